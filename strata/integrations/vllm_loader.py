"""``--load-format strata``: vLLM's default loader, then the decoder layers handed to the store.

    vllm serve MODEL --load-format strata \\
        --model-loader-extra-config '{"gpu_budget": "4GiB", "prefetch": 2, "config": "store.yaml"}'

The weights are read exactly as vLLM's default loader reads them (same files, same weight
loaders, same post-processing); then ``strata.offload`` keeps the decoder layers that do not fit
``gpu_budget`` in the store under namespace ``param`` and streams each one onto the device, layer
ahead, just before it runs. The embedding, the head, the norms and the layers that fit stay resident.

Extra-config keys: ``config`` (store YAML, preset or mapping; when it names the same store as the
KV connector's ``strata.config``, both use one ``StorageEngine`` in the worker: one budget, one
``stats()``), ``gpu_budget`` (bytes or "4GiB"; None streams every layer), ``prefetch`` (layers
copied ahead, default 1), ``blocks`` (dotted path of the layer list, when the guess is wrong).
vLLM's own keys of the default loader pass through.

Both of vLLM's modes. Eagerly (``--enforce-eager``) the layers stream through module hooks, from
any tier. Compiled (vLLM's default: torch.compile, CUDA graphs on a GPU) they stream through the
static ring (``strata.offload(static=True)``): each streamed layer keeps fixed device buffers, the
copies read the layers' bytes leased in a memory tier (cpu or cxl) for the engine's life, and
the per-layer step is the custom op ``strata::enter`` inside the graph, ordered by a declared
write of the layer's activations, as vLLM's own prefetch offloader does; vLLM's CUDA-graph capture
drains and joins the copies through ``strata.integrations.vllm_offloader``. A store whose layers
cannot sit in a memory tier (a file or redis tier alone) is refused in compiled mode, naming
``--enforce-eager``; ``strata serve`` adds that flag itself then, and says so. On a CUDA device the weights are loaded into host
memory first (``LoadConfig.device``), so a model larger than the GPU can load; only the resident part
and the streaming ring are ever on the GPU. On vLLM's CPU platform the linear layers of the blocks
keep ``torch.nn.functional.linear`` (vLLM's ``_cpu_skip_gemm_dispatch``) instead of being prepacked
into oneDNN handles, whose weights could not be streamed.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from vllm.config import CompilationMode, CUDAGraphMode
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.platforms import current_platform

from strata.config import parse_size
from strata.config_load import load_config
from strata.errors import ConfigError
from strata.integrations.vllm_version import check_vllm
from strata.offload import OffloadError, OffloadHandle, find_blocks, offload
from strata.store.shared import shared_store

log = logging.getLogger("strata.vllm")
if not log.handlers:  # vLLM configures its own loggers only: say where the layers went on stderr
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("strata: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

_handles: list[OffloadHandle] = []


@dataclass(frozen=True)
class LoaderOptions:
    config: object = None  # store YAML path, preset name or mapping (None: the cpu preset)
    gpu_budget: object = None  # int, "4GiB" or None (stream every block)
    prefetch: int = 1
    blocks: str | None = None

    @classmethod
    def parse(cls, raw: Mapping) -> "LoaderOptions":
        where = "model_loader_extra_config"
        opts = cls(**raw)
        load_config(opts.config)  # a bad store config fails here, naming its field
        if opts.gpu_budget is not None:
            parse_size(opts.gpu_budget, f"{where}.gpu_budget")
        if isinstance(opts.prefetch, bool) or not isinstance(opts.prefetch, int) or opts.prefetch < 0:
            raise ConfigError(f"{where}.prefetch: got {opts.prefetch!r}; allowed: an integer >= 0 (layers copied ahead)")
        if opts.blocks is not None and not isinstance(opts.blocks, str):
            raise ConfigError(f"{where}.blocks: got {opts.blocks!r}; allowed: the dotted path of the layer list, "
                              "like 'model.layers'")
        return opts


OPTION_KEYS = tuple(LoaderOptions.__dataclass_fields__)


def handles() -> list[OffloadHandle]:
    """The offload handles of the models this process loaded with ``--load-format strata``."""
    return [h for h in _handles if h.attached]


def _drop_store_copies(handle: OffloadHandle) -> None:
    """At exit: the layers' bytes are keyed by this process (one scope per load), so nobody can use
    them after it; a persistent tier (CXL, files, Redis) must not keep them. A process that is
    killed leaves them behind, as orphans of its owned scope: the next load drops them
    (``_drop_orphans``), or ``strata gc CONFIG`` does."""
    for key in handle.keys.values():
        try:
            handle.store.delete(key)
        except Exception:  # the store may be closed or a tier down at exit; nothing to save then
            log.debug("strata: could not delete %s at exit", key, exc_info=True)


def _drop_orphans(store) -> None:
    """Before offloading: drop what killed processes left (their layers' scopes name an owner that
    has exited), so a restarted server gets back the space a killed one held. Without this the
    orphans fill a persistent last tier, whose weights may not be evicted, and every later KV put
    to it is refused. Objects of live processes and of other hosts are kept."""
    try:
        dropped = store.gc()
    except Exception:  # a tier down: offloading may still work, the orphans wait for the next load
        log.warning("could not look for orphaned objects in %r", store, exc_info=True)
        return
    if dropped:
        log.info("dropped %d orphaned objects (left by processes that exited) from %r", dropped, store)


def compiled(vllm_config) -> bool:
    """Whether vLLM will run the model compiled (torch.compile, or CUDA graphs): then the layers
    stream through the static ring, whose per-layer step is a custom op inside the graph."""
    comp = vllm_config.compilation_config
    return comp.mode != CompilationMode.NONE or comp.cudagraph_mode not in (None, CUDAGraphMode.NONE)


class StrataModelLoader(DefaultModelLoader):
    """vLLM's default loader plus ``strata.offload`` of the decoder layers."""

    def __init__(self, load_config_):
        check_vllm()
        extra = load_config_.model_loader_extra_config
        if not isinstance(extra, Mapping):
            raise ConfigError(f"model_loader_extra_config: got {type(extra).__name__}; allowed: a JSON object "
                              f"with keys {', '.join(OPTION_KEYS)}")
        self.options = LoaderOptions.parse({k: v for k, v in extra.items() if k in OPTION_KEYS})
        rest = {k: v for k, v in extra.items() if k not in OPTION_KEYS}
        try:
            # the files are read as --load-format auto would read them
            super().__init__(replace(load_config_, load_format="auto", model_loader_extra_config=rest))
        except ValueError as e:  # vLLM's own check of the keys it knows
            raise ConfigError(f"model_loader_extra_config: {e}; Strata's keys: {', '.join(OPTION_KEYS)}") from None

    def load_weights(self, model: torch.nn.Module, model_config) -> None:
        super().load_weights(model, model_config)
        if current_platform.is_cpu():  # keep the blocks' weights plain tensors (see the module docstring)
            for block in self._blocks(model):
                for mod in block.modules():
                    mod._cpu_skip_gemm_dispatch = True

    def load_model(self, vllm_config, model_config, prefix: str = "") -> torch.nn.Module:
        static = compiled(vllm_config)
        device = torch.device(vllm_config.device_config.device)
        load_cfg = vllm_config.load_config
        staged = device.type == "cuda" and load_cfg.device is None
        if staged:  # read the checkpoint into host memory: the model need not fit the GPU
            load_cfg.device = "cpu"
        try:
            model = super().load_model(vllm_config, model_config, prefix)
        finally:
            if staged:
                load_cfg.device = None
        store = shared_store(self.options.config)
        _drop_orphans(store)
        try:
            handle = offload(model, store=store, device=device, gpu_budget=self.options.gpu_budget,
                             prefetch=self.options.prefetch, blocks=self.options.blocks, static=static,
                             progress=False)
        except OffloadError as e:
            if static and "memory tier" in str(e):
                raise ConfigError(f"--load-format strata, model {model_config.model}, compiled mode: {e}; in vLLM: "
                                  "allowed: --enforce-eager (LLM(enforce_eager=True)), which streams from any tier, "
                                  "or a store with a cpu or cxl tier") from None
            raise OffloadError(f"--load-format strata, model {model_config.model}: {e}") from None
        if handle.static:
            from strata.integrations.vllm_offloader import install

            try:
                install(handle.scheduler)
            except ConfigError:
                handle.detach()
                raise
        _handles.append(handle)
        atexit.register(_drop_store_copies, handle)
        log.info("%r; store %r\n%s", handle, store, handle.placement())
        return model

    def _blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        try:
            return find_blocks(model, self.options.blocks)[1]
        except OffloadError as e:
            raise OffloadError(f"--load-format strata: {e}") from None
