"""Tensor <-> bytes: the object header (dtype, shape, key, checksum) and the payload checksum.

The header is a fixed little-endian struct, never pickle. The payload checksum is
XXH3-64; the header carries a checksum of its own, so a torn or flipped header is
detected before any field of it is trusted.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
import xxhash

from strata.errors import StoreError, allowed

KIND_TENSOR, KIND_BYTES = 0, 1

# Codes are part of the on-disk format: append only, never renumber.
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.uint8: 1, torch.int8: 2, torch.int16: 3, torch.int32: 4, torch.int64: 5,
    torch.float16: 6, torch.bfloat16: 7, torch.float32: 8, torch.float64: 9, torch.bool: 10,
    torch.complex64: 11, torch.complex128: 12,
}
for _name, _code in (("float8_e4m3fn", 13), ("float8_e5m2", 14), ("uint16", 15), ("uint32", 16), ("uint64", 17)):
    if hasattr(torch, _name):
        _DTYPE_CODES[getattr(torch, _name)] = _code
_CODE_DTYPES = {c: d for d, c in _DTYPE_CODES.items()}

_MAGIC = b"STRO"
_VERSION = 1
_FIXED = struct.Struct("<4sBBBBIQQ")  # magic, version, kind, dtype, ndim, keylen, nbytes, checksum
_TAIL = struct.Struct("<Q")  # header checksum
MAX_NDIM = 32


class CorruptObject(Exception):
    """Stored bytes failed a check (torn, flipped, truncated, or another key's)."""


class ObjectMeta(NamedTuple):
    kind: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    checksum: int | None = None  # None until computed (volatile tiers compute it lazily)

    def with_checksum(self, value: int) -> "ObjectMeta":
        return self._replace(checksum=value)


def describe(payload: object, field: str = "value") -> tuple[ObjectMeta, torch.Tensor]:
    """Meta (without checksum) and the payload as a contiguous tensor of the stored dtype
    and shape (bytes become a 1-D uint8 tensor). No copy for contiguous tensors."""
    if isinstance(payload, torch.Tensor):
        if payload.dtype not in _DTYPE_CODES:
            raise StoreError(allowed(f"{field}.dtype", str(payload.dtype), [str(d) for d in _DTYPE_CODES]))
        if payload.is_nested:
            raise StoreError(f"{field}: got a nested tensor; allowed: dense tensors (store each component)")
        if payload.layout != torch.strided:
            raise StoreError(f"{field}: got layout {payload.layout}; allowed: torch.strided (dense) tensors")
        shape = tuple(payload.shape)
        if len(shape) > MAX_NDIM:
            raise StoreError(f"{field}: got {len(shape)} dimensions; allowed: at most {MAX_NDIM}")
        t = payload.detach() if payload.requires_grad else payload
        if not t.is_contiguous():
            t = t.contiguous()
        return ObjectMeta(KIND_TENSOR, t.dtype, shape, t.numel() * t.element_size()), t
    if isinstance(payload, (bytes, bytearray, memoryview)):
        buf = bytearray(payload)
        data = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        return ObjectMeta(KIND_BYTES, torch.uint8, (len(buf),), len(buf)), data
    raise StoreError(f"{field}: got {type(payload).__name__}; allowed: torch.Tensor, bytes, bytearray, memoryview")


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes."""
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def checksum(data: torch.Tensor) -> int:
    """XXH3-64 of a contiguous CPU tensor's bytes."""
    if data.numel() == 0:
        return xxhash.xxh3_64_intdigest(b"")
    return xxhash.xxh3_64_intdigest(flat_bytes(data).numpy())


def checksum_buffer(buf) -> int:
    """XXH3-64 of a buffer's bytes (bytes, memoryview, uint8 array): equal to ``checksum`` of a
    tensor holding the same bytes."""
    return xxhash.xxh3_64_intdigest(buf)


def materialize(meta: ObjectMeta, data: torch.Tensor) -> "torch.Tensor | bytes":
    """The user's value from a tensor of the stored dtype and shape."""
    if meta.kind == KIND_BYTES:
        return data.numpy().tobytes()
    return data


def fit_out(meta: ObjectMeta, out: torch.Tensor) -> torch.Tensor:
    """``out`` as a tensor of the stored dtype and shape, or StoreError. ``out`` may have the
    stored dtype and element count in any shape, or be uint8 of the stored byte size."""
    if out.dtype == meta.dtype and tuple(out.shape) == meta.shape:
        return out
    numel = 1
    for d in meta.shape:
        numel *= d
    if out.dtype == meta.dtype and out.numel() == numel:
        return out.view(meta.shape)
    if out.dtype == torch.uint8 and out.numel() == meta.nbytes:
        if meta.nbytes == 0:
            return torch.empty(meta.shape, dtype=meta.dtype, device=out.device)  # nothing to copy
        return out.reshape(-1).view(meta.dtype).view(meta.shape)
    raise StoreError(
        f"out: got {out.dtype} with {out.numel()} elements; allowed: {meta.dtype} with {numel} "
        f"elements (stored shape {tuple(meta.shape)}), or torch.uint8 with {meta.nbytes} elements"
    )


def pack_header(key: bytes, meta: ObjectMeta) -> bytes:
    if meta.checksum is None:
        raise ValueError("pack_header needs the payload checksum")
    fixed = _FIXED.pack(_MAGIC, _VERSION, meta.kind, _DTYPE_CODES[meta.dtype], len(meta.shape), len(key),
                        meta.nbytes, meta.checksum)
    body = fixed + struct.pack(f"<{len(meta.shape)}Q", *meta.shape) + key
    return body + _TAIL.pack(xxhash.xxh3_64_intdigest(body))


def header_size(buf: bytes) -> int:
    """Total header length given at least its first ``_FIXED.size`` bytes."""
    if len(buf) < _FIXED.size:
        raise CorruptObject("header truncated")
    magic, version, _, _, ndim, keylen, _, _ = _FIXED.unpack_from(buf)
    if magic != _MAGIC or version != _VERSION or ndim > MAX_NDIM or keylen > 1 << 20:
        raise CorruptObject("bad header magic, version or sizes")
    return _FIXED.size + 8 * ndim + keylen + _TAIL.size


FIXED_HEADER_SIZE = _FIXED.size


def header_size_for(key: bytes, meta: ObjectMeta) -> int:
    """Length of ``pack_header(key, meta)`` without building it."""
    return _FIXED.size + 8 * len(meta.shape) + len(key) + _TAIL.size


def unpack_header(buf: bytes) -> tuple[bytes, ObjectMeta]:
    """(key bytes, meta) from a complete header; CorruptObject on any inconsistency."""
    n = header_size(buf)
    if len(buf) < n:
        raise CorruptObject("header truncated")
    body, (check,) = buf[: n - _TAIL.size], _TAIL.unpack_from(buf, n - _TAIL.size)
    if xxhash.xxh3_64_intdigest(body) != check:
        raise CorruptObject("header checksum mismatch")
    _, _, kind, dcode, ndim, keylen, nbytes, csum = _FIXED.unpack_from(body)
    shape = struct.unpack_from(f"<{ndim}Q", body, _FIXED.size)
    key = body[_FIXED.size + 8 * ndim :]
    if dcode not in _CODE_DTYPES or kind not in (KIND_TENSOR, KIND_BYTES) or len(key) != keylen:
        raise CorruptObject("bad header fields")
    dtype = _CODE_DTYPES[dcode]
    # The sizes must agree: a tensor is later made of these bytes in this shape.
    if nbytes != math.prod(shape) * dtype.itemsize or (kind == KIND_BYTES and (dtype != torch.uint8 or ndim != 1)):
        raise CorruptObject("header sizes disagree (shape, dtype, byte count)")
    return bytes(key), ObjectMeta(kind, dtype, tuple(shape), nbytes, csum)
