"""Plain positional file reads into tensors."""

from __future__ import annotations

import os

import torch


def read_range(path: str, offset: int, out: torch.Tensor) -> None:
    """Fill contiguous CPU ``out`` with the bytes of ``path`` at ``offset``."""
    n = out.numel() * out.element_size()
    if n == 0:
        return
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k <= 0:
                raise OSError(f"{path}: short read at byte {offset + got}")
            got += k
    finally:
        os.close(fd)
