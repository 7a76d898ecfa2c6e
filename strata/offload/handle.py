"""``strata.offload(model)``: put a model's repeated blocks in the store and stream them back."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
import weakref
from typing import Iterable, Iterator

import torch

from strata import timeline as _timeline
from strata.config import format_size, parse_size
from strata.errors import ConfigError, OffloadError
from strata.hooks import ModuleHook, attach_hook, detach_hook
from strata.keys import Key, make_scope
from strata.offload import ops
from strata.offload.analysis import Analysis, analyse
from strata.offload.blocks import Uncopyable
from strata.offload.conversions import ConversionGuard
from strata.offload.inference_only import InferenceOnly
from strata.offload.packing import BlockLayout, set_tensor, without_inference_tensors
from strata.offload.placement import Plan, plan
from strata.offload.scheduler import BlockHook, PrefetchScheduler
from strata.offload.serial import ForwardLock
from strata.offload.staging import LiveSource, Staging, WeightSource, restore_block
from strata.offload.state import BlockState, refuse_loads
from strata.offload.static import StaticRing
from strata.store.engine import StorageEngine, open_store
from strata.store.owners import owned_scope

_MARK = "_strata_offload"
_ATTACHED: "weakref.WeakSet[OffloadHandle]" = weakref.WeakSet()  # live handles: a module is in one offload at most
log = logging.getLogger("strata.offload")


def check_device(device: "str | torch.device") -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OffloadError(f"device: got {device!r}; allowed: 'cuda', 'cuda:N' or 'cpu'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OffloadError(f"device: got {device!r} but CUDA is not available here; allowed: 'cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise OffloadError(f"device: got {device!r}; allowed: cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise OffloadError(f"device: got {device!r}; allowed: 'cuda', 'cuda:N' or 'cpu'")
    return dev


def parse_budget(budget: object, device: torch.device) -> int | None:
    if budget is None:
        return None
    if isinstance(budget, dict):  # Accelerate's max_memory style: {0: "20GiB", "cpu": "64GiB"}
        for k in (device.index, str(device.index), f"cuda:{device.index}", str(device)):
            if k in budget:
                return parse_size(budget[k], f"gpu_budget[{k!r}]")
        raise OffloadError(f"gpu_budget: no entry for {device} in {sorted(map(str, budget))}")
    try:
        return parse_size(budget, "gpu_budget")
    except ConfigError as e:
        raise OffloadError(str(e)) from None


class OffloadHandle(Uncopyable):
    """What ``strata.offload`` returns: stats, placement, and ``detach()``."""

    def __init__(self, model: torch.nn.Module, store: StorageEngine, owns_store: bool, device: torch.device,
                 analysis: Analysis, keys: dict[int, Key], plan_: Plan,
                 scheduler: "PrefetchScheduler | StaticRing | None", moved: dict[tuple, torch.device]):
        self.model = model
        self.store: StorageEngine = store
        self._owns_store = owns_store
        self.device = device
        self.names = analysis.names
        self.layouts = analysis.layouts
        self.block_path = analysis.block_path
        self._modules = analysis.modules
        self.keys = keys
        self.plan: Plan = plan_
        self.scheduler = scheduler
        self.static = isinstance(scheduler, StaticRing)
        self._moved = moved  # resident tensors moved to the device: where from
        self._ring_id: int | None = None  # the static ring's number in strata::enter calls
        self._frozen: list[InferenceOnly] = []  # static mode: the blocks whose parameters stopped requiring grad
        self._wrapped: list[torch.nn.Module] = []  # static mode: the blocks whose forward calls strata::enter
        self._hooks: list[tuple[torch.nn.Module, ModuleHook]] = []  # hook mode: block and inference-only hooks
        self._states: list[BlockState] = []  # the offloaded blocks' state_dict / load_state_dict hooks
        self._load_guard = None  # the model's load_state_dict hook (refuses the blocks' values up front)
        self._conversions: ConversionGuard | None = None  # refuses .to() / .half() ... that would change them
        self._serial: ForwardLock | None = None  # one forward at a time: the ring is one
        self.attached = True
        self._unregister_close = store.on_close(self._store_closing)
        self._recorded: tuple | None = None  # (spans, time zero) of the last recording()

    def _attach(self, states: list[BlockState]) -> None:
        """Stream the offloaded blocks from now on (static: each block's forward calls ``strata::enter``;
        else module hooks), guard the model against what would lose their weights, and mark it."""
        mods, names, layouts, offloaded = self._modules, self.names, self.layouts, self.plan.offloaded
        if self.static:
            self._ring_id = ops.register(self.scheduler)
            for q, b in enumerate(offloaded):
                ops.wrap_forward(mods[b], self._ring_id, q, names[b])
                self._wrapped.append(mods[b])
                frozen = InferenceOnly(names[b], layouts[b])
                frozen.init_hook(mods[b])
                self._frozen.append(frozen)
        elif self.scheduler is not None:
            for i, m in enumerate(mods):
                self._hooks.append((m, attach_hook(m, BlockHook(self.scheduler, i))))
            for b in offloaded:  # detach() removes it like the block hooks, giving requires_grad back
                self._hooks.append((mods[b], attach_hook(mods[b], InferenceOnly(names[b], layouts[b]))))
        self._states = states
        if self.scheduler is not None:
            self._serial = ForwardLock(self.model, traced=self.static)
        if states:
            self._load_guard = refuse_loads(self.model, states)
            kinds = {(s.dtype, self.device) for b in offloaded for s in layouts[b].slots}
            inside = [m for b in offloaded for m in mods[b].modules()]
            self._conversions = ConversionGuard([self.model, *inside], kinds)
        object.__setattr__(self.model, _MARK, self)
        _ATTACHED.add(self)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- reporting -----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Bytes streamed, copy time hidden vs exposed, per-block wait, resident and pinned bytes."""
        p = self.plan
        out = {
            "blocks": len(self.layouts),
            "offloaded_blocks": len(p.offloaded),
            "resident_blocks": len(p.resident),
            "offloaded_bytes": sum(self.layouts[b].nbytes for b in p.offloaded),
            "resident_bytes": p.other_bytes + sum(self.layouts[b].nbytes for b in p.resident),
            "ring_bytes": p.ring_bytes,
            "device": str(self.device),
        }
        if self.scheduler is not None:
            out.update(self.scheduler.stats())
        tiers = self.store.stats()["tiers"].values()  # once: a remote tier's figures cost a round trip
        out["pinned_bytes"] = sum(t["capacity"] for t in tiers if t["kind"] == "cpu" and t.get("pinned"))
        out["store_param_bytes"] = sum(t["namespaces"].get("param", {}).get("bytes", 0) for t in tiers)
        return out

    def placement(self) -> str:
        """Where every block and the rest of the model live, one line each."""
        p = self.plan
        if not self.attached:
            return f"detached: every parameter of the {type(self.model).__name__} is back where it was"
        lines = [f"device {self.device}: non-block modules {format_size(p.other_bytes)}, "
                 f"ring {p.ring_slots} x {format_size(p.slot_bytes)}"]
        for i, name in enumerate(self.names):
            where = "resident on device" if i in p.resident else "streamed from the store"
            lines.append(f"  {name}: {format_size(self.layouts[i].nbytes)}, {where}")
        return "\n".join(lines)

    # -- timeline ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self) -> Iterator["OffloadHandle"]:
        """Record every streamed block's copy and compute inside the ``with`` block, for ``timeline``:
        any number of forwards (a ``model.generate`` call records one per token). Outside it the
        ring records nothing (one attribute test per block). A new recording replaces the last."""
        s = self.scheduler
        if not self.attached:
            raise OffloadError("recording: this handle is detached, nothing streams any more; offload the model "
                               "again to record")
        if s is None:
            raise OffloadError("recording: every block is resident on the device, so nothing is streamed and there "
                               "is no copy to record; offload with a smaller gpu_budget")
        if self.static:
            raise OffloadError("recording: not available with static=True (the copies run inside compiled graphs); "
                               "offload with static=False to record a timeline")
        if s.trace is not None:
            raise OffloadError("recording: already recording; handle.recording() blocks do not nest")
        s.start_trace()
        try:
            yield self
        finally:
            self._recorded = s.stop_trace()

    def timeline(self, path: "str | os.PathLike | None" = None, forwards: int | None = None) -> dict:
        """The last ``recording()`` as a Chrome trace / Perfetto JSON dict (``{"traceEvents": [...]}``:
        one copy and one compute event per streamed block per forward, rows ``copy`` and ``compute``),
        written to ``path`` if given; ``forwards`` keeps the first N forwards. Draw it with
        ``strata plot TRACE -o timeline.png``; open it in ui.perfetto.dev or chrome://tracing."""
        if self._recorded is None:
            raise OffloadError("timeline: nothing recorded yet; run the model inside `with handle.recording():` first")
        if forwards is not None and (isinstance(forwards, bool) or not isinstance(forwards, int) or forwards < 1):
            raise OffloadError(f"forwards: got {forwards!r}; allowed: an integer >= 1, or None for every forward")
        s = self.scheduler
        if s.asynchronous:  # the timing events are read now, not while recording
            s.dev.synchronize(s.device)
        spans, base = self._recorded
        trace = _timeline.build(spans, base, s.asynchronous, self.names, forwards, device=str(self.device))
        if path is not None:
            try:
                _timeline.write(trace, path)
            except OSError as e:
                raise OffloadError(f"path: cannot write the timeline to {str(path)!r} ({e.strerror or e}); allowed: "
                                   "a file path in a writable directory") from None
        return trace

    # -- undo ----------------------------------------------------------------------------------
    def detach(self) -> torch.nn.Module:
        """Put every parameter back where it was, bit for bit, and remove Strata's hooks."""
        return self._detach(strict=True)

    def _store_closing(self) -> None:
        """The store is closing under an attached model: take the weights back first, so closing it
        loses nothing (a block already deleted from the store stays a placeholder). At the process's
        exit there is nothing to take them back into: the blocks are deleted instead (keyed by this
        process, no one could use them), so no write-back carries them down and no persistent tier
        keeps them."""
        if self.store.exiting:
            for key in self.keys.values():
                self.store.delete(key)
            return
        log.warning("strata: the store of an offloaded %s is closing; its weights are restored into the model",
                    type(self.model).__name__)
        self._detach(strict=False)

    @torch.inference_mode(False)  # the restored tensors are the model's for good: never inference tensors
    def _detach(self, strict: bool) -> torch.nn.Module:
        if not self.attached:
            return self.model
        with self._serial.held() if self._serial is not None else contextlib.nullcontext():
            if self.attached:  # not detached by another thread while this one waited for the lock
                self._detach_now(strict)
        return self.model

    def _detach_now(self, strict: bool) -> None:
        if self._serial is not None:
            self._serial.detach()
        if self._unregister_close is not None:
            self._unregister_close()
        for module, hook in self._hooks:
            detach_hook(module, hook)
        for state in self._states:
            state.detach()
        if self._load_guard is not None:
            self._load_guard.remove()
        if self._conversions is not None:
            self._conversions.detach()
        if self._ring_id is not None:
            for module in self._wrapped:
                ops.unwrap_forward(module)
            ops.unregister(self._ring_id)
        for frozen in self._frozen:
            frozen.detach_hook(None)
        if self.scheduler is not None:
            self.scheduler.close()
        for b in self.plan.offloaded:
            if not restore_block(self.store, self.keys[b], self.layouts[b]):
                if strict:
                    raise OffloadError(f"detach: block {self.names[b]} is missing from the store; cannot restore it")
                log.warning("strata: block %s is no longer in the store; it stays unloaded", self.names[b])
                continue
            self.store.delete(self.keys[b])
        for (module, name, is_param), dev in self._moved.items():
            t = module._parameters[name] if is_param else module._buffers[name]
            set_tensor(module, name, is_param, t.to(dev))
        if self._owns_store:
            self.store.close()
        object.__delattr__(self.model, _MARK)
        _ATTACHED.discard(self)
        self.attached = False

    def __enter__(self) -> "OffloadHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        p = self.plan
        if not self.attached:
            return f"OffloadHandle(detached from its {type(self.model).__name__})"
        return (f"OffloadHandle({len(p.offloaded)}/{len(self.layouts)} blocks streamed from the store, "
                f"{len(p.resident)} resident, ring {p.ring_slots} x {format_size(p.slot_bytes)} on {self.device})")


