"""Streamed blocks are inference only: a hook that says so at the backward, never NaN gradients."""

from __future__ import annotations

import torch

from strata.errors import OffloadError
from strata.hooks import ModuleHook
from strata.offload.blocks import Uncopyable
from strata.offload.packing import BlockLayout


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
