"""Composable module hooks: attach, chain and remove pre/post-forward hooks.

A hook is four methods (``init_hook``, ``pre_forward``, ``post_forward``,
``detach_hook``), as in Accelerate. Strata registers them through torch's own
``register_forward_pre_hook`` / ``register_forward_hook``, so ``forward`` is never
replaced: hooks already on the module (Accelerate's, which wrap ``forward``, and
users' torch hooks) keep running, and detaching removes exactly what was added.

The hooks run eagerly under ``torch.compile``: dynamo never traces them (each one is a
graph break), so the module's own forward compiles between them while what they do to
the module (``strata.offload`` points parameters at streamed bytes) happens outside any
graph, as it does without compiling. Tracing them instead bakes one moment's tensors
(the between-forward placeholders) into the graph.
"""

from __future__ import annotations

from typing import Any

import torch

_ATTR = "_strata_hook"
_EAGER_REASON = ("strata hooks (strata.offload) move weights in and out of the module and run outside the "
                 "compiled graph; compile without fullgraph=True so each block's forward compiles between them, "
                 "or offload with strata.offload(model, static=True), which streams inside the graph")


def _eager(fn):
    """``fn`` as a graph break: dynamo calls it as Python instead of tracing into it."""
    try:
        return torch.compiler.disable(fn, reason=_EAGER_REASON)
    except TypeError:  # torch before ``reason=``
        return torch.compiler.disable(fn)


class ModuleHook:
    """Override what you need; every method is optional."""

    def init_hook(self, module: torch.nn.Module) -> None:
        """Called once when the hook is attached."""

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return output

    def detach_hook(self, module: torch.nn.Module) -> None:
        """Called once when the hook is removed."""


class SequentialHook(ModuleHook):
    """Several hooks as one: pre-forwards in order, post-forwards in reverse order."""

    def __init__(self, *hooks: ModuleHook):
        self.hooks = list(hooks)

    def init_hook(self, module):
        for h in self.hooks:
            h.init_hook(module)

    def pre_forward(self, module, args, kwargs):
        for h in self.hooks:
            args, kwargs = h.pre_forward(module, args, kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        for h in reversed(self.hooks):
            output = h.post_forward(module, output)
        return output

    def detach_hook(self, module):
        for h in reversed(self.hooks):
            h.detach_hook(module)


class _Attached:
    __slots__ = ("hook", "handles")

    def __init__(self, hook: SequentialHook, handles: list):
        self.hook, self.handles = hook, handles


def attach_hook(module: torch.nn.Module, hook: ModuleHook) -> ModuleHook:
    """Attach ``hook`` to ``module``, after any Strata hook already there. Returns ``hook``."""
    attached: _Attached | None = getattr(module, _ATTR, None)
    if attached is None:
        seq = SequentialHook()

        @_eager
        def pre(mod, args, kwargs):
            return seq.pre_forward(mod, args, kwargs)

        @_eager
        def post(mod, args, kwargs, output):
            return seq.post_forward(mod, output)

        # Strata's pre-hook runs first (weights must be in place before anyone looks at them);
        # its post-hook runs last (after every other hook is done with them).
        handles = [
            module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
            module.register_forward_hook(post, with_kwargs=True),
        ]
        attached = _Attached(seq, handles)
        object.__setattr__(module, _ATTR, attached)
    hook.init_hook(module)
    attached.hook.hooks.append(hook)
    return hook


def hooks_of(module: torch.nn.Module) -> list[ModuleHook]:
    attached = getattr(module, _ATTR, None)
    return list(attached.hook.hooks) if attached else []


def detach_hook(module: torch.nn.Module, hook: ModuleHook | None = None) -> None:
    """Remove ``hook`` (or every Strata hook) from ``module``; torch's hook lists and
    ``forward`` end exactly as they were before Strata attached anything."""
    attached: _Attached | None = getattr(module, _ATTR, None)
    if attached is None:
        return
    targets = [hook] if hook is not None else list(reversed(attached.hook.hooks))
    for h in targets:
        if h in attached.hook.hooks:
            attached.hook.hooks.remove(h)
            h.detach_hook(module)
    if not attached.hook.hooks:
        for handle in attached.handles:
            handle.remove()
        object.__delattr__(module, _ATTR)


__all__ = ["ModuleHook", "SequentialHook", "attach_hook", "detach_hook", "hooks_of"]
