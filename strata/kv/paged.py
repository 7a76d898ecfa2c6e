"""Gather and scatter between vLLM's paged KV cache and one contiguous bundle per chunk.

Layout-agnostic: vLLM (0.32) hands each layer's KV as a tensor with blocks on dim 0
(its standardized per-layer view), whatever the attention backend puts inside a
block. A bundle is every layer's blocks of one chunk, stacked: ``[layers, blocks, ...]``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from strata import streams
from strata.errors import StoreError


class PagedKV:
    def __init__(self, layers: Sequence[torch.Tensor], num_blocks: int | None = None):
        if not layers:
            raise StoreError("kv_caches: got no layers")
        first = layers[0]
        for i, t in enumerate(layers):
            if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype or t.shape[0] != first.shape[0]:
                raise StoreError(f"kv_caches[{i}]: shape {tuple(t.shape)} {t.dtype} differs from layer 0's "
                                 f"{tuple(first.shape)} {first.dtype}; allowed: one layout for every layer")
        if num_blocks is not None and first.shape[0] != num_blocks:
            raise StoreError(f"kv_caches: dim 0 is {first.shape[0]}, not the {num_blocks} blocks vLLM allocated; "
                             "this KV layout (blocks not on dim 0) is not supported")
        self.layers = list(layers)
        self.block_shape = tuple(first.shape[1:])
        self.dtype = first.dtype
        self.device = first.device
        self._staging = torch.empty(0, dtype=self.dtype, device=self.device)

    def staging(self, num_blocks: int) -> torch.Tensor:
        """A contiguous bundle-shaped buffer on the KV cache's device, reused across calls (grown
        when needed): a load lands here in one copy from the store, then scatters on the device.
        Calls on one CUDA stream are ordered, so reuse needs no synchronisation."""
        shape = (len(self.layers), num_blocks, *self.block_shape)
        numel = 1
        for d in shape:
            numel *= d
        if self._staging.numel() < numel:
            self._staging = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self._staging[:numel].view(shape)

    def layout(self) -> tuple:
        return (len(self.layers), self.block_shape, str(self.dtype))

    def gather(self, block_ids: Sequence[int], pin: bool = False) -> torch.Tensor:
        """A new CPU bundle ``[layers, len(block_ids), *block_shape]`` of those blocks."""
        idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
        dev = streams.active()
        pinned = pin and dev.is_async_device(self.device)
        shape = (len(self.layers), len(idx), *self.block_shape)
        out = dev.host_empty(math.prod(shape) * self.dtype.itemsize, pinned).view(self.dtype).view(shape)
        for i, layer in enumerate(self.layers):
            if layer.device.type == "cpu":
                torch.index_select(layer, 0, idx, out=out[i])  # one copy, no temporary
            else:
                dev.copy(out[i], layer.index_select(0, idx), non_blocking=pinned)
        if pinned:  # the blocks may be reused once this step ends: the bundle must hold them by then
            dev.current_stream(self.device).synchronize()
        return out

    def scatter(self, bundle: torch.Tensor, block_ids: Sequence[int], first: int = 0) -> None:
        """Write ``bundle[:, first:]`` into ``block_ids[first:]`` of every layer."""
        if tuple(bundle.shape) != (len(self.layers), len(block_ids), *self.block_shape) or bundle.dtype != self.dtype:
            raise StoreError(f"bundle: got {tuple(bundle.shape)} {bundle.dtype}; allowed: "
                             f"{(len(self.layers), len(block_ids), *self.block_shape)} {self.dtype}")
        if first >= len(block_ids):
            return
        idx = torch.as_tensor(list(block_ids[first:]), dtype=torch.long, device=self.device)
        for i, layer in enumerate(self.layers):
            layer.index_copy_(0, idx, bundle[i, first:].to(self.device, non_blocking=True))
