"""The static ring: streamed blocks whose parameters never move, for torch.compile and CUDA graphs.

The hook ring (``scheduler.py``) points a block's parameters at whichever slot its bytes
landed in, just before it runs. A compiled graph cannot follow that: dynamo guards on the
tensors it traced, and a CUDA graph replays the addresses it captured. Here every streamed
block is given one slot for good (its parameters are views into it from offload to
detach), the source of every copy is a lease held for the ring's life (the block's bytes
in a memory tier, which cannot move while leased), and what runs per block is one
operation, ``enter(q)``, issued as the custom op ``strata::enter`` (``ops.py``) from a
wrapper of the block's ``forward``:

1. issue the copies the window needs: position ``q + lookahead`` (and any position of the
   window not in its slot yet), each on the copy stream after an event recorded on the
   compute stream now, when every block before ``q`` (the slot's previous user among them)
   has been issued;
2. make the compute stream wait for block ``q``'s copy.

Which slot a position gets: the cyclic sequence of streamed positions is cut into rounds
of at least ``lookahead + 1`` positions and each round uses slots 0, 1, ... in order, so any
``lookahead + 1`` consecutive positions (the window, across the forward's end as well) sit
in distinct slots. With ``n`` positions a multiple of ``lookahead + 1`` that is the usual
``lookahead + 1`` slots; otherwise at most ``ceil(n / (n // (lookahead + 1)))``.

Under CUDA-graph capture (vLLM's compiled mode) the copies and waits are captured with the
rest: a wait for a copy issued before the capture began is skipped (the caller drains the
copy stream first: ``sync``), copies issued inside a capture are joined back into the
capturing stream at its end (``join``). Replays run the same copies and waits with no
Python, so the counters here count what was issued from Python only, and copy times (CUDA
timing events, as the hook ring takes them) come from copies issued outside a capture.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque

import torch

from strata import streams
from strata.errors import OffloadError
from strata.keys import Key
from strata.offload.packing import BlockLayout
from strata.offload.scheduler import RingAccounting


def round_lengths(n: int, lookahead: int) -> list[int]:
    """``n`` cut into as many rounds as possible, each at least ``lookahead + 1`` long, evenly."""
    if n <= 0:
        return []
    rounds = max(1, n // (lookahead + 1))
    base, extra = divmod(n, rounds)
    return [base + 1] * extra + [base] * (rounds - extra)


def slot_plan(n: int, lookahead: int) -> list[int]:
    """The slot of each of ``n`` streamed positions (see the module docstring)."""
    return [s for length in round_lengths(n, lookahead) for s in range(length)]


def static_slots(n: int, prefetch: int) -> int:
    """How many slots the static ring needs for ``n`` streamed blocks copied ``prefetch`` ahead."""
    if n <= 0:
        return 0
    return max(round_lengths(n, min(prefetch, n - 1)))


class StaticRing(RingAccounting):
    """Fixed slots, leased sources and one ``enter`` per streamed block (see the module docstring)."""

    static = True

    def __init__(self, store, device: torch.device, names: list[str], layouts: list[BlockLayout],
                 keys: dict[int, Key], offloaded: tuple[int, ...], slot_bytes: int, prefetch: int,
                 timing: bool = True):
        self.store, self.device, self.names, self.layouts = store, device, names, layouts
        self.offloaded = offloaded
        self.n = len(offloaded)
        self.lookahead = min(prefetch, max(self.n - 1, 0))
        self.slot_of = slot_plan(self.n, self.lookahead)
        self.slots = max(self.slot_of) + 1 if self.slot_of else 0
        self.dev = streams.active()
        self.asynchronous = self.dev.is_async_device(device)
        self._leases = contextlib.ExitStack()
        self.sources = self._lease([keys[b] for b in offloaded])
        self.ring = [self.dev.device_empty(slot_bytes, device) for _ in range(self.slots)]
        views: dict[tuple, list[torch.Tensor]] = {}
        self.dest: list[torch.Tensor] = []
        for q, b in enumerate(offloaded):
            slot, layout = self.slot_of[q], layouts[b]
            layout.bind(views.setdefault((layout.signature, slot), layout.views(self.ring[slot])))
            self.dest.append(self.ring[slot][: layout.nbytes])
        self.slot_pos = [-1] * self.slots  # the position each slot holds or is receiving
        if self.asynchronous:
            self.copy_stream = self.dev.new_stream(device)
            self.copy_done = [self.dev.event() for _ in range(self.slots)]
            self.free = [self.dev.event() for _ in range(self.slots)]
        self.captured = [False] * self.slots  # the slot's copy was issued inside a capture, not joined yet
        self.eager_event = [True] * self.slots  # copy_done was recorded outside a capture (waitable eagerly)
        self.copies = 0
        self.bytes_streamed = 0
        self.forwards = 0
        self.copy_seconds = 0.0
        self.exposed_seconds = 0.0  # on the host device every copy is exposed
        self.wait_by_block = [0.0] * len(layouts)
        self.timing = timing and self.asynchronous
        self._samples: deque = deque()  # [block, copy start, copy end, compute arrival] timing events
        self._last_copy: dict[int, list] = {}  # position -> its latest timed copy's sample
        self.closed = False
        for q in range(min(self.lookahead, self.n)):  # the first forward's window, as every later one finds it
            self._ensure(q, self.dev.current_stream(device), False)

    def _lease(self, keys: list[Key]) -> list[torch.Tensor]:
        """The blocks' bytes, leased in a memory tier until ``close``: addresses that never change."""
        views = self._leases.enter_context(self.store.lease_many(keys, copies=False))
        missing = [self.names[b] for b, v in zip(self.offloaded, views) if v is None]
        if missing:
            self._leases.close()
            raise OffloadError(
                f"static=True: blocks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} are not in a "
                f"memory tier of {self.store!r}; compiled graphs copy from fixed host addresses, which only a cpu or "
                "cxl tier gives (leased for the model's life). Allowed: a store whose tiers begin with cpu or cxl "
                "with room for the streamed weights, or static=False (eager streaming, which also works from file "
                "and redis tiers)")
        return [v.as_subclass(torch.Tensor) for v in views]

    # -- the hot path: one call per streamed block, from the strata::enter op --------------------
    def enter(self, q: int) -> None:
        if self.closed:
            raise OffloadError(f"block {self.names[self.offloaded[q]]}: the model was detached from the store; "
                               "call strata.offload again to stream it")
        if q == 0:
            self.forwards += 1
        stream = self.dev.current_stream(self.device)
        capturing = self.dev.capturing()
        for k in range(self.lookahead + 1):
            self._ensure((q + k) % self.n, stream, capturing)
        if self.asynchronous:
            sample = self._last_copy.pop(q, None) if not capturing else None
            if sample is not None:  # when compute arrived here, against when the copy ended
                sample[3] = self.dev.event(timing=True)
                sample[3].record(stream)
            self._await_copy(self.slot_of[q], stream, capturing)
            if len(self._samples) > 256:
                self._harvest(block=False)

    def _ensure(self, q: int, stream, capturing: bool) -> None:
        """Position ``q``'s bytes are in its slot or on their way, issued after every block the
        compute ``stream`` has been given so far (the slot's previous user among them)."""
        slot = self.slot_of[q]
        if self.slot_pos[slot] == q:
            return
        b = self.offloaded[q]
        if self.asynchronous:
            self.free[slot].record(stream)
            timed = self.timing and not capturing
            with self.dev.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[slot])
                if timed:
                    start, end = self.dev.event(timing=True), self.dev.event(timing=True)
                    start.record(self.copy_stream)
                self.dev.copy(self.dest[q], self.sources[q], non_blocking=True)
                if timed:
                    end.record(self.copy_stream)
                    self._last_copy[q] = sample = [b, start, end, None]
                    self._samples.append(sample)
                self.copy_done[slot].record(self.copy_stream)
            self.captured[slot] = capturing
            self.eager_event[slot] = not capturing
        else:
            start = time.perf_counter()
            self.dev.copy(self.dest[q], self.sources[q])
            dt = time.perf_counter() - start
            self.copy_seconds += dt
            self.exposed_seconds += dt
            self.wait_by_block[b] += dt
        self.slot_pos[slot] = q
        self.copies += 1
        self.bytes_streamed += self.layouts[b].nbytes

    def _await_copy(self, slot: int, stream, capturing: bool) -> None:
        """The compute ``stream`` waits for the copy into ``slot``. Inside a capture, a copy issued
        before it began is not waited on (``sync`` drained it); outside, an event last recorded
        inside a capture cannot be waited on, so the whole copy stream is."""
        if capturing:
            if self.captured[slot]:
                stream.wait_event(self.copy_done[slot])
                self.captured[slot] = False
        elif self.eager_event[slot]:
            stream.wait_event(self.copy_done[slot])
        else:
            self._wait_copy_stream(stream)

    def _wait_copy_stream(self, stream) -> None:
        done = self.dev.event()
        done.record(self.copy_stream)
        stream.wait_event(done)

    # -- around CUDA-graph capture (vLLM calls these through strata.integrations.vllm_offloader) -
    def sync(self) -> None:
        """The compute stream waits for every copy issued so far (before a capture or a replay)."""
        if self.asynchronous and not self.closed:
            self._wait_copy_stream(self.dev.current_stream(self.device))

    def join(self) -> None:
        """Join the copies issued inside the capture that are still unjoined (the first blocks of the
        next forward, prefetched by the last ones), so the capture ends with one stream."""
        if not self.asynchronous or self.closed:
            return
        stream = self.dev.current_stream(self.device)
        for slot in range(self.slots):
            if self.captured[slot]:
                stream.wait_event(self.copy_done[slot])
                self.captured[slot] = False

    # -- reporting and undo ------------------------------------------------------------------
    def stats(self) -> dict:
        return {"static": True, **self._ring_stats()}

    def close(self) -> None:
        """Let the leases go once no copy can still read them; the slots go with the ring."""
        if self.closed:
            return
        self.closed = True
        if self.asynchronous:
            self.dev.synchronize(self.device)
        self._leases.close()
        self.sources = []
        self.dest = []
        self.ring = []
