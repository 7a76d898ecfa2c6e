"""Whether a file's filesystem keeps its pages in RAM (tmpfs such as /dev/shm, ramfs, hugetlbfs),
and how much RAM the host has available for more of them.

A cxl region file on such a filesystem is backed by memory when its space is reserved: a region
larger than the memory available gets the process (or a neighbour) killed by the kernel's
out-of-memory killer, since a tmpfs may be sized above the RAM that is free."""

from __future__ import annotations

import os

RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem mounted where ``path`` lies (the longest mount point that holds
    it, from /proc/self/mounts), or None where that cannot be read."""
    path = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        return None
    return kind


def available_ram() -> int | None:
    """Bytes of memory the host can still give (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def ram_backed(path: str) -> str | None:
    """The filesystem type where ``path`` lies in RAM, else None."""
    kind = filesystem_type(path)
    return kind if kind in RAM_FILESYSTEMS else None
