"""A timeline of the offload ring: each streamed block's copy and compute, per forward.

``handle.recording()`` turns the scheduler's recording on (``scheduler.trace``: a list of
``Span``); ``handle.timeline(path)`` turns the spans into a Chrome trace / Perfetto JSON
(``{"traceEvents": [...]}``, ``"ph": "X"`` complete events on two rows, ``copy`` and
``compute``, named after the blocks), which ``plot`` draws as a PNG: copy bars above
compute bars, the exposed waits (compute stalled on its copy) marked in red.

Times are wall clock (``time.perf_counter``) on a synchronous device, where the scheduler
reads the clock around each copy and block. On an asynchronous one (CUDA) they are timing
events recorded on the copy and compute streams, resolved against one base event only when
the timeline is built, so recording never synchronises the device. A device whose events
carry no time (the test device ``strata.testing.sim``) gets issue order instead, said in
``otherData.clock``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from strata.errors import StrataError

# Whether a torch profiler is recording: a C call of ~0.1 us, where an idle record_function costs
# microseconds; the ring and the KV connector open their ranges only while this says yes.
profiling = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None) or (
    lambda: torch.autograd.profiler._is_profiler_enabled)

PID, COPY_TID, COMPUTE_TID = 1, 1, 2
ROWS = {COPY_TID: "copy", COMPUTE_TID: "compute"}


class TimelineError(StrataError, RuntimeError):
    """A timeline was asked for that cannot be made (nothing recorded, no matplotlib, not a trace)."""


class Span:
    """One copy or one block's compute, as the scheduler saw it. Times are ``perf_counter``
    seconds (synchronous device) or recorded timing events (asynchronous device); ``arrive``
    is when compute reached the block, ``start`` when it could run (its copy had landed)."""

    __slots__ = ("kind", "block", "forward", "nbytes", "arrive", "start", "end", "copy", "seq")

    def __init__(self, kind: str, block: int, forward: int, seq: int, nbytes: int = 0, start=None):
        self.kind, self.block, self.forward, self.seq, self.nbytes = kind, block, forward, seq, nbytes
        self.arrive = self.start = start
        self.end = None
        self.copy: Span | None = None  # compute spans: the copy that filled the block's slot


def _clock(spans: list[Span], base, asynchronous: bool):
    """(name of the clock, function span time -> microseconds since the recording began)."""
    if not asynchronous:
        return "wall", lambda t: (t - base) * 1e6
    ms = [base.elapsed_time(t) for s in spans for t in (s.start, s.end) if t is not None]
    if any(ms):
        return "device events", lambda t: base.elapsed_time(t) * 1e3
    # no time in the events: lay the spans out in the order they were issued
    order = {}
    for s in spans:
        for k, t in enumerate((s.arrive, s.start, s.end)):
            if t is not None:
                order.setdefault(id(t), 3 * s.seq + k)
    return "issue order", lambda t: float(order[id(t)])


def build(spans: list[Span], base, asynchronous: bool, names: list[str], forwards: int | None = None,
          device: str = "") -> dict:
    """The Chrome trace of the computes in ``spans`` (the first ``forwards`` forwards, or all) and the
    copies that fed them. A copy issued before the recording began, or prefetched for a forward that
    was not recorded, is left out: every copy event has exactly one compute event after it."""
    computes = [s for s in spans if s.kind == "compute" and s.end is not None]
    first = computes[0].forward if computes else 0  # forwards count from 0 in the trace
    if forwards is not None:
        computes = [s for s in computes if s.forward - first < forwards]
    used = [s for c in computes for s in (c.copy, c) if s is not None]
    clock, us = _clock(used, base, asynchronous)
    events: list[dict] = [
        {"ph": "M", "name": "process_name", "pid": PID, "args": {"name": f"strata offload {device}".strip()}}]
    for tid, row in ROWS.items():
        events.append({"ph": "M", "name": "thread_name", "pid": PID, "tid": tid, "args": {"name": row}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": PID, "tid": tid, "args": {"sort_index": tid}})
    for c in computes:
        if c.copy is not None:
            t0, t1 = us(c.copy.start), us(c.copy.end)
            events.append({"name": names[c.block], "cat": "copy", "ph": "X", "pid": PID, "tid": COPY_TID,
                           "ts": t0, "dur": max(t1 - t0, 0.0),
                           "args": {"bytes": c.copy.nbytes, "forward": c.forward - first}})
        t0, t1, arrive = us(c.start), us(c.end), us(c.arrive)
        events.append({"name": names[c.block], "cat": "compute", "ph": "X", "pid": PID, "tid": COMPUTE_TID,
                       "ts": t0, "dur": max(t1 - t0, 0.0),
                       "args": {"forward": c.forward - first, "exposed_wait_us": max(t0 - arrive, 0.0)}})
    low = min((e["ts"] for e in events if e["ph"] == "X"), default=0.0)
    if low < 0:  # a copy stream's event may precede time zero, recorded on the compute stream
        for e in events:
            if e["ph"] == "X":
                e["ts"] -= low
    n = computes[-1].forward - first + 1 if computes else 0
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"producer": "strata", "clock": clock, "device": device, "forwards": n}}


def write(trace: dict, path: "str | os.PathLike") -> Path:
    path = Path(path)
    if path.parent != Path("."):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace, indent=None, separators=(",", ":")))
    return path


def load(trace_path: "str | os.PathLike") -> dict:
    """A trace ``handle.timeline`` wrote, checked enough to draw it."""
    try:
        trace = json.loads(Path(trace_path).read_text())
    except FileNotFoundError:
        raise TimelineError(f"trace: {str(trace_path)!r} does not exist; write one with handle.timeline(path)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TimelineError(f"trace: {str(trace_path)!r} is not a JSON trace ({e})") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise TimelineError(f"trace: {str(trace_path)!r} has no 'traceEvents' list; allowed: a Chrome trace "
                            "written by handle.timeline(path)")
    return trace


def plot(trace_path: "str | os.PathLike", out_png: "str | os.PathLike", title: str | None = None) -> Path:
    """Draw the trace at ``trace_path`` as ``out_png``: copy bars above compute bars, one colour per
    row, the exposed waits (compute held up by its copy) in red. Needs matplotlib (``strata[plot]``)."""
    trace = load(trace_path)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise TimelineError("strata plot needs matplotlib: pip install 'strata[plot]'") from None
    rows = {"copy": [], "compute": [], "wait": []}
    starts: dict[int, float] = {}  # forward -> when its first compute or copy began
    for e in trace["traceEvents"]:
        if e.get("ph") != "X" or e.get("cat") not in ("copy", "compute"):
            continue
        ts, dur = float(e["ts"]) / 1e3, float(e["dur"]) / 1e3  # ms
        rows[e["cat"]].append((ts, dur, e["name"]))
        fwd = e.get("args", {}).get("forward", 0)
        starts[fwd] = min(starts.get(fwd, ts), ts)
        wait = float(e.get("args", {}).get("exposed_wait_us", 0.0)) / 1e3
        if e["cat"] == "compute" and wait > 0:
            rows["wait"].append((ts - wait, wait, ""))
    if not rows["compute"]:
        raise TimelineError(f"trace: {str(trace_path)!r} has no compute events to draw")
    clock = trace.get("otherData", {}).get("clock", "wall")
    fig = Figure(figsize=(10, 2.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = {"copy": 1.0, "compute": 0.0, "wait": 0.0}
    colour = {"copy": "tab:blue", "compute": "tab:green", "wait": "tab:red"}
    for row, bars in rows.items():
        if bars:
            ax.broken_barh([(t, max(d, 1e-6)) for t, d, _ in bars], (y[row] - 0.35, 0.7), facecolors=colour[row],
                           edgecolor="white" if row != "wait" else "darkred", linewidth=0.5,
                           hatch="////" if row == "wait" else None)
    every = [(t, t + d) for bars in rows.values() for t, d, _ in bars]
    wide = 0.03 * (max(e for _, e in every) - min(t for t, _ in every))  # a bar wide enough to name
    for row in ("copy", "compute"):
        for t, d, name in rows[row]:
            if d >= wide:
                ax.text(t + d / 2, y[row], name.rsplit(".", 1)[-1], ha="center", va="center", fontsize=7,
                            color="white", clip_on=True)
    for fwd, t in sorted(starts.items())[1:]:
        ax.axvline(t, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yticks([0, 1], ["compute", "copy"])
    ax.set_ylim(-0.6, 1.6)
    ax.set_xlabel("issue order" if clock == "issue order" else "ms")
    forwards = trace.get("otherData", {}).get("forwards", len(starts))
    ax.set_title(title or f"strata offload: {forwards} forward(s), {clock} clock", fontsize=10)
    ax.legend(handles=[Patch(color=colour["copy"], label="copy"), Patch(color=colour["compute"], label="compute"),
                       Patch(facecolor=colour["wait"], hatch="////", edgecolor="darkred", label="exposed wait")],
              loc="upper right", fontsize=7, ncol=3, frameon=False, bbox_to_anchor=(1.0, 1.3))
    fig.tight_layout()
    out = Path(out_png)
    if out.parent != Path("."):
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
