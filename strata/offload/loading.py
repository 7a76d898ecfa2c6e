"""``strata.load``: a checkpoint larger than the GPU (and than host RAM) loaded ready to run.

The model is built on the meta device (Accelerate's ``init_empty_weights``). Every
check that can fail — shards, index, tensor names, shapes, dtypes, architecture — runs
before any device memory is taken. Then the decoder blocks are read tensor by tensor
from the safetensors files into the store (or, in file-backed mode, registered as byte
ranges of the files themselves, read on demand), the rest goes to the device, and the
offload hooks of ``strata.offload`` are attached.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch

from strata.config import format_size, parse_size
from strata.errors import ConfigError, OffloadError
from strata.keys import Key
from strata.offload.checkpoint import Checkpoint, TensorInfo
from strata.offload.handle import check_device, offload_from
from strata.offload.packing import BlockLayout, named_tensors, placeholder, replace_tensors, tensor_names
from strata.store.engine import StorageEngine, open_store
from strata.store.tiers.ranges import Extent


class CheckpointSource:
    """The weights come from a checkpoint: read them (or register their byte ranges). A
    ``staging.WeightSource``, as ``staging.LiveSource`` (the live model's own tensors) is."""

    restores_devices = False

    def __init__(self, ckpt: Checkpoint, names_of: dict[int, list[str]], prefix: str, file_backed: bool):
        self.ckpt, self.names_of, self.prefix, self.file_backed = ckpt, names_of, prefix, file_backed

    def info(self, full_name: str, t: torch.Tensor) -> TensorInfo | None:
        return self.ckpt.find(self.names_of.get(id(t), [full_name]), self.prefix)

    def store_block(self, store: StorageEngine, key: Key, layout: BlockLayout, staging: torch.Tensor) -> bool:
        infos = [self.info(s.full_name, t) if t is not None else None for s, t in zip(layout.slots, layout.tensors)]
        if self.file_backed and all(i is not None for i in infos):
            extents = [Extent(i.path, i.offset, i.nbytes, s.offset, i.dtype, s.dtype, i.stamp)
                       for s, i in zip(layout.slots, infos)]
            return store.put_ranges(key, torch.uint8, (layout.nbytes,), extents)
        buf = staging[: layout.nbytes]
        for s, t, info in zip(layout.slots, layout.tensors, infos):
            dest = buf[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) if s.nbytes else None
            if dest is None:
                continue
            if info is not None:
                self.ckpt.read_into(info, dest)
            else:  # a buffer the model computes itself (not in the checkpoint)
                dest.copy_(t)
        return store.put(key, buf)

    def resident(self, full_name: str, t: torch.Tensor, dev: torch.device) -> torch.Tensor | None:
        info = self.info(full_name, t)
        if info is None:
            return None if t.device == dev else t.to(dev)
        out = torch.empty(t.shape, dtype=t.dtype)
        self.ckpt.read_into(info, out)
        return out if dev.type == "cpu" else out.to(dev)


def _resolve_dtype(dtype, config, ckpt: Checkpoint) -> torch.dtype:
    """``dtype`` as a torch dtype; None and ``"auto"`` (Hugging Face's word for it) mean the checkpoint's own:
    its config's ``dtype``/``torch_dtype``, else the dtype holding most of its floating-point bytes."""
    if dtype is None or dtype == "auto":
        own = _as_dtype(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
        return own if isinstance(own, torch.dtype) and own.is_floating_point else _checkpoint_dtype(ckpt)
    dtype = _as_dtype(dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise OffloadError(f"dtype: got {dtype!r}; allowed: a floating dtype such as torch.bfloat16, torch.float16, "
                           "torch.float32 or its name ('bfloat16'), or None / 'auto' for the checkpoint's own")
    return dtype


def _as_dtype(value: object) -> object:
    if isinstance(value, str):
        named = getattr(torch, value.removeprefix("torch."), None)
        return named if isinstance(named, torch.dtype) else value
    return value


def _checkpoint_dtype(ckpt: Checkpoint) -> torch.dtype:
    by_dtype: dict[torch.dtype, int] = {}
    for info in ckpt.tensors.values():
        if info.dtype.is_floating_point:
            by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else torch.get_default_dtype()


def _build_meta_model(path: str, dtype, model_cls, ckpt: Checkpoint):
    try:
        import transformers
        from accelerate import init_empty_weights
    except ImportError:
        raise OffloadError("strata.load needs transformers and accelerate: pip install transformers accelerate") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise OffloadError(f"config.json: transformers {transformers.__version__} cannot read it ({e}); "
                           "pass model_cls= for a custom architecture") from None
    quant = getattr(config, "quantization_config", None)
    if quant:  # from_config ignores it: the quantized tensors would be cast as plain weights, scales dropped
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        raise OffloadError(f"config.json: the checkpoint is quantized (quantization_config, quant_method "
                           f"{str(method)!r}); strata.load reads unquantized checkpoints (float32, float16, "
                           "bfloat16): load it with transformers' from_pretrained, then strata.offload(model), or "
                           "take the unquantized checkpoint")
    torch_dtype = _resolve_dtype(dtype, config, ckpt)
    cls = model_cls or transformers.AutoModelForCausalLM
    kwargs = {"dtype": torch_dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch_dtype}
    try:
        with init_empty_weights():
            model = cls.from_config(config, **kwargs) if hasattr(cls, "from_config") else cls(config)
    except ValueError as e:
        raise OffloadError(f"config.json: model_type {getattr(config, 'model_type', '?')!r} has no model class "
                           f"{getattr(cls, '__name__', cls)} can build ({e}); pass model_cls=") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    except (OSError, ValueError, AttributeError):
        pass
    return model.eval()


def _check_against(model, ckpt: Checkpoint, prefix: str) -> None:
    """Every meta tensor must be in the checkpoint with its shape and a castable dtype."""
    names_of = tensor_names(model)
    for *_, full, t in named_tensors(model):
        if t.device.type != "meta":
            continue  # a buffer the model computes itself
        info = ckpt.find(names_of[id(t)], prefix)
        if info is None:
            raise OffloadError(f"checkpoint: {ckpt.root} has no tensor for {full} (nor {', '.join(names_of[id(t)])}); "
                               "is it the checkpoint of this architecture?")
        if info.shape != tuple(t.shape):
            raise OffloadError(f"checkpoint: {info.name} has shape {list(info.shape)}, the model expects {list(t.shape)}")
        if info.dtype != t.dtype and not (info.dtype.is_floating_point and t.dtype.is_floating_point):
            raise OffloadError(f"dtype: checkpoint tensor {info.name} is {info.dtype} and cannot be cast to {t.dtype}")


def _dematerialize(model: torch.nn.Module, dev: torch.device) -> None:
    """Swap meta tensors for shape-true placeholders on ``dev`` (ties kept: one object per tensor)."""
    replace_tensors(model, lambda t: placeholder(t.shape, t.dtype, dev) if t.device.type == "meta" else None,
                    requires_grad=False)


@torch.inference_mode(False)  # the model's placeholders must take streamed bytes: no inference tensors
def load(path: "str | os.PathLike", *, store: StorageEngine | None = None, device: "str | torch.device" = "cuda",
         gpu_budget: "int | str | dict | None" = None, dtype: "torch.dtype | str | None" = None, prefetch: int = 1,
         model_cls=None, file_backed: bool = False, cpu_cache: "int | str | None" = None,
         blocks: "str | Iterable[torch.nn.Module] | None" = None, progress: bool = True,
         static: bool = False) -> torch.nn.Module:
    """Load a safetensors checkpoint directory ready to run, weights streamed from the store.

    ``file_backed=True`` keeps the checkpoint's own files as the lowest tier (read on
    demand) under a CPU tier of ``cpu_cache`` bytes (default 2 GiB; only with ``file_backed`` and
    no ``store`` of your own, else refused), so host memory stays bounded for a checkpoint larger
    than it. ``static=True`` streams through fixed buffers for torch.compile
    and CUDA graphs, as in ``strata.offload`` (the streamed blocks are leased in the CPU tier for
    the model's life, so with ``file_backed`` they must fit ``cpu_cache``).
    ``strata.handle_of(model)`` gives the offload handle (``placement()``, ``stats()``, ``detach()``).
    """
    ckpt = Checkpoint(path)
    dev = check_device(device)
    if file_backed and store is not None and not any(t.kind == "ranges" for t in store.tiers):
        raise OffloadError("file_backed: the given store has no ranges tier; pass store=None or add {kind: ranges}")
    if cpu_cache is not None and (not file_backed or store is not None):
        raise OffloadError(f"cpu_cache: got {cpu_cache!r}, which sizes the CPU tier of the store file_backed=True "
                           "opens; allowed: with file_backed=True and store=None (a store of your own has its "
                           "tiers sized in its config)")
    try:
        cache_bytes = parse_size("2GiB" if cpu_cache is None else cpu_cache, "cpu_cache")
    except ConfigError as e:
        raise OffloadError(str(e)) from None
    model = _build_meta_model(str(path), dtype, model_cls, ckpt)
    prefix = getattr(model, "base_model_prefix", "") or ""
    _check_against(model, ckpt, prefix)
    _dematerialize(model, dev)
    source = CheckpointSource(ckpt, tensor_names(model), prefix, file_backed)  # ids of the placeholders

    def file_backed_store(offloaded_bytes: int) -> StorageEngine:
        return open_store({"tiers": [{"kind": "cpu", "capacity": cache_bytes}, {"kind": "ranges"}],
                           "namespaces": {"param": {"evict": "lower"}}})

    handle = offload_from(model, source, store=store, device=dev, gpu_budget=gpu_budget, prefetch=prefetch,
                          blocks=blocks, timing=True, progress=progress,
                          store_factory=file_backed_store if file_backed else None, static=static)
    if progress:
        s = handle.stats()
        where = "registered in place (file-backed)" if file_backed else "in the store"
        print(f"strata.load: {format_size(ckpt.nbytes)} checkpoint; {format_size(s['resident_bytes'])} resident on "
              f"{dev}; {s['offloaded_blocks']} blocks ({format_size(s['offloaded_bytes'])}) {where}, streamed "
              f"through a ring of {format_size(s['ring_bytes'])}; store: {handle.store!r}")
    return model
