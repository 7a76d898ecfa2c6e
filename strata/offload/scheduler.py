"""The layer-ahead prefetch scheduler: a fixed ring of device buffers fed from the store.

Offloaded blocks have positions in execution order. Before block *i* runs, its own
copy and the copies of the next ``prefetch`` offloaded blocks are issued, each into
the least recently filled ring slot that holds none of them, on a side CUDA stream
(each copy waits, on the GPU, for the slot's previous user to finish); the compute
stream waits on block *i*'s copy event and the block's parameters are pointed at
views into its slot (built once per block layout and slot). After it runs, the
slot's compute event is recorded and the parameters go back to placeholders. No
allocation and no host synchronisation per block. Every stream, event and copy goes
through the device seam (``strata.streams``): on CUDA they are CUDA's; without it the
same steps run synchronously; under the test device (``strata.testing.sim``) copies run
as late or as early as the recorded waits allow, so a missing wait is caught on a CPU.

Three index spaces, never mixed: a block's index among all blocks (``i``, ``b``: the hooks' and
``layouts``' numbering), its position among the offloaded blocks in execution order (``q``,
``pos``: ``pos_of[b]``, ``offloaded[q]``, the store's ``keys[q]``), and a ring buffer (``slot``).
Position to slot is ``slot_of``, slot to position ``slot_pos``, a running block to its slot ``_bound``.

Observability costs nothing unless asked for: while ``trace`` is a list (``handle.recording()``)
each copy and each streamed block's compute is recorded as a ``strata.timeline.Span`` (clock
reads here, timing events on an asynchronous device); the copy issue and the compute stream's
wait are ``strata.copy <block>`` / ``strata.wait <block>`` ranges for ``torch.profiler`` only
while a profiler is on (``record_function`` costs microseconds even with none), and NVTX
ranges on CUDA (for Nsight Systems).
"""

from __future__ import annotations

import time
from collections import deque

import torch

from strata import streams
from strata.errors import OffloadError
from strata.hooks import ModuleHook
from strata.keys import Key
from strata.offload.blocks import Uncopyable
from strata.offload.packing import BlockLayout
from strata.timeline import Span, profiling as _profiling


def harvest(samples: deque, block: bool):
    """(block, copy seconds, exposed seconds or None) of each finished timing sample
    ``[block, copy start, copy end, compute arrival]`` (CUDA events), oldest first, popped from
    ``samples``. Exposed is how long compute arrived before the copy ended. A sample whose copy or
    arrival is still pending stops a non-blocking harvest; a blocking one waits for it (a copy whose
    block has not run yet counts as hidden)."""
    while samples:
        b, start, end, arrive = samples[0]
        if not block and (arrive is None or not end.query() or not arrive.query()):
            return
        end.synchronize()
        samples.popleft()
        exposed = None
        if arrive is not None:
            arrive.synchronize()
            exposed = max(0.0, arrive.elapsed_time(end) / 1e3)
        yield b, start.elapsed_time(end) / 1e3, exposed


class RingAccounting(Uncopyable):
    """What both rings (this one and ``static.StaticRing``) report: copies, bytes, copy seconds and
    the part of them compute waited for, per block, from timing samples harvested lazily."""

    def _harvest(self, block: bool) -> None:
        for b, copy_s, exposed in harvest(self._samples, block):
            self.copy_seconds += copy_s
            if exposed is not None:
                self.exposed_seconds += exposed
                self.wait_by_block[b] += exposed

    def _ring_stats(self) -> dict:
        """The counters, once every timing sample issued so far is harvested (a device sync)."""
        if self.asynchronous and self.timing:
            self.dev.synchronize(self.device)
            self._harvest(block=True)
        return {
            "forwards": self.forwards,
            "copies": self.copies,
            "bytes_streamed": self.bytes_streamed,
            "copy_seconds": self.copy_seconds,
            "exposed_wait_seconds": self.exposed_seconds,
            "hidden_copy_seconds": max(0.0, self.copy_seconds - self.exposed_seconds),
            "wait_seconds_by_block": {self.names[b]: self.wait_by_block[b] for b in self.offloaded},
            "ring_slots": self.slots,
            "ring_bytes": sum(r.numel() for r in self.ring),
        }