def offload(model: torch.nn.Module, *, store: StorageEngine | None = None, device: "str | torch.device" = "cuda",
            gpu_budget: "int | str | dict | None" = None, prefetch: int = 1,
            blocks: "str | Iterable[torch.nn.Module] | None" = None, timing: bool = True,
            progress: bool = True, static: bool = False) -> OffloadHandle:
    """Keep ``model``'s repeated blocks in the store and stream each onto ``device`` just before
    it runs, ``prefetch`` blocks ahead; see the README for every argument. ``static=True`` gives
    every streamed block fixed device buffers and runs the streaming as a custom op, so
    ``torch.compile(fullgraph=True)`` and CUDA graphs take the model whole (``strata.offload.static``)."""
    return offload_from(model, LiveSource(), store=store, device=device, gpu_budget=gpu_budget, prefetch=prefetch,
                        blocks=blocks, timing=timing, progress=progress, static=static)


@torch.inference_mode(False)  # placeholders, ring views, restored copies: normal tensors whatever the caller's mode
def offload_from(model: torch.nn.Module, source: WeightSource, *, store: StorageEngine | None, device, gpu_budget,
                 prefetch: int, blocks, timing: bool, progress: bool, store_factory=None,
                 static: bool = False) -> OffloadHandle:
    """``offload`` with the weights coming from ``source`` (the live model, or a checkpoint): check the
    arguments, analyse the model, plan the placement, move the weights, attach the streaming."""
    if not isinstance(model, torch.nn.Module):
        raise OffloadError(f"model: got {type(model).__name__}; allowed: a torch.nn.Module")
    _refuse_nested(model)
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise OffloadError(f"prefetch: got {prefetch!r}; allowed: an integer >= 0 (blocks copied ahead)")
    if not isinstance(static, bool):
        raise OffloadError(f"static: got {static!r}; allowed: True (fixed buffers, for torch.compile and CUDA graphs) "
                           "or False (module hooks)")
    if store is not None and not isinstance(store, StorageEngine):
        raise OffloadError(f"store: got {type(store).__name__}; allowed: a StorageEngine (strata.open_store) or None")
    dev = check_device(device)
    budget = parse_budget(gpu_budget, dev)
    without_inference_tensors(model)
    a = analyse(model, blocks)
    p = plan([layout.nbytes for layout in a.layouts], a.other_bytes, budget, prefetch, static)

    owns_store = store is None
    if owns_store:
        store = (store_factory or _default_store)(sum(a.layouts[b].nbytes for b in p.offloaded))
    arch = make_scope(names=tuple(a.names), layout=tuple(layout.signature for layout in a.layouts))
    # owned by this process: what a killed one leaves is an orphan that StorageEngine.gc() drops
    scope = owned_scope(make_scope(model=type(model).__name__, arch=arch, instance=uuid.uuid4().hex))
    keys = {b: Key("param", scope, a.names[b]) for b in p.offloaded}
    staging = Staging(store, owns_store, a, keys)
    try:
        staging.store_blocks(source, p.offloaded, p.slot_bytes, dev, progress)
        staging.place_residents(model, source, dev)
        staging.watch_state()
        scheduler = None
        if p.offloaded and static:
            scheduler = StaticRing(store, dev, a.names, a.layouts, keys, p.offloaded, p.slot_bytes, prefetch,
                                   timing=timing)
        elif p.offloaded:
            scheduler = PrefetchScheduler(store, dev, a.names, a.layouts, keys, p.offloaded, p.ring_slots,
                                          p.slot_bytes, prefetch, timing=timing)
    except BaseException:
        staging.rollback()
        raise
    if p.offloaded:  # `strata inspect` names the scope by these facts, not by its hash alone
        store.label_scope("param", scope, _scope_facts(model, a.layouts, p.offloaded, a.block_path))
    handle = OffloadHandle(model, store, owns_store, dev, a, keys, p, scheduler, staging.moved)
    handle._attach(staging.states)
    return handle


