"""The ranges tier: read-only objects assembled from byte ranges of files that already exist.

It lets files the store did not write serve as a lowest tier: a checkpoint's
safetensors shards, for example, read on demand, so a model larger than host RAM
needs no copy of its weights anywhere but where they already are. An object is a
list of extents (file, offset, length, where its bytes go in the payload, and an
optional dtype cast). The store never writes to this tier and keeps no checksum of
it: the bytes are the files' own. An extent may carry its file's stamp (device, inode, size,
mtime) from when its offset was taken; a file rewritten or replaced since (a checkpoint saved
again over itself) is a corrupt object, dropped and counted, never bytes from the wrong offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.store.codec import CorruptObject
from strata.store.fileio import FileChanged, read_range
from strata.store.tiers.base import Entry
from strata.store.tiers.memory import MemoryTier


@dataclass(frozen=True)
class Extent:
    path: str
    offset: int  # byte offset in the file
    nbytes: int  # bytes in the file
    dest: int  # byte offset in the object's payload
    src_dtype: torch.dtype = torch.uint8
    dst_dtype: torch.dtype = torch.uint8  # cast on read when it differs from src_dtype
    stamp: tuple | None = None  # fileio.file_stamp when the offset was taken: a file changed since is refused


class RangesTier(MemoryTier):
    kind = "ranges"
    writable = False
    # Read-only, and its bytes are the files' own: nothing is written or checksummed here.
    config_refused = ("write", "verify")

    def register(self, key: bytes, ns: str, meta, extents: list[Extent]) -> Entry | None:
        """Add (or replace) an object; None if it does not fit the tier's capacity. Caller holds the lock."""
        old = self.index.get(key)
        room = self.capacity - self.used + (old.size if old is not None else 0)
        if meta.nbytes > room:
            return None
        e = Entry(key, ns, meta, meta.nbytes, tuple(extents))
        self._account(e, +1)
        self.publish(e)
        return e

    def _alloc(self, e: Entry) -> bool:
        return False  # never written through the chain

    def write(self, e: Entry, data: torch.Tensor) -> bool:
        return False

    def read_into(self, e: Entry, out: torch.Tensor) -> None:
        flat = out.reshape(-1).view(torch.uint8) if out.numel() else out
        try:
            for x in e.loc:
                if x.src_dtype == x.dst_dtype:
                    read_range(x.path, x.offset, flat[x.dest : x.dest + x.nbytes], x.stamp)
                else:
                    raw = torch.empty(x.nbytes // x.src_dtype.itemsize, dtype=x.src_dtype)
                    read_range(x.path, x.offset, raw, x.stamp)
                    n = raw.numel() * x.dst_dtype.itemsize
                    flat[x.dest : x.dest + n].view(x.dst_dtype).copy_(raw)
        except FileChanged as exc:  # its offsets point into another file now: never served again
            raise CorruptObject(str(exc)) from None
