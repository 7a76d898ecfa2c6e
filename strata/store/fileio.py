"""Plain positional file reads into tensors."""

from __future__ import annotations

import os

import torch


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What says a file is still the one some byte offsets were taken from: device, inode, size and
    modification time (a rewrite in place changes the last two, a replacement the inode)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileChanged(OSError):
    """A file is no longer the one its byte ranges were taken from."""


def read_range(path: str, offset: int, out: torch.Tensor, stamp: tuple | None = None) -> None:
    """Fill contiguous CPU ``out`` with the bytes of ``path`` at ``offset``; with ``stamp``
    (``file_stamp`` when the offset was taken), ``FileChanged`` if the file is another by now."""
    n = out.numel() * out.element_size()
    if n == 0:
        return
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        if stamp is not None and file_stamp(os.fstat(fd)) != tuple(stamp):
            raise FileChanged(f"{path}: rewritten or replaced since its byte ranges were taken")
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k <= 0:
                raise OSError(f"{path}: short read at byte {offset + got}")
            got += k
    finally:
        os.close(fd)
