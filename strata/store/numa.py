"""Bind a memory range to one NUMA node (CXL memory that appears as a CPU-less node).

Through libnuma's ``mbind`` with ctypes. Never raises: where the node or libnuma is
absent, or the kernel refuses, the memory stays where the OS puts it and the reason says
why (the caller logs it once and reports it in stats).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MPOL_BIND = 2
MPOL_MF_MOVE = 1 << 1


def node_exists(node: int) -> bool:
    return os.path.isdir(f"/sys/devices/system/node/node{node}")


def bind(address: int, length: int, node: int) -> tuple[bool, str]:
    """(bound, reason): pages of ``[address, address + length)`` placed on ``node``."""
    if not node_exists(node):
        online = sorted(int(n[4:]) for n in os.listdir("/sys/devices/system/node") if n[4:].isdigit()) \
            if os.path.isdir("/sys/devices/system/node") else []
        return False, f"NUMA node {node} does not exist on this host (nodes: {online or 'none visible'})"
    name = ctypes.util.find_library("numa")
    if name is None:
        return False, "libnuma is not installed (Debian: apt-get install libnuma1)"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
        if lib.numa_available() < 0:
            return False, "libnuma reports NUMA as unavailable on this kernel"
        words = node // 64 + 1
        mask = (ctypes.c_ulong * words)()
        mask[node // 64] = 1 << (node % 64)
        lib.mbind.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.POINTER(ctypes.c_ulong),
                              ctypes.c_ulong, ctypes.c_uint]
        lib.mbind.restype = ctypes.c_long
        if lib.mbind(address, length, MPOL_BIND, mask, words * 64 + 1, MPOL_MF_MOVE) != 0:
            err = ctypes.get_errno()
            return False, f"mbind to node {node} refused: {os.strerror(err)}"
    except (OSError, AttributeError) as e:
        return False, f"libnuma could not be used ({e})"
    return True, f"bound to NUMA node {node}"
