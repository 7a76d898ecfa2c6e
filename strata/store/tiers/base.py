"""What every tier shares: the index, capacity accounting, quotas, eviction, counters.

A tier is driven by the ``TierChain`` under the chain's lock for every index and
accounting call; the bulk byte moves (``write``, ``read_into``) run outside the lock
on an entry that is reserved (not yet visible) or leased (cannot be freed). I/O an index
change calls for (unlinking a freed object's file, flushing a cleared slot, a DEL on a
store) goes through ``after_unlock``: it runs once the thread has let the lock go, before
the store call returns, so no store call waits on another's I/O.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from strata import streams
from strata.config import StoreConfig, TierConfig
from strata.store.codec import CorruptObject, ObjectMeta, checksum
from strata.store.eviction import make_policy

class CopiesInFlight(Exception):
    """``_alloc`` found no room while device copies out of the tier are in flight, holding bytes
    that come back when they complete. The chain waits for ``events`` outside its lock and
    reserves again: waiting under it would stall every store call for as long as a copy runs."""

    def __init__(self, events: list):
        super().__init__(f"{len(events)} device copies in flight")
        self.events = events


class NotStored(LookupError):
    """A tier that looks objects up only when reading (remote) has nothing under the key: a plain miss."""


class Entry:
    """One object in one tier."""

    __slots__ = ("key", "ns", "meta", "size", "loc", "leases", "dead", "dirty", "view")

    def __init__(self, key: bytes, ns: str, meta: ObjectMeta, size: int, loc: object):
        self.key, self.ns, self.meta, self.size, self.loc = key, ns, meta, size, loc
        self.leases = 0
        self.dead = False  # retired while leased: freed on the last release
        self.dirty = False  # write-back: not yet in the tier below
        self.view: torch.Tensor | None = None  # memory tiers: typed view of the payload in place


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    rejected: int = 0  # puts this tier could not take (too big, full of pinned or leased objects)
    checksum_failures: int = 0
    errors: int = 0  # I/O errors, degraded to misses or rejected puts
    promotions: int = 0
    ns_bytes: dict = field(default_factory=lambda: defaultdict(int))
    ns_objects: dict = field(default_factory=lambda: defaultdict(int))


# Called before an entry is evicted; returns False to keep it (e.g. it could not be demoted).
EvictHook = Callable[["Tier", Entry], bool]


class Tier:
    kind = "base"
    persistent = False  # bytes survive the process: checksums are always verified on read
    writable = True  # False: objects are registered, never written through the chain
    remote = False  # True: a store that is its own index (capacity, eviction and what it holds are the store's)
    shared = False  # True: other processes add and remove objects; the chain asks discover() on index misses
    prefetchable = False  # True: worth reading ahead of use into the memory tiers above it (``prefetch``)

    def __init__(self, cfg: TierConfig, store_cfg: StoreConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.capacity = cfg.capacity
        self.store_cfg = store_cfg
        self.index: dict[bytes, Entry] = {}
        self.used = 0  # bytes held: visible, reserved, and retired-but-leased objects
        self.counters = TierCounters()
        self._policies: dict[str, object] = {}
        self._quotas: dict[str, int | None] = {}
        self.pinned = False  # memory tiers: views are page-locked, so copies to the GPU may be asynchronous
        self.seam = streams.active()  # the device seam (strata.streams) copies out of this tier go through
        self._in_flight: list[tuple[object, Entry]] = []  # (CUDA event, leased entry)
        self.chain_lock = None  # the lock of the chain that drives this tier (strata.store.chain.ChainLock)

    def after_unlock(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (I/O an index change calls for: an unlink, a flush, a DEL) once this thread
        has let the chain's lock go, before its store call returns; at once where it does not hold
        it. ``fn`` deals with its own faults (a failing tier degrades, never raises); one that
        raises is logged."""
        lock = self.chain_lock
        if lock is not None and lock._is_owned():
            lock.defer(fn)
        else:
            fn()

    # -- subclass hooks ---------------------------------------------------------------
    def stored_size(self, key: bytes, meta: ObjectMeta) -> int:
        return meta.nbytes

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
        False and an error counted). A remote tier batches the round trips."""
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
        CorruptObject, OSError). A remote tier batches the round trips."""
        out: list = []
        for e in entries:
            try:
                out.append(self.read(e))
            except (NotStored, CorruptObject, OSError) as exc:
                out.append(exc)
        return out

    def discover(self, keys: list[bytes]) -> list:
        """A ``shared`` tier: per key that its index missed, what another process stored under it
        (a token for ``adopt``) or None. May do I/O: the chain calls it without its lock."""
        return [None] * len(keys)

    def adopt(self, found) -> Entry | None:
        """Index what ``discover`` found (caller holds the chain lock); the entry, or None."""
        return None

    def vanished_among(self, entries: list[Entry]) -> list[Entry]:
        """A ``shared`` tier: those of ``entries`` another process removed (I/O, without the lock)."""
        return []

    def forget(self, e: Entry) -> None:
        """Drop an entry whose object another process removed (caller holds the chain lock)."""
        self.retire(e)

    def stats_extra(self) -> dict:
        return {}

    def refresh(self) -> None:
        """Update what stats() reports from outside the process (called without the chain lock)."""

    def location(self) -> str:
        """Where the bytes live, for humans."""
        return self.stats_extra().get("path") or ("pinned memory" if self.pinned else "memory")

    def contents(self):
        """(key, namespace, stored bytes) of every object: a snapshot of the index for local tiers."""
        for key, e in list(self.index.items()):
            yield key, e.ns, e.size

    def close(self) -> None:
        pass

    # -- index and accounting (caller holds the chain lock) ------------------------------
    def policy(self, ns: str):
        pol = self._policies.get(ns)
        if pol is None:
            pol = self._policies[ns] = make_policy(self.cfg.policy)
        return pol

    def lookup(self, key: bytes) -> Entry | None:
        return self.index.get(key)

    def probe(self, key: bytes) -> Entry | None:
        """The entry a read goes through: what ``lookup`` finds (a remote tier returns one to try)."""
        return self.lookup(key)

    def exists_many(self, keys: list[bytes]) -> list[bool]:
        """Which keys this tier holds, called WITHOUT the chain lock (a backing tier asks its store):
        a memory tier answers from its index, each look one atomic dict read."""
        index = self.index
        return [k in index for k in keys]

    def holds(self, e: Entry) -> bool:
        """Whether ``e``, an entry this tier published, is still the object it holds under its key
        (it may have been evicted, or replaced by a newer put). A dict read: no lock needed."""
        return self.index.get(e.key) is e

    def remove(self, key: bytes) -> bool:
        """Delete what the index does not know of ``key`` (another process's file, a store's value),
        called WITHOUT the chain lock after the chain retired the entries it indexes; whether
        something was removed. A memory tier has nothing beyond its index."""
        return False

    def lease(self, e: Entry) -> None:
        e.leases += 1

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
        for ns in order:
            if self.store_cfg.policy(ns).evict == "never":
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

    def stats(self) -> dict:
        c = self.counters
        out = {
            "kind": self.kind,
            "capacity": self.capacity,
            "bytes": self.used,
            "objects": len(self.index),
            "hits": c.hits,
            "misses": c.misses,
            "puts": c.puts,
            "evictions": c.evictions,
            "rejected": c.rejected,
            "checksum_failures": c.checksum_failures,
            "errors": c.errors,
            "promotions": c.promotions,
            "namespaces": {
                ns: {"bytes": c.ns_bytes[ns], "objects": c.ns_objects[ns]}
                for ns in sorted(c.ns_bytes) if c.ns_objects[ns] or c.ns_bytes[ns]
            },
        }
        out.update(self.stats_extra())
        return out
