"""A test device for CPU machines: asynchronous copies run as late or as early as their recorded
waits allow, and a checker asserts the happens-before rules.

``SimStreams`` stands in for ``strata.streams.CudaStreams`` (install it with
``strata.streams.use(sim)``). "Device" memory is CPU memory it hands out (``device_empty``,
filled with 0xFF bytes: NaN for floats, so a block that runs on bytes whose copy has not
landed computes garbage). The host is one stream whose work runs at once; every other
stream is a queue. A copy, an event record or a wait issued on a side stream runs only when
the schedule says:

- ``late``: never before something forces it (the host waits on an event recorded after it,
  synchronizes, or needs the memory back). A missing wait means stale bytes.
- ``early``: as soon as its stream's earlier work and waits are done. A copy issued into a
  slot that is still in use lands at once and overwrites it.
- ``random``: a seeded mix: after every call, a random number of runnable operations run.

Beside the bytes, vector clocks record what each stream is known to have waited for, and
the checker names a violation the moment a rule is broken, whatever the schedule:

- a block reads a buffer whose last copy the host did not wait for (``reads``);
- a copy is issued into a buffer whose previous reader its stream did not wait for;
- the store lets go of bytes an issued copy may still read (``releasing``: a lease released
  before its copy completed);
- a copy's source changed between issue and execution.

``reads`` and ``read_done`` are called by the test around each block's forward (see
``attach_checker``); everything else comes through the seam.
"""

from __future__ import annotations

import contextlib
import random
from collections import deque
from dataclasses import dataclass, field

import torch
import xxhash

from strata.streams import HostStreams

MODES = ("late", "early", "random")
HOST = "host"


