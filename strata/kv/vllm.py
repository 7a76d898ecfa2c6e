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
(saves copied out of the cache but not yet in the store before further saves are dropped;
default 64), ``strata.load_async`` (a hit loads while vLLM keeps its request waiting and the
others run; false: before the step's forward, stalling the batch; default true), ``strata.layerwise``
(a hit loads within the step that computes on it, released to the forward layer by layer, and saves
are copied out layer by layer; implies ``load_async`` false; default false; ``vllm_layerwise``).

This module is the facade vLLM loads; it is split the way vLLM splits its own offloading
connector. vLLM builds one connector per role and calls each only with that role's methods: the
facade hands them to ``SchedulerHalf`` (``vllm_scheduler``: lookups, one state per request, the
metadata that carries every hit boundary and block id) or ``WorkerHalf`` (``vllm_worker``: loads,
saves, their background threads, the KV cache around sleep). Both build from one ``Context``
(``vllm_context``); the metadata lives in ``vllm_meta``, the stats and Prometheus series in
``vllm_metrics``. The scheduler and the worker share one engine per process (``shared_store``);
when vLLM puts them in different processes the scheduler asks the rank-0 worker's engine over a
Unix socket (``strata.kv.lookup``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from strata.integrations.vllm_version import check_vllm
from strata.kv import vllm_context
from strata.kv.vllm_meta import BlockSpan, LoadSpec, SaveSpec, StrataConnectorMetadata
from strata.kv.vllm_metrics import COUNTERS, MAX_TIMINGS, TIMINGS, StrataKVStats, StrataPromMetrics
from strata.kv.vllm_scheduler import SchedulerHalf
from strata.kv.vllm_worker import STORE_STATS_EVERY_S, WorkerHalf

__all__ = ["COUNTERS", "MAX_TIMINGS", "STORE_STATS_EVERY_S", "TIMINGS", "BlockSpan", "LoadSpec", "SaveSpec",
           "StrataConnector", "StrataConnectorMetadata", "StrataKVStats", "StrataPromMetrics", "connectors",
           "worker_connector", "engine_stats"]


class StrataConnector(KVConnectorBase_V1):
    """What vLLM constructs, once per role: the scheduler's calls go to ``scheduler_half``, the
    worker's to ``worker_half`` (the other is None)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        check_vllm()  # a vLLM Strata was not checked against fails here, naming both versions
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ctx = vllm_context.build(vllm_config, self._kv_transfer_config, kv_cache_config)
        self.block_size, self.hasher, self.store = ctx.block_size, ctx.hasher, ctx.store
        self.scheduler_half = SchedulerHalf(ctx) if role == KVConnectorRole.SCHEDULER else None
        self.worker_half = None if role == KVConnectorRole.SCHEDULER else WorkerHalf(ctx)
        _track(self)

    @property
    def paged(self):
        """The worker's view of the KV cache (None on the scheduler, before registration, asleep)."""
        return self.worker_half.paged if self.worker_half is not None else None

    # ============================== scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """(tokens, True): loaded while vLLM parks the request; (None, False): the lookup is still
        out, ask again next step."""
        return self.scheduler_half.lookup(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        self.scheduler_half.allocated(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self.scheduler_half.build(scheduler_output)

    def reset_cache(self) -> bool | None:
        """Scheduler: this engine's chunks start a new epoch (``SchedulerHalf.reset_cache``); the
        worker holds no cache of chunks of its own (None, as vLLM's base class answers)."""
        if self.scheduler_half is None:
            return None
        ok = self.scheduler_half.reset_cache()
        self.hasher = self.scheduler_half.ctx.hasher
        return ok

    def update_connector_output(self, connector_output) -> None:
        self.scheduler_half.connector_output(connector_output)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Never delays freeing: a save copied its blocks out within its step, and vLLM itself keeps
        the blocks of a request whose asynchronous load runs until ``get_finished`` reports it."""
        self.scheduler_half.finished(request)
        return False, None

    # ============================== worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self.worker_half.register(kv_caches)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Layer-wise mode waits and copies between attention layers: vLLM must not capture them
        into a full CUDA graph (it falls back to piecewise graphs)."""
        return (extra_config or {}).get("strata.layerwise") is True

    # ------------------------------ sleep mode (vLLM 0.33 calls these; 0.32 never does)
    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config) -> bool:
        """Strata can follow sleep's remap of the KV cache: it registers no memory with a driver or
        a NIC, it only holds the cache tensors, which it lets go before sleep and takes back after."""
        return True

    def unregister_kv_caches(self) -> None:
        """Before sleep frees the KV cache (``WorkerHalf.unregister``). Idempotent."""
        self.worker_half.unregister()

    def restore_kv_caches(self) -> None:
        """After wake-up (``WorkerHalf.restore``). Idempotent."""
        self.worker_half.restore()

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self.worker_half.load(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Layer-wise mode: until this layer of the step's loads may be computed on. Otherwise at
        once: synchronous loads are done in start_load_kv, asynchronous ones before their request runs."""
        self.worker_half.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        """Layer-wise mode: copy this layer of the step's chunks to save out of the cache (from the
        registered cache, the same tensor as ``kv_layer``). Otherwise nothing: wait_for_save gathers
        every layer at once."""
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        self.worker_half.save_layer(layer_name, meta)

    def wait_for_save(self):
        self.worker_half.save(self._get_connector_metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(nothing sent, the requests whose asynchronous load is complete); cancels the loads of
        ``finished_req_ids``."""
        return set(), self.worker_half.finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_half.load_errors()

    # ============================== both
    def flush(self) -> None:
        """Wait until every queued save has reached the store."""
        if self.worker_half is not None:
            self.worker_half.flush()
        else:
            self.store.flush()

    def shutdown(self):
        for half in (self.worker_half, self.scheduler_half):
            if half is not None:
                half.close()
        _untrack(self)

    def stats(self) -> dict:
        """The connector's counters since it started (this process); zeros on the scheduler."""
        return dict(self.worker_half.counters) if self.worker_half is not None else dict.fromkeys(COUNTERS, 0)

    # ============================== vLLM's connector stats (logged and aggregated by vLLM)
    def get_kv_connector_stats(self) -> "StrataKVStats | None":
        """What changed since the last call (vLLM asks after every step, on the worker and on the
        scheduler, which moves nothing)."""
        if self.worker_half is None:
            return None
        stats = StrataKVStats(data=self.worker_half.stats_delta())
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> "StrataKVStats":
        return StrataKVStats(data=dict(data) if data else dict.fromkeys(COUNTERS, 0))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> StrataPromMetrics:
        """Strata's series on vLLM's /metrics; vLLM's front end builds them once per stat logger."""
        return StrataPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


# The connectors of this process (in the order they were made), held weakly: one vLLM let go of is
# freed with what it holds, and one shut down is forgotten at once, so neither lookup below returns it.
_live: "weakref.WeakKeyDictionary[StrataConnector, None]" = weakref.WeakKeyDictionary()


def _track(connector: StrataConnector) -> None:
    _live[connector] = None


def _untrack(connector: StrataConnector) -> None:
    _live.pop(connector, None)


def connectors() -> "list[StrataConnector]":
    """The live connectors of this process, oldest first (for stats and for flushing saves in tests)."""
    return list(_live)


def worker_connector() -> "StrataConnector | None":
    """The connector of this process that holds a KV cache (the worker side, asleep or not), or None."""
    return next((c for c in connectors() if c.worker_half is not None and c.worker_half.kv_caches is not None), None)


def engine_stats(llm=None, engine: int = 0) -> dict:
    """The Strata KV numbers of a vLLM engine, from the process that drives it (an offline ``LLM``,
    whose engine runs in another process): ``{"connector": counters summed since start (chunks,
    tokens and bytes loaded and saved, failures, drops), "store": {rank: StorageEngine.stats()},
    "reports": n}``. They arrive through vLLM's own stats plumbing, with each step, so an ``LLM``
    must be made with ``disable_log_stats=False`` (its default is True); a save still queued after
    the last step shows up with the next one, and the store's stats are sent every few seconds."""
    from strata.errors import StrataError
    from strata.kv import vllm_metrics

    engine_obj = getattr(llm, "llm_engine", llm)
    if engine_obj is not None and getattr(engine_obj, "log_stats", True) is False:
        raise StrataError("engine_stats: this LLM was made with disable_log_stats=True (LLM's default), so vLLM "
                          "sends no connector stats to this process; allowed: LLM(..., disable_log_stats=False)")
    got = vllm_metrics.observed(engine)
    if got is None:
        raise StrataError(f"engine_stats: no Strata stats of engine {engine} have reached this process yet (none "
                          "before the first step that loads or saves; is the StrataConnector configured?)")
    return got
