"""Moving an offload's weights: the streamed blocks into the store, the rest onto the device.

Where the weights come from is a ``WeightSource``: the live model (``strata.offload``) or a
checkpoint (``strata.load``, ``loading.CheckpointSource``). ``Staging`` makes the moves of one
offload and undoes them all if a later step fails; ``restore_block`` (also ``detach``) puts a
block's stored bytes back into its tensors.
"""

from __future__ import annotations

from typing import Protocol

import torch
from tqdm.auto import tqdm

from strata.config import format_size
from strata.errors import OffloadError
from strata.keys import Key
from strata.offload.analysis import Analysis
from strata.offload.packing import BlockLayout, named_tensors, set_tensor
from strata.offload.state import BlockState
from strata.store.engine import StorageEngine


class WeightSource(Protocol):
    restores_devices: bool  # detach() moves resident tensors back to the devices they came from

    def store_block(self, store: StorageEngine, key: Key, layout: BlockLayout, staging: torch.Tensor) -> bool:
        """Put the block's packed bytes under ``key`` (``staging``: a buffer of at least its size)."""

    def resident(self, full_name: str, t: torch.Tensor, dev: torch.device) -> torch.Tensor | None:
        """The tensor to keep on ``dev`` for ``t``, or None to leave ``t`` as it is."""


class LiveSource:
    """The weights are the model's own tensors: pack them, move the rest to the device."""

    restores_devices = True

    def store_block(self, store: StorageEngine, key: Key, layout: BlockLayout, staging: torch.Tensor) -> bool:
        return store.put(key, layout.pack(staging[: layout.nbytes]))

    def resident(self, full_name: str, t: torch.Tensor, dev: torch.device) -> torch.Tensor | None:
        if t.device.type == "meta":
            raise OffloadError(f"model: {full_name} is still on the meta device; load its weights first (strata.load)")
        return None if t.device == dev else t.to(dev)


def restore_block(store: StorageEngine, key: Key, layout: BlockLayout) -> bool:
    """Point a block's tensors back at copies of its stored bytes, on the devices they came from;
    False if the store no longer holds them."""
    packed = store.get(key)
    if packed is None:
        return False
    layout.bind([v.to(dev, copy=True) for v, dev in zip(layout.views(packed), layout.devices)])
    return True


class Staging:
    """One offload's moves, in order: ``store_blocks``, ``place_residents``, ``watch_state``;
    ``rollback`` undoes what was done (and closes a store the offload opened)."""

    def __init__(self, store: StorageEngine, owns_store: bool, analysis: Analysis, keys: dict[int, Key]):
        self.store, self.owns_store, self.analysis, self.keys = store, owns_store, analysis, keys
        self.stored: list[int] = []  # blocks whose bytes are in the store and whose tensors are placeholders
        self.states: list[BlockState] = []  # their state_dict hooks
        self.moved: dict[tuple, torch.device] = {}  # (module, name, is_param) of each tensor moved: where from
        self._offloaded_ids: set[int] = set()

    def store_blocks(self, source: WeightSource, blocks: tuple[int, ...], slot_bytes: int, dev: torch.device,
                     progress: bool) -> None:
        staging = torch.empty(slot_bytes if blocks else 0, dtype=torch.uint8)
        bar = tqdm(blocks, desc="strata: blocks -> store", unit="block", disable=not progress or not blocks)
        for b in bar:
            layout = self.analysis.layouts[b]
            if not source.store_block(self.store, self.keys[b], layout, staging):
                raise OffloadError(
                    f"store: could not take block {self.analysis.names[b]} ({format_size(layout.nbytes)}); the "
                    f"store's tiers are full of objects it may not evict: {self.store!r}. Give it more capacity or "
                    "a lower tier")
            self._offloaded_ids.update(id(t) for t in layout.tensors)
            layout.bind(layout.placeholders(dev))  # the store's copy is now the only one
            layout.forget_buffers()
            self.stored.append(b)

    def place_residents(self, model: torch.nn.Module, source: WeightSource, dev: torch.device) -> None:
        placed: dict[int, torch.Tensor] = {}  # tied tensors are placed once
        for mod, name, is_param, full, t in list(named_tensors(model)):
            if id(t) in self._offloaded_ids:
                continue
            new = placed.get(id(t))
            if new is None:
                new = source.resident(full, t, dev)
                if new is None:
                    continue
                placed[id(t)] = new
                if source.restores_devices:
                    self.moved[(mod, name, is_param)] = t.device
            set_tensor(mod, name, is_param, new)

    def watch_state(self) -> None:
        """``state_dict()`` of each stored block reads it from the store (``state.BlockState``)."""
        a = self.analysis
        self.states = [BlockState(self.store, self.keys[b], a.layouts[b], a.names[b], a.modules[b])
                       for b in self.stored]

    def rollback(self) -> None:
        """A failed offload: put back the blocks already moved into the store, then forget them."""
        for state in self.states:
            state.detach()
        for b in self.stored:
            restore_block(self.store, self.keys[b], self.analysis.layouts[b])
            self.store.delete(self.keys[b])
        if self.owns_store:
            self.store.close()
