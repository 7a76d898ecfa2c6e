"""The offload timeline (handle.recording / handle.timeline / strata plot) and the profiler ranges."""

import json

import pytest
import torch

import strata
from strata import streams, timeline
from strata.errors import OffloadError
from strata.testing.sim import SimStreams
from tiny_models import VOCAB, make

LAYERS = 5


def offloaded(layers=LAYERS, prefetch=1):
    model = make("llama", layers=layers)
    handle = strata.offload(model, device="cpu", prefetch=prefetch, progress=False)
    return model, handle


def rows(trace):
    """(copy events, compute events) of a trace, in time order."""
    xs = sorted((e for e in trace["traceEvents"] if e["ph"] == "X"), key=lambda e: e["ts"])
    return [e for e in xs if e["cat"] == "copy"], [e for e in xs if e["cat"] == "compute"]


def check_per_block(trace, names, forwards):
    """One copy and one compute per streamed block per forward, blocks in order, each compute
    starting once its own copy has ended."""
    copies, computes = rows(trace)
    assert [e["name"] for e in computes] == names * forwards
    assert [e["name"] for e in copies] == names * forwards
    assert [e["args"]["forward"] for e in computes] == [f for f in range(forwards) for _ in names]
    for copy, compute in zip(copies, computes):
        assert copy["name"] == compute["name"] and copy["args"]["forward"] == compute["args"]["forward"]
        assert compute["ts"] >= copy["ts"] + copy["dur"]
        assert copy["args"]["bytes"] > 0 and compute["args"]["exposed_wait_us"] >= 0
    for a, b in zip(computes, computes[1:]):
        assert b["ts"] >= a["ts"] + a["dur"]  # one compute stream: blocks one after another


@pytest.mark.parametrize("forwards", [1, 2])
def test_a_cpu_recording_has_one_copy_and_one_compute_per_block_per_forward(tmp_path, forwards):
    model, handle = offloaded()
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        model(ids)  # not recorded
        with handle.recording():
            for _ in range(forwards):
                model(ids)
        model(ids)  # not recorded either
    path = tmp_path / "trace.json"
    trace = handle.timeline(path)
    assert json.loads(path.read_text()) == trace
    names = [handle.names[b] for b in handle.plan.offloaded]
    assert len(names) == LAYERS
    check_per_block(trace, names, forwards)
    assert trace["otherData"]["clock"] == "wall" and trace["otherData"]["forwards"] == forwards
    meta = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert meta == {timeline.COPY_TID: "copy", timeline.COMPUTE_TID: "compute"}
    if forwards == 2:
        check_per_block(handle.timeline(forwards=1), names, 1)
    handle.detach()


def test_recording_a_generate_call_records_every_forward():
    model, handle = offloaded(layers=3)
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad(), handle.recording():
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    names = [handle.names[b] for b in handle.plan.offloaded]
    check_per_block(handle.timeline(), names, 3)
    handle.detach()


def test_nothing_is_recorded_outside_a_recording_and_misuse_is_refused(tmp_path):
    model, handle = offloaded(layers=3)
    ids = torch.randint(0, VOCAB, (1, 6))
    with pytest.raises(OffloadError, match="nothing recorded"):
        handle.timeline()
    with torch.no_grad():
        model(ids)
    assert handle.scheduler.trace is None and not handle.scheduler._trace_copy
    with handle.recording():
        with pytest.raises(OffloadError, match="already recording"):
            with handle.recording():
                pass
    with pytest.raises(OffloadError, match="forwards: got 0"):
        handle.timeline(forwards=0)
    with pytest.raises(OffloadError, match=r"path: cannot write the timeline to .* \(Is a directory\)"):
        handle.timeline(tmp_path)  # was a bare IsADirectoryError
    assert handle.scheduler.trace is None
    handle.detach()
    # a detached handle says so (its placement spoke of blocks "streamed from the store") and records nothing
    assert handle.placement().startswith("detached: ") and "detached" in repr(handle)
    with pytest.raises(OffloadError, match="recording: this handle is detached"):
        with handle.recording():
            pass


def test_the_sim_device_lays_the_spans_out_in_issue_order():
    """The test device's events carry no time: the timeline falls back to issue order, still one
    copy then one compute per block."""
    with streams.use(SimStreams("late", 0)):
        model, handle = offloaded(layers=4)
        with torch.no_grad(), handle.recording():
            model(torch.randint(0, VOCAB, (1, 6)))
        trace = handle.timeline()
        handle.detach()
    assert trace["otherData"]["clock"] == "issue order"
    check_per_block(trace, [handle.names[b] for b in handle.plan.offloaded], 1)


def recorded_trace(tmp_path):
    """A trace.json of one recorded forward of a 3-layer model."""
    model, handle = offloaded(layers=3)
    with torch.no_grad(), handle.recording():
        model(torch.randint(0, VOCAB, (1, 6)))
    trace = tmp_path / "trace.json"
    handle.timeline(trace)
    handle.detach()
    return trace


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    trace = recorded_trace(tmp_path)
    png = timeline.plot(trace, tmp_path / "out" / "timeline.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(timeline.TimelineError, match="does not exist"):
        timeline.plot(tmp_path / "missing.json", tmp_path / "x.png")
    (tmp_path / "bad.json").write_text('{"not": "a trace"}')
    with pytest.raises(timeline.TimelineError, match="traceEvents"):
        timeline.plot(tmp_path / "bad.json", tmp_path / "x.png")


def test_strata_plot_command_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from strata import cli

    trace = recorded_trace(tmp_path)
    png = tmp_path / "timeline.png"
    assert cli.main(["plot", str(trace), "-o", str(png)]) in (0, None)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torch_profiler_sees_the_ring_copies_only_while_it_runs():
    model, handle = offloaded(layers=3)
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        model(ids)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(ids)
    names = [e.name for e in prof.events()]
    copies = [n for n in names if n.startswith("strata.copy ")]
    assert len(copies) == 3 and set(copies) == {f"strata.copy {handle.names[b]}" for b in handle.plan.offloaded}
    assert handle.scheduler._ranges  # the last block saw the profiler
    with torch.no_grad():
        model(ids)
    assert not handle.scheduler._ranges  # no profiler, no ranges
    handle.detach()
