"""The tier protocol: what ``TierChain`` calls on every tier, and what every tier shares.

A tier is a memory tier (``strata.store.tiers.memory.MemoryTier``: an index, an allocator,
eviction, quotas and leases over bytes it holds) or a backing tier
(``strata.store.tiers.backing.BackingTier``: a store behind I/O that is its own index). The
chain drives both through the calls of ``Tier`` below and never asks which kind a tier is.

Calls marked "lock" run under the chain's lock (index and accounting); the byte moves
(``write_many``, ``read_many``) run outside it on an entry that is reserved (not yet visible)
or leased (cannot be freed); calls marked "no lock" may do I/O. I/O an index change calls for
(unlinking a freed object's file, flushing a cleared slot, a DEL on a store) goes through
``after_unlock``: it runs once the thread has let the lock go, before the store call returns,
so no store call waits on another's I/O.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from strata import streams
from strata.config import StoreConfig, TierConfig
from strata.store.codec import ObjectMeta

class CopiesInFlight(Exception):
    """``_alloc`` found no room while device copies out of the tier are in flight, holding bytes
    that come back when they complete. The chain waits for ``events`` outside its lock and
    reserves again: waiting under it would stall every store call for as long as a copy runs.
    ``counted``: each wait counts against a few tries (room that stays short after the copies
    completed is no reason to wait more); False for a wait that always ends with the reservation
    free to try again (another process's put holding a shared region, ``RegionBusy``; a put of the
    same key in flight to a remote store, ``KeyBusy``), retried until a deadline instead."""

    counted = True

    def __init__(self, events: list):
        super().__init__(f"{len(events)} device copies in flight")
        self.events = events


class NotStored(LookupError):
    """A tier that looks objects up only when reading (remote) has nothing under the key: a plain miss."""


class Entry:
    """One object in one tier."""

    __slots__ = ("key", "ns", "meta", "size", "loc", "leases", "dead", "dirty", "copied", "overtaken", "view")

    def __init__(self, key: bytes, ns: str, meta: ObjectMeta, size: int, loc: object):
        self.key, self.ns, self.meta, self.size, self.loc = key, ns, meta, size, loc
        self.leases = 0
        self.dead = False  # retired while leased: freed on the last release
        self.dirty = False  # write-back: not yet in the tier below
        self.copied = False  # a flush or a demotion wrote this very version to a tier below
        self.overtaken = 0  # newer puts of the key on their way to the tiers below (this tier refused them)
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


# Called before an entry is evicted; returns False to keep it (e.g. it could not be demoted). A
# hook may also have ``spares(ns)``: True for a namespace whose every object it would keep (the
# chain's, for a promotion of a ``promote: keep`` namespace), which a tier may skip without asking.
EvictHook = Callable[["Tier", Entry], bool]


class Tier:
    """The protocol a tier implements for the chain, and what every tier shares: its config,
    counters, the device seam, deferred I/O, stats. Subclass ``MemoryTier`` or ``BackingTier``."""

    kind = "base"
    persistent = False  # bytes survive the process: checksums are always verified on read
    writable = True  # False: objects are registered, never written through the chain
    remote = False  # True: a store that is its own index (capacity, eviction and what it holds are the store's)
    shared = False  # True: other processes add and remove objects; the chain asks discover() on index misses
    prefetchable = False  # True: worth reading ahead of use into the memory tiers above it (``prefetch``)
    # False: another process may free and reuse the bytes under a view this process leased (a region
    # shared between processes that takes no cross-process pins), so ``lease`` hands out no such
    # view, only a checked private copy
    stable_views = True

    def __init__(self, cfg: TierConfig, store_cfg: StoreConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.capacity = cfg.capacity
        self.store_cfg = store_cfg
        self.used = 0  # bytes held: visible, reserved, and retired-but-leased objects
        self.counters = TierCounters()
        self.pinned = False  # memory tiers: views are page-locked, so copies to the GPU may be asynchronous
        self.seam = streams.active()  # the device seam (strata.streams) copies out of this tier go through
        self.chain_lock = None  # the lock of the chain that drives this tier (strata.store.chain_lock.ChainLock)

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

    # -- finding objects ------------------------------------------------------------------
    def lookup(self, key: bytes) -> Entry | None:
        """The entry this tier indexes under ``key``, or None (lock)."""
        raise NotImplementedError

    def probe(self, key: bytes) -> Entry | None:
        """The entry a read of ``key`` goes through, or None for a miss (lock). Its ``meta`` may be
        None: the stored dtype and shape then come with the bytes (``read_many`` sets it)."""
        raise NotImplementedError

    def exists_many(self, keys: list[bytes]) -> list[bool]:
        """Which keys this tier holds (no lock: a backing tier asks its store)."""
        raise NotImplementedError

    def holds(self, e: Entry) -> bool:
        """Whether ``e``, an entry this tier published, is still the object it holds under its key
        (it may have been evicted, or replaced by a newer put). Any thread, no lock needed."""
        raise NotImplementedError

    def contents(self) -> Iterator[tuple[bytes, str, int]]:
        """(key, namespace, stored bytes) of every object (no lock: a listing may do I/O)."""
        raise NotImplementedError

    # -- writing: reserve, write, then publish or abort ----------------------------------------
    def stored_size(self, key: bytes, meta: ObjectMeta) -> int:
        """Bytes one object takes in this tier (lock)."""
        return meta.nbytes

    def reserve(self, key: bytes, ns: str, meta: ObjectMeta, evict: EvictHook) -> Entry | None:
        """A not-yet-visible entry with room for ``meta``'s payload, or None (lock). A memory tier
        evicts as its policy allows, asking ``evict`` first about each victim."""
        raise NotImplementedError

    def write_many(self, pairs: list[tuple[Entry, torch.Tensor]]) -> list[bool]:
        """Store each payload in its reserved entry (no lock); per pair True, or False on a fault
        (counted in ``counters.errors``). Never raises for an I/O fault."""
        raise NotImplementedError

    def publish(self, e: Entry, count: bool = True) -> None:
        """Make the written ``e`` the object under its key, retiring an older one (lock)."""
        raise NotImplementedError

    def abort(self, e: Entry) -> None:
        """Give back a reserved entry whose write failed or lost to a newer put (lock): never
        visible to a lookup."""
        raise NotImplementedError

    def retire(self, e: Entry) -> None:
        """Make ``e`` unreachable: deleted, evicted, replaced, or corrupt (lock); its bytes go once
        no lease holds them."""
        raise NotImplementedError

    def remove(self, key: bytes) -> bool:
        """Delete what the index does not know of ``key`` (another process's file, a store's value),
        after the chain retired what it indexes (no lock); whether something was removed."""
        return False

    # -- reading: lease, read, release -------------------------------------------------------
    def lease(self, e: Entry) -> bool:
        """Keep ``e``'s bytes from being freed until ``release`` (lock); False (not leased) where
        they are gone already: another process removed the object of a shared tier since the index
        last looked (a miss)."""
        e.leases += 1
        return True

    def release(self, e: Entry) -> None:
        e.leases -= 1

    def touch(self, e: Entry) -> None:
        """A read used ``e``: recency for eviction (lock)."""

    def read_many(self, entries: list[Entry]) -> list:
        """Per leased entry its payload (a CPU tensor of the stored dtype and shape) or the exception
        a read of it met: NotStored, CorruptObject (the chain retires it), OSError (no lock)."""
        raise NotImplementedError

    def read(self, e: Entry) -> torch.Tensor:
        """The payload of the leased ``e`` as a CPU tensor, or the exception ``read_many`` gives."""
        got = self.read_many([e])[0]
        if isinstance(got, BaseException):
            raise got
        return got

    def read_into(self, e: Entry, out: torch.Tensor) -> None:
        """Copy the payload into ``out`` (a contiguous CPU tensor of the stored dtype and shape)."""
        raise NotImplementedError

    # -- device copies out of views (memory tiers) ----------------------------------------
    def check_view(self, e: Entry) -> None:
        """With ``verify``, CorruptObject unless the bytes in place match the payload checksum."""

    def hold_until(self, e: Entry, event) -> None:
        """Keep ``e``'s lease until ``event`` (a recorded device event) completes (lock)."""
        raise NotImplementedError

    def copies_in_flight(self) -> list:
        """The events of device copies still holding leases (lock)."""
        return []

    def reap(self, wait: bool = False) -> None:
        """Give back the leases of copies that have completed (with ``wait``: of all of them)."""

    # -- objects other processes add and remove (``shared`` tiers) -------------------------
    def discover(self, keys: list[bytes]) -> list:
        """Per key that the index missed, what another process stored under it (a token for
        ``adopt``) or None (no lock: I/O)."""
        return [None] * len(keys)

    def adopt(self, found) -> Entry | None:
        """Index what ``discover`` found (lock); the entry, or None."""
        return None

    def vanished_among(self, entries: list[Entry]) -> list[Entry]:
        """Those of ``entries`` another process removed (no lock: I/O)."""
        return []

    def forget(self, e: Entry) -> None:
        """Drop an entry whose object another process removed (lock)."""
        self.retire(e)

    # -- writes down of objects other processes put (a region they share) ------------------------
    # True (a cxl region that takes cross-process locks, with a writable tier below it): another
    # process may evict this process's objects, so it marks each as written below once it is
    # (``mark_written_below``); until then only this process writes it down
    marks_below = False
    writes_down = False  # set by the chain: a writable tier lies below this one

    def owned_elsewhere(self, e: Entry) -> bool:
        """Whether another live process put ``e`` and has not yet written it to the tiers below
        (lock): only that process may write it down, since its writes of the key are ordered with
        each other and another process's would not be. Evicted once it is marked written below."""
        return False

    def written_below(self, e: Entry) -> bool:
        """Whether the process that put ``e`` marked it written to a tier below (lock): it may be
        evicted without writing it again."""
        return False

    def mark_written_below(self, e: Entry) -> None:
        """``e``, put by this process, now has its very version in a tier below (lock): other
        processes may evict it without writing it down (``marks_below`` tiers)."""

    # -- reporting and lifecycle ----------------------------------------------------------
    def stats_extra(self) -> dict:
        return {}

    def refresh(self) -> None:
        """Update what stats() reports from outside the process (called without the chain lock)."""

    def location(self) -> str:
        """Where the bytes live, for humans."""
        return self.stats_extra().get("path") or ("pinned memory" if self.pinned else "memory")

    def close(self) -> None:
        pass

    def _held(self) -> dict:
        """``bytes`` and ``objects`` for ``stats()``, where the tier knows them."""
        return {}

    def stats(self) -> dict:
        c = self.counters
        out = {
            "kind": self.kind,
            "capacity": self.capacity,
            **self._held(),
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
