"""The CPU tier: one slab of host memory (pinned when CUDA is present), extent-allocated.

Objects are typed views into the slab. Readers hold a lease while they copy, so an
evicted or overwritten object's bytes are never reused under them; a non-blocking
copy to the GPU keeps its lease until the copy's CUDA event has completed (a put that
needs those bytes waits for it outside the chain's lock: ``CopiesInFlight``).
Host RAM is trusted: checksums are computed when an object leaves this tier for a
persistent one, or on every put and get with ``verify: true``.
"""

from __future__ import annotations

import functools
import os

import torch

from strata.config import format_size
from strata.errors import ConfigError, allowed

from strata.store.allocator import ExtentAllocator
from strata.store.codec import checksum
from strata.store.tiers.base import CopiesInFlight, Entry
from strata.store.tiers.memory import MemoryTier


def host_memory() -> int | None:
    """Bytes of physical memory on this host, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


PIN_MODES = ("auto", "always", "never")


def pin_mode(value: object, where: str) -> str:
    """auto, always, never (true / false: always / never)."""
    pin = "always" if value is True else "never" if value is False else value
    if pin not in PIN_MODES:
        raise ConfigError(allowed(where, pin, PIN_MODES))
    return pin  # type: ignore[return-value]


@functools.lru_cache(maxsize=4096)
def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


class CpuTier(MemoryTier):
    kind = "cpu"
    # pin: the slab is pinned (page-locked) when CUDA is available ("auto"), always, or never.
    config_keys = {"pin": pin_mode}
    config_required = ("capacity",)
    defaults = {"pin": "auto"}

    def __init__(self, cfg, store_cfg):
        super().__init__(cfg, store_cfg)
        self.pinned = cfg.pin == "always" or (cfg.pin == "auto" and self.seam.can_pin())
        self.allocator = ExtentAllocator(cfg.capacity)
        self.capacity = self.allocator.capacity
        ram = host_memory()
        if ram and self.capacity > ram:
            raise ConfigError(f"tiers[{cfg.name}].capacity: got {format_size(self.capacity)}; allowed: at most this "
                              f"host's RAM ({format_size(ram)}), and less to leave room for the process")
        # Pageable memory is reserved lazily by the OS; pinned memory is locked up front.
        try:
            self.slab = self.seam.host_empty(self.capacity, pinned=self.pinned)
        except RuntimeError as e:
            raise ConfigError(f"tiers[{cfg.name}].capacity: could not allocate {format_size(self.capacity)} of "
                              f"{'pinned ' if self.pinned else ''}host memory ({str(e).splitlines()[0][:200]}); "
                              "allowed: a capacity the host can give (pin: never for pageable memory)") from None
        self._aliases: dict[torch.dtype, torch.Tensor] = {}  # the slab seen as each dtype

    def stored_size(self, key, meta) -> int:
        return self.allocator.rounded(meta.nbytes)

    def _typed_view(self, off: int, meta) -> torch.Tensor:
        alias = self._aliases.get(meta.dtype)
        if alias is None:
            alias = self._aliases[meta.dtype] = self.slab.view(meta.dtype)
        return alias.as_strided(meta.shape, contiguous_strides(meta.shape), off // alias.element_size())

    def _alloc(self, e: Entry) -> bool:
        off = self.allocator.alloc(e.size)
        if off is None and self._in_flight:
            self.reap()  # bytes held only by GPU copies that have completed come back
            off = self.allocator.alloc(e.size)
            if off is None and self._in_flight:  # the chain waits for the rest outside its lock, then retries
                raise CopiesInFlight(self.copies_in_flight())
        if off is None:
            return False
        e.loc = off
        e.view = self._typed_view(off, e.meta)
        return True

    def _free(self, e: Entry) -> None:
        self.allocator.free(e.loc, e.size)

    def write(self, e: Entry, data: torch.Tensor) -> bool:
        e.view.copy_(data)
        if self.cfg.verify:
            e.meta = e.meta.with_checksum(checksum(e.view))
        return True

    def read(self, e: Entry) -> torch.Tensor:
        self.check_view(e)
        return e.view.clone()

    def read_into(self, e: Entry, out: torch.Tensor) -> None:
        self.check_view(e)
        out.copy_(e.view)

    def stats_extra(self) -> dict:
        return {
            "pinned": self.pinned,
            "free_bytes": self.allocator.free_bytes,
            "largest_free": self.allocator.largest_free(),
        }
