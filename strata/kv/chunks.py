"""Prefix chunks of a token sequence and their chained keys.

Each chunk's key depends on every token before it: ``h_i = SHA-256(h_{i-1} || n || tokens_i)``
over a fixed little-endian uint32 encoding of the token ids, seeded with the scope.
Identical in every process, on every Python, whatever ``PYTHONHASHSEED`` is: no
``hash()``, no pickle. The scope fingerprints the model, dtype, KV layout, block size,
chunk size and TP rank, so a changed layout is a miss, never wrong bytes.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from strata.errors import StoreError
from strata.keys import Key, make_scope


@dataclass(frozen=True)
class Chunk:
    key: Key
    start: int  # first token
    end: int  # one past the last token

    @property
    def full(self) -> bool:
        return not self.key.name.startswith("p-")


def kv_scope(*, model: str, dtype: str, layout: object, block_size: int, chunk_size: int,
             tp_size: int = 1, tp_rank: int = 0, version: str = "", epoch: str = "") -> str:
    """The scope of KV chunks: everything that makes their bytes valid; ``epoch`` (none at first)
    starts a scope of its own after the weights may have changed (a connector's ``reset_cache``)."""
    return make_scope(kind="kv", model=model, dtype=dtype, layout=layout, block_size=block_size,
                      chunk_size=chunk_size, tp_size=tp_size, tp_rank=tp_rank, version=version,
                      **({"epoch": epoch} if epoch else {}))


def kv_facts(*, model: str, dtype: str, layout: object, block_size: int, chunk_size: int,
             tp_size: int = 1, tp_rank: int = 0, version: str = "") -> dict[str, str]:
    """What ``kv_scope`` hashes (the same arguments), as the scope's label for
    ``StorageEngine.label_scope("kv", scope, facts)``, so `strata inspect` names it. The layout
    vLLM's connector hashes, ``(layer names, ((spec, kv heads, head size, dtype), ...), cache
    dtype)``, is summed up as layers, spec and cache dtype; any other layout as its text, clipped."""
    from strata.store.labels import clip

    facts = {"model": clip(model, tail=True), "dtype": clip(dtype)}
    if isinstance(layout, tuple) and len(layout) == 3 and isinstance(layout[0], tuple) \
            and isinstance(layout[1], tuple) and all(isinstance(s, tuple) for s in layout[1]):
        names, specs, cache_dtype = layout
        kinds = dict.fromkeys(_spec_text(spec) for spec in specs)  # in order, once each
        facts.update(layers=str(len(names)), layout=clip("; ".join(kinds)), cache_dtype=clip(cache_dtype))
    else:
        facts["layout"] = clip(layout)
    facts.update(block_size=str(block_size), chunk_size=str(chunk_size), tp=f"{tp_rank}/{tp_size}")
    if version:
        facts["vllm"] = clip(version)
    return facts


def _spec_text(spec: tuple) -> str:
    if len(spec) == 4:  # (spec class, kv heads, head size, dtype), as the connector hashes it
        return f"{spec[0]} heads={spec[1]} head_size={spec[2]} {spec[3]}"
    return " ".join(str(part) for part in spec)


class ChunkHasher:
    def __init__(self, scope: str, chunk_size: int = 256, block_size: int = 16):
        if chunk_size <= 0 or block_size <= 0 or chunk_size % block_size:
            raise StoreError(f"chunk_size: got {chunk_size}; allowed: a positive multiple of the block size "
                             f"({block_size})")
        self.scope, self.chunk_size, self.block_size = scope, chunk_size, block_size
        self._seed = hashlib.sha256(b"strata-kv-v1\0" + scope.encode()).digest()

    def chunks(self, tokens: Sequence[int], limit: int | None = None, partial: bool = True) -> list[Chunk]:
        """Chunks covering ``tokens[:limit]``: whole chunks, then (with ``partial``) one last chunk of
        the remaining whole blocks."""
        n = len(tokens) if limit is None else min(limit, len(tokens))
        arr = np.asarray(tokens[:n], dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= 2**32):
            raise StoreError("tokens: got an id outside 0 .. 2**32-1")
        data = arr.astype("<u4").tobytes()
        out, h, start = [], self._seed, 0
        while start < n:
            end = start + self.chunk_size
            if end > n:
                if not partial:
                    break
                end = start + (n - start) // self.block_size * self.block_size
                if end == start:
                    break
            h = hashlib.sha256(h + struct.pack("<I", end - start) + data[4 * start : 4 * end]).digest()
            name = h.hex() if end - start == self.chunk_size else "p-" + h.hex()
            out.append(Chunk(Key("kv", self.scope, name), start, end))
            start = end
        return out
