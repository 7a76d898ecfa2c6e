"""The CPU tier: one slab of host memory (pinned when CUDA is present), extent-allocated.

Objects are views into the slab. Readers hold a lease while they copy, so an
evicted or overwritten object's bytes are never reused under them; a non-blocking
copy to the GPU keeps its lease until the copy's CUDA event has completed.
Host RAM is trusted: checksums are computed when an object leaves this tier for a
persistent one, or on every put and get with ``verify: true``.
"""

from __future__ import annotations

import torch

from strata.store.allocator import ExtentAllocator
from strata.store.codec import CorruptObject, checksum
from strata.store.tiers.base import Entry, Tier


def _want_pinned(pin: str) -> bool:
    if pin == "never":
        return False
    if pin == "always":
        return True
    return torch.cuda.is_available()


class CpuTier(Tier):
    kind = "cpu"

    def __init__(self, cfg, store_cfg):
        super().__init__(cfg, store_cfg)
        self.pinned = _want_pinned(cfg.pin)
        self.allocator = ExtentAllocator(cfg.capacity)
        self.capacity = self.allocator.capacity
        # Pageable memory is reserved lazily by the OS; pinned memory is locked up front.
        self.slab = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self.pinned)
        self._in_flight: list[tuple[object, Entry]] = []  # (CUDA event, leased entry)

    def stored_size(self, key, meta) -> int:
        return self.allocator.rounded(meta.nbytes)

    def _alloc(self, e: Entry) -> bool:
        off = self.allocator.alloc(e.size)
        if off is None:
            self.reap(wait=bool(self._in_flight))  # bytes held only by finished GPU copies come back
            off = self.allocator.alloc(e.size)
            if off is None:
                return False
        e.loc = off
        e.view = self.slab[off : off + e.meta.nbytes]
        return True

    def _free(self, e: Entry) -> None:
        self.allocator.free(e.loc, e.size)

    def write(self, e: Entry, data: torch.Tensor) -> bool:
        e.view.copy_(data)
        if self.cfg.verify:
            e.meta = e.meta.with_checksum(checksum(e.view))
        return True

    def read_into(self, e: Entry, out: torch.Tensor) -> None:
        if self.cfg.verify and checksum(e.view) != e.meta.checksum:
            raise CorruptObject(f"checksum mismatch in tier {self.name}")
        out.copy_(e.view)

    # -- asynchronous copies to the GPU -------------------------------------------------
    def hold_until(self, e: Entry, event) -> None:
        """Keep ``e``'s lease until ``event`` (a recorded CUDA event) completes. Caller holds the lock."""
        self.lease(e)
        self._in_flight.append((event, e))

    def reap(self, wait: bool = False) -> None:
        keep = []
        for event, e in self._in_flight:
            if wait:
                event.synchronize()
            if wait or event.query():
                self.release(e)
            else:
                keep.append((event, e))
        self._in_flight = keep

    def stats_extra(self) -> dict:
        return {
            "pinned": self.pinned,
            "free_bytes": self.allocator.free_bytes,
            "largest_free": self.allocator.largest_free(),
        }
