"""TierChain: ordered tiers, read-through with promotion, write-through or write-back links.

Index and accounting changes happen under one lock; payload copies, file writes and
network round trips run outside it on reserved (invisible) or leased (unfreeable)
entries. That includes demotion on eviction: a victim that must live on below is leased,
written down after the lock is let go, and only then evicted (``_reserve``). I/O that an index
change under the lock calls for (unlinking a retired object's file, flushing a cleared cxl slot,
a DEL on a backing store) is deferred by the tier (``Tier.after_unlock``) and run by the thread that
made the change as it lets the lock go (``ChainLock``), before its store call returns; a put
short of room that device copies still hold waits for them outside the lock too. A tier that
fails (an I/O error, a checksum mismatch) degrades to a miss and a counter.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, TypeVar

import torch

from strata.config import StoreConfig, format_size
from strata.store.chain_lock import ChainLock
from strata.store.codec import CorruptObject, ObjectMeta, checksum, fit_out
from strata.store.inflight import KeyChanges, KeysInFlight
from strata.store.tiers.base import CopiesInFlight, Entry, NotStored, Tier
from strata.store.writeback import WriteBack

log = logging.getLogger("strata.chain")
Guard = Callable[[], bool]
T = TypeVar("T")
_DEMOTION_ROUNDS = 4  # reserve, demote victims outside the lock, retry: at most this many times per write
_DOWN_WAIT_S = 30.0  # the longest a flush or a reservation waits for another writer (of an entry, a key, a region)
_COPY_WAITS = 16  # a reservation waits at most this many times for device copies holding a tier's room


class _Put:
    """One object of a put on its way down the chain: its bytes as the next tier takes them, the
    guard of the tier above it (checked under the lock before publishing: False means a newer put
    won), and what each tier made of it (for ``_settle_put``). A ``promotion`` (a copy of what a
    read found below) a tier cannot take is no refused put: not counted in ``rejected``."""

    __slots__ = ("key", "ns", "meta", "data", "guard", "kept", "refused", "promotion")

    def __init__(self, key: bytes, ns: str, meta: ObjectMeta, data: torch.Tensor, guard: "Guard | None",
                 promotion: bool = False):
        self.key, self.ns, self.meta, self.data, self.guard = key, ns, meta, data, guard
        self.promotion = promotion
        self.kept: list[tuple[Tier, Entry]] = []
        self.refused: list[tuple[Tier, Entry]] = []  # (tier, its older version) where nothing above holds the new one


class _Sparing:
    """An evict hook for a promotion of a ``promote: keep`` namespace: it keeps every object of a
    namespace of its priority (``floor``) or higher, which a tier may skip without asking
    (``spares``), and asks ``hook`` about the others."""

    __slots__ = ("hook", "cfg", "floor")

    def __init__(self, hook, cfg: StoreConfig, floor: int):
        self.hook, self.cfg, self.floor = hook, cfg, floor

    def spares(self, ns: str) -> bool:
        return self.cfg.policy(ns).priority >= self.floor

    def __call__(self, t: Tier, e: Entry) -> bool:
        return not self.spares(e.ns) and self.hook(t, e)


def _value(got: "torch.Tensor | Exception") -> torch.Tensor:
    """A batched read's outcome for one key: the payload, or its exception raised."""
    if isinstance(got, BaseException):
        raise got
    return got


def _warn_rejected(tier: Tier, item: "_Put") -> None:
    """Say so when a tier starts refusing puts (then at every power of ten): a persistent tier full of
    objects it may not evict (e.g. weights a killed process left: ``strata gc``) must not go unseen."""
    n = tier.counters.rejected
    if n == 10 ** (len(str(n)) - 1):
        held = ", ".join(f"{ns} {format_size(b)}" for ns, b in sorted(tier.counters.ns_bytes.items()) if b)
        log.warning("tier %s refused a put (%s, %s): %d refused so far; it holds %s of %s (%s)", tier.name, item.ns,
                    format_size(item.meta.nbytes), n, format_size(tier.used), format_size(tier.capacity), held or "nothing")


