"""StorageEngine: the store's one facade (put / get / get_into / contains / delete, batches, stats)."""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import weakref
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import torch

from strata.config import StoreConfig, format_size
from strata.config_load import load_config
from strata.errors import StoreError, allowed
from strata.keys import Key
from strata.store.chain import TierChain
from strata.store.codec import describe, materialize
from strata.store.labels import ScopeLabels
from strata.store.readonly import Lease, read_only
from strata.store.tiers import build_tier

MODES = ("chain", "exact", "prefer")
log = logging.getLogger("strata.store")
_OPEN: "weakref.WeakValueDictionary[int, StorageEngine]" = weakref.WeakValueDictionary()  # by opening order
_OPENED = itertools.count()  # stores left open are closed at exit, newest first


class StorageEngine:
    """A tiered tensor store. Use as a context manager, or call ``close()``."""

    def __init__(self, config: "StoreConfig | dict | str | None" = None, *, create: bool = True):
        """``create=False`` only looks: a cxl region or a file tier's directory that does not exist
        yet is not made (``strata.store.tiers.RegionAbsent``), as ``strata stats``, ``inspect`` and
        ``gc`` open stores."""
        self.config = load_config(config)
        tiers = []
        try:
            for tc in self.config.tiers:
                tiers.append(build_tier(tc, self.config, create=create))
        except BaseException as e:
            for t in tiers:  # what opened before the failing tier is let go (mappings, locks, sockets)
                t.close()
            if isinstance(e, OSError):
                raise StoreError(f"tiers[{len(tiers)}] ({self.config.tiers[len(tiers)].kind}): cannot open: {e}") from e
            raise
        self.chain = TierChain(tiers, self.config)
        self._tier_index = {t.name: i for i, t in enumerate(tiers)}
        self._max_capacity = max(t.capacity for t in tiers)
        self._chain_order = list(range(len(tiers)))
        self._ns = defaultdict(lambda: defaultdict(int))
        self._ns_lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()  # a forked child must open its own: see _check_open
        self._closing: list[weakref.WeakMethod] = []  # on_close callbacks
        self._labels = ScopeLabels(tiers)  # what scopes fingerprint, beside the objects (no I/O here)
        self.exiting = False  # True while the interpreter's exit closes it (on_close clients need not restore)
        self._opened = next(_OPENED)
        _OPEN[self._opened] = self
        # dropped without close(): its tiers are still let go, and what write-back holds reaches them
        self._finalizer = weakref.finalize(self, _dropped_open, self.chain, self._pid)
        self._finalizer.atexit = False  # at exit _close_open_stores closes what is still open

    # -- helpers ----------------------------------------------------------------------------
    @property
    def tiers(self):
        return self.chain.tiers

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store: this StorageEngine is closed; allowed: open a new one (strata.open_store)")
        if self._pid != os.getpid():
            raise StoreError(self._forked())

    def _forked(self) -> str:
        return (f"store: opened in process {self._pid}, used in its fork {os.getpid()}, where its background "
                "threads do not run and its open files, with the region lock and lease pins they hold, are the "
                "parent's; allowed: open a store in the child (strata.open_store, or open it after the fork)")

    def _check_key(self, key: object) -> Key:
        self._check_open()
        if not isinstance(key, Key):
            raise StoreError(f"key: got {type(key).__name__}; allowed: strata.Key(namespace, scope, name)")
        return key

    def _check_keys(self, keys: object) -> list[Key]:
        """The keys of a ``*_many`` call as a list (a generator is read once), each checked."""
        self._check_open()
        if isinstance(keys, (Key, str, bytes)) or not isinstance(keys, Iterable):
            raise StoreError(f"keys: got {type(keys).__name__}; allowed: a list of strata.Key (for one key, the "
                             "call without _many)")
        out = list(keys)
        for i, k in enumerate(out):
            if not isinstance(k, Key):
                raise StoreError(f"keys[{i}]: got {type(k).__name__}; allowed: strata.Key(namespace, scope, name)")
        return out

    def _order(self, mode: str, tier: str | None) -> tuple[list[int], bool]:
        if mode == "chain" and tier is None:
            return self._chain_order, self.config.promote
        if mode not in MODES:
            raise StoreError(allowed("mode", mode, MODES))
        if mode == "chain":
            raise StoreError("tier: only used with mode='exact' or mode='prefer'")
        if tier not in self._tier_index:
            raise StoreError(allowed(f"tier (mode={mode!r})", tier, self._tier_index))
        first = self._tier_index[tier]
        if mode == "exact":
            return [first], False
        return [first] + [i for i in range(len(self.tiers)) if i != first], self.config.promote

    def _count(self, ns: str, event: str, nbytes: int) -> None:
        """Count one ``event`` (puts, put_rejected, hits, misses) of ``nbytes`` for a namespace."""
        with self._ns_lock:
            c = self._ns[ns]
            c[event] += 1
            if event == "puts":
                c["bytes_written"] += nbytes
            elif event == "hits":
                c["bytes_read"] += nbytes

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: Key, value: "torch.Tensor | bytes") -> bool:
        """Store ``value`` under ``key``. False (and a ``rejected`` counter) if no tier could take it
        now, e.g. every tier is full of pinned or in-use objects."""
        key, meta, data = self._checked_value(key, value)
        ok = self.chain.put(key.encoded, key.namespace, meta, data)
        self._count(key.namespace, "puts" if ok else "put_rejected", meta.nbytes)
        return ok

    def _checked_value(self, key: Key, value: "torch.Tensor | bytes") -> tuple[Key, object, "torch.Tensor"]:
        """(key, meta, data) of a value to put, or StoreError naming what is wrong with it."""
        key = self._check_key(key)
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            raise StoreError("value: a meta tensor has no data to store; allowed: a tensor on cpu or cuda "
                             "(materialize it first, e.g. load its weights)")
        meta, data = describe(value)
        if meta.nbytes > self._max_capacity:
            caps = ", ".join(f"{t.name}={format_size(t.capacity)}" for t in self.tiers)
            raise StoreError(f"value: {format_size(meta.nbytes)} is larger than every tier ({caps})")
        return key, meta, data

    def put_ranges(self, key: Key, dtype: torch.dtype, shape: tuple, extents: list, *, tier: str | None = None) -> bool:
        """Register an object whose bytes already lie in files (``strata.store.tiers.Extent`` list)
        with a read-only ``ranges`` tier; reads assemble it on demand. False if the tier is full."""
        key = self._check_key(key)
        ranges = [i for i, t in enumerate(self.tiers) if t.kind == "ranges" and (tier is None or t.name == tier)]
        if not ranges:
            raise StoreError(f"tier: this store has no ranges tier{f' named {tier!r}' if tier else ''}; "
                             "add one to the config: {kind: ranges}")
        meta, _ = describe(torch.empty(shape, dtype=dtype, device="meta"))
        with self.chain.lock:
            ok = self.tiers[ranges[0]].register(key.encoded, key.namespace, meta, extents) is not None
        self._count(key.namespace, "puts" if ok else "put_rejected", meta.nbytes)
        return ok

    def put_many(self, items: Iterable[tuple[Key, "torch.Tensor | bytes"]]) -> list[bool]:
        """``put`` of many values; each tier takes them as one batch (a backing tier in round
        trips of many values). Per value True, or False where no tier could take it."""
        if isinstance(items, (Key, str, bytes, dict)) or not isinstance(items, Iterable):
            raise StoreError(f"items: got {type(items).__name__}; allowed: a list of (strata.Key, value) pairs")
        checked = []
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise StoreError(f"items[{i}]: got {type(item).__name__}; allowed: a (strata.Key, value) pair")
            checked.append(self._checked_value(*item))
        oks = self.chain.put_many([(k.encoded, k.namespace, meta, data) for k, meta, data in checked])
        for (key, meta, _), ok in zip(checked, oks):
            self._count(key.namespace, "puts" if ok else "put_rejected", meta.nbytes)
        return oks

    def delete(self, key: Key) -> bool:
        key = self._check_key(key)
        return self.chain.delete(key.encoded)

    # -- reads -------------------------------------------------------------------------------
    def get(self, key: Key, *, mode: str = "chain", tier: str | None = None) -> "torch.Tensor | bytes | None":
        """The stored value (a new CPU tensor of the stored dtype and shape, or bytes), None on a miss."""
        key = self._check_key(key)
        order, promote = self._order(mode, tier)
        found = self.chain.read(key.encoded, order, promote)
        if found is None:
            self._count(key.namespace, "misses", 0)
            return None
        meta, data = found
        self._count(key.namespace, "hits", meta.nbytes)
        return materialize(meta, data)

    def get_into(self, key: Key, out: torch.Tensor, *, mode: str = "chain", tier: str | None = None) -> bool:
        """Copy the stored tensor into ``out`` (the stored dtype and element count in any shape,
        or uint8 of the stored byte size; contiguous; any device). From pinned memory to CUDA
        the copy is non-blocking on the current stream. False on a miss."""
        key = self._check_key(key)
        if not isinstance(out, torch.Tensor) or not out.is_contiguous():
            raise StoreError("out: allowed: a contiguous torch.Tensor")
        order, promote = self._order(mode, tier)
        found = self.chain.read(key.encoded, order, promote, out=out)
        if found is None:
            self._count(key.namespace, "misses", 0)
            return False
        self._count(key.namespace, "hits", found[0].nbytes)
        return True

    def get_many(self, keys: Sequence[Key], *, mode: str = "chain", tier: str | None = None) -> list:
        """``get`` of many keys (None for each miss); a remote tier is asked for the whole batch
        in pipelined round trips, not one per key."""
        keys = self._check_keys(keys)
        encoded = [k.encoded for k in keys]
        order, promote = self._order(mode, tier)
        out = []
        for key, found in zip(keys, self.chain.read_many(encoded, order, promote)):
            self._count(key.namespace, "misses" if found is None else "hits", found[0].nbytes if found else 0)
            out.append(None if found is None else materialize(*found))
        return out

    def prefetch(self, keys: Sequence[Key]) -> int:
        """Bring the keys that only a remote tier holds into the memory tiers above it, in
        batched round trips, so that the reads that follow hit locally (a KV load calls this
        for a prompt's chunks first). The number of keys brought up; 0 with ``promote: false``."""
        encoded = [k.encoded for k in self._check_keys(keys)]
        return self.chain.prefetch(encoded) if self.config.promote else 0

    def contains(self, key: Key, *, mode: str = "chain", tier: str | None = None) -> bool:
        return self.contains_many([key], mode=mode, tier=tier)[0]

    def contains_many(self, keys: Sequence[Key], *, mode: str = "chain", tier: str | None = None) -> list[bool]:
        """Which keys some tier holds; a remote tier is asked once for the whole batch."""
        encoded = [k.encoded for k in self._check_keys(keys)]
        order, _ = self._order(mode, tier)
        return [i is not None for i in self.chain.where_many(encoded, order)]

    @contextmanager
    def lease(self, key: Key) -> Iterator[torch.Tensor | None]:
        """A zero-copy, read-only view of the stored tensor in a memory tier, valid inside the
        ``with`` block (the bytes cannot be evicted or reused meanwhile). None on a miss.
        The view refuses in-place changes (``strata.store.readonly``): ``.clone()`` to change a copy.
        A copy found only in a lower tier is promoted first; one that no memory tier can take
        (full of leased objects, or no memory tier at all) is yielded as a private copy. A view of
        a region other processes share (cxl) pins its bytes for them too: they may delete the
        object, but never put other bytes there while the view is held. Where the region takes no
        such pins (``pins`` in its stats), its object is read and checked, then promoted or
        copied, never handed out in place."""
        with self.lease_many([key]) as views:
            yield views[0]

    @contextmanager
    def lease_many(self, keys: Sequence[Key], *, copies: bool = True) -> Iterator[list]:
        """``lease`` of many keys at once: a list of views (None for each miss). What no memory
        tier holds is read from the tiers below in one batch (pipelined round trips to a remote
        tier), promoted, and leased, or yielded as a private copy; with ``copies=False`` such a key
        is None instead (a caller that needs stored bytes at a fixed address: the static ring),
        and a view in a shared region is leased in place even where the region takes no pins:
        there another process must not delete or evict those keys meanwhile (the static ring's
        keys are scoped to its process)."""
        keys = self._check_keys(keys)
        encoded = [k.encoded for k in keys]
        held = [self.chain.lease_view(k, stable=copies) for k in encoded]
        views = [None if h is None else h[1].view for h in held]
        missing = [j for j, h in enumerate(held) if h is None]
        try:
            if missing:
                found = self.chain.read_many([encoded[j] for j in missing], self._chain_order, True)
                for j, f in zip(missing, found):
                    if f is not None:  # promoted: lease it there; else the reader's own copy
                        held[j] = self.chain.lease_view(encoded[j], stable=copies)
                        views[j] = (f[1] if copies else None) if held[j] is None else held[j][1].view
            for key, view in zip(keys, views):
                self._count(key.namespace, "misses" if view is None else "hits",
                            0 if view is None else view.numel() * view.element_size())
            lease = Lease()
            try:
                yield [None if v is None else read_only(v, lease) for v in views]
            finally:
                lease.ended = True  # the views refuse every use from now on (strata.store.readonly)
        finally:
            for h in held:
                if h is not None:
                    self.chain.release(*h)

    def keys(self, namespace: str | None = None) -> list[Key]:
        """Every key held by any tier (optionally of one namespace)."""
        self._check_open()
        out = []
        for raw in self.chain.keys():
            try:
                key = Key.decode(raw)
            except StoreError:  # a foreign value under a remote tier's prefix, or a namespace not registered here
                continue
            if namespace is None or key.namespace == namespace:
                out.append(key)
        return out

    def orphans(self) -> list[Key]:
        """Keys whose scope names an owner process that has exited (``strata.store.owners``):
        what a killed process left, which nobody can use and which would hold its tier's space
        forever. An owner this process cannot judge (another host) is never an orphan; keys of
        namespaces not registered here are left out (they cannot be named by a Key)."""
        from strata.keys import split_key
        from strata.store.owners import is_alive, owner_of

        self._check_open()
        verdicts: dict[str, bool] = {}  # scope -> dead; one /proc read per scope, not per key
        out = []
        for raw in self.chain.keys():
            try:
                _, scope, _ = split_key(raw)
            except StoreError:  # a foreign value under a remote tier's prefix
                continue
            if scope not in verdicts:
                owner = owner_of(scope)
                verdicts[scope] = owner is not None and is_alive(owner) is False
            if verdicts[scope]:
                try:
                    out.append(Key.decode(raw))
                except StoreError:
                    continue
        return out

    def gc(self) -> int:
        """Delete every orphan (see ``orphans``) from every tier; how many keys were dropped."""
        return sum(self.delete(key) for key in self.orphans())

    # -- scope labels --------------------------------------------------------------------------
    def label_scope(self, namespace: str, scope: str, facts: dict[str, str]) -> bool:
        """Record what ``scope`` fingerprints (``{"model": ..., "dtype": ...}``, str to str), so that
        ``strata inspect`` names the scope by its facts, not by a hash alone. Kept where the store
        persists (``strata.store.labels``): a label is no object, never counted, charged or evicted.
        StoreError (naming the field) on bad facts; False, never an exception, where a tier could
        not keep it (this process still knows it)."""
        self._check_open()
        return self._labels.put(namespace, scope, facts)

    def scope_labels(self) -> dict[tuple[str, str], dict[str, str]]:
        """Every scope label this store holds, by ``(namespace, scope)``: this process's and those
        its tiers kept (other processes' too). Reading creates nothing; unreadable labels are left out."""
        self._check_open()
        return self._labels.all()

    # -- lifecycle and stats -----------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every write-back object has reached the tier below; one whose flush failed is
        tried once more, and one still refused stays dirty above (``writeback.failed``)."""
        self._check_open()
        self.chain.flush()

    def on_close(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (a bound method, held weakly) when this store starts closing, while it
        still serves reads: a client whose only copy of some data lives here takes it back then
        (an offloaded model restores its weights). Returns a function that unregisters it."""
        ref = weakref.WeakMethod(callback)
        self._closing.append(ref)
        return lambda: self._closing.remove(ref) if ref in self._closing else None

    def close(self) -> None:
        """Let clients take back what only lives here (``on_close``), drain background work and
        release the tiers. Safe to call twice."""
        if self._closed:
            return
        if self._pid != os.getpid():  # a forked child's copy: the parent's to close, nothing to let go here
            self._closed = True
            return
        self._end()
        self.chain.close()

    def _end(self) -> None:
        """What every close does first: tell ``on_close`` clients, then refuse every new call."""
        for ref in list(self._closing):
            callback = ref()
            if callback is not None:
                callback()
        self._closing.clear()
        self._closed = True
        _OPEN.pop(self._opened, None)
        self._finalizer.detach()

    def _close_at_exit(self) -> None:
        """``close`` as the interpreter exits: clients are told ``exiting`` and write-back is flushed
        (what outlives the process), but the tiers are not let go: the exit does that, and doing it
        here could pull a mapping from under a daemon thread still inside a call."""
        self.exiting = True
        self._end()
        self.chain.drain()

    def __enter__(self) -> "StorageEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """Per tier and per namespace counters, and the write-back queue."""
        for t in self.tiers:
            t.refresh()  # remote tiers read their server's figures (bounded by their timeout)
        with self.chain.lock:
            tiers = {t.name: t.stats() for t in self.tiers}
        with self._ns_lock:
            names = {ns: dict(c) for ns, c in self._ns.items()}
        for t in tiers.values():  # namespaces held (e.g. recovered from disk) but not touched yet
            for ns in t["namespaces"]:
                names.setdefault(ns, {})
        wb = self.chain.writeback.stats() if self.chain.writeback else {
            "queue_depth": 0, "pending_bytes": 0, "flushed": 0, "failed": 0, "writer_waits": 0}
        wb["dropped_dirty"] = self.chain.dropped_dirty
        return {"tiers": tiers, "namespaces": names, "writeback": wb}

    def __repr__(self) -> str:
        tiers = " -> ".join(f"{t.name}({format_size(t.capacity)})" for t in self.tiers)
        return f"StorageEngine({tiers})"


_DROPPED: list[TierChain] = []  # chains of stores dropped unclosed while write-back still held objects


def _dropped_open(chain: TierChain, pid: int) -> None:
    """A store collected without ``close()``: its write-back goes on draining in the background and is
    flushed at exit; one without write-back is closed now (no I/O to wait for)."""
    if pid != os.getpid():
        return
    if chain.writeback is not None:
        _DROPPED.append(chain)
        return
    try:
        chain.close()
    except Exception:  # noqa: BLE001 - a finalizer must not raise
        log.warning("strata: closing a store dropped without close() failed", exc_info=True)


@atexit.register
def _close_open_stores() -> None:
    """At the interpreter's exit, close what was left open, newest first: what write-back still held in
    memory reaches the tiers below (a file, CXL or Redis tier keeps it), and new calls are refused;
    locks, mappings and connections go with the process (``_close_at_exit``). Clients told by
    ``on_close`` see ``exiting`` and need not restore anything.
    Then the write-back of stores dropped unclosed (``_dropped_open``) is flushed too."""
    for _, engine in sorted(_OPEN.items(), reverse=True):
        if engine._closed or engine._pid != os.getpid():
            continue
        try:
            engine._close_at_exit()
        except Exception:  # noqa: BLE001 - one store failing to close must not keep the others open
            log.warning("strata: closing %r at exit failed", engine, exc_info=True)
    while _DROPPED:
        try:
            _DROPPED.pop().drain()
        except Exception:  # noqa: BLE001
            log.warning("strata: closing a store dropped without close() failed at exit", exc_info=True)


def open_store(config: "StoreConfig | dict | str | None" = None, *, create: bool = True) -> StorageEngine:
    """Open a store from None (the ``cpu`` preset), a preset name, a YAML path or a dict
    (``create=False``: see ``StorageEngine``)."""
    return StorageEngine(config, create=create)
