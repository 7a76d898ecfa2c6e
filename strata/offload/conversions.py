"""``.to()``, ``.half()``, ``.cuda()`` ... of an offloaded model: refused where they would change a
streamed block.

Each such call runs ``nn.Module._apply(fn)`` down the module tree. On a streamed block it would
replace the placeholders (static: the views of the block's ring buffer) with converted copies:
memory for every offloaded weight at once, and blocks that no longer match what the store
streams in (a dtype or device error at the next forward; static, stale weights and wrong tokens
without a word). A guard on the model and on each module of a streamed block (an instance
``_apply``, as Accelerate guards ``to`` on a dispatched model) first tries ``fn`` on an empty
tensor of each dtype and device the streamed tensors have: a call that changes none
(``model.to("cuda")`` on a model that runs there, as pipelines do) goes through; one that would
is refused before anything converts, naming the way out."""

from __future__ import annotations

import torch

from strata.errors import OffloadError
from strata.offload.blocks import Uncopyable

_UNSET = object()


class ConversionGuard(Uncopyable):
    """Guards ``modules`` (the model, then its streamed blocks and every module inside them) until
    ``detach``; ``kinds``: the (dtype, device) of every streamed tensor."""

    def __init__(self, modules: list[torch.nn.Module], kinds: set[tuple[torch.dtype, torch.device]]):
        self.kinds = sorted(kinds, key=str)
        self._saved: list[tuple[torch.nn.Module, object]] = []
        seen: set[int] = set()
        for m in modules:
            if id(m) in seen:
                continue
            seen.add(id(m))
            self._saved.append((m, m.__dict__.get("_apply", _UNSET)))
            m.__dict__["_apply"] = _Guarded(self, m._apply)

    def check(self, fn) -> None:
        for dtype, device in self.kinds:
            probe = torch.empty(0, dtype=dtype, device=device)
            out = fn(probe)
            if isinstance(out, torch.Tensor) and (out.dtype, out.device) != (dtype, device):
                raise OffloadError(
                    f"model: a conversion after strata.offload would turn its streamed blocks' {dtype} tensors on "
                    f"{device} into {out.dtype} on {out.device}, which the store does not stream (placeholders or "
                    "ring buffers would be replaced by copies); convert the model before strata.offload, or call "
                    "handle.detach(), convert, and offload again")

    def detach(self) -> None:
        for m, before in self._saved:
            if before is _UNSET:
                m.__dict__.pop("_apply", None)
            else:
                m.__dict__["_apply"] = before
        self._saved = []


class _Guarded(Uncopyable):
    """A module's ``_apply`` that the guard checks first."""

    def __init__(self, guard: ConversionGuard, apply):
        self.guard, self.apply = guard, apply

    def __call__(self, fn, *args, **kwargs):
        self.guard.check(fn)
        return self.apply(fn, *args, **kwargs)
