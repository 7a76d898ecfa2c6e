"""What both halves of the connector are built from: the ``strata.*`` keys of vLLM's
``kv_connector_extra_config``, checked, and the facts of one engine (block size, layers, the scope
of its chunks, the store, the lookup socket). Read once by the facade, whatever the role, so the
scheduler and the worker hash chunks and name sockets alike."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from strata.errors import ConfigError
from strata.kv.chunks import ChunkHasher, kv_facts, kv_scope
from strata.kv.lookup import socket_path
from strata.store.shared import shared_store

if TYPE_CHECKING:
    from strata.store.engine import StorageEngine

log = logging.getLogger("strata.kv")

CONNECTOR_KEYS = {"config", "chunk_size", "save_partial", "max_pending_saves", "load_async", "layerwise"}


def settings(extra: dict) -> dict:
    """The ``strata.*`` keys with their defaults; a key or value not allowed names what is.
    ``strata.layerwise: true`` loads a hit within the step that computes on it, layer by layer, so
    it turns ``load_async`` off (and refuses an explicit ``strata.load_async: true``)."""
    out = {"config": None, "chunk_size": 256, "save_partial": True, "max_pending_saves": 64, "load_async": True,
           "layerwise": False}
    for k, v in (extra or {}).items():
        if not k.startswith("strata."):
            bare = k.removeprefix("strata_").removeprefix("strata-")
            if bare in CONNECTOR_KEYS:  # meant for Strata, but it would be ignored (a dotted key is another's)
                raise ConfigError(f"kv_connector_extra_config: key {k!r} is not read (Strata reads strata.* keys); "
                                  f"allowed: 'strata.{bare}'")
            continue
        name = k[len("strata."):]
        if name not in CONNECTOR_KEYS:
            raise ConfigError(f"kv_connector_extra_config: unknown key {k!r}; allowed: "
                              + ", ".join(f"strata.{n}" for n in sorted(CONNECTOR_KEYS)))
        out[name] = v
    for name in ("chunk_size", "max_pending_saves"):
        if isinstance(out[name], bool) or not isinstance(out[name], int) or out[name] <= 0:
            raise ConfigError(f"kv_connector_extra_config: strata.{name}: got {out[name]!r}; allowed: an integer > 0")
    for name in ("save_partial", "load_async", "layerwise"):
        if not isinstance(out[name], bool):
            raise ConfigError(f"kv_connector_extra_config: strata.{name}: got {out[name]!r}; allowed: true, false")
    if out["layerwise"]:
        if (extra or {}).get("strata.load_async") is True:
            raise ConfigError("kv_connector_extra_config: strata.layerwise: true loads a hit in the step that "
                              "computes on it, strata.load_async: true in the steps before it; allowed: "
                              "strata.layerwise: true with strata.load_async false or unset")
        out["load_async"] = False
    return out


@dataclass
class Context:
    """One engine's connector facts, the same in its scheduler and in each of its workers."""

    block_size: int
    layer_names: list[str]
    num_blocks: int
    hasher: ChunkHasher
    store: "StorageEngine"
    rank: int
    lookup_path: str  # the rank-0 worker's socket, which the scheduler asks
    save_partial: bool
    max_pending_saves: int  # the one bound on saves: gathered, queued or being put
    load_async: bool = True  # a hit is loaded while vLLM parks its request (false: before the step's forward)
    layerwise: bool = False  # synchronous loads released and saves gathered layer by layer (vllm_layerwise)
    prefix_caching: bool = False  # vLLM's own prefix cache is on (it caches what a load brought)
    facts: dict = field(default_factory=dict)  # what the scope hashes (kv_scope's arguments), for new epochs

    def new_epoch(self, epoch: str) -> ChunkHasher:
        """A hasher for the same facts in another epoch of the scope: none of its keys is a key of
        an earlier epoch (``StrataConnector.reset_cache``). The new scope is labelled like the first."""
        scope = kv_scope(**self.facts, epoch=epoch)
        self.hasher = ChunkHasher(scope, self.hasher.chunk_size, self.block_size)
        self.store.label_scope("kv", scope, {**kv_facts(**self.facts), "epoch": epoch})
        return self.hasher


def _vllm_version() -> str:
    try:
        import vllm

        return vllm.__version__
    except AttributeError:
        return "?"


def _scope_facts(vllm_config, kv_cache_config, chunk_size: int, layer_names: list[str]) -> dict:
    """Everything that makes a chunk's bytes valid: a changed model, layout or TP rank is a miss.
    Hashed into the chunks' scope (``kv_scope``) and kept as its label (``kv_facts``)."""
    groups = kv_cache_config.kv_cache_groups
    specs = [(type(g.kv_cache_spec).__name__, getattr(g.kv_cache_spec, "num_kv_heads", None),
              getattr(g.kv_cache_spec, "head_size", None), str(getattr(g.kv_cache_spec, "dtype", "")))
             for g in groups]
    parallel = vllm_config.parallel_config
    return dict(model=str(vllm_config.model_config.model), dtype=str(vllm_config.model_config.dtype),
                layout=(tuple(layer_names), tuple(specs), vllm_config.cache_config.cache_dtype),
                block_size=vllm_config.cache_config.block_size, chunk_size=chunk_size,
                tp_size=parallel.tensor_parallel_size, tp_rank=parallel.rank, version=_vllm_version())


def build(vllm_config, kv_transfer_config, kv_cache_config) -> Context:
    """The context of the connector vLLM is constructing (either role)."""
    cfg = settings(kv_transfer_config.kv_connector_extra_config)
    block_size = vllm_config.cache_config.block_size
    layer_names = [n for g in kv_cache_config.kv_cache_groups for n in g.layer_names]
    facts = _scope_facts(vllm_config, kv_cache_config, cfg["chunk_size"], layer_names)
    scope = kv_scope(**facts)
    hasher = ChunkHasher(scope, cfg["chunk_size"], block_size)
    store = shared_store(cfg["config"])
    store.label_scope("kv", scope, kv_facts(**facts))  # `strata inspect` names the chunks' scope by these
    if getattr(kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
        log.warning('strata: kv_load_failure_policy is %r: a chunk that fails to load (evicted, corrupt, tier '
                    'down) fails its request instead of being recomputed; set "kv_load_failure_policy": '
                    '"recompute" in --kv-transfer-config', kv_transfer_config.kv_load_failure_policy)
    return Context(block_size=block_size, layer_names=layer_names, num_blocks=kv_cache_config.num_blocks,
                   hasher=hasher, store=store,
                   rank=vllm_config.parallel_config.rank, lookup_path=socket_path(kv_transfer_config.engine_id),
                   save_partial=cfg["save_partial"], max_pending_saves=cfg["max_pending_saves"],
                   load_async=cfg["load_async"], layerwise=cfg["layerwise"], facts=facts,
                   prefix_caching=bool(getattr(vllm_config.cache_config, "enable_prefix_caching", False)))
