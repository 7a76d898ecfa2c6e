"""What an offload works on: the model's repeated blocks, their names and packed layouts, and
the bytes that stay on the device whatever the plan (tensors outside the blocks, and tensors
shared between blocks or with a module outside them, such as tied embeddings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from strata.errors import OffloadError
from strata.offload.blocks import block_names, find_blocks
from strata.offload.packing import ALIGN, BlockLayout, named_tensors


@dataclass(frozen=True)
class Analysis:
    block_path: str  # where the blocks are ("model.layers"), for messages and labels
    modules: list[torch.nn.Module]  # the blocks, in execution order
    names: list[str]  # their dotted names
    layouts: list[BlockLayout]  # each block's own tensors, packed
    other_bytes: int  # every other tensor, aligned as the device holds it


def analyse(model: torch.nn.Module, blocks: "str | Iterable[torch.nn.Module] | None") -> Analysis:
    block_path, mods = find_blocks(model, blocks)
    names = block_names(model, mods)
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
    if not any(layout.nbytes for layout in layouts):
        raise OffloadError(f"blocks: the blocks found at {block_path!r} hold no tensors of their own to offload")
    other = {id(t): t for *_, t in named_tensors(model) if id(t) in outside}
    other_bytes = sum((t.numel() * t.element_size() + ALIGN - 1) // ALIGN * ALIGN for t in other.values())
    return Analysis(block_path, mods, names, layouts, other_bytes)
