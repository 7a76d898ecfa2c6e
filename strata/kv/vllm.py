"""StrataConnector: vLLM (0.32, V1 engine) prefix-KV reuse through the Strata store.

Enable with::

    --kv-transfer-config '{"kv_connector": "StrataConnector",
                           "kv_connector_module_path": "strata.kv.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"strata.config": "<yaml path or preset>"}}'

(vLLM's default failure policy, "fail", fails a request whose chunk cannot be loaded;
"recompute" recomputes those tokens instead. Either way no wrong bytes are served.)

Extra config keys: ``strata.config`` (store YAML or preset), ``strata.chunk_size``
(tokens, a multiple of the block size; default 256), ``strata.save_partial`` (also
store the last, partial chunk of whole blocks; default true), ``strata.max_pending_saves``
(chunks waiting for the background saver before saves are dropped; default 64).

Scheduler side: how many leading prompt tokens the store holds (whole chunks, then the
partial last chunk), less what vLLM's own prefix cache has. Worker side: before the
forward, every chunk to load is read and scattered into the blocks vLLM allocated
(a chunk that fails is reported so vLLM recomputes it); after the forward, each
finished prompt's new chunks are gathered and handed to a bounded background saver.
The scheduler and the worker share one engine per process (``shared_store``); when vLLM puts
them in different processes the scheduler asks the rank-0 worker's engine over a Unix socket
(``strata.kv.lookup``).
"""

from __future__ import annotations

import logging
import queue
from collections import deque
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import record_function

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from strata import metrics, streams
from strata.errors import ConfigError, StoreError
from strata.kv.chunks import Chunk, ChunkHasher, kv_scope
from strata.kv.lookup import LookupClient, LookupServer, local_server, socket_path
from strata.kv.paged import PagedKV
from strata.store.shared import shared_store
from strata.timeline import profiling as _profiling

log = logging.getLogger("strata.kv")

_CONNECTOR_KEYS = {"config", "chunk_size", "save_partial", "max_pending_saves"}
COUNTERS = ("chunks_loaded", "chunks_failed", "tokens_loaded", "bytes_loaded", "load_seconds",
            "chunks_saved", "tokens_saved", "bytes_saved", "save_seconds",
            "saves_dropped", "saves_rejected", "chunks_skipped")
# Timings observed one by one (Prometheus histograms): stats key -> the connector's counter it details.
TIMINGS = {"load_times": "load_seconds", "save_times": "save_seconds"}
MAX_TIMINGS = 1024  # observations kept between two reports; older ones are dropped, never memory grown
STORE_STATS_EVERY_S = 5.0  # the worker also sends the store's stats this often without KV traffic


def _range(name: str):
    """A ``torch.profiler`` range around a step's KV work, only while a profiler records."""
    return record_function(name) if _profiling() else nullcontext()


class StrataKVStats(KVConnectorStats):
    """What one interval brought: counter deltas (summed when aggregated across steps and workers),
    timings (concatenated) and, under ``store``, the latest ``StorageEngine.stats()`` of each worker
    rank (the newest replaces the older). Plain dicts, lists and numbers: vLLM ships them across
    processes."""

    def reset(self):
        self.data = dict.fromkeys(COUNTERS, 0)

    def aggregate(self, other: KVConnectorStats) -> "StrataKVStats":
        for k, v in (other.data or {}).items():
            if k in TIMINGS:  # new lists: vLLM may still hold the ones it was given
                self.data[k] = (list(self.data.get(k) or []) + list(v))[-MAX_TIMINGS:]
            elif k == "store":
                self.data[k] = {**(self.data.get(k) or {}), **v}
            else:
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        out = {k: self.data.get(k, 0) for k in COUNTERS}
        for way, moved in (("load", "bytes_loaded"), ("save", "bytes_saved")):
            secs = out[f"{way}_seconds"]
            out[f"{way}_GBps"] = round(out[moved] / secs / 1e9, 3) if secs > 0 else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in (*COUNTERS, *TIMINGS, "store"))