def _refuse_nested(model: torch.nn.Module) -> None:
    """One offload per module tree: a second one inside or around the first would pack the first's
    placeholders (or ring views) as weights, and the two detach() calls would undo each other."""
    for name, sub in model.named_modules():
        if getattr(sub, _MARK, None) is not None:
            if not name:
                raise OffloadError("model: already offloaded by strata.offload; call handle.detach() first")
            raise OffloadError(f"model: its submodule {name} is already offloaded by strata.offload; call that "
                               "handle's detach() first (strata.handle_of(module)), then offload the whole model once")
    for handle in list(_ATTACHED):
        if handle.attached and any(sub is model for sub in handle.model.modules()):
            raise OffloadError(f"model: part of a {type(handle.model).__name__} already offloaded by strata.offload; "
                               "call that handle's detach() first, or offload one of them only")


def _default_store(offloaded_bytes: int) -> StorageEngine:
    """A CPU tier sized to the offloaded weights (pinned when CUDA is present), weights pinned in it."""
    return open_store({"tiers": [{"kind": "cpu", "capacity": max(offloaded_bytes, 1) + (1 << 20)}],
                       "namespaces": {"param": {"evict": "never"}}})


def handle_of(model: torch.nn.Module) -> OffloadHandle | None:
    """The ``OffloadHandle`` of a model offloaded or loaded by Strata, or None."""
    return getattr(model, _MARK, None)


def _scope_facts(model: torch.nn.Module, layouts: list[BlockLayout], offloaded: list[int], block_path: str) -> dict:
    """What an offload's scope stands for, as its label (``StorageEngine.label_scope``): the
    model class, the dtypes of the streamed tensors, where the blocks are, how many, whose."""
    from strata.store.labels import clip

    dtypes = sorted({str(s.dtype).removeprefix("torch.") for b in offloaded for s in layouts[b].slots})
    return {"model": clip(type(model).__name__), "dtype": clip(",".join(dtypes)), "block_path": clip(block_path),
            "blocks": str(len(layouts)), "pid": str(os.getpid())}
