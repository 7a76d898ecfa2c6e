"""``strata.offload(model)``: put a model's repeated blocks in the store and stream them back."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
import weakref
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from strata import timeline as _timeline
from strata.config import format_size, parse_size
from strata.errors import ConfigError
from strata.hooks import ModuleHook, attach_hook, detach_hook
from strata.keys import Key, make_scope
from strata.offload.blocks import OffloadError, Uncopyable, block_names, find_blocks
from strata.offload.conversions import ConversionGuard
from strata.offload.packing import ALIGN, BlockLayout, set_tensor
from strata.offload.placement import Plan, plan
from strata.offload import ops
from strata.offload.scheduler import BlockHook, PrefetchScheduler
from strata.offload.serial import ForwardLock
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

    def __init__(self, model, store, owns_store, device, names, layouts, keys, plan_, scheduler, moved, block_path):
        self.model = model
        self.store: StorageEngine = store
        self._owns_store = owns_store
        self.device = device
        self.names = names
        self.layouts = layouts
        self.keys = keys
        self.plan: Plan = plan_
        self.scheduler: PrefetchScheduler | StaticRing | None = scheduler
        self.static = isinstance(scheduler, StaticRing)
        self._ring_id: int | None = None  # the static ring's number in strata::enter calls
        self._frozen: list[InferenceOnly] = []  # static mode: the blocks whose parameters stopped requiring grad
        self._wrapped: list[torch.nn.Module] = []  # static mode: the blocks whose forward calls strata::enter
        self._moved: dict[tuple, torch.device] = moved  # resident tensors moved to the device: where from
        self.block_path = block_path
        self._hooks: list[tuple[torch.nn.Module, BlockHook]] = []
        self._states: list[BlockState] = []  # the offloaded blocks' state_dict / load_state_dict hooks
        self._load_guard = None  # the model's load_state_dict hook (refuses the blocks' values up front)
        self._conversions: ConversionGuard | None = None  # refuses .to() / .half() ... that would change them
        self._serial: ForwardLock | None = None  # one forward at a time: the ring is one
        self.attached = True
        self._unregister_close = store.on_close(self._store_closing)
        self._recorded: tuple | None = None  # (spans, time zero) of the last recording()

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
        cpu = [t for t in self.store.stats()["tiers"].values() if t["kind"] == "cpu"]
        out["pinned_bytes"] = sum(t["capacity"] for t in cpu if t.get("pinned"))
        out["store_param_bytes"] = sum(t["namespaces"].get("param", {}).get("bytes", 0)
                                       for t in self.store.stats()["tiers"].values())
        return out

    def placement(self) -> str:
        """Where every block and the rest of the model live, one line each."""
        p = self.plan
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
            _timeline.write(trace, path)
        return trace

    # -- undo ----------------------------------------------------------------------------------
    def detach(self) -> torch.nn.Module:
        """Put every parameter back where it was, bit for bit, and remove Strata's hooks."""
        return self._detach(strict=True)

    def _store_closing(self) -> None:
        """The store is closing under an attached model: take the weights back first, so closing it
        loses nothing (a block already deleted from the store, e.g. at exit, stays a placeholder)."""
        log.warning("strata: the store of an offloaded %s is closing; its weights are restored into the model",
                    type(self.model).__name__)
        self._detach(strict=False)

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
            if not _restore_block(self.store, self.keys[b], self.layouts[b]):
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
        return (f"OffloadHandle({len(p.offloaded)}/{len(self.layouts)} blocks streamed from the store, "
                f"{len(p.resident)} resident, ring {p.ring_slots} x {format_size(p.slot_bytes)} on {self.device})")


def _restore_block(store: StorageEngine, key: Key, layout: BlockLayout) -> bool:
    """Point a block's tensors back at copies of its stored bytes, on the devices they came from;
    False if the store no longer holds them."""
    packed = store.get(key)
    if packed is None:
        return False
    layout.bind([v.to(dev, copy=True) for v, dev in zip(layout.views(packed), layout.devices)])
    return True