class StrataPromMetrics(KVConnectorPromMetrics):
    """The connector's series on vLLM's /metrics (``strata.metrics``: KV_SERIES, STORE_SERIES), with
    vLLM's labels (model_name, engine) first. vLLM's front end calls ``observe`` with the stats of
    each step, aggregated over the workers: KV counters grow by their deltas, timings fill the
    histograms, and the store's own stats (totals, sent by the worker) set the gauges and move the
    store counters by what they grew since the last report."""

    _built: "list[Any]" = []  # the metrics of the last build, unregistered when vLLM builds again

    def __init__(self, vllm_config, metric_types, labelnames: list[str], per_engine_labelvalues: dict[int, list]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._forget_previous_build()
        self._kv: dict[tuple[int, str], Any] = {}
        self._families: dict[str, Any] = {}
        for key in COUNTERS:
            if key in metrics.KV_COUNTERS:
                family = self._make(f"strata_kv_{key}", metrics.COUNTER, metrics.KV_COUNTERS[key], ())
                for idx, values in per_engine_labelvalues.items():
                    self._kv[(idx, key)] = family.labels(*values)
        for timing, key in TIMINGS.items():
            family = self._make(f"strata_kv_{key}", metrics.HISTOGRAM, metrics.KV_HISTOGRAMS[key], ())
            for idx, values in per_engine_labelvalues.items():
                self._kv[(idx, timing)] = family.labels(*values)
        for name, (kind, doc, extra) in metrics.STORE_SERIES.items():
            self._families[name] = self._make(name, kind, doc, extra)
        self._bound: dict[tuple, Any] = {}
        self._last: dict[tuple, float] = {}  # (engine, series, labels) -> store counter value last seen
        self._ranks: dict[int, dict[str, list[metrics.Sample]]] = {}

    def _make(self, name: str, kind: str, doc: str, extra: tuple[str, ...]):
        labels = list(self._labelnames) + list(extra)
        if kind == metrics.COUNTER:
            m = self._counter_cls(name=name, documentation=doc, labelnames=labels)
        elif kind == metrics.HISTOGRAM:
            m = self._histogram_cls(name=name, documentation=doc, labelnames=labels, buckets=metrics.TIME_BUCKETS)
        else:
            m = self._gauge_cls(name=name, documentation=doc, labelnames=labels, multiprocess_mode="mostrecent")
        StrataPromMetrics._built.append(m)
        return m

    @staticmethod
    def _forget_previous_build() -> None:
        """vLLM unregisters only its own ``vllm:`` metrics before it builds them again (a second
        engine in one process): do the same for the ``strata_*`` ones this class registered."""
        from prometheus_client import REGISTRY

        for m in StrataPromMetrics._built:
            try:
                REGISTRY.unregister(m)
            except (KeyError, ValueError):  # not in the default registry (another one, or Ray's)
                pass
        StrataPromMetrics._built = []

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        data = transfer_stats_data or {}
        for key in COUNTERS:
            if (engine_idx, key) in self._kv and data.get(key):
                self._kv[(engine_idx, key)].inc(data[key])
        for timing in TIMINGS:
            for secs in data.get(timing) or ():
                self._kv[(engine_idx, timing)].observe(secs)
        if data.get("store"):
            ranks = self._ranks.setdefault(engine_idx, {})
            ranks.update({rank: metrics.samples(stats) for rank, stats in data["store"].items()})
            self._observe_store(engine_idx, ranks)

    def _observe_store(self, engine_idx: int, ranks: dict[str, list]) -> None:
        totals: dict[tuple[str, tuple], float] = {}
        for rank_samples in ranks.values():  # each rank's store holds its own shard of the KV
            for s in rank_samples:
                if s.name in metrics.STORE_SERIES and s.name != "strata_namespace_hit_ratio":
                    totals[(s.name, s.labels)] = totals.get((s.name, s.labels), 0.0) + s.value
        for (name, labels), value in totals.items():
            bound = self._bind(engine_idx, name, labels)
            if metrics.STORE_SERIES[name][0] == metrics.COUNTER:
                seen = self._last.get((engine_idx, name, labels), 0.0)
                if value > seen:
                    bound.inc(value - seen)
                self._last[(engine_idx, name, labels)] = value
            else:
                bound.set(value)
        for (name, labels), hits in totals.items():
            if name == "strata_namespace_hits":
                asked = hits + totals.get(("strata_namespace_misses", labels), 0.0)
                self._bind(engine_idx, "strata_namespace_hit_ratio", labels).set(hits / asked if asked else 0.0)

    def _bind(self, engine_idx: int, name: str, labels: tuple):
        key = (engine_idx, name, labels)
        if key not in self._bound:
            self._bound[key] = self._families[name].labels(*self.per_engine_labelvalues[engine_idx], *labels)
        return self._bound[key]


@dataclass
class LoadSpec:
    req_id: str
    block_ids: list[int]
    chunks: list[Chunk]
    first_token: int  # tokens before this are already in vLLM's cache (block aligned)


@dataclass
class SaveSpec:
    req_id: str
    block_ids: list[int]
    chunks: list[Chunk]


@dataclass
class StrataConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


def _settings(extra: dict) -> dict:
    out = {"config": None, "chunk_size": 256, "save_partial": True, "max_pending_saves": 64}
    for k, v in (extra or {}).items():
        if not k.startswith("strata."):
            continue
        name = k[len("strata."):]
        if name not in _CONNECTOR_KEYS:
            raise ConfigError(f"kv_connector_extra_config: unknown key {k!r}; allowed: "
                              + ", ".join(f"strata.{n}" for n in sorted(_CONNECTOR_KEYS)))
        out[name] = v
    for name in ("chunk_size", "max_pending_saves"):
        if isinstance(out[name], bool) or not isinstance(out[name], int) or out[name] <= 0:
            raise ConfigError(f"kv_connector_extra_config: strata.{name}: got {out[name]!r}; allowed: an integer > 0")
    if not isinstance(out["save_partial"], bool):
        raise ConfigError(f"kv_connector_extra_config: strata.save_partial: got {out['save_partial']!r}; "
                          "allowed: true, false")
    return out


class StrataConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = _settings(self._kv_transfer_config.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        groups = kv_cache_config.kv_cache_groups
        self.layer_names = [n for g in groups for n in g.layer_names]
        specs = [(type(g.kv_cache_spec).__name__, getattr(g.kv_cache_spec, "num_kv_heads", None),
                  getattr(g.kv_cache_spec, "head_size", None), str(getattr(g.kv_cache_spec, "dtype", "")))
                 for g in groups]
        parallel = vllm_config.parallel_config
        try:
            import vllm

            version = vllm.__version__
        except AttributeError:
            version = "?"
        scope = kv_scope(model=str(vllm_config.model_config.model), dtype=str(vllm_config.model_config.dtype),
                         layout=(tuple(self.layer_names), tuple(specs), vllm_config.cache_config.cache_dtype),
                         block_size=self.block_size, chunk_size=cfg["chunk_size"],
                         tp_size=parallel.tensor_parallel_size, tp_rank=parallel.rank, version=version)
        self.hasher = ChunkHasher(scope, cfg["chunk_size"], self.block_size)
        self.save_partial = cfg["save_partial"]
        self.store = shared_store(cfg["config"])
        self.rank = parallel.rank
        # the scheduler asks the rank-0 worker's store, which may live in another process
        self._lookup_path = socket_path(self._kv_transfer_config.engine_id)
        self._lookup = LookupClient(self._lookup_path) if role == KVConnectorRole.SCHEDULER else None
        self._lookup_server: LookupServer | None = None
        if getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
            log.warning('strata: kv_load_failure_policy is %r: a chunk that fails to load (evicted, corrupt, tier '
                        'down) fails its request instead of being recomputed; set "kv_load_failure_policy": '
                        '"recompute" in --kv-transfer-config', self._kv_transfer_config.kv_load_failure_policy)
        self.num_blocks = kv_cache_config.num_blocks
        # scheduler side
        self._matched: dict[str, tuple[int, list[Chunk], int]] = {}
        self._to_load: dict[str, tuple[list[Chunk], int]] = {}
        self._blocks: dict[str, list[int]] = {}
        self._prompts: dict[str, list[int]] = {}
        self._saved: set[str] = set()
        # worker side
        self.paged: PagedKV | None = None
        self._kv_caches: dict[str, torch.Tensor] | None = None  # kept across sleep (vLLM 0.33)
        self._failed: set[int] = set()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._reported = dict(self.counters)  # what vLLM's stats have already been told
        self._timings = {k: deque(maxlen=MAX_TIMINGS) for k in TIMINGS}  # appended by two threads: deques
        self._store_stats_at = float("-inf")
        self._saves: queue.Queue = queue.Queue(maxsize=cfg["max_pending_saves"])
        self._saver: threading.Thread | None = None
        _track(self)

    # ============================== scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        tokens = list(request.prompt_token_ids or [])
        limit = (len(tokens) - 1) // self.block_size * self.block_size  # vLLM computes at least one token
        chunks = self.hasher.chunks(tokens, limit, partial=self.save_partial)
        hit, found = 0, []
        for chunk, present in zip(chunks, self._held([c.key for c in chunks])):
            if not present:
                break
            found.append(chunk)
            hit = chunk.end
        if hit <= num_computed_tokens:
            self._matched.pop(request.request_id, None)
            return 0, False
        self._matched[request.request_id] = (hit, found, num_computed_tokens)
        return hit - num_computed_tokens, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        matched = self._matched.pop(request.request_id, None)
        if num_external_tokens > 0 and matched is not None:
            hit, found, computed = matched
            self._to_load[request.request_id] = ([c for c in found if c.end > computed], computed)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = StrataConnectorMetadata()
        for req in scheduler_output.scheduled_new_reqs:
            rid = req.req_id
            self._blocks[rid] = list(req.block_ids[0])
            self._prompts[rid] = list(req.prompt_token_ids or [])
            if rid in self._to_load:
                chunks, computed = self._to_load.pop(rid)
                meta.loads.append(LoadSpec(rid, list(self._blocks[rid]), chunks, computed))
            self._maybe_save(meta, rid, req.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(rid, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                self._blocks[rid] = list(new_ids[0]) if new_ids else []
                self._saved.discard(rid)
            elif new_ids:
                self._blocks.setdefault(rid, []).extend(new_ids[0])
            done = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(rid, 0)
            self._maybe_save(meta, rid, done)
        return meta

    def _maybe_save(self, meta: StrataConnectorMetadata, rid: str, computed_after_step: int) -> None:
        prompt = self._prompts.get(rid)
        if prompt is None or rid in self._saved or computed_after_step < len(prompt):
            return
        self._saved.add(rid)
        # Whole chunks of the prompt (for longer prompts that extend it), and the chunks a repeat of
        # this very prompt will look up: up to its last whole block before the final token.
        chunks = {c.key: c for c in self.hasher.chunks(prompt, len(prompt), partial=False)}
        repeat = (len(prompt) - 1) // self.block_size * self.block_size
        chunks.update((c.key, c) for c in self.hasher.chunks(prompt, repeat, partial=self.save_partial))
        chunks = sorted(chunks.values(), key=lambda c: (c.start, c.end))
        new = [c for c, have in zip(chunks, self._held([c.key for c in chunks])) if not have]
        if new:
            meta.saves.append(SaveSpec(rid, list(self._blocks.get(rid, [])), new))

    def _held(self, keys: list) -> list[bool]:
        """Which keys the worker's store holds: asked over its socket when it runs in another process."""
        if self._lookup is not None and local_server(self._lookup_path) is None:
            held = self._lookup.contains_many(keys)
            if held is not None:
                return held
        return self.store.contains_many(keys)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        for table in (self._matched, self._to_load, self._blocks, self._prompts):
            table.pop(rid, None)
        self._saved.discard(rid)
        return False, None

    # ============================== worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._kv_caches = kv_caches
        self.paged = self._paged_kv(kv_caches)
        if self.rank == 0 and self._lookup_server is None:
            try:
                self._lookup_server = LookupServer(self.store, self._lookup_path)
            except OSError as e:  # the scheduler then sees only the tiers shared between processes
                log.warning("strata: cannot serve KV lookups at %s (%s)", self._lookup_path, e)

    def _paged_kv(self, kv_caches: dict[str, torch.Tensor]) -> PagedKV:
        names = [n for n in self.layer_names if n in kv_caches]
        return PagedKV([kv_caches[n] for n in names], num_blocks=self.num_blocks)

    # ------------------------------ sleep mode (vLLM 0.33 calls these; 0.32 never does)
    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config) -> bool:
        """Strata can follow sleep's remap of the KV cache: it registers no memory with a driver or
        a NIC, it only holds the cache tensors, which it lets go before sleep and takes back after."""
        return True

    def unregister_kv_caches(self) -> None:
        """Before sleep frees the KV cache: let go of the cache tensors and the staging bundle, so no
        load or save writes into or reads from memory that is no longer mapped (every worker step
        returns early without ``paged``), and forget load errors of requests that sleep aborted.
        Saves already queued are host copies: they still reach the store. Idempotent."""
        if self.paged is None:
            return
        dev = streams.active()
        if dev.is_async_device(self.paged.device):  # no copy of ours may still run into the staging bundle
            dev.synchronize(self.paged.device)
        self.paged = None
        self._failed.clear()

    def restore_kv_caches(self) -> None:
        """After wake-up: the same cache tensors again (sleep keeps their addresses, not their bytes,
        and vLLM has reset its prefix cache, so Strata loads only what the store holds) with a new,
        empty staging bundle. Idempotent; nothing to do before the first ``register_kv_caches``."""
        if self.paged is None and self._kv_caches is not None:
            self.paged = self._paged_kv(self._kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, StrataConnectorMetadata) or not meta.loads or self.paged is None:
            return
        with _range("strata.kv.load"):
            self._load_step(meta)

    def _load_step(self, meta: StrataConnectorMetadata) -> None:
        bs = self.block_size
        t0 = time.perf_counter()
        with self._sources([c.key for spec in meta.loads for c in spec.chunks]) as sources:
            views = iter(sources)
            for spec in meta.loads:
                failed = False
                for chunk in spec.chunks:
                    view = next(views)
                    ids = spec.block_ids[chunk.start // bs : chunk.end // bs]
                    skip = max(0, spec.first_token - chunk.start) // bs
                    loaded = 0 if failed else self._load(chunk, view, ids, skip)
                    if not loaded:
                        failed = True  # this chunk and every one after it are recomputed by vLLM
                        first = max(chunk.start, spec.first_token) // bs
                        self._failed.update(spec.block_ids[first : chunk.end // bs])
                        self.counters["chunks_failed"] += 1
                        continue
                    self.counters["chunks_loaded"] += 1
                    self.counters["tokens_loaded"] += chunk.end - max(chunk.start, spec.first_token)
                    self.counters["bytes_loaded"] += loaded
        elapsed = time.perf_counter() - t0
        self.counters["load_seconds"] += elapsed
        self._timings["load_times"].append(elapsed)

    @contextmanager
    def _sources(self, keys: list):
        """What a step's chunks load from, one batch for all of them (a remote tier's chunks come
        up in a few round trips). A cache in host memory gets views of the store's bytes, leased
        for the step; a device cache gets no views (each chunk goes through its staging bundle)."""
        if self.paged.device.type == "cpu":
            with self.store.lease_many(keys) as views:
                yield views
        else:
            self.store.prefetch(keys)
            yield [None] * len(keys)

    def _load(self, chunk: Chunk, view: "torch.Tensor | None", ids: list[int], skip: int) -> int:
        """Write a stored chunk into blocks ``ids[skip:]``; the bytes loaded, 0 on a miss or a
        bundle of another shape or dtype (the store's checks name which). A cache in host memory
        scatters straight from the leased ``view`` (None: a miss); a device cache takes one copy
        into its staging bundle (from pinned memory on a GPU), then scatters on the device."""
        try:
            if self.paged.device.type == "cpu":
                if view is None:
                    return 0
                self.paged.scatter(view, ids, first=skip)
                return view.numel() * view.element_size()
            bundle = self.paged.staging(len(ids))
            if not self.store.get_into(chunk.key, bundle):
                return 0
            self.paged.scatter(bundle, ids, first=skip)
            return bundle.numel() * bundle.element_size()
        except StoreError as e:
            log.warning("strata: KV chunk %s does not fit this cache (%s); recomputed", chunk.key.name[:16], e)
            return 0

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous, done in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # gathered for all layers at once in wait_for_save

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if not isinstance(meta, StrataConnectorMetadata) or not meta.saves or self.paged is None:
            return
        with _range("strata.kv.save"):
            self._queue_saves(meta)

    def _queue_saves(self, meta: StrataConnectorMetadata) -> None:
        bs = self.block_size
        for spec in meta.saves:
            for chunk in spec.chunks:
                ids = spec.block_ids[chunk.start // bs : chunk.end // bs]
                if len(ids) * bs != chunk.end - chunk.start:
                    self.counters["chunks_skipped"] += 1
                    continue
                bundle = self.paged.gather(ids, pin=True)  # blocks may be reused after this step
                try:
                    self._saves.put_nowait((chunk, bundle))
                except queue.Full:  # back-pressure: drop the save, never grow memory or stall the step
                    self.counters["saves_dropped"] += 1
        if self._saver is None:
            self._saver = threading.Thread(target=self._save_loop, name="strata-kv-saver", daemon=True)
            self._saver.start()

    def _save_loop(self) -> None:
        while True:
            item = self._saves.get()
            if item is None:
                return
            chunk, bundle = item
            t0 = time.perf_counter()
            try:
                if self.store.put(chunk.key, bundle):
                    self.counters["chunks_saved"] += 1
                    self.counters["tokens_saved"] += chunk.end - chunk.start
                    self.counters["bytes_saved"] += bundle.numel() * bundle.element_size()
                    elapsed = time.perf_counter() - t0
                    self.counters["save_seconds"] += elapsed
                    self._timings["save_times"].append(elapsed)
                else:  # the store is full of what it may not evict: a future miss
                    self.counters["saves_rejected"] += 1
            except StoreError as e:  # e.g. a chunk larger than every tier
                self.counters["saves_rejected"] += 1
                if self.counters["saves_rejected"] == 1:
                    log.warning("strata: a KV chunk cannot be stored (%s); such saves are dropped", e)
            except Exception:  # a failing save is a future miss, never an error in serving
                log.exception("strata: saving a KV chunk failed")
            finally:
                self._saves.task_done()

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    def flush(self) -> None:
        """Wait until every queued save has reached the store."""
        self._saves.join()
        self.store.flush()

    def shutdown(self):
        if self._lookup_server is not None:
            self._lookup_server.close()
            self._lookup_server = None
        if self._lookup is not None:
            self._lookup.close()
        if self._saver is not None:
            self.flush()
            self._saves.put(None)
            self._saver.join(timeout=30)
            self._saver = None

    def stats(self) -> dict:
        """The connector's counters since it started (this process)."""
        return dict(self.counters)

    # ============================== vLLM's connector stats (logged and aggregated by vLLM)
    def get_kv_connector_stats(self) -> "StrataKVStats | None":
        """What changed since the last call (vLLM asks after every step on the worker)."""
        now = dict(self.counters)
        data: dict[str, Any] = {k: now[k] - self._reported[k] for k in COUNTERS}
        self._reported = now
        for key, seen in self._timings.items():
            data[key] = [seen.popleft() for _ in range(len(seen))]
        store = self._store_stats(moved=any(data[k] for k in COUNTERS))
        if store is not None:
            data["store"] = {str(self.rank): store}
        stats = StrataKVStats(data=data)
        return None if stats.is_empty() else stats

    def _store_stats(self, moved: bool) -> dict | None:
        """The store's stats, from a worker, when KV moved in this step (a step that moved chunks
        can afford one ``stats()``) or every STORE_STATS_EVERY_S; else None. Never raises."""
        if self._kv_caches is None:  # the scheduler side: the worker reports the store it writes to
            return None
        now = time.monotonic()
        if not moved and now - self._store_stats_at < STORE_STATS_EVERY_S:
            return None
        self._store_stats_at = now
        try:
            return self.store.stats()
        except Exception as e:  # a metric must never fail a step
            log.warning("strata: the store's stats could not be read for vLLM's metrics (%s)", e)
            return None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> "StrataKVStats":
        return StrataKVStats(data=dict(data) if data else dict.fromkeys(COUNTERS, 0))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> StrataPromMetrics:
        """Strata's series on vLLM's /metrics; vLLM's front end builds them once per stat logger."""
        return StrataPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


_live: "list[StrataConnector]" = []


def _track(connector: StrataConnector) -> None:
    _live.append(connector)


def connectors() -> "list[StrataConnector]":
    """The connectors of this process (for stats and for flushing saves in tests)."""
    return list(_live)


def worker_connector() -> "StrataConnector | None":
    """The connector of this process that holds a KV cache (the worker side, asleep or not), or None."""
    return next((c for c in _live if c._kv_caches is not None), None)
