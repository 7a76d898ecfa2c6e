"""An offloaded block's ``state_dict()`` and ``load_state_dict()``: the weights the store holds.

Between forwards an offloaded block's tensors are placeholders (NaN expanded to their shapes,
``packing.py``) or, in the static ring, views of a slot other blocks share: what ``state_dict()``
would return is not the model's weights, and ``torch.save`` or ``save_pretrained`` would write
that to disk without a word. A post-hook on each offloaded block (torch's public
``register_state_dict_post_hook``) puts the block's stored values in their place at the call:
CPU tensors read from the store, each its own storage (safetensors refuses tensors that share
one), tied ones one tensor as in any module. ``load_state_dict`` into an offloaded block is
refused, naming the way out: its values would be copied into placeholders (a torch error about
overlapping memory) or into ring slots the next copy overwrites (lost silently)."""

from __future__ import annotations

import torch

from strata.errors import OffloadError
from strata.keys import Key
from strata.offload.blocks import Uncopyable
from strata.offload.packing import BlockLayout


class BlockState(Uncopyable):
    """The state-dict hooks of one offloaded block, registered when made; ``detach`` removes them."""

    def __init__(self, store, key: Key, layout: BlockLayout, name: str, block: torch.nn.Module):
        self.store, self.key, self.layout, self.name = store, key, layout, name
        self.refs = _references(block, layout)
        # torch marks each hook it is given (an attribute), which a bound method cannot take
        self._handles = [block.register_state_dict_post_hook(_Hook(self._state_dict)),
                         block.register_load_state_dict_pre_hook(_Hook(self._load_state_dict))]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _state_dict(self, module, state_dict, prefix, local_metadata) -> None:
        present = [(prefix + rel, i) for rel, i in self.refs if prefix + rel in state_dict]
        if not present:
            return
        packed = self.store.get(self.key)
        if packed is None:
            raise OffloadError(f"state_dict: block {self.name}'s weights are not in the store any more (evicted with "
                               "no lower tier to keep them, or a tier failed); see store.stats()")
        views = self.layout.views(packed)
        copies: dict[int, torch.Tensor] = {}
        for k, i in present:
            if i not in copies:
                copies[i] = views[i].clone()
            state_dict[k] = copies[i]

    def _load_state_dict(self, module, state_dict, prefix, *rest) -> None:
        self.refuse(state_dict, prefix)

    def refuse(self, state_dict, prefix: str) -> None:
        """OffloadError where ``state_dict`` holds a value of this block, which sits at ``prefix``."""
        hit = next((prefix + rel for rel, _ in self.refs if prefix + rel in state_dict), None)
        if hit is not None:
            raise OffloadError(
                f"load_state_dict: {hit} belongs to block {self.name}, which strata.offload streams from the store "
                "(between forwards its tensors are placeholders), so the values would be lost; load them before "
                "strata.offload (or load the checkpoint with strata.load), or call handle.detach(), load, and "
                "offload again")


def refuse_loads(model: torch.nn.Module, states: list[BlockState]):
    """A ``load_state_dict`` of the whole model refused before it loads anything (the blocks'
    own hooks would refuse only once the modules before them were loaded); the hook's handle."""
    def check(module, state_dict, prefix, *rest) -> None:
        for st in states:
            st.refuse(state_dict, f"{prefix}{st.name}.")

    return model.register_load_state_dict_pre_hook(_Hook(check))


class _Hook(Uncopyable):
    """A hook torch may mark (an attribute) and no copy of the model takes along."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


def _references(block: torch.nn.Module, layout: BlockLayout) -> list[tuple[str, int]]:
    """``(state_dict key relative to the block, slot)`` of every reference to a tensor the layout
    packed, tied and repeated ones included (``state_dict`` lists each)."""
    param_slot = {id(s.module._parameters[s.name]): i for i, s in enumerate(layout.slots) if s.is_param}
    buffer_slot = {(id(s.module), s.name): i for i, s in enumerate(layout.slots) if not s.is_param}
    buffer_slot.update({(id(mod), name): i for mod, name, i in layout.aliases})
    refs = []
    for mod_name, mod in block.named_modules(remove_duplicate=False):
        pre = f"{mod_name}." if mod_name else ""
        for name, p in mod._parameters.items():
            if p is not None and id(p) in param_slot:
                refs.append((pre + name, param_slot[id(p)]))
        for name in mod._buffers:
            i = buffer_slot.get((id(mod), name))
            if i is not None:
                refs.append((pre + name, i))
    return refs
