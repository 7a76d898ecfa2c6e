"""The file tier: one file per object in a directory on local storage.

A put writes header and payload to a temporary file and renames it into place, so
a reader or a restart sees the whole object or none of it. Each file name carries
a version suffix, so replacing an object never unlinks the new file. On open the
directory is scanned: a file with a bad header, a short payload, or a stale
version is removed. Every read checks the header's key and the payload checksum;
a mismatch is a miss, counted, and the file is dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from pathlib import Path

import torch

from strata.keys import Key
from strata.store.codec import CorruptObject, FIXED_HEADER_SIZE, checksum, flat_bytes, header_size, header_size_for, pack_header, unpack_header
from strata.store.tiers.base import Entry, Tier

_SUFFIX = ".obj"


class FileTier(Tier):
    kind = "file"
    persistent = True

    def __init__(self, cfg, store_cfg):
        super().__init__(cfg, store_cfg)
        self.root = Path(cfg.path)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.recovered = 0
        self.discarded = 0
        self._scan()

    # -- recovery ------------------------------------------------------------------------
    def _scan(self) -> None:
        for stale in self.tmp.iterdir():  # interrupted puts: never visible, space reclaimed
            stale.unlink(missing_ok=True)
        found: list[tuple[str, Path, bytes, object, int]] = []
        for path in self.objects.glob(f"*/*{_SUFFIX}"):
            try:
                with open(path, "rb") as f:
                    head = f.read(FIXED_HEADER_SIZE)
                    head += f.read(header_size(head) - len(head))
                    key, meta = unpack_header(head)
                    size = os.fstat(f.fileno()).st_size
                if size != len(head) + meta.nbytes:
                    raise CorruptObject("payload truncated")
            except (OSError, CorruptObject):
                self.discarded += 1
                path.unlink(missing_ok=True)
                continue
            found.append((path.name, path, key, meta, size))
        # Oldest first so LRU order survives a restart; the newest version of a key wins.
        found.sort(key=lambda item: item[0].rsplit("-", 1)[-1])
        for _, path, key, meta, size in found:
            try:
                ns = Key.decode(key).namespace
            except Exception:
                self.discarded += 1
                path.unlink(missing_ok=True)
                continue
            e = Entry(key, ns, meta, size, path)
            self._account(e, +1)
            self.publish(e, count=False)
            self.recovered += 1
        evicted = 0
        while self.used > self.capacity and self._evict_one(self._eviction_order(), lambda t, e: True, set()):
            evicted += 1  # capacity shrank since last run

    # -- storage hooks ---------------------------------------------------------------------
    def stored_size(self, key: bytes, meta) -> int:
        return header_size_for(key, meta) + meta.nbytes

    def _alloc(self, e: Entry) -> bool:
        if self.used + e.size > self.capacity:
            return False
        digest = hashlib.sha256(e.key).hexdigest()
        version = f"{time.time_ns():020d}{uuid.uuid4().hex[:8]}"
        e.loc = self.objects / digest[:2] / f"{digest}-{version}{_SUFFIX}"
        return True

    def _free(self, e: Entry) -> None:
        try:
            e.loc.unlink(missing_ok=True)
        except OSError:
            self.counters.errors += 1

    def write(self, e: Entry, data: torch.Tensor) -> bool:
        if e.meta.checksum is None:
            raise ValueError("file tier needs the payload checksum")  # the chain computes it
        head = pack_header(e.key, e.meta)
        tmp = self.tmp / f"{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                if e.meta.nbytes:
                    f.write(memoryview(flat_bytes(data).cpu().numpy()))
                if self.cfg.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            e.loc.parent.mkdir(exist_ok=True)
            os.replace(tmp, e.loc)
        except OSError:
            self.counters.errors += 1
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return False
        return True

    def read_into(self, e: Entry, out: torch.Tensor) -> None:
        with open(e.loc, "rb") as f:
            head = f.read(FIXED_HEADER_SIZE)
            head += f.read(header_size(head) - len(head))
            key, meta = unpack_header(head)
            if key != e.key or meta.nbytes != e.meta.nbytes or meta.checksum != e.meta.checksum:
                raise CorruptObject("file holds another object")
            if meta.nbytes:
                buf = memoryview(flat_bytes(out).numpy())
                if f.readinto(buf) != meta.nbytes or f.read(1):
                    raise CorruptObject("payload length mismatch")
        if checksum(out) != meta.checksum:
            raise CorruptObject("payload checksum mismatch")

    def stats_extra(self) -> dict:
        return {"path": str(self.root), "recovered": self.recovered, "discarded": self.discarded}
