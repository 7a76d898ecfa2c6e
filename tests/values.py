"""Test values: tensors of several dtypes and shapes, and raw bytes, made from a seed."""

import torch
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]


def make_value(kind: int, seed: int, dims: tuple[int, ...]):
    g = torch.Generator().manual_seed(seed)
    if kind == len(DTYPES):
        return bytes(torch.randint(0, 256, (sum(dims) * 7,), generator=g, dtype=torch.uint8).tolist())
    dtype = DTYPES[kind]
    raw = torch.randint(-1000, 1000, dims, generator=g)
    return raw.to(dtype) if dtype != torch.bool else raw > 0


values = st.builds(
    make_value,
    st.integers(0, len(DTYPES)),
    st.integers(0, 2**31),
    st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple),
)


def same(a, b) -> bool:
    if isinstance(a, bytes) or isinstance(b, bytes):
        return a == b
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