class InferenceOnly(ModuleHook, Uncopyable):
    """A streamed block is inference only: its weights are views into a ring slot while it
    runs and placeholders after, so autograd would differentiate through whatever the slot
    holds by then (NaN gradients, silently). Its parameters stop requiring grad while
    offloaded (given back at detach), so a forward with grad mode on works as inference;
    a backward that reaches the block's output raises instead of producing wrong numbers."""

    def __init__(self, name: str, layout: BlockLayout):
        self.name, self.layout = name, layout
        self._frozen: list[torch.nn.Parameter] = []

    def init_hook(self, module):
        for s in self.layout.slots:
            p = s.module._parameters[s.name] if s.is_param else None
            if p is not None and p.requires_grad:
                p.requires_grad_(False)
                self._frozen.append(p)

    def detach_hook(self, module):
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []

    def post_forward(self, module, output):
        if torch.is_grad_enabled():
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(self._refuse)
        return output

    def _refuse(self, grad):
        raise OffloadError(
            f"backward through {self.name}: strata.offload is inference only (the block's weights are streamed "
            "in for its forward and gone after it, so their gradients would be wrong); run the model under "
            "torch.no_grad() / torch.inference_mode(), or call handle.detach() to train it")


def _tensors(output, depth: int = 3):
    """The tensors in a forward's output: a tensor, or one inside tuples, lists and dicts
    (transformers' ModelOutput is a dict)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif depth and isinstance(output, (tuple, list)):
        for o in output:
            yield from _tensors(o, depth - 1)
    elif depth and isinstance(output, dict):
        for o in output.values():
            yield from _tensors(o, depth - 1)


def named_tensors(module: torch.nn.Module):
    """(owner module, attribute, is_param, dotted name, tensor) for every parameter and buffer
    reference, tied ones once per reference."""
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
            for name, t in table.items():
                if t is not None:
                    yield mod, name, is_param, f"{prefix}.{name}" if prefix else name, t


class LiveSource:
    """The weights are the model's own tensors: pack them, move the rest to the device."""

    restores_devices = True

    def store_block(self, store: StorageEngine, key: Key, layout: BlockLayout, staging: torch.Tensor) -> bool:
        return store.put(key, layout.pack(staging[: layout.nbytes]))

    def resident(self, full_name: str, t: torch.Tensor, dev: torch.device) -> torch.Tensor | None:
        if t.device.type == "meta":
            raise OffloadError(f"model: {full_name} is still on the meta device; load its weights first (strata.load)")
        return None if t.device == dev else t.to(dev)


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


