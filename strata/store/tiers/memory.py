"""Memory tiers: objects this process indexes, in bytes it holds or owns (a cpu slab, a cxl
mapping, files, byte ranges of existing files).

``MemoryTier`` is the machinery they share: the index, capacity accounting, per-namespace
quotas and eviction policies, leases (a reader holds a view in place, so its bytes are not
freed or reused), and leases held until a device copy out of a pinned view has completed. A
memory tier implements ``_alloc``, ``_free``, ``write``, ``read_into`` and, where it differs
from the payload's size, ``stored_size`` (docs/TIERS.md).
"""

from __future__ import annotations

from typing import Iterator

import torch

from strata.config import StoreConfig, TierConfig
from strata.store.codec import CorruptObject, ObjectMeta, checksum
from strata.store.eviction import make_policy
from strata.store.tiers.base import Entry, EvictHook, NotStored, Tier


class MemoryTier(Tier):
    def __init__(self, cfg: TierConfig, store_cfg: StoreConfig):
        super().__init__(cfg, store_cfg)
        self.index: dict[bytes, Entry] = {}
        self._policies: dict[str, object] = {}
        self._quotas: dict[str, int | None] = {}
        self._in_flight: list[tuple[object, Entry]] = []  # (device event, leased entry)

    # -- what a memory tier implements ------------------------------------------------------
    def _alloc(self, entry: Entry) -> bool:
        """Find room for ``entry.size`` bytes and set ``entry.loc``; False if it does not fit now."""
        if self.used + entry.size > self.capacity:
            return False
        entry.loc = None
        return True

    def _free(self, entry: Entry) -> None:
        """Give back the bytes of an entry nobody can reach any more."""

    def write(self, entry: Entry, data: torch.Tensor) -> bool:
        """Copy the payload in (outside the lock). False on an I/O fault."""
        raise NotImplementedError

    def read_into(self, entry: Entry, out: torch.Tensor) -> None:
        """Copy the payload into ``out`` (a contiguous CPU tensor of the stored dtype and shape),
        outside the lock with the entry leased. Raises CorruptObject on a checksum or identity
        mismatch, OSError on I/O faults."""
        raise NotImplementedError

    # -- what the chain calls -----------------------------------------------------------------
    def read(self, entry: Entry) -> torch.Tensor:
        """The payload as a new CPU tensor of the stored dtype and shape."""
        out = torch.empty(entry.meta.shape, dtype=entry.meta.dtype)
        self.read_into(entry, out)
        return out

    def check_view(self, e: Entry) -> None:
        """With ``verify``, CorruptObject unless the bytes in place match the payload checksum."""
        if self.cfg.verify and e.view is not None and checksum(e.view) != e.meta.checksum:
            raise CorruptObject(f"payload checksum mismatch in tier {self.name}")

    def write_many(self, pairs: list[tuple[Entry, torch.Tensor]]) -> list[bool]:
        """``write`` of many (entry, payload) pairs, per pair True or False (an I/O fault is
        False and an error counted)."""
        out = []
        for e, data in pairs:
            try:
                out.append(self.write(e, data))
            except OSError:
                self.counters.errors += 1
                out.append(False)
        return out

    def read_many(self, entries: list[Entry]) -> list:
        """Per entry its payload (as ``read``) or the exception ``read`` raised (NotStored,
        CorruptObject, OSError)."""
        out: list = []
        for e in entries:
            try:
                out.append(self.read(e))
            except (NotStored, CorruptObject, OSError) as exc:
                out.append(exc)
        return out

    def contents(self) -> Iterator[tuple[bytes, str, int]]:
        """A snapshot of the index (one atomic copy of it: no lock needed)."""
        for key, e in list(self.index.items()):
            yield key, e.ns, e.size

    def _held(self) -> dict:
        return {"bytes": self.used, "objects": len(self.index)}

    # -- index and accounting (caller holds the chain lock) ------------------------------
    def policy(self, ns: str):
        pol = self._policies.get(ns)
        if pol is None:
            pol = self._policies[ns] = make_policy(self.cfg.policy)
        return pol

    def lookup(self, key: bytes) -> Entry | None:
        return self.index.get(key)

    def probe(self, key: bytes) -> Entry | None:
        """What ``lookup`` finds."""
        return self.lookup(key)

    def exists_many(self, keys: list[bytes]) -> list[bool]:
        """From the index, each look one atomic dict read: no lock needed."""
        index = self.index
        return [k in index for k in keys]

    def holds(self, e: Entry) -> bool:
        return self.index.get(e.key) is e

    def release(self, e: Entry) -> None:
        e.leases -= 1
        if e.leases == 0:
            if e.dead:
                self._release_space(e)
            elif e.view is not None:
                self.seam.releasing(e.view)  # a checker's hook: no copy may still read these bytes

    def reserve(self, key: bytes, ns: str, meta: ObjectMeta, evict: EvictHook) -> Entry | None:
        """A not-yet-visible entry with room for ``meta``'s payload, evicting as policy allows."""
        size = self.stored_size(key, meta)
        e = Entry(key, ns, meta, size, None)
        quota = self._quotas.get(ns, -1)
        if quota == -1:
            quota = self._quotas[ns] = self.store_cfg.policy(ns).quota.get(self.name)
        if size > self.capacity or (quota is not None and size > quota):
            return None
        refused: set[bytes] = set()
        if quota is not None:
            while self.counters.ns_bytes[ns] + size > quota:
                if not self._evict_one([ns], evict, refused):
                    return None
        while not self._alloc(e):
            if not self._evict_one(self._eviction_order(), evict, refused):
                return None
        self._account(e, +1)
        return e

    def publish(self, e: Entry, count: bool = True) -> None:
        old = self.index.get(e.key)
        if old is not None:
            self.retire(old)
        self.index[e.key] = e
        self.policy(e.ns).insert(e.key, e.size)
        self.counters.puts += count

    def abort(self, e: Entry) -> None:
        self._release_space(e)

    def retire(self, e: Entry) -> None:
        """Make an entry unreachable; its bytes go once no lease holds them."""
        if self.index.get(e.key) is e:
            del self.index[e.key]
            self.policy(e.ns).remove(e.key)
        if e.leases:
            e.dead = True
        elif not e.dead:
            self._release_space(e)

    def touch(self, e: Entry) -> None:
        self.policy(e.ns).touch(e.key)

    # -- asynchronous copies to the GPU (pinned memory tiers) ---------------------------
    def hold_until(self, e: Entry, event) -> None:
        """Keep ``e``'s lease until ``event`` (a recorded CUDA event) completes. Caller holds the lock."""
        if self._in_flight:
            self.reap()  # leases of copies that have finished go back now, not at the next full tier
        self.lease(e)
        self._in_flight.append((event, e))

    def copies_in_flight(self) -> list:
        """The events of device copies still holding leases (caller holds the lock), for a caller
        to wait for without the lock; a ``reap`` afterwards gives their leases back."""
        return [event for event, _ in self._in_flight]

    def reap(self, wait: bool = False) -> None:
        """Give back the leases of copies that have completed; with ``wait``, of all of them, after
        waiting for each (blocks: never under the chain lock, see ``copies_in_flight``)."""
        keep = []
        for event, e in self._in_flight:
            if wait:
                event.synchronize()
            if wait or event.query():
                self.release(e)
            else:
                keep.append((event, e))
        self._in_flight = keep

    # -- internals ----------------------------------------------------------------------
    def _account(self, e: Entry, sign: int) -> None:
        self.used += sign * e.size
        self.counters.ns_bytes[e.ns] += sign * e.size
        self.counters.ns_objects[e.ns] += sign

    def _release_space(self, e: Entry) -> None:
        e.dead = True
        if e.view is not None:
            self.seam.releasing(e.view)
        e.view = None
        self._free(e)
        self._account(e, -1)

    def _eviction_order(self) -> list[str]:
        pols = self.store_cfg
        live = [ns for ns, p in self._policies.items() if len(p) and pols.policy(ns).evict != "never"]
        return sorted(live, key=lambda ns: pols.policy(ns).priority)

    def _evict_one(self, order: list[str], evict: EvictHook, refused: set[bytes]) -> bool:
        spares = getattr(evict, "spares", None)
        for ns in order:
            if self.store_cfg.policy(ns).evict == "never" or (spares is not None and spares(ns)):
                continue
            pol = self.policy(ns)
            while True:
                key = pol.victim(lambda k: k not in refused and self.index[k].leases == 0)
                if key is None:
                    break
                e = self.index[key]
                if evict(self, e):
                    self.retire(e)
                    self.counters.evictions += 1
                    return True
                refused.add(key)
        return False

