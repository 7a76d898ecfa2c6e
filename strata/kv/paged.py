"""Gather and scatter between vLLM's paged KV cache and one contiguous bundle per chunk.

Layout-agnostic: vLLM (0.32) hands each layer's KV as a tensor with blocks on dim 0
(its standardized per-layer view), whatever the attention backend puts inside a
block. A bundle is every layer's blocks of one chunk, stacked: ``[layers, blocks, ...]``.

Two ways to move a bundle: ``gather``/``scatter`` (index kernels; on a device cache, a load goes
through the staging bundle) and ``copy_out``/``copy_in`` (one copy per run of consecutive blocks
and layer, issued on the current stream of the ``Streams`` the cache was built with: what the
connector's side stream runs, so its ordering is events, never a host synchronisation). Each has a
one-layer form (``gather_layer``, ``scatter_layer``, ``copy_out_layer``, ``copy_in_layer``) that
moves ``bundle[i]`` alone: the connector's layer-wise mode moves a chunk layer by layer, in the
same bundle format.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from strata import streams
from strata.errors import StoreError


def runs(block_ids: Sequence[int], first: int = 0) -> list[tuple[int, int, int]]:
    """Each run of consecutive block ids from index ``first`` on: (its index in ``block_ids``, its
    first block id, how many blocks)."""
    out: list[tuple[int, int, int]] = []
    for j in range(first, len(block_ids)):
        b = block_ids[j]
        if out and out[-1][1] + out[-1][2] == b:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((j, b, 1))
    return out


class PagedKV:
    def __init__(self, layers: Sequence[torch.Tensor], num_blocks: int | None = None, dev=None):
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
        self.dev = dev if dev is not None else streams.active()
        self._staging = torch.empty(0, dtype=self.dtype, device=self.device)

    def staging(self, num_blocks: int) -> torch.Tensor:
        """A contiguous bundle-shaped buffer on the KV cache's device, reused across calls (grown
        when needed): a load lands here in one copy from the store, then scatters on the device.
        Calls on one CUDA stream are ordered, so reuse needs no synchronisation."""
        shape = (len(self.layers), num_blocks, *self.block_shape)
        numel = math.prod(shape)
        if self._staging.numel() < numel:  # through the seam: device memory as the seam knows it
            raw = self.dev.device_empty(numel * self.dtype.itemsize, self.device)
            self._staging = raw.view(self.dtype)
        return self._staging[:numel].view(shape)

    def _index(self, block_ids: Sequence[int], first: int = 0) -> torch.Tensor:
        return torch.as_tensor(list(block_ids[first:]), dtype=torch.long, device=self.device)

    def gather_layer(self, i: int, block_ids: Sequence[int], out: torch.Tensor) -> None:
        """Copy those blocks of layer ``i`` into ``out`` (``bundle[i]`` of a host bundle), now."""
        layer, idx = self.layers[i], self._index(block_ids)
        if layer.device.type == "cpu":
            torch.index_select(layer, 0, idx, out=out)  # one copy, no temporary
        else:
            self.dev.copy(out, layer.index_select(0, idx))

    def gather(self, block_ids: Sequence[int], pin: bool = False) -> torch.Tensor:
        """A new CPU bundle ``[layers, len(block_ids), *block_shape]`` of those blocks."""
        idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
        dev = self.dev
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

    def bundle_shape(self, num_blocks: int) -> tuple:
        return (len(self.layers), num_blocks, *self.block_shape)

    def host_bundle(self, num_blocks: int) -> torch.Tensor:
        """A new host bundle for ``num_blocks`` blocks, pinned where the cache is on an asynchronous
        device (so copies to and from it can run on a stream)."""
        shape = self.bundle_shape(num_blocks)
        pinned = self.dev.is_async_device(self.device)
        return self.dev.host_empty(math.prod(shape) * self.dtype.itemsize, pinned).view(self.dtype).view(shape)

    def copy_out_layer(self, i: int, block_ids: Sequence[int], out: torch.Tensor) -> None:
        """Copy those blocks of layer ``i`` into ``out[i]`` of the host bundle ``out``, on the current
        stream (asynchronous on a device: ``out`` holds them once an event recorded after this fires)."""
        layer = self.layers[i]
        for j, b, n in runs(block_ids):
            self.dev.copy(out[i, j:j + n], layer[b:b + n], non_blocking=True)

    def copy_out(self, block_ids: Sequence[int], out: torch.Tensor) -> None:
        """``copy_out_layer`` for every layer."""
        for i in range(len(self.layers)):
            self.copy_out_layer(i, block_ids, out)

    def copy_in_layer(self, i: int, bundle: torch.Tensor, block_ids: Sequence[int], first: int = 0) -> None:
        """Copy ``bundle[i, first:]`` into ``block_ids[first:]`` of layer ``i``, on the current
        stream (asynchronous on a device: ``bundle`` must outlive the copies). Unchecked: the caller
        has ``check``-ed the bundle."""
        layer = self.layers[i]
        for j, b, n in runs(block_ids, first):
            self.dev.copy(layer[b:b + n], bundle[i, j:j + n], non_blocking=True)

    def copy_in(self, bundle: torch.Tensor, block_ids: Sequence[int], first: int = 0) -> None:
        """``copy_in_layer`` for every layer, the bundle checked first."""
        self.check(bundle, block_ids)
        for i in range(len(self.layers)):
            self.copy_in_layer(i, bundle, block_ids, first)

    def check(self, bundle: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Raise a StoreError naming both shapes unless ``bundle`` is the bundle of those blocks."""
        if tuple(bundle.shape) != self.bundle_shape(len(block_ids)) or bundle.dtype != self.dtype:
            raise StoreError(f"bundle: got {tuple(bundle.shape)} {bundle.dtype}; allowed: "
                             f"{self.bundle_shape(len(block_ids))} {self.dtype}")

    def scatter_layer(self, i: int, bundle: torch.Tensor, block_ids: Sequence[int], first: int = 0) -> None:
        """Write ``bundle[i, first:]`` into ``block_ids[first:]`` of layer ``i``. Unchecked: the
        caller has ``check``-ed the bundle."""
        if first >= len(block_ids):
            return
        src = bundle[i, first:].to(self.device, non_blocking=True)
        self.layers[i].index_copy_(0, self._index(block_ids, first), src)

    def scatter(self, bundle: torch.Tensor, block_ids: Sequence[int], first: int = 0) -> None:
        """Write ``bundle[:, first:]`` into ``block_ids[first:]`` of every layer."""
        self.check(bundle, block_ids)
        for i in range(len(self.layers)):
            self.scatter_layer(i, bundle, block_ids, first)
