"""StorageEngine: the store's one facade (put / get / get_into / contains / delete, batches, stats)."""

from __future__ import annotations

import threading
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch

from strata.config import StoreConfig, format_size, load_config
from strata.errors import StoreError, allowed
from strata.keys import Key
from strata.store.chain import TierChain
from strata.store.codec import ObjectMeta, describe, materialize, typed_view
from strata.store.tiers import build_tier

MODES = ("chain", "exact", "prefer")
Value = "torch.Tensor | bytes"


class StorageEngine:
    """A tiered tensor store. Use as a context manager, or call ``close()``."""

    def __init__(self, config: "StoreConfig | dict | str | None" = None):
        self.config = load_config(config)
        tiers = []
        try:
            for tc in self.config.tiers:
                tiers.append(build_tier(tc, self.config))
        except OSError as e:
            raise StoreError(f"tiers[{len(tiers)}] ({self.config.tiers[len(tiers)].kind}): cannot open: {e}") from e
        self.chain = TierChain(tiers, self.config)
        self._tier_index = {t.name: i for i, t in enumerate(tiers)}
        self._max_capacity = max(t.capacity for t in tiers)
        self._ns = defaultdict(lambda: defaultdict(int))
        self._ns_lock = threading.Lock()
        self._closed = False

    # -- helpers ----------------------------------------------------------------------------
    @property
    def tiers(self):
        return self.chain.tiers

    def _check_key(self, key: object) -> Key:
        if self._closed:
            raise StoreError("store: this StorageEngine is closed")
        if not isinstance(key, Key):
            raise StoreError(f"key: got {type(key).__name__}; allowed: strata.Key(namespace, scope, name)")
        return key

    def _order(self, mode: str, tier: str | None) -> tuple[list[int], bool]:
        if mode not in MODES:
            raise StoreError(allowed("mode", mode, MODES))
        if mode == "chain":
            if tier is not None:
                raise StoreError("tier: only used with mode='exact' or mode='prefer'")
            return list(range(len(self.tiers))), self.config.promote
        if tier not in self._tier_index:
            raise StoreError(allowed(f"tier (mode={mode!r})", tier, self._tier_index))
        first = self._tier_index[tier]
        if mode == "exact":
            return [first], False
        return [first] + [i for i in range(len(self.tiers)) if i != first], self.config.promote

    def _count(self, ns: str, **fields: int) -> None:
        with self._ns_lock:
            c = self._ns[ns]
            for k, v in fields.items():
                c[k] += v

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: Key, value: "torch.Tensor | bytes") -> bool:
        """Store ``value`` under ``key``. False (and a ``rejected`` counter) if no tier could take it
        now, e.g. every tier is full of pinned or in-use objects."""
        key = self._check_key(key)
        meta, data = describe(value)
        if meta.nbytes > self._max_capacity:
            caps = ", ".join(f"{t.name}={format_size(t.capacity)}" for t in self.tiers)
            raise StoreError(f"value: {format_size(meta.nbytes)} is larger than every tier ({caps})")
        ok = self.chain.put(key.encoded, key.namespace, meta, data)
        self._count(key.namespace, puts=1, bytes_written=meta.nbytes if ok else 0, put_rejected=not ok)
        return ok

    def put_many(self, items: Iterable[tuple[Key, "torch.Tensor | bytes"]]) -> list[bool]:
        return [self.put(k, v) for k, v in items]

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
            self._count(key.namespace, misses=1)
            return None
        meta, data = found
        self._count(key.namespace, hits=1, bytes_read=meta.nbytes)
        return materialize(meta, data)

    def get_into(self, key: Key, out: torch.Tensor, *, mode: str = "chain", tier: str | None = None) -> bool:
        """Copy the stored tensor into ``out`` (same dtype and element count, or uint8 of the same
        byte size; contiguous; any device). From pinned memory to CUDA the copy is non-blocking
        on the current stream. False on a miss."""
        key = self._check_key(key)
        if not isinstance(out, torch.Tensor) or not out.is_contiguous():
            raise StoreError("out: allowed: a contiguous torch.Tensor")
        order, promote = self._order(mode, tier)
        flat = out.reshape(-1)
        flat = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8, device=out.device)
        with self.chain.lock:  # check the shape against what is stored before copying
            i = self.chain.where(key.encoded, order)
            meta = self.tiers[i].index[key.encoded].meta if i is not None else None
        if meta is not None:
            self._check_out(meta, out)
        found = self.chain.read(key.encoded, order, promote, out=flat)
        if found is None:
            self._count(key.namespace, misses=1)
            return False
        self._count(key.namespace, hits=1, bytes_read=found[0].nbytes)
        return True

    @staticmethod
    def _check_out(meta: ObjectMeta, out: torch.Tensor) -> None:
        numel = 1
        for d in meta.shape:
            numel *= d
        same_type = out.dtype == meta.dtype and out.numel() == numel
        raw = out.dtype == torch.uint8 and out.numel() == meta.nbytes
        if not (same_type or raw):
            raise StoreError(
                f"out: got {out.dtype} with {out.numel()} elements; allowed: {meta.dtype} with {numel} "
                f"elements (stored shape {tuple(meta.shape)}), or torch.uint8 with {meta.nbytes} elements"
            )

    def get_many(self, keys: Sequence[Key], *, mode: str = "chain", tier: str | None = None) -> list:
        return [self.get(k, mode=mode, tier=tier) for k in keys]

    def contains(self, key: Key, *, mode: str = "chain", tier: str | None = None) -> bool:
        key = self._check_key(key)
        order, _ = self._order(mode, tier)
        return self.chain.where(key.encoded, order) is not None

    def contains_many(self, keys: Sequence[Key], *, mode: str = "chain", tier: str | None = None) -> list[bool]:
        return [self.contains(k, mode=mode, tier=tier) for k in keys]

    @contextmanager
    def lease(self, key: Key) -> Iterator[torch.Tensor | None]:
        """A zero-copy, read-only view of the stored tensor in a memory tier, valid inside the
        ``with`` block (the bytes cannot be evicted or reused meanwhile). None on a miss.
        A copy found only in a lower tier is promoted first."""
        key = self._check_key(key)
        held = self.chain.lease_view(key.encoded)
        if held is None and self.chain.read(key.encoded, list(range(len(self.tiers))), True) is not None:
            held = self.chain.lease_view(key.encoded)
        if held is None:
            self._count(key.namespace, misses=1)
            yield None
            return
        tier, e = held
        self._count(key.namespace, hits=1, bytes_read=e.meta.nbytes)
        try:
            yield typed_view(e.meta, e.view)
        finally:
            self.chain.release(tier, e)

    def keys(self, namespace: str | None = None) -> list[Key]:
        """Every key held by any tier (optionally of one namespace)."""
        out = [Key.decode(k) for k in self.chain.keys()]
        return [k for k in out if namespace is None or k.namespace == namespace]

    # -- lifecycle and stats -----------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every write-back object has reached the tier below."""
        self.chain.flush()

    def close(self) -> None:
        """Drain background work and release the tiers. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self.chain.close()

    def __enter__(self) -> "StorageEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """Per tier and per namespace counters, and the write-back queue."""
        with self.chain.lock:
            tiers = {t.name: t.stats() for t in self.tiers}
        with self._ns_lock:
            names = {ns: dict(c) for ns, c in self._ns.items()}
        for t in tiers.values():
            for ns, held in t["namespaces"].items():
                names.setdefault(ns, {})
        wb = self.chain.writeback.stats() if self.chain.writeback else {
            "queue_depth": 0, "pending_bytes": 0, "flushed": 0, "failed": 0, "writer_waits": 0}
        wb["dropped_dirty"] = self.chain.dropped_dirty
        return {"tiers": tiers, "namespaces": names, "writeback": wb}

    def __repr__(self) -> str:
        tiers = " -> ".join(f"{t.name}({format_size(t.capacity)})" for t in self.tiers)
        return f"StorageEngine({tiers})"


def open_store(config: "StoreConfig | dict | str | None" = None) -> StorageEngine:
    """Open a store from None (the ``cpu`` preset), a preset name, a YAML path or a dict."""
    return StorageEngine(config)