def _join(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if v > out.get(k, 0):
            out[k] = v
    return out


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``t`` covers (conservatively, from its first to its last element)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((d - 1) * s for d, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _digest(t: torch.Tensor) -> int:
    return xxhash.xxh3_64_intdigest(t.contiguous().view(-1).view(torch.uint8).numpy()) if t.numel() else 0


class SimEvent:
    def __init__(self, sim: "SimStreams"):
        self.sim = sim
        self.streams: dict[int, SimStream] = {}  # record generation -> the stream it was recorded on
        self.gen = 0  # how many times it was recorded
        self.done_gen = 0  # the newest record that has run
        self.vcs: dict[int, dict] = {}  # record generation -> its stream's clock at issue

    def record(self, stream: "SimStream | None" = None) -> None:
        self.sim._record(self, stream or self.sim.current_stream())

    def query(self) -> bool:
        self.sim._progress()
        if self.done_gen >= self.gen:
            self.sim._observe(self.vcs.get(self.gen, {}))
            return True
        return False

    def synchronize(self) -> None:
        self.sim._force(self, self.gen)
        self.sim._observe(self.vcs.get(self.gen, {}))

    def elapsed_time(self, end: "SimEvent") -> float:
        return 0.0


class SimStream:
    def __init__(self, sim: "SimStreams", name: str):
        self.sim, self.name = sim, name
        self.queue: deque = deque()
        self.vc: dict[str, int] = {name: 0}

    def tick(self) -> dict:
        self.vc[self.name] = self.vc.get(self.name, 0) + 1
        return dict(self.vc)

    def wait_event(self, event: SimEvent) -> None:
        self.sim._wait(self, event)

    def synchronize(self) -> None:
        self.sim._drain(self)
        self.sim._observe(self.vc)

    def __repr__(self) -> str:
        return f"SimStream({self.name})"


@dataclass(eq=False)
class _Copy:
    dst: torch.Tensor
    src: torch.Tensor
    vc: dict
    stream: str
    src_span: tuple[int, int]
    src_digest: int


@dataclass(eq=False)
class _Record:
    event: SimEvent
    gen: int


@dataclass(eq=False)
class _Wait:
    event: SimEvent
    gen: int


@dataclass
class _Buffer:
    """A device buffer's history: its last copy in, and who read it since."""

    last_copy: tuple[str, int] | None = None  # (stream, tick at issue)
    readers: list[int] = field(default_factory=list)  # host ticks at the end of each read


class SimStreams(HostStreams):
    """The adversarial test device (see the module docstring)."""

    name = "sim"

    def __init__(self, mode: str = "late", seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode: got {mode!r}; allowed: {', '.join(MODES)}")
        super().__init__()
        self.mode, self.rng = mode, random.Random(seed)
        self.host = SimStream(self, HOST)
        self.side: list[SimStream] = []
        self._current: list[SimStream] = []
        self.buffers: dict[int, _Buffer] = {}  # storage address -> history
        self._unobserved: list[_Copy] = []  # copies the host has not seen complete
        self.violations: list[str] = []
        self.copies_run = 0
        self.copies_deferred = 0  # copies that ran after the call that issued them returned

    # -- memory ----------------------------------------------------------------------------
    def can_pin(self) -> bool:
        return True

    def host_empty(self, nbytes: int, pinned: bool) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def register_host(self, address: int, length: int) -> tuple[bool, str]:
        return True, "simulated device: registered"

    def device_empty(self, nbytes: int, device: torch.device) -> torch.Tensor:
        t = torch.full((nbytes,), 0xFF, dtype=torch.uint8)
        self.buffers[t.untyped_storage().data_ptr()] = _Buffer()
        return t

    def is_async_device(self, device: torch.device) -> bool:
        return True

    def is_device_memory(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.buffers

    def releasing(self, view: torch.Tensor | None) -> None:
        if view is None:
            return
        lo, hi = _span(view)
        self._prune()
        for c in self._unobserved:
            if c.src_span[0] < hi and lo < c.src_span[1]:
                self._violate(f"the store lets go of bytes a copy issued on {c.stream} (tick {c.vc[c.stream]}) may "
                              "still read: a lease released before its copy completed")

    # -- streams ---------------------------------------------------------------------------
    def new_stream(self, device=None) -> SimStream:
        s = SimStream(self, f"s{len(self.side) + 1}")
        self.side.append(s)
        return s

    def current_stream(self, device=None) -> SimStream:
        return self._current[-1] if self._current else self.host

    @contextlib.contextmanager
    def stream(self, stream: SimStream):
        self._current.append(stream)
        try:
            yield
        finally:
            self._current.pop()

    def event(self, timing: bool = False) -> SimEvent:
        return SimEvent(self)

    def synchronize(self, device=None) -> None:
        for s in self.side:
            s.synchronize()

    # -- operations ------------------------------------------------------------------------
    def copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> None:
        s = self.current_stream()
        if s is self.host or not non_blocking:  # a blocking copy waits for its stream, then runs
            if s is not self.host:
                s.synchronize()
            vc = self.host.tick()
            self._check_issue(dst, vc, HOST)
            self._run_copy(_Copy(dst, src, vc, HOST, _span(src), 0), check_source=False)
            return
        vc = s.tick()
        self._check_issue(dst, vc, s.name)
        op = _Copy(dst, src, vc, s.name, _span(src), _digest(src))
        s.queue.append(op)
        self._unobserved.append(op)
        self._progress()
        if op in s.queue:
            self.copies_deferred += 1

    def _record(self, event: SimEvent, s: SimStream) -> None:
        event.gen += 1
        event.streams[event.gen] = s
        event.vcs[event.gen] = s.tick()
        if s is self.host:
            event.done_gen = event.gen
        else:
            s.queue.append(_Record(event, event.gen))
            self._progress()

    def _wait(self, s: SimStream, event: SimEvent) -> None:
        if event.gen == 0:
            return  # never recorded: complete, as in CUDA
        vc = event.vcs[event.gen]
        if s is self.host:  # the host (the compute stream) waits: what the event covers runs now
            self._force(event, event.gen)
            s.vc = _join(s.vc, vc)
            return
        s.vc = _join(s.vc, vc)
        s.queue.append(_Wait(event, event.gen))
        self._progress()

    # -- running queued work -------------------------------------------------------------------
    def _runnable(self, s: SimStream) -> bool:
        if not s.queue:
            return False
        op = s.queue[0]
        return not isinstance(op, _Wait) or op.event.done_gen >= op.gen

    def _step(self, s: SimStream) -> None:
        op = s.queue.popleft()
        if isinstance(op, _Copy):
            self._run_copy(op, check_source=True)
        elif isinstance(op, _Record):
            op.event.done_gen = max(op.event.done_gen, op.gen)
        else:
            self._force(op.event, op.gen)

    def _force(self, event: SimEvent, gen: int, depth: int = 0) -> None:
        """Run the work ``event``'s record ``gen`` covers (and what it waits for)."""
        if depth > 64:
            raise RuntimeError("sim: a cycle of stream waits (would hang on a GPU)")
        while event.done_gen < gen:
            s = event.streams[gen]
            if not s.queue:
                raise RuntimeError(f"sim: {event} generation {gen} will never complete")
            op = s.queue[0]
            if isinstance(op, _Wait) and op.event.done_gen < op.gen:
                self._force(op.event, op.gen, depth + 1)
            self._step(s)

    def _drain(self, s: SimStream) -> None:
        while s.queue:
            op = s.queue[0]
            if isinstance(op, _Wait) and op.event.done_gen < op.gen:
                self._force(op.event, op.gen)
            self._step(s)

    def _progress(self) -> None:
        """Run what the schedule lets run now."""
        if self.mode == "late":
            return
        if self.mode == "early":
            moved = True
            while moved:
                moved = False
                for s in self.side:
                    while self._runnable(s):
                        self._step(s)
                        moved = True
            return
        for _ in range(self.rng.randint(0, 3)):
            ready = [s for s in self.side if self._runnable(s)]
            if not ready:
                return
            self._step(self.rng.choice(ready))

    def _run_copy(self, op: _Copy, check_source: bool) -> None:
        if check_source and _digest(op.src) != op.src_digest:
            self._violate(f"a copy issued on {op.stream} read bytes that changed after it was issued "
                          "(its source was reused: a lease released too early?)")
        op.dst.copy_(op.src)
        self.copies_run += 1

    def _observe(self, vc: dict) -> None:
        """The host has seen work up to ``vc`` complete."""
        self.host.vc = _join(self.host.vc, vc)
        self._prune()

    def _prune(self) -> None:
        hv = self.host.vc
        self._unobserved = [c for c in self._unobserved if hv.get(c.stream, 0) < c.vc[c.stream]]

    # -- the checker ---------------------------------------------------------------------------
    def _violate(self, what: str) -> None:
        self.violations.append(what)

    def _buffer(self, t: torch.Tensor) -> _Buffer | None:
        return self.buffers.get(t.untyped_storage().data_ptr())

    def _check_issue(self, dst: torch.Tensor, vc: dict, stream: str) -> None:
        buf = self._buffer(dst)
        if buf is None:
            return
        late = [t for t in buf.readers if vc.get(HOST, 0) < t]
        if late:
            self._violate(f"a copy into a device buffer issued on {stream} without waiting for its previous "
                          f"reader (host tick {late[-1]}; the stream knows host tick {vc.get(HOST, 0)})")
        buf.readers.clear()
        buf.last_copy = (stream, vc[stream])

    def reads(self, tensors) -> None:
        """A block is about to run on ``tensors``: each device buffer's last copy must be one the
        host waited for."""
        for buf in self._buffers_of(tensors):
            if buf.last_copy is not None:
                stream, tick = buf.last_copy
                if self.host.vc.get(stream, 0) < tick:
                    self._violate(f"a block runs on a buffer whose copy (on {stream}, tick {tick}) it did not "
                                  f"wait for (the host knows {stream} tick {self.host.vc.get(stream, 0)})")

    def read_done(self, tensors) -> None:
        """A block has run on ``tensors``: a later copy into them must wait for this."""
        t = self.host.tick()[HOST]
        for buf in self._buffers_of(tensors):
            buf.readers.append(t)

    def _buffers_of(self, tensors) -> list[_Buffer]:
        seen, out = set(), []
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key in self.buffers and key not in seen:
                seen.add(key)
                out.append(self.buffers[key])
        return out


def attach_checker(model: torch.nn.Module, blocks, sim: SimStreams, inside: bool = False) -> list:
    """Forward hooks on ``blocks`` that tell ``sim`` what each block reads, inside Strata's own
    hooks (the pre-hook runs after Strata bound the block, the post-hook before it unbinds it).
    ``inside=True`` (the static ring, whose wait runs inside the block's forward): the hooks go on
    each block's children, each reporting every tensor of its block. Returns the hook handles."""
    handles = []
    for block in blocks:
        def tensors(m=block):
            return [*m.parameters(), *m.buffers()]

        for mod in (block.children() if inside else (block,)):
            handles.append(mod.register_forward_pre_hook(lambda m, a, t=tensors: sim.reads(t())))
            handles.append(mod.register_forward_hook(lambda m, a, o, t=tensors: sim.read_done(t()), prepend=True))
    return handles