def offload_from(model: torch.nn.Module, source, *, store: StorageEngine | None, device, gpu_budget, prefetch: int,
                 blocks, timing: bool, progress: bool, store_factory=None, static: bool = False) -> OffloadHandle:
    """``offload`` with the weights coming from ``source`` (the live model, or a checkpoint)."""
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
    block_path, mods = find_blocks(model, blocks)
    names = block_names(model, mods)

    # Tensors shared between blocks, or with a module outside the blocks, stay resident.
    owners: dict[int, set[int]] = {}
    block_modules: set[int] = set()
    for i, m in enumerate(mods):
        block_modules.update(id(sub) for sub in m.modules())
        for *_, t in named_tensors(m):
            owners.setdefault(id(t), set()).add(i)
    outside = {tid for tid, blocks_ in owners.items() if len(blocks_) > 1}
    for mod in model.modules():
        if id(mod) not in block_modules:
            outside.update(id(t) for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None)
    layouts = [BlockLayout(m, names[i], skip=outside) for i, m in enumerate(mods)]
    if not any(l.nbytes for l in layouts):
        raise OffloadError(f"blocks: the blocks found at {block_path!r} hold no tensors of their own to offload")
    other = {id(t): t for *_, t in named_tensors(model) if id(t) in outside}
    other_bytes = sum((t.numel() * t.element_size() + ALIGN - 1) // ALIGN * ALIGN for t in other.values())
    p = plan([l.nbytes for l in layouts], other_bytes, budget, prefetch, static)

    offloaded_bytes = sum(layouts[b].nbytes for b in p.offloaded)
    owns_store = store is None
    if owns_store:
        store = (store_factory or _default_store)(offloaded_bytes)

    arch = make_scope(names=tuple(names), layout=tuple(l.signature for l in layouts))
    # owned by this process: what a killed one leaves is an orphan that StorageEngine.gc() drops
    scope = owned_scope(make_scope(model=type(model).__name__, arch=arch, instance=uuid.uuid4().hex))
    keys = {b: Key("param", scope, names[b]) for b in p.offloaded}
    offloaded_ids: set[int] = set()
    done: list[int] = []
    states: list[BlockState] = []  # state_dict() reads an offloaded block from the store
    try:
        staging = torch.empty(p.slot_bytes if p.offloaded else 0, dtype=torch.uint8)
        bar = tqdm(p.offloaded, desc="strata: blocks -> store", unit="block", disable=not progress or not p.offloaded)
        for b in bar:
            layout = layouts[b]
            if not source.store_block(store, keys[b], layout, staging):
                raise OffloadError(
                    f"store: could not take block {names[b]} ({format_size(layout.nbytes)}); the store's tiers are "
                    f"full of objects it may not evict: {store!r}. Give it more capacity or a lower tier")
            offloaded_ids.update(id(t) for t in layout.tensors)
            layout.bind(layout.placeholders(dev))  # the store's copy is now the only one
            layout.forget_buffers()
            done.append(b)
        moved: dict[tuple, torch.device] = {}
        placed: dict[int, torch.Tensor] = {}  # tied tensors are placed once
        for mod, name, is_param, full, t in list(named_tensors(model)):
            if id(t) in offloaded_ids:
                continue
            new = placed.get(id(t))
            if new is None:
                new = source.resident(full, t, dev)
                if new is None:
                    continue
                placed[id(t)] = new
                if source.restores_devices:
                    moved[(mod, name, is_param)] = t.device
            set_tensor(mod, name, is_param, new)
        for b in p.offloaded:
            states.append(BlockState(store, keys[b], layouts[b], names[b], mods[b]))
    except BaseException:
        _undo(store, owns_store, keys, layouts, done, states)
        raise
    scheduler = None
    if p.offloaded:
        try:
            if static:
                scheduler = StaticRing(store, dev, names, layouts, keys, p.offloaded, p.slot_bytes, prefetch,
                                       timing=timing)
            else:
                scheduler = PrefetchScheduler(store, dev, names, layouts, keys, p.offloaded, p.ring_slots,
                                              p.slot_bytes, prefetch, timing=timing)
        except BaseException:
            _undo(store, owns_store, keys, layouts, done, states)
            raise
    if p.offloaded:  # `strata inspect` names the scope by these facts, not by its hash alone
        store.label_scope("param", scope, _scope_facts(model, layouts, p.offloaded, block_path))
    handle = OffloadHandle(model, store, owns_store, dev, names, layouts, keys, p, scheduler, moved, block_path)
    if static and scheduler is not None:
        handle._ring_id = ops.register(scheduler)
        for q, b in enumerate(p.offloaded):
            ops.wrap_forward(mods[b], handle._ring_id, q, names[b])
            handle._wrapped.append(mods[b])
            frozen = InferenceOnly(names[b], layouts[b])
            frozen.init_hook(mods[b])
            handle._frozen.append(frozen)
    elif scheduler is not None:
        for i, m in enumerate(mods):
            hook = attach_hook(m, BlockHook(scheduler, i))
            handle._hooks.append((m, hook))
        for b in p.offloaded:  # detach() removes it like the block hooks, giving requires_grad back
            handle._hooks.append((mods[b], attach_hook(mods[b], InferenceOnly(names[b], layouts[b]))))
    handle._states = states
    if scheduler is not None:
        handle._serial = ForwardLock(model, traced=static)
    if states:
        handle._load_guard = refuse_loads(model, states)
        kinds = {(s.dtype, dev) for b in p.offloaded for s in layouts[b].slots}
        inside = [m for b in p.offloaded for m in mods[b].modules()]
        handle._conversions = ConversionGuard([model, *inside], kinds)
    object.__setattr__(model, _MARK, handle)
    _ATTACHED.add(handle)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
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


def _undo(store: StorageEngine, owns_store: bool, keys: dict, layouts: list[BlockLayout], done: list[int],
          states: list[BlockState]) -> None:
    """A failed offload: put back the blocks already moved into the store, then forget them."""
    for state in states:
        state.detach()
    for b in done:
        _restore_block(store, keys[b], layouts[b])
        store.delete(keys[b])
    if owns_store:
        store.close()


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