class TierChain:
    def __init__(self, tiers: list[Tier], cfg: StoreConfig):
        self.tiers = tiers
        self.cfg = cfg
        self.lock = ChainLock()
        for i, t in enumerate(tiers):
            t.chain_lock = self.lock
            t.writes_down = any(u.writable for u in tiers[i + 1:])
        self._writes_done = threading.Condition(self.lock)
        self._writing = KeysInFlight(self._writes_done)  # keys with a flush or a demotion in flight
        self._down: set[Entry] = set()  # entries a flush, a demotion or their put is writing down: one writer each
        # puts and deletes, for promotions (``_promote``): none where no tier has one above it
        self._changes = KeyChanges() if len(tiers) > 1 else None
        self.dropped_dirty = 0  # write-back objects evicted before reaching the tier below
        self.writeback = None
        if any(t.cfg.write == "back" for t in tiers[:-1]):
            wb = cfg.writeback
            self.writeback = WriteBack(self._flush_many, wb.max_pending, wb.max_pending_bytes)

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: bytes, ns: str, meta: ObjectMeta, data: torch.Tensor) -> bool:
        if self._changes is None:
            return self._put_many_from(0, [_Put(key, ns, meta, data, None)], block=True)[0]
        with self._changing((key,)):
            return self._put_many_from(0, [_Put(key, ns, meta, data, None)], block=True)[0]

    def put_many(self, items: list[tuple[bytes, str, ObjectMeta, torch.Tensor]]) -> list[bool]:
        """``put`` of many objects, tier by tier: each tier takes the batch in one ``write_many``
        (a backing tier: round trips of many values, not one per object)."""
        out: list[bool] = []
        batch: list[_Put] = []
        seen: set[bytes] = set()
        with self._changing([k for k, _, _, _ in items]):
            for k, ns, meta, data in items:
                if k in seen:  # a key twice: its puts in order, as one at a time would make them
                    out += self._put_many_from(0, batch, block=True)
                    batch, seen = [], set()
                batch.append(_Put(k, ns, meta, data, None))
                seen.add(k)
            return out + (self._put_many_from(0, batch, block=True) if batch else [])

    @contextlib.contextmanager
    def _changing(self, keys):
        """A put or delete of ``keys`` under way: a promotion of them read before it ends is not
        published (``KeyChanges``)."""
        if self._changes is None:
            yield
            return
        with self.lock:
            self._changes.begin(keys)
        try:
            yield
        finally:
            with self.lock:
                self._changes.end(keys)

    def _put_many_from(self, i: int, puts: list["_Put"], block: bool) -> list[bool]:
        """Write ``puts`` into tier ``i`` and those below it, as far as each goes (``_landed``), one
        ``write_many`` per tier for all of them. An entry a write-through tier took is being written
        down by this put until it ends (in ``_down``): an eviction meanwhile waits for it rather than
        demote it alongside (the write that lost the race, its guard gone, took back the other's copy)."""
        going = puts
        passing: list[Entry] = []
        try:
            while i < len(self.tiers) and going:
                tier = self.tiers[i]
                if not tier.writable:
                    i += 1
                    continue
                for p in going:
                    if i > 0 and p.data.device.type != "cpu":
                        p.data = p.data.cpu()
                    if tier.persistent and p.meta.checksum is None:
                        p.meta = p.meta.with_checksum(checksum(p.data.cpu()))
                        for _, e in p.kept:  # the copies above name their version too (``_copy_below``)
                            e.meta = p.meta
                write_back = tier.cfg.write == "back" and i + 1 < len(self.tiers)
                below = not write_back and any(t.writable for t in self.tiers[i + 1:])
                entries = self._write_many(tier, going, dirty=write_back, passing=passing if below else None)
                going = [p for p, e in zip(going, entries) if self._landed(i, tier, p, e, write_back, block)]
                i += 1
        except BaseException:  # the older versions this put overtook are theirs to write down again
            with self.lock:
                for p in puts:
                    for _, old in p.refused:
                        old.overtaken -= 1
            raise
        finally:
            if passing:
                with self.lock:
                    self._down.difference_update(passing)
                    self._writes_done.notify_all()
        return [self._settle_put(p.kept, p.refused) for p in puts]

    def _landed(self, i: int, tier: Tier, p: "_Put", e: Entry | None, write_back: bool, block: bool) -> bool:
        """What tier ``i``'s write ``e`` of ``p`` (None: refused) means; whether ``p`` goes on down.
        A write-back tier that took it queues it for the next tier; a write-through tier that took
        it passes it on, guarded by its own entry there (a newer put above wins)."""
        if e is None and p.guard is not None:  # refused, the new version above: drop the older one here
            self._drop_older(tier, p.key, p.guard)
        elif e is None:  # nothing above holds it: the older version here goes once a tier below takes it,
            with self.lock:  # and is never written down meanwhile (it would land over the newer one)
                old = tier.lookup(p.key)
                if old is not None:
                    old.overtaken += 1
                    p.refused.append((tier, old))
        if e is None:
            return True
        self._mark_written_below(p.kept)
        p.kept.append((tier, e))
        if write_back:
            self.writeback.enqueue(i, e, block=block)
            return False
        p.guard = (lambda t=tier, ent=e: t.holds(ent))
        return True

    def _mark_written_below(self, kept: list[tuple[Tier, Entry]]) -> None:
        """A tier below took a put that the write-through tiers above (``kept``) passed on: their
        copies are of a version a tier below holds (``copied``), and those that tell other processes
        (``Tier.marks_below``) mark theirs written below."""
        for _, e in kept:
            e.copied = True
        marking = [(t, e) for t, e in kept if t.marks_below]
        if marking:
            with self.lock:
                for t, e in marking:
                    if t.holds(e):
                        t.mark_written_below(e)

    def _settle_put(self, kept: list[tuple[Tier, Entry]], refused: list[tuple[Tier, Entry]]) -> bool:
        """Whether some tier still holds a put's bytes: one that took them may have evicted them (or a
        newer put replaced them) before a lower tier's write, which was then not published; an
        eviction that demoted them first (another thread's put) left them below (``copied``). If
        held, the older versions left in tiers above that refused it go (they would be served
        first); if not, they stay: the put failed and they are still the newest acknowledged version
        (which may be written down again)."""
        if not refused:  # nothing to retire: a look at the index needs no lock (a dict read is atomic)
            return any(t.holds(e) or e.copied for t, e in kept)
        with self.lock:
            held = any(t.holds(e) or e.copied for t, e in kept)
            for tier, old in refused:
                old.overtaken -= 1
                if held and tier.holds(old):
                    tier.retire(old)
            return held

    def _drop_older(self, tier: Tier, key: bytes, guard: Guard) -> None:
        """A lower tier could not take a new version of ``key``: its older version must not outlive
        it there (after the tiers above evict the new one, or a restart, it would be served).
        Only while this put is still the newest above (``guard``): else the copy there is newer."""
        with self.lock:
            old = tier.lookup(key)
            if old is not None and guard():
                tier.retire(old)

    def _write_many(self, tier: Tier, items: list[_Put], dirty: bool = False,
                    passing: list[Entry] | None = None) -> list[Entry | None]:
        """Write items into ``tier`` (a backing tier batches them): per item the published entry,
        or None where it was rejected, failed or lost to a newer put of its key (a guard that no
        longer holds). With ``passing`` the entries published are marked as being written down
        (``_down``) as they are published, and listed there."""
        entries = self._reserve(tier, items)
        reserved = [(e, item.data) for e, item in zip(entries, items) if e is not None]
        written: list[bool] = []
        try:
            written = tier.write_many(reserved)
        finally:
            ok = iter(written)
            with self.lock:
                for j, (e, item) in enumerate(zip(entries, items)):
                    if e is None:
                        continue
                    # A newer put of the same key may have won meanwhile: never publish stale bytes.
                    if next(ok, False) and (item.guard is None or item.guard()):
                        e.dirty = dirty
                        tier.publish(e)
                        if passing is not None:
                            self._down.add(e)
                            passing.append(e)
                    else:
                        tier.abort(e)
                        entries[j] = None
        return entries

    def _hold_down(self, tier: Tier, e: Entry) -> bool:
        """Lease ``e`` to write it to the tiers below (lock held), a write a delete waits for (so it
        cannot land after the delete); False where it cannot be leased (another process removed it).
        One writer at a time: the flusher and a demotion must not both write it (the one whose write
        lands after the other retired ``e`` would abort it, taking back the copy the other published)."""
        if not tier.lease(e):
            return False
        self._writing.begin(e.key)
        self._down.add(e)
        return True

    def _let_go(self, tier: Tier, e: Entry) -> None:
        tier.release(e)
        self._down.discard(e)
        self._writing.end(e.key)
        self._writes_done.notify_all()

    def _await_down(self, e: Entry) -> bool:
        """Wait (lock held) until nobody is writing ``e`` down; False if that takes over
        ``_DOWN_WAIT_S`` (the caller leaves ``e`` alone)."""
        deadline = time.monotonic() + _DOWN_WAIT_S
        while e in self._down:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._writes_done.wait(left)
        return True

    def _reserve(self, tier: Tier, items: list[_Put]) -> list[Entry | None]:
        """Room in ``tier`` for each item: per item a reserved (invisible) entry, or None (counted
        as rejected). Eviction happens under the lock, but a victim that must live on below (dirty,
        or ``evict: lower`` with no copy below) is not written there under it: it is leased and
        set aside, demoted after the lock is let go (``_demote``), and then its room is retried.
        Readers meanwhile find the victim whole where it was. Room that device copies out of the
        tier still hold (``CopiesInFlight``) is waited for after the lock is let go, then retried.
        An item whose guard no longer holds (a write down of a version replaced above) is not
        reserved at all: None, not counted as rejected."""
        entries: list[Entry | None] = [None] * len(items)
        stale: set[int] = set()  # items whose version the tier above no longer holds: not written
        rounds = waits = 0
        deadline = time.monotonic() + _DOWN_WAIT_S
        # A remote tier may make a put wait for another of its key (KeyBusy): every writer reserves
        # its keys in one order, so two batches never wait for each other's.
        order = sorted(range(len(items)), key=lambda j: items[j].key) if tier.remote else range(len(items))
        try:
            while rounds < _DEMOTION_ROUNDS:
                victims: list[Entry] = []
                busy: list[Entry] = []  # victims the flusher is writing down: evictable once it is done
                copies: list = []  # events of device copies holding room the tier is short of
                with self.lock:
                    try:
                        for j in order:
                            item = items[j]
                            if entries[j] is not None or j in stale:
                                continue
                            if item.guard is not None and not item.guard():
                                stale.add(j)  # a write down of a version replaced above meanwhile
                                continue
                            evict = self._evict_hook(tier, victims, tier.stored_size(item.key, item.meta), busy)
                            pol = self.cfg.policy(item.ns)
                            if item.promotion and pol.promote == "keep":
                                evict = _Sparing(evict, self.cfg, pol.priority)
                            try:
                                entries[j] = tier.reserve(item.key, item.ns, item.meta, evict)
                            except CopiesInFlight as exc:
                                copies = exc.events
                                waits += exc.counted
                                break
                    except BaseException:  # victims set aside must not stay held (a delete would wait forever)
                        for e in victims:
                            self._let_go(tier, e)
                        raise
                if copies:  # waited for without the lock; the next reservation reaps them
                    for event in copies:
                        event.synchronize()
                if victims:
                    self._demote(tier, victims)
                if all(e is not None or j in stale for j, e in enumerate(entries)):
                    break
                if copies and waits < _COPY_WAITS and time.monotonic() < deadline:
                    continue
                rounds += 1
                if victims:
                    continue
                if not busy:
                    break
                with self.lock:  # the flusher's write of a victim ends with it clean, evictable
                    self._await_down(busy[0])
        except BaseException:  # reservations made must not stay (a put of their keys would wait for them)
            with self.lock:
                for e in entries:
                    if e is not None:
                        tier.abort(e)
            raise
        if None in entries:
            with self.lock:
                for j, (item, e) in enumerate(zip(items, entries)):
                    if e is None and j not in stale and not item.promotion:
                        tier.counters.rejected += 1
                        _warn_rejected(tier, item)
        return entries

    def _evict_hook(self, tier: Tier, victims: list[Entry], want: int, busy: list[Entry]):
        """The hook ``tier.reserve`` asks (under the lock) before evicting an entry: True to evict it
        now; False to keep it, leasing it into ``victims`` for demotion first (up to ``want`` bytes
        of them per reservation, so one put never demotes a whole tier), or into ``busy`` when the
        flusher is writing it down already."""
        i = self.tiers.index(tier)
        below = self.tiers[i + 1 :]
        deferred = [0]

        def evict(t: Tier, e: Entry) -> bool:
            pol = self.cfg.policy(e.ns)
            if below and t.owned_elsewhere(e):
                return False  # another process's, not yet written below: only it writes it down
            if not (e.dirty or (pol.evict == "lower" and not (t.written_below(e) or self._copy_below(below, e)))):
                return True  # clean, or a copy lives below already
            if not below:
                if pol.evict == "drop":
                    self.dropped_dirty += e.dirty
                    return True
                return False
            if e in self._down:
                busy.append(e)
                return False
            if e.overtaken:  # a newer version is on its way below: this one must not follow it there
                return False
            if deferred[0] < want:
                if not self._hold_down(t, e):
                    return False  # cannot be leased to demote now: kept
                victims.append(e)
                deferred[0] += e.size
            return False

        return evict

    @staticmethod
    def _copy_below(below: list[Tier], e: Entry) -> bool:
        """Whether a tier of ``below`` holds ``e``'s very version (lock held): its header, payload
        checksum included. An older version of the key there (a write of this one still in flight)
        is no copy: evicting ``e`` for it would lose the newer bytes. Without a checksum to tell,
        no copy (a demotion writes it down again)."""
        if e.meta.checksum is None:
            return False
        for b in below:
            c = b.lookup(e.key)
            if c is not None and c.meta == e.meta:
                return True
        return False

    def _demote(self, tier: Tier, victims: list[Entry]) -> None:
        """Write leased victims of ``tier`` to the tiers below (outside the lock, one batch per
        tier), but those a store below still holds (``_held_below``), then evict those that made
        it (or may be dropped), unless a newer put replaced them meanwhile."""
        oks = [False] * len(victims)
        try:
            i = self.tiers.index(tier)
            oks = self._held_below(i, victims)
            todo = [j for j, held in enumerate(oks) if not held]
            for j, ok in zip(todo, self._copy_down(i, [victims[j] for j in todo])):
                oks[j] = ok
        finally:
            with self.lock:
                for e, ok in zip(victims, oks):
                    if ok:
                        e.dirty, e.copied = False, True
                    if tier.holds(e) and (ok or self.cfg.policy(e.ns).evict == "drop"):
                        self.dropped_dirty += e.dirty
                        tier.retire(e)
                        tier.counters.evictions += 1
                    self._let_go(tier, e)

    def _held_below(self, i: int, entries: list[Entry]) -> list[bool]:
        """Per leased entry of tier ``i``, whether a store below it (a backing tier, which keeps no
        index to look in under the lock as ``_copy_below`` does) still holds the key of a clean
        entry whose version reached the tiers below (``copied``: written through, flushed,
        demoted, or promoted from there). Asked outside the lock, one round trip per store: such
        an entry is evicted without writing it again (each eviction of a weight promoted from
        Redis wrote it back over the network), and one the store let go is written down."""
        held = [False] * len(entries)
        asked = [j for j, e in enumerate(entries) if e.copied and not e.dirty]
        for t in self.tiers[i + 1 :]:
            if not asked:
                break
            if t.remote:
                for j, h in zip(asked, t.exists_many([entries[j].key for j in asked])):
                    held[j] = h
                asked = [j for j in asked if not held[j]]
        return held

    def _flush_many(self, items: list[tuple[int, Entry]]) -> list[bool]:
        """Write dirty entries (``(tier index, entry)``, the write-back queue's) to the tiers below
        them: one ``_flush_from`` per tier they are in. Per item whether it is clean now."""
        done = [False] * len(items)
        by_tier: dict[int, list[int]] = {}
        for j, (i, _) in enumerate(items):
            by_tier.setdefault(i, []).append(j)
        for i, js in by_tier.items():
            for j, ok in zip(js, self._flush_from(i, [items[j][1] for j in js])):
                done[j] = ok
        return done

    def _flush_from(self, i: int, entries: list[Entry]) -> list[bool]:
        """Flush dirty entries of tier ``i``: each still current there is leased (a demotion writing
        one down goes first) and copied down (``_copy_down``). Per entry whether it is clean now
        (True too for one replaced, deleted or already clean)."""
        tier = self.tiers[i]
        free, skip, todo = [], [], []
        with self.lock:
            for e in entries:  # each held as soon as it is free (a wait for the next lets the lock go)
                free.append(self._await_down(e))
                skip.append(not e.dirty or not tier.holds(e))
                if free[-1] and not skip[-1]:
                    if self._hold_down(tier, e):
                        todo.append(e)
                    else:
                        skip[-1] = True  # another process removed it: nothing to flush
        oks: list[bool] = []
        try:
            oks = self._copy_down(i, todo)
        finally:
            stored = {id(e) for e, ok in zip(todo, oks) if ok}
            with self.lock:
                for e in todo:
                    if id(e) in stored:  # clean before it is let go: no eviction writes it down again
                        e.dirty, e.copied = False, True
                        tier.mark_written_below(e)
                    self._let_go(tier, e)
        return [f and (s or id(e) in stored) for e, s, f in zip(entries, skip, free)]

    def _copy_down(self, i: int, entries: list[Entry]) -> list[bool]:
        """Write ``entries``, leased in tier ``i``, to the tiers below it (outside the lock, one
        batch per tier), each published there only while it is still the current version in tier
        ``i`` (a newer put writes its own, into tier ``i`` or, where that refused it, past it:
        ``overtaken``). Per entry whether a tier below holds it."""
        tier = self.tiers[i]
        puts, at = [], []
        for j, e in enumerate(entries):
            data = self._payload(tier, e)
            if data is not None:
                guard = (lambda e=e: tier.holds(e) and not e.overtaken)
                puts.append(_Put(e.key, e.ns, self._with_checksum(e, data), data, guard))
                at.append(j)
        ok = [False] * len(entries)
        for j, held in zip(at, self._put_many_from(i + 1, puts, block=False) if puts else ()):
            ok[j] = held
        return ok

    def _payload(self, tier: Tier, e: Entry) -> torch.Tensor | None:
        """The entry's payload as a CPU tensor (a view in place for memory tiers)."""
        if e.view is not None:
            return e.view
        try:
            return tier.read(e)
        except NotStored:  # another process removed it: nothing to move, and no fault
            return None
        except (OSError, CorruptObject):
            tier.counters.errors += 1
            return None

    @staticmethod
    def _with_checksum(e: Entry, data: torch.Tensor) -> ObjectMeta:
        if e.meta.checksum is None:
            e.meta = e.meta.with_checksum(checksum(data))
        return e.meta

    # -- reads -------------------------------------------------------------------------------
    def read(self, key: bytes, order: list[int], promote: bool,
             out: torch.Tensor | None = None) -> tuple[ObjectMeta, torch.Tensor] | None:
        """Find ``key`` in ``order``'s tiers: (meta, payload) or None on a miss everywhere.
        With ``out`` the payload is copied into it (see ``fit_out``); otherwise it is a new CPU
        tensor of the stored dtype and shape."""
        for i in order:
            tier = self.tiers[i]
            for _ in range(2 if tier.shared else 1):  # once more where another process replaced the file
                since = self._changes.now() if i else 0
                e = self._open(tier, key)
                if e is None:
                    break
                got = self._settle(tier, e, lambda: self._read_entry(tier, e, out))
                if got is not None:
                    data, host_copy = got
                    if promote and i > 0 and host_copy is not None:
                        self._promote(i, key, e, host_copy, since)
                    return e.meta, data
                if not e.dead:
                    break
        return None

    def read_many(self, keys: list[bytes], order: list[int], promote: bool) -> list:
        """``read`` of many keys, per key (meta, payload) or None. Each tier gets the keys no tier
        before it had in one ``read_many`` (a backing tier: pipelined round trips, not one per key)."""
        found: list = [None] * len(keys)
        for i in order:
            todo = [j for j, f in enumerate(found) if f is None]
            if not todo:
                break
            tier = self.tiers[i]
            since = self._changes.now() if i else 0
            opened = [(j, e) for j in todo if (e := self._open(tier, keys[j])) is not None]
            try:
                fetched = tier.read_many([e for _, e in opened])
            except BaseException:
                with self.lock:
                    for _, e in opened:
                        tier.release(e)
                raise
            for (j, e), got in zip(opened, fetched):
                data = self._settle(tier, e, lambda got=got: _value(got))
                if data is None:
                    if e.dead and tier.shared:  # another process replaced the file: as ``read`` does
                        found[j] = self.read(keys[j], [i], promote)
                    continue
                if promote and i > 0:
                    self._promote(i, keys[j], e, data, since)
                found[j] = (e.meta, data)
        return found

    def _open(self, tier: Tier, key: bytes) -> Entry | None:
        """The leased entry a read of ``key`` in ``tier`` goes through, or None (a miss, counted).
        A shared tier whose index misses is asked, outside the lock, what another process stored."""
        with self.lock:
            e = tier.probe(key)
            if e is not None or not tier.shared:
                return self._lease_hit(tier, e)
        found = tier.discover([key])[0]
        with self.lock:
            return self._lease_hit(tier, None if found is None else tier.adopt(found))

    @staticmethod
    def _lease_hit(tier: Tier, e: Entry | None) -> Entry | None:
        if e is None or not tier.lease(e):
            tier.counters.misses += 1
            return None
        tier.touch(e)
        return e

    def _settle(self, tier: Tier, e: Entry, fetch: Callable[[], T]) -> T | None:
        """``fetch()`` the payload of the leased ``e``, release it, count a hit; a fault is a miss
        and a counter (a corrupt object is retired), never an exception. Where a shared tier's
        object is gone or corrupt, ``read`` looks in it once more and that look counts the miss."""
        try:
            data = fetch()
        except NotStored:  # a backing store had nothing under the key; a shared tier's file is gone
            with self.lock:
                if not tier.shared:
                    tier.counters.misses += 1
                tier.release(e)
            return None
        except (CorruptObject, OSError) as exc:
            corrupt = isinstance(exc, CorruptObject)
            log.warning("tier %s: %s, treated as a miss (%s)", tier.name,
                        "corrupt object dropped" if corrupt else "read failed", exc)
            with self.lock:
                if not (corrupt and tier.shared):
                    tier.counters.misses += 1
                if corrupt:
                    tier.counters.checksum_failures += 1
                    tier.retire(e)  # never served again
                else:
                    tier.counters.errors += 1
                tier.release(e)
            return None
        except BaseException:
            with self.lock:
                tier.release(e)
            raise
        with self.lock:
            tier.release(e)
            tier.counters.hits += 1
        return data

    def _read_entry(self, tier: Tier, e: Entry, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read the leased ``e``: (the payload where the caller wants it, a host copy of it to promote
        from, or None where the bytes went straight to device memory). Device copies go through the
        tier's device seam (``strata.streams``): from pinned bytes they are asynchronous, and the
        entry stays leased until the copy's event has fired."""
        if out is None:
            data = tier.read(e)
            return data, data
        dev = tier.seam
        if e.meta is None:  # a backing tier's: the stored dtype and shape are known once the value has arrived
            data = tier.read(e)
            target = fit_out(e.meta, out)
            dev.copy(target, data)
            return target, data
        target = fit_out(e.meta, out)
        if not dev.is_device_memory(target):
            tier.read_into(e, target)
            return target, target
        if e.view is not None and (tier.pinned or not tier.cfg.verify):
            dev.copy(target, e.view, non_blocking=tier.pinned)
            if tier.cfg.verify:  # checked once the copy has read them: bytes changed meanwhile are a miss
                if tier.pinned:
                    dev.current_stream(target.device).synchronize()
                tier.check_view(e)
            elif tier.pinned:  # the bytes must outlive the copy: lease until its event fires
                event = dev.event()
                event.record()
                with self.lock:
                    tier.hold_until(e, event)
            return target, None
        buf = tier.read(e)
        dev.copy(target, buf)
        return target, buf

    def _promote(self, i: int, key: bytes, e: Entry, data: torch.Tensor, since: int) -> None:
        """Write what a read found in tier ``i`` into the writable tiers above it that lack the key,
        each published only if no put or delete of the key was under way or ended ``since`` the
        read looked (it would land over the newer version, or bring a deleted one back)."""
        unchanged = (lambda: self._changes.unchanged(key, since))
        for j in range(i):
            upper = self.tiers[j]
            if not upper.writable:
                continue
            with self.lock:  # a lookup may bring the index up to date first (a shared cxl region)
                there = upper.lookup(key) is not None
            if there:
                continue
            promoted = self._write_many(upper, [_Put(key, e.ns, e.meta, data, unchanged, promotion=True)])[0]
            if promoted is not None:
                with self.lock:  # its very version lives below, where it was read
                    promoted.copied = True
                    upper.counters.promotions += 1
                    if upper.holds(promoted):
                        upper.mark_written_below(promoted)

    # -- lookups and deletes -------------------------------------------------------------------
    def where_many(self, keys: list[bytes], order: list[int]) -> list[int | None]:
        """Per key, the first tier of ``order`` that holds it, or None. Each tier is asked once,
        without the lock, for the keys no tier before it holds (a memory tier answers from its
        index, a backing tier asks its store, a shared tier also looks for other processes' objects)."""
        found: list[int | None] = [None] * len(keys)
        for i in order:
            tier = self.tiers[i]
            todo = [j for j, f in enumerate(found) if f is None]
            if not todo:
                break
            asked = [keys[j] for j in todo]
            have = self._shared_exists(tier, asked) if tier.shared else tier.exists_many(asked)
            for j, h in zip(todo, have):
                if h:
                    found[j] = i
        return found

    def _shared_exists(self, tier: Tier, keys: list[bytes]) -> list[bool]:
        """Which keys a shared tier holds, as other processes left it: what the index holds is
        checked to be still there, what it misses is looked for (I/O outside the lock)."""
        with self.lock:
            indexed = [tier.lookup(k) for k in keys]
        gone = tier.vanished_among([e for e in indexed if e is not None])
        gone_ids = {id(e) for e in gone}
        with self.lock:
            for e in gone:
                if tier.holds(e):
                    tier.forget(e)
        todo = [j for j, e in enumerate(indexed) if e is None or id(e) in gone_ids]
        found = tier.discover([keys[j] for j in todo])
        have = [e is not None and id(e) not in gone_ids for e in indexed]
        with self.lock:
            for j, f in zip(todo, found):
                have[j] = f is not None and tier.adopt(f) is not None
        return have

    def prefetch(self, keys: list[bytes]) -> int:
        """Read the keys no tier's index holds from the tiers worth reading ahead (``prefetchable``:
        backing stores) that have a writable tier to promote into above them (batched), and
        promote them; the number found."""
        sources = [i for i, t in enumerate(self.tiers)
                   if t.prefetchable and any(u.writable and not u.prefetchable for u in self.tiers[:i])]
        if not sources:
            return 0
        with self.lock:
            missing = [k for k in keys if all(t.lookup(k) is None for t in self.tiers)]
        if not missing:
            return 0
        return sum(f is not None for f in self.read_many(missing, sources, promote=True))

    def lease_view(self, key: bytes, stable: bool = True) -> tuple[Tier, Entry] | None:
        """Lease the topmost memory-tier copy of ``key`` (zero-copy view), or None. With ``stable``
        only in a tier whose views no other process can change (``Tier.stable_views``): a view of a
        region shared between processes that takes no cross-process pins could show another
        object's bytes once that process freed and reused the space, so the caller reads such a
        copy (checked) instead. A tier may refuse the lease (the object just left it): not there."""
        with self.lock:
            for tier in self.tiers:
                e = tier.lookup(key)
                if e is not None and e.view is not None and (tier.stable_views or not stable) and tier.lease(e):
                    tier.touch(e)
                    tier.counters.hits += 1
                    return tier, e
        return None

    def release(self, tier: Tier, e: Entry) -> None:
        with self.lock:
            tier.release(e)

    def delete(self, key: bytes) -> bool:
        with self._changing([key]):
            found = False
            with self.lock:
                for tier in self.tiers:
                    e = tier.lookup(key)
                    if e is not None:
                        tier.retire(e)
                        found = True
                self._writing.wait_out(key)  # a write in flight (a write-back flush) would land after the DEL
            for tier in self.tiers:  # what the indexes do not know: a store's value, other processes' files
                found = tier.remove(key) or found
            return found

    def keys(self) -> set[bytes]:
        """Every key some tier holds: top tier first, so an object a demotion moves meanwhile (written
        below before it leaves above) is seen. A backing tier lists its store (I/O, without the lock)."""
        out: set[bytes] = set()
        for t in self.tiers:
            out.update(k for k, _, _ in t.contents())
        return out

    # -- lifecycle ---------------------------------------------------------------------------
    def _dirty(self) -> list[tuple[int, Entry]]:
        """``(tier index, entry)`` of every write-back object not yet in the tier below it."""
        with self.lock:
            return [(i, e) for i, t in enumerate(self.tiers[:-1]) if t.cfg.write == "back"
                    for e in list(t.index.values()) if e.dirty]

    def _warn_unwritten(self) -> None:
        """At close: the write-back objects no tier below took, even at the last try (they go with
        a volatile tier), named per tier and namespace in one warning."""
        left = self._dirty()
        if not left:
            return
        by: dict[tuple[str, str], list[int]] = {}
        for i, e in left:
            n = by.setdefault((self.tiers[i].name, e.ns), [0, 0])
            n[0] += 1
            n[1] += e.size
        what = ", ".join(f"tier {t} {ns}: {n} objects, {format_size(b)}" for (t, ns), (n, b) in sorted(by.items()))
        log.warning("closing with write-back objects the tiers below did not take (%s); a persistent tier keeps "
                    "them, a volatile one loses them (stats: writeback.failed)", what)

    def flush(self) -> None:
        """Wait until the write-back queue is empty, then queue again what is still dirty (a flush
        that failed, the tier below refusing for a while, leaves its object dirty above and out of
        the queue) and wait for that too: one more try each, not a loop on a tier that keeps failing."""
        if self.writeback is None:
            return
        self.writeback.drain()
        dirty = self._dirty()
        for i, e in dirty:
            self.writeback.enqueue(i, e, block=False)
        if dirty:
            self.writeback.drain()

    def drain(self) -> None:
        """Flush (what is dirty gets one more try), saying what could still not be written down."""
        if self.writeback is not None:
            self.flush()
            self._warn_unwritten()

    def close(self) -> None:
        """``drain``; wait for device copies out of the tiers (without the lock), give their leases
        back, and close the tiers (a last flush or purge: I/O, without the lock)."""
        if self.writeback is not None:
            self.drain()
            self.writeback.close()
        with self.lock:
            copies = [event for t in self.tiers for event in t.copies_in_flight()]
        for event in copies:
            event.synchronize()
        with self.lock:
            for t in self.tiers:
                t.reap()
        for t in self.tiers:
            t.close()
