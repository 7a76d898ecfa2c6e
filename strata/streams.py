"""The one seam for asynchronous device work: streams, events, copies, pinned host memory.

Everything in Strata that orders work on a device goes through the ``Streams`` that is
active: the offload ring's copy stream and events (``offload/scheduler.py``), the store's
non-blocking copies out of pinned memory and the leases they hold until their event fires
(``store/chain.py``, ``store/tiers/base.py``), pinned slabs and registered mappings
(``store/tiers/cpu.py``, ``store/tiers/cxl.py``), the KV cache's pinned gathers
(``kv/paged.py``). Three implementations keep one code path:

- ``CudaStreams``: torch.cuda itself (streams, events, ``copy_(non_blocking=True)``).
- ``HostStreams``: no device: every copy runs at once, events are always complete.
- ``strata.testing.sim.SimStreams``: a test device for CPU machines that runs side-stream
  copies as late or as early as the recorded waits allow and checks the happens-before
  rules, so a missing wait shows up as wrong bytes and as a named violation.

``active()`` is CUDA where torch sees a GPU, else the host; ``use(streams)`` installs another
(tests). Objects keep the ``Streams`` they were built with.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


class HostEvent:
    """An event of the host: complete as soon as it is recorded; ``elapsed_time`` in ms."""

    def __init__(self, timing: bool = False):
        self.t = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end.t - self.t) * 1e3


class HostStream:
    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass


class HostStreams:
    """No device: copies run when issued, events are complete when recorded."""

    name = "host"

    def __init__(self):
        self._stream = HostStream()

    # -- memory ----------------------------------------------------------------------------
    def can_pin(self) -> bool:
        """Whether page-locked host memory can be had (so device copies from it may be asynchronous)."""
        return False

    def host_empty(self, nbytes: int, pinned: bool) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

    def register_host(self, address: int, length: int) -> tuple[bool, str]:
        """Page-lock memory the process already maps: (registered, why)."""
        return False, "no CUDA device: host-to-device copies are not needed"

    def unregister_host(self, address: int) -> None:
        pass

    def device_empty(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def is_async_device(self, device: torch.device) -> bool:
        """Whether work for ``device`` runs on streams (asynchronously) under these Streams."""
        return False

    def is_device_memory(self, t: torch.Tensor) -> bool:
        """Whether a copy into ``t`` is a device copy (may run asynchronously, from pinned memory)."""
        return False

    def releasing(self, view: torch.Tensor | None) -> None:
        """The store may reuse the bytes of ``view`` from now on (its last lease went, or it was freed):
        a checker's hook, nothing to do here."""

    # -- streams and events ------------------------------------------------------------------
    def new_stream(self, device: torch.device):
        return self._stream

    def current_stream(self, device: torch.device | None = None):
        return self._stream

    def stream(self, stream) -> contextlib.AbstractContextManager:
        """Make ``stream`` current inside the ``with`` block."""
        return contextlib.nullcontext()

    def event(self, timing: bool = False):
        return HostEvent(timing)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> None:
        """``dst.copy_(src)`` on the current stream (asynchronous where ``non_blocking`` may be)."""
        dst.copy_(src)

    def synchronize(self, device: torch.device | None = None) -> None:
        pass

    def capturing(self) -> bool:
        """Whether the current stream is being captured into a CUDA graph."""
        return False


class CudaStreams(HostStreams):
    """torch.cuda: real streams and events; copies from pinned memory are asynchronous."""

    name = "cuda"

    def can_pin(self) -> bool:
        return True

    def register_host(self, address: int, length: int) -> tuple[bool, str]:
        from strata.store import cudahost

        return cudahost.register(address, length)

    def unregister_host(self, address: int) -> None:
        from strata.store import cudahost

        cudahost.unregister(address)

    def is_async_device(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def is_device_memory(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def new_stream(self, device: torch.device):
        return torch.cuda.Stream(device=device)

    def current_stream(self, device: torch.device | None = None):
        return torch.cuda.current_stream(device)

    def stream(self, stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> None:
        dst.copy_(src, non_blocking=non_blocking)

    def synchronize(self, device: torch.device | None = None) -> None:
        torch.cuda.synchronize(device)

    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()


_active: HostStreams | None = None
_HOST, _CUDA = HostStreams(), CudaStreams()


def active() -> HostStreams:
    """The Streams in use: what ``use`` installed, else CUDA where torch sees a GPU, else the host."""
    if _active is not None:
        return _active
    return _CUDA if torch.cuda.is_available() else _HOST


@contextlib.contextmanager
def use(streams: HostStreams) -> Iterator[HostStreams]:
    """Install ``streams`` for the ``with`` block (a test device, say); the previous one after."""
    global _active
    before = _active
    _active = streams
    try:
        yield streams
    finally:
        _active = before
