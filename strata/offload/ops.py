"""``strata::enter``: the static ring's per-block step as a custom op torch.compile keeps in order.

A wrapper of each streamed block's ``forward`` calls ``torch.ops.strata.enter(xs, ring, pos)``
first, then the block's own forward. To dynamo and inductor the op is opaque and declares
that it writes ``xs``, the block's floating-point tensor inputs (hidden states, residual):
everything that produced them (the blocks before, which read the slots this op refills)
stays before it, and everything that reads them (this block, which reads the slot this op
waits for) stays after it. It writes nothing in fact; the declaration is the ordering.
vLLM's own prefetch offloader orders its waits and copies the same way.

Rings are found by number (``register``), so the graph holds two integers, not an object.
"""

from __future__ import annotations

import itertools

import torch

from strata.errors import OffloadError

_rings: dict[int, object] = {}
_ids = itertools.count()
_WRAPPED = "_strata_static_forward"


@torch.library.custom_op("strata::enter", mutates_args=("xs",))
def enter(xs: list[torch.Tensor], ring: int, pos: int) -> None:
    """Issue the copies block ``pos`` of ring ``ring`` needs ahead and wait for its own."""
    r = _rings.get(ring)
    if r is None:
        raise OffloadError(f"strata::enter: ring {ring} is gone (its model was detached); offload it again")
    r.enter(pos)


@enter.register_fake
def _(xs, ring, pos) -> None:
    return None


def register(ring) -> int:
    """A number the graph can hold for ``ring``."""
    rid = next(_ids)
    _rings[rid] = ring
    return rid


def unregister(rid: int) -> None:
    _rings.pop(rid, None)


def _activations(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The block's floating-point tensor inputs (the tensors the blocks before it produced)."""
    found = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    floats = [t for t in found if t.is_floating_point()]
    return floats or found


def wrap_forward(module: torch.nn.Module, rid: int, pos: int, name: str) -> None:
    """Make ``module`` call ``strata::enter`` before its own forward (an instance attribute, so
    ``unwrap_forward`` restores exactly what was there, an Accelerate wrapper included).

    A forward that autograd records is refused: the block's weights are a shared buffer that
    later blocks overwrite, so a backward would differentiate through whatever it holds by then."""
    before = module.__dict__.get("forward")
    inner = module.forward

    def forward(*args, **kwargs):
        xs = _activations(args, kwargs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in xs):
            raise OffloadError(
                f"{name}: its input requires grad, and strata.offload(static=True) is inference only (the block's "
                "weights are a buffer later blocks overwrite, so gradients through it would be wrong); run the model "
                "under torch.no_grad() / torch.inference_mode(), or call handle.detach() to train it")
        torch.ops.strata.enter(xs, rid, pos)
        return inner(*args, **kwargs)

    object.__setattr__(module, _WRAPPED, before)
    module.forward = forward


def unwrap_forward(module: torch.nn.Module) -> None:
    if _WRAPPED not in module.__dict__:
        return
    before = module.__dict__.pop(_WRAPPED)
    if before is None:
        del module.forward
    else:
        module.forward = before