class BlockHook(ModuleHook, Uncopyable):
    def __init__(self, scheduler: "PrefetchScheduler", index: int):
        self.scheduler, self.index = scheduler, index

    def pre_forward(self, module, args, kwargs):
        self.scheduler.before(self.index)
        return args, kwargs

    def post_forward(self, module, output):
        self.scheduler.after(self.index)
        return output


class PrefetchScheduler(RingAccounting):
    def __init__(self, store, device: torch.device, names: list[str], layouts: list[BlockLayout],
                 keys: dict[int, Key], offloaded: tuple[int, ...], slots: int, slot_bytes: int,
                 prefetch: int, timing: bool = True):
        self.store, self.device, self.names, self.layouts = store, device, names, layouts
        self.offloaded = offloaded
        self.pos_of = {b: q for q, b in enumerate(offloaded)}
        self.n = len(offloaded)
        self.slots = slots
        self.lookahead = min(prefetch, max(self.n - 1, 0))
        self.dev = streams.active()  # the device seam: CUDA, the host, or a test device
        self.asynchronous = self.dev.is_async_device(device)
        self.keys = [keys[b] for b in offloaded]
        # next offloaded position at or after each block index (cyclic: the last block prefetches
        # the first ones of the next forward)
        n_blocks = len(layouts)
        self.next_pos = [0] * n_blocks
        nxt = 0
        for i in range(n_blocks - 1, -1, -1):
            if i in self.pos_of:
                nxt = self.pos_of[i]
            self.next_pos[i] = nxt
        self.ring = [self.dev.device_empty(slot_bytes, device) for _ in range(slots)]
        self._views: dict[tuple, list[torch.Tensor]] = {}  # (layout signature, slot) -> typed views
        self._dest: dict[tuple, torch.Tensor] = {}  # (nbytes, slot) -> the slot's first nbytes
        for b in offloaded:
            for slot in range(slots):
                self._views.setdefault((layouts[b].signature, slot), layouts[b].views(self.ring[slot]))
                self._dest.setdefault((layouts[b].nbytes, slot), self.ring[slot][: layouts[b].nbytes])
        self.placeholders = {b: layouts[b].placeholders(device) for b in offloaded}
        self.slot_pos = [-1] * slots  # which position each slot holds (or is receiving)
        self.slot_of: dict[int, int] = {}  # position -> slot
        self._bound: dict[int, int] = {}  # block index -> slot, while the block runs
        self._fill_order = deque(range(slots))  # least recently filled slot first
        if self.asynchronous:
            self.copy_stream = self.dev.new_stream(device)
            self.copy_done = [self.dev.event() for _ in range(slots)]
            self.compute_done = [self.dev.event() for _ in range(slots)]
        self.timing = timing
        self._samples: deque = deque()  # [block, copy start, copy end, compute arrival] CUDA events
        self._last_copy: dict[int, list] = {}  # position -> its latest copy's sample
        # counters
        self.copies = 0
        self.bytes_streamed = 0
        self.forwards = 0
        self.copy_seconds = 0.0
        self.exposed_seconds = 0.0
        self.wait_by_block = [0.0] * n_blocks
        self.copies_by_block = [0] * n_blocks
        # observability: a timeline only while recording, ranges only while someone listens
        self.trace: list[Span] | None = None
        self._trace_base = None  # the recording's time zero: perf_counter seconds or a timing event
        self._trace_copy: dict[int, Span] = {}  # position -> the recorded copy that filled its slot
        self._trace_open: dict[int, Span] = {}  # block index -> its compute span, while it runs
        self._copy_wall: dict[int, tuple] = {}  # synchronous device: position -> (block, start, end) of its copy
        self._nvtx = self.asynchronous and isinstance(self.dev, streams.CudaStreams)
        self._ranges = False

    # -- the hot path ------------------------------------------------------------------------
    def before(self, i: int) -> None:
        tr = self.trace
        arrived = time.perf_counter() if tr is not None and not self.asynchronous else None
        self._ranges = self._nvtx or _profiling()
        if i == 0:
            self.forwards += 1
        if self._bound:  # a forward that raised left blocks bound: close them as if they had run
            for j in list(self._bound):
                self.after(j)
        q = self.pos_of.get(i)
        if q is None:  # a resident block: no slot is in use, fill the whole ring ahead
            window = [(self.next_pos[i] + k) % self.n for k in range(self.slots)]
        else:
            window = [(q + k) % self.n for k in range(self.lookahead + 1)]
        for pos in window:
            self._ensure(pos, window)
        if q is None:
            return
        slot = self.slot_of[q]
        span = None
        if tr is not None:
            span = self._trace_compute(i, q, arrived, tr)
        elif not self.asynchronous:
            self._copy_wall.pop(q, None)
        if self.asynchronous:
            stream = self.dev.current_stream(self.device)
            sample = self._last_copy.pop(q, None)
            if sample is not None:  # when did compute arrive here, against when the copy ended
                sample[3] = self.dev.event(timing=True)
                sample[3].record(stream)
            if span is not None:
                span.arrive = self.dev.event(timing=True)
                span.arrive.record(stream)
            rng = self._range_open("wait", i) if self._ranges else None
            self._await_copy(stream, slot)
            if rng is not None:
                self._range_close(rng)
            if span is not None:
                span.start = self.dev.event(timing=True)
                span.start.record(stream)
        self.layouts[i].bind(self._views[(self.layouts[i].signature, slot)])
        self._bound[i] = slot
        if span is not None:
            if not self.asynchronous:
                span.start = time.perf_counter()
            self._trace_open[i] = span

    def after(self, i: int) -> None:
        slot = self._bound.pop(i, None)
        if slot is None:
            return
        span = self._trace_open.pop(i, None) if self._trace_open else None
        if self.asynchronous:
            self.compute_done[slot].record(self.dev.current_stream(self.device))
            if span is not None:
                span.end = self.dev.event(timing=True)
                span.end.record(self.dev.current_stream(self.device))
            if self.timing and len(self._samples) > 256:
                self._harvest(block=False)
        elif span is not None:
            span.end = time.perf_counter()
        self.layouts[i].bind(self.placeholders[i])

    def _ensure(self, q: int, window: list[int]) -> None:
        """Make sure position ``q``'s bytes are in (or on their way to) a slot, never evicting
        a position of ``window`` (the running block and the ones prefetched for it)."""
        if q in self.slot_of:
            return
        slot = self._victim(window)
        self._fill_order.remove(slot)
        self._fill_order.append(slot)
        self.slot_of.pop(self.slot_pos[slot], None)
        self.slot_pos[slot] = -1
        b = self.offloaded[q]
        dest = self._dest[(self.layouts[b].nbytes, slot)]
        rng = self._range_open("copy", b) if self._ranges else None
        try:
            ok = self._issue_copy(q, b, slot, dest)
        finally:
            if rng is not None:
                self._range_close(rng)
        if not ok:
            raise OffloadError(
                f"block {self.names[b]}: its weights are not in the store any more (evicted with no lower "
                f"tier to keep them, or a tier failed); see store.stats()")
        self.slot_pos[slot] = q
        self.slot_of[q] = slot
        self.copies += 1
        self.copies_by_block[b] += 1
        self.bytes_streamed += self.layouts[b].nbytes

    def _issue_copy(self, q: int, b: int, slot: int, dest: torch.Tensor) -> bool:
        """Copy position ``q`` (block ``b``) from the store into ``slot``: on the copy stream after
        the slot's previous user where the device is asynchronous, at once otherwise."""
        tr = self.trace
        if self.asynchronous:
            with self.dev.stream(self.copy_stream):
                self._after_previous_user(slot)
                start = end = None
                if self.timing or tr is not None:
                    start, end = self.dev.event(timing=True), self.dev.event(timing=True)
                    start.record(self.copy_stream)
                ok = self.store.get_into(self.keys[q], dest)
                if end is not None:
                    end.record(self.copy_stream)
                    if self.timing:
                        sample = [b, start, end, None]  # the arrival event is filled in by before()
                        self._samples.append(sample)
                        self._last_copy[q] = sample
                self.copy_done[slot].record(self.copy_stream)
        else:
            start = time.perf_counter()
            ok = self.store.get_into(self.keys[q], dest)
            end = time.perf_counter()
            self._copy_wall[q] = (b, start, end)  # for a recording that begins before block b runs
            dt = end - start
            self.copy_seconds += dt
            self.exposed_seconds += dt  # synchronous: nothing hides it
            self.wait_by_block[b] += dt
        if tr is not None:
            span = Span("copy", b, self.forwards, len(tr), self.layouts[b].nbytes, start=start)
            span.end = end
            tr.append(span)
            self._trace_copy[q] = span
        return ok

    def _trace_compute(self, i: int, q: int, arrived: float | None, tr: list[Span]) -> Span:
        """Block ``i``'s compute span, linked to the copy that filled its slot: one recorded, or one
        issued before the recording began (prefetched by the forward before), from the times kept
        for it anyway (the wall clock here, the copy's timing sample on an asynchronous device)."""
        copy = self._trace_copy.pop(q, None)
        earlier = self._last_copy.get(q) if self.asynchronous else self._copy_wall.pop(q, None)
        if copy is None and earlier is not None:
            b = self.offloaded[q]
            copy = Span("copy", b, self.forwards, len(tr), self.layouts[b].nbytes, start=earlier[1])
            copy.end = earlier[2]
            tr.append(copy)
        span = Span("compute", i, self.forwards, len(tr), start=arrived)
        span.copy = copy
        tr.append(span)
        return span

    def _range_open(self, what: str, b: int) -> tuple:
        """Open the ``strata.<what> <block>`` range: NVTX on CUDA, torch.profiler while one records."""
        name = f"strata.{what} {self.names[b]}"
        if self._nvtx:
            torch.cuda.nvtx.range_push(name)
        rf = None
        if _profiling():
            rf = torch.profiler.record_function(name)
            rf.__enter__()
        return (rf,)

    def _range_close(self, rng: tuple) -> None:
        if rng[0] is not None:
            rng[0].__exit__(None, None, None)
        if self._nvtx:
            torch.cuda.nvtx.range_pop()

    # -- timeline (strata.timeline) ----------------------------------------------------------
    def start_trace(self) -> None:
        """Record a Span per copy and per streamed block's compute from now on; time zero now."""
        if self.asynchronous:
            self._trace_base = self.dev.event(timing=True)
            self._trace_base.record(self.dev.current_stream(self.device))
        else:
            self._trace_base = time.perf_counter()
        self._trace_copy.clear()
        self._trace_open.clear()
        self.trace = []

    def stop_trace(self) -> tuple[list[Span], object]:
        """Stop recording: (the spans, time zero), for ``strata.timeline.build``."""
        spans, self.trace = self.trace or [], None
        self._trace_copy.clear()
        self._trace_open.clear()
        return spans, self._trace_base

    def _await_copy(self, stream, slot: int) -> None:
        """The compute ``stream`` waits (on the device) for the copy into ``slot``."""
        stream.wait_event(self.copy_done[slot])

    def _after_previous_user(self, slot: int) -> None:
        """The copy stream waits (on the device) until the block that last ran from ``slot`` is done."""
        self.copy_stream.wait_event(self.compute_done[slot])

    def _victim(self, window: list[int]) -> int:
        """The least recently filled slot that holds no position of ``window``."""
        for slot in self._fill_order:
            if self.slot_pos[slot] not in window:
                return slot
        raise RuntimeError("strata: prefetch window larger than the ring")  # the plan never allows it

    # -- accounting ------------------------------------------------------------------------
    def stats(self) -> dict:
        return self._ring_stats()

    def close(self) -> None:
        if self.asynchronous:
            self.dev.synchronize(self.device)
        self.ring = []
        self._dest.clear()
        self._views.clear()
