"""The connector's worker half: it moves the bytes the scheduler half planned.

Before the forward, every chunk to load is read and scattered into the blocks vLLM allocated (a
chunk that fails, and every chunk after it in its request, is reported so vLLM recomputes it);
after the forward, each chunk to save is gathered and handed to a bounded background saver. It
also holds the KV cache tensors (given back around sleep), serves the scheduler's lookups from the
rank-0 worker, and counts what it moved for vLLM's stats.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.profiler import record_function

from strata import streams
from strata.errors import StoreError
from strata.kv.lookup import LookupServer
from strata.kv.paged import PagedKV
from strata.kv.vllm_context import Context
from strata.kv.vllm_meta import BlockSpan, StrataConnectorMetadata
from strata.kv.vllm_metrics import COUNTERS, MAX_TIMINGS, TIMINGS
from strata.timeline import profiling as _profiling

log = logging.getLogger("strata.kv")

STORE_STATS_EVERY_S = 5.0  # the worker also sends the store's stats this often without KV traffic


def _range(name: str):
    """A ``torch.profiler`` range around a step's KV work, only while a profiler records."""
    return record_function(name) if _profiling() else nullcontext()


class Saver:
    """Puts gathered chunks into the store from one background thread, so a slow tier never stalls
    a step. Bounded: when ``max_pending`` chunks wait, a new one is dropped (and counted)."""

    def __init__(self, store, max_pending: int, counters: dict, timings: dict):
        self.store, self.counters, self.timings = store, counters, timings
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None

    def submit(self, chunk, bundle: torch.Tensor) -> None:
        try:
            self._queue.put_nowait((chunk, bundle))
        except queue.Full:  # back-pressure: drop the save, never grow memory or stall the step
            self.counters["saves_dropped"] += 1

    def start(self) -> None:
        """Start the thread (once; the first step with saves does)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="strata-kv-saver", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._put(*item)
            finally:
                self._queue.task_done()

    def _put(self, chunk, bundle: torch.Tensor) -> None:
        t0 = time.perf_counter()
        try:
            if self.store.put(chunk.key, bundle):
                self.counters["chunks_saved"] += 1
                self.counters["tokens_saved"] += chunk.end - chunk.start
                self.counters["bytes_saved"] += bundle.numel() * bundle.element_size()
                elapsed = time.perf_counter() - t0
                self.counters["save_seconds"] += elapsed
                self.timings["save_times"].append(elapsed)
            else:  # the store is full of what it may not evict: a future miss
                self.counters["saves_rejected"] += 1
        except StoreError as e:  # e.g. a chunk larger than every tier
            self.counters["saves_rejected"] += 1
            if self.counters["saves_rejected"] == 1:
                log.warning("strata: a KV chunk cannot be stored (%s); such saves are dropped", e)
        except Exception:  # a failing save is a future miss, never an error in serving
            log.exception("strata: saving a KV chunk failed")

    def flush(self) -> None:
        """Wait until every queued save has reached the store."""
        self._queue.join()
        self.store.flush()

    def close(self) -> None:
        if self._thread is not None:
            self.flush()
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None


class WorkerHalf:
    """The worker's connector: carries out the scheduler's plan against this rank's KV cache; it
    decides nothing about which chunks or blocks, so every rank moves exactly what was planned."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.paged: PagedKV | None = None
        self.kv_caches: dict[str, torch.Tensor] | None = None  # kept across sleep (vLLM 0.33)
        self._failed: set[int] = set()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._reported = dict(self.counters)  # what vLLM's stats have already been told
        self._timings = {k: deque(maxlen=MAX_TIMINGS) for k in TIMINGS}  # appended by two threads: deques
        self._store_stats_at = float("-inf")
        self.saver = Saver(ctx.store, ctx.max_pending_saves, self.counters, self._timings)
        self._lookup_server: LookupServer | None = None

    # ------------------------------------------------------------------ the KV cache, and sleep
    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = kv_caches
        self.paged = self._paged_kv(kv_caches)
        if self.ctx.rank == 0 and self._lookup_server is None:
            try:
                self._lookup_server = LookupServer(self.ctx.store, self.ctx.lookup_path)
            except OSError as e:  # the scheduler then sees only the tiers shared between processes
                log.warning("strata: cannot serve KV lookups at %s (%s)", self.ctx.lookup_path, e)

    def _paged_kv(self, kv_caches: dict[str, torch.Tensor]) -> PagedKV:
        names = [n for n in self.ctx.layer_names if n in kv_caches]
        return PagedKV([kv_caches[n] for n in names], num_blocks=self.ctx.num_blocks)

    def unregister(self) -> None:
        """Before sleep frees the KV cache: let go of the cache tensors and the staging bundle, so no
        load or save writes into or reads from memory that is no longer mapped (every step returns
        early without ``paged``), and forget load errors of requests that sleep aborted. Saves
        already queued are host copies: they still reach the store. Idempotent."""
        if self.paged is None:
            return
        dev = streams.active()
        if dev.is_async_device(self.paged.device):  # no copy of ours may still run into the staging bundle
            dev.synchronize(self.paged.device)
        self.paged = None
        self._failed.clear()

    def restore(self) -> None:
        """After wake-up: the same cache tensors again (sleep keeps their addresses, not their bytes,
        and vLLM has reset its prefix cache, so Strata loads only what the store holds) with a new,
        empty staging bundle. Idempotent; nothing to do before the first ``register``."""
        if self.paged is None and self.kv_caches is not None:
            self.paged = self._paged_kv(self.kv_caches)

    # ------------------------------------------------------------------ loads
    def load(self, meta) -> None:
        if not isinstance(meta, StrataConnectorMetadata) or not meta.loads or self.paged is None:
            return
        with _range("strata.kv.load"):
            self._load_step(meta)

    def _load_step(self, meta: StrataConnectorMetadata) -> None:
        t0 = time.perf_counter()
        plans = [spec.planned(self.ctx.block_size) for spec in meta.loads]
        with self._sources([s.chunk.key for spans in plans for s in spans]) as sources:
            views = iter(sources)
            for spans in plans:
                self._load_request(spans, views)
        elapsed = time.perf_counter() - t0
        self.counters["load_seconds"] += elapsed
        self._timings["load_times"].append(elapsed)

    def _load_request(self, spans: list[BlockSpan], views) -> None:
        """One request's chunks, in order: after the first that fails, none is loaded (vLLM
        recomputes from there), and every block from there on is reported."""
        failed = False
        for span in spans:
            view = next(views)
            loaded = 0 if failed else self._load(span, view)
            if not loaded:
                failed = True
                self._failed.update(span.new_block_ids)
                self.counters["chunks_failed"] += 1
                continue
            self.counters["chunks_loaded"] += 1
            self.counters["tokens_loaded"] += span.tokens
            self.counters["bytes_loaded"] += loaded

    @contextmanager
    def _sources(self, keys: list):
        """What a step's chunks load from, one batch for all of them (a remote tier's chunks come
        up in a few round trips). A cache in host memory gets views of the store's bytes, leased
        for the step; a device cache gets no views (each chunk goes through its staging bundle)."""
        if self.paged.device.type == "cpu":
            with self.ctx.store.lease_many(keys) as views:
                yield views
        else:
            self.ctx.store.prefetch(keys)
            yield [None] * len(keys)

    def _load(self, span: BlockSpan, view: "torch.Tensor | None") -> int:
        """Write a stored chunk into its new blocks; the bytes loaded, 0 on a miss or a bundle of
        another shape or dtype (the store's checks name which). A cache in host memory scatters
        straight from the leased ``view`` (None: a miss); a device cache takes one copy into its
        staging bundle (from pinned memory on a GPU), then scatters on the device."""
        ids, skip = span.block_ids, span.skip
        try:
            if self.paged.device.type == "cpu":
                if view is None:
                    return 0
                self.paged.scatter(view, ids, first=skip)
                return view.numel() * view.element_size()
            bundle = self.paged.staging(len(ids))
            if not self.ctx.store.get_into(span.chunk.key, bundle):
                return 0
            self.paged.scatter(bundle, ids, first=skip)
            return bundle.numel() * bundle.element_size()
        except StoreError as e:
            log.warning("strata: KV chunk %s does not fit this cache (%s); recomputed", span.chunk.key.name[:16], e)
            return 0

    def load_errors(self) -> set[int]:
        """The blocks that failed to load since the last call (vLLM recomputes them)."""
        failed, self._failed = self._failed, set()
        return failed

    # ------------------------------------------------------------------ saves
    def save(self, meta) -> None:
        if not isinstance(meta, StrataConnectorMetadata) or not meta.saves or self.paged is None:
            return
        with _range("strata.kv.save"):
            self._queue_saves(meta)

    def _queue_saves(self, meta: StrataConnectorMetadata) -> None:
        bs = self.ctx.block_size
        for spec in meta.saves:
            for span in spec.planned(bs):
                if len(span.block_ids) * bs != span.chunk.end - span.chunk.start:
                    self.counters["chunks_skipped"] += 1
                    continue
                bundle = self.paged.gather(span.block_ids, pin=True)  # blocks may be reused after this step
                self.saver.submit(span.chunk, bundle)
        self.saver.start()

    # ------------------------------------------------------------------ stats and the end
    def stats_delta(self) -> dict[str, Any]:
        """What changed since the last call: counter deltas, the timings seen, and (sometimes) the
        store's own stats under ``store``."""
        now = dict(self.counters)
        data: dict[str, Any] = {k: now[k] - self._reported[k] for k in COUNTERS}
        self._reported = now
        for key, seen in self._timings.items():
            data[key] = [seen.popleft() for _ in range(len(seen))]
        store = self._store_stats(moved=any(data[k] for k in COUNTERS))
        if store is not None:
            data["store"] = {str(self.ctx.rank): store}
        return data

    def _store_stats(self, moved: bool) -> dict | None:
        """The store's stats, once the worker holds a KV cache, when KV moved in this step (a step
        that moved chunks can afford one ``stats()``) or every STORE_STATS_EVERY_S; else None.
        Never raises."""
        if self.kv_caches is None:
            return None
        now = time.monotonic()
        if not moved and now - self._store_stats_at < STORE_STATS_EVERY_S:
            return None
        self._store_stats_at = now
        try:
            return self.ctx.store.stats()
        except Exception as e:  # a metric must never fail a step
            log.warning("strata: the store's stats could not be read for vLLM's metrics (%s)", e)
            return None

    def flush(self) -> None:
        self.saver.flush()

    def close(self) -> None:
        if self._lookup_server is not None:
            self._lookup_server.close()
            self._lookup_server = None
        self.saver.close()
