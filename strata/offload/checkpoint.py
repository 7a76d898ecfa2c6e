"""A Hugging Face style checkpoint directory: config.json and safetensors shards.

Headers are parsed here (8-byte length, then JSON) so that every tensor's file and
byte range is known before anything is read: a missing or truncated shard, an index
naming a tensor that no shard holds, or an unknown dtype is an error up front.
Tensors are read with ``readinto`` straight into their destination, never the whole
checkpoint at once.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from strata.errors import OffloadError
from strata.store.fileio import file_stamp, read_range

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: str
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stamp: tuple | None = None  # the shard's fileio.file_stamp when its header was read


def _read_header(path: Path) -> tuple[dict, int, tuple]:
    """(the header, where the data starts, the file's stamp as the header was read)."""
    try:
        with open(path, "rb") as f:
            stamp = file_stamp(os.fstat(f.fileno()))
            size = stamp[2]
            raw = f.read(8)
            if len(raw) != 8:
                raise OffloadError(f"checkpoint: {path.name} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise OffloadError(f"checkpoint: {path.name} has a corrupt header (length {n} for a {size}-byte file)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, OffloadError):
            raise
        raise OffloadError(f"checkpoint: cannot read the safetensors header of {path.name}: {e}") from None
    if not isinstance(header, dict):
        raise OffloadError(f"checkpoint: {path.name} has a corrupt header (not a JSON object)")
    return header, 8 + n, stamp


class Checkpoint:
    """The tensors of a checkpoint directory, by name, with where their bytes lie."""

    def __init__(self, path: "str | os.PathLike"):
        self.root = Path(path)
        if not self.root.is_dir():
            raise OffloadError(f"path: {str(path)!r} is not a directory; allowed: a local Hugging Face-style "
                               "directory with config.json and *.safetensors")
        if not (self.root / "config.json").is_file():
            raise OffloadError(f"path: {self.root} has no config.json")
        index_file = self.root / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise OffloadError(f"checkpoint: {index_file.name} is not a valid index ({e!r})") from None
            shards = sorted(set(weight_map.values()))
        else:
            weight_map = None
            shards = sorted(p.name for p in self.root.glob("*.safetensors"))
            if not shards:
                raise OffloadError(f"path: {self.root} holds no *.safetensors files")
        self.tensors: dict[str, TensorInfo] = {}
        self.nbytes = 0
        for shard in shards:
            file = self.root / shard
            if not file.is_file():
                raise OffloadError(f"checkpoint: shard {shard} named by the index is missing from {self.root}")
            header, data_start, stamp = _read_header(file)
            size = stamp[2]
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                try:
                    dtype = SAFETENSORS_DTYPES[info["dtype"]]
                    begin, end = info["data_offsets"]
                    shape = tuple(int(d) for d in info["shape"])
                except (KeyError, TypeError, ValueError):
                    raise OffloadError(f"checkpoint: tensor {name} in {shard} has an unsupported dtype or a "
                                       f"corrupt entry ({info!r}); dtypes allowed: "
                                       f"{', '.join(SAFETENSORS_DTYPES)}") from None
                numel = 1
                for d in shape:
                    numel *= d
                if end - begin != numel * dtype.itemsize or data_start + end > size:
                    raise OffloadError(f"checkpoint: shard {shard} is truncated or corrupt (tensor {name} "
                                       f"ends at byte {data_start + end} of {size})")
                self.tensors[name] = TensorInfo(name, str(file), data_start + begin, end - begin, dtype, shape, stamp)
                self.nbytes += end - begin
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in self.tensors or Path(self.tensors[name].path).name != shard:
                    raise OffloadError(f"checkpoint: the index maps {name} to {shard}, which does not hold it")

    def find(self, names: list[str], prefix: str = "") -> TensorInfo | None:
        """The first of ``names`` the checkpoint holds, also trying with/without ``prefix.``."""
        for name in names:
            candidates = [name]
            if prefix:
                candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
            for c in candidates:
                if c in self.tensors:
                    return self.tensors[c]
        return None

    def read_into(self, info: TensorInfo, out: torch.Tensor) -> None:
        """Read one tensor into contiguous CPU ``out`` of its shape, casting to ``out.dtype``."""
        raw = out if out.dtype == info.dtype else torch.empty(info.shape, dtype=info.dtype)
        read_range(info.path, info.offset, raw, info.stamp)
        if raw is not out:
            out.copy_(raw)
