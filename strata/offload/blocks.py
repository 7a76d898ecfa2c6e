"""Finding a model's repeated blocks (decoder layers) and what each one holds."""

from __future__ import annotations

from typing import Iterable

import torch

from strata.errors import OffloadError


class Uncopyable:
    """A part of an offloaded model that no copy or pickle may take along: it holds the ring and the
    store (their locks, streams and buffers). ``copy.deepcopy(model)``, ``pickle`` and
    ``torch.save(model)`` meet one of them and raise, naming the way out."""

    def __reduce_ex__(self, protocol):
        raise OffloadError("model: an offloaded model cannot be copied or pickled (copy.deepcopy, pickle, "
                           "torch.save(model)): its blocks stream from a store this process holds; call "
                           "handle.detach() first, or save its weights with torch.save(model.state_dict())")


def find_blocks(model: torch.nn.Module, blocks: "str | Iterable[torch.nn.Module] | None" = None
                ) -> tuple[str, list[torch.nn.Module]]:
    """(path, blocks): the repeated blocks to stream, in execution order.

    Without ``blocks`` the guess is the ``nn.ModuleList`` of at least two children of one
    class that holds the most parameters (``model.layers`` of Llama/Qwen2/Mistral/Mixtral,
    ``transformer.h`` of GPT-2, ``model.decoder.layers`` of OPT). ``blocks`` may name a
    ModuleList by its dotted path, or list the modules.
    """
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(blocks, str):
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            lists = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
            raise OffloadError(f"blocks: got {blocks!r}, no such submodule; module lists in this model: "
                               f"{', '.join(lists) or 'none'}") from None
        mods = list(found.children()) if isinstance(found, (torch.nn.ModuleList, torch.nn.Sequential)) else [found]
        return blocks, mods
    if blocks is not None:
        mods = list(blocks)
        if not mods:
            raise OffloadError("blocks: got an empty list; allowed: the model's repeated blocks, a dotted path "
                               "('model.layers') or None to find them")
        given: set[int] = set()
        for m in mods:
            if not isinstance(m, torch.nn.Module) or id(m) not in names:
                raise OffloadError("blocks: every item must be a submodule of the model")
            if id(m) in given:
                raise OffloadError(f"blocks: {names[id(m)] or 'the model'} is given twice; allowed: each block once")
            given.add(id(m))
        owner: dict[int, torch.nn.Module] = {}  # every module within a given block -> that block
        for m in mods:
            for sub in m.modules():
                first = owner.setdefault(id(sub), m)
                if first is not m:
                    raise OffloadError(f"blocks: {names[id(first)] or 'the model'} and {names[id(m)] or 'the model'} "
                                       f"overlap ({names[id(sub)] or 'the model'} is in both); allowed: blocks that "
                                       "do not contain one another")
        return "<given>", mods
    best: tuple[int, str, list] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) < 2:
            continue
        kinds = {type(c) for c in mod}
        if len(kinds) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, list(mod))
    if best is None:
        raise OffloadError(
            f"blocks: found no repeated blocks in {type(model).__name__} (no nn.ModuleList of two or more "
            "modules of one class holding parameters); pass blocks='path.to.layers' or blocks=[module, ...]"
        )
    return best[1], best[2]


def block_names(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in blocks]
