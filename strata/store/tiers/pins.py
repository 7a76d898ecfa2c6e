"""Pins on byte ranges of a file that every process sharing it honours: open file description
locks (Linux ``F_OFD_SETLK``), one shared lock per pinned range.

A process that reads bytes in place from a region other processes share (a lease of a cxl
object) pins their range; a process about to reuse freed space asks whether another holds a pin
on it and takes other space if so. The kernel keeps the table: a pin lasts until it is taken
back or its descriptor is closed, so a process that dies (SIGKILL included) leaves none behind.

Locks of one open file description never conflict with each other, so a process's own pins
never block its own allocations (its own leases already keep its frees back), while two stores
that open one region in one process act as two processes, as they do for the region lock.
Classic POSIX locks would not do: they belong to the process, and closing any descriptor of the
file (the region lock's waiter opens and closes one) drops them all.
"""

from __future__ import annotations

import fcntl
import struct

# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for open file description locks), padding
_FLOCK = struct.Struct("hhqqi4x")
_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
_GETLK = getattr(fcntl, "F_OFD_GETLK", None)


class RangePins:
    """Pins on ranges of the file open as ``fd``. ``supported`` is False where the platform or
    the file refuses such locks (then ``pin`` is never asked and nothing is pinned elsewhere)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.supported, self.reason = self._probe()

    def _probe(self) -> tuple[bool, str]:
        if _SETLK is None or _GETLK is None:
            return False, "this platform has no open file description locks (F_OFD_SETLK: Linux 3.15+)"
        try:
            self._lock(_GETLK, fcntl.F_WRLCK, 0, 1)
        except OSError as e:
            return False, f"the file refuses open file description locks ({e.strerror})"
        return True, ""

    def _lock(self, cmd: int, kind: int, start: int, length: int) -> tuple:
        got = fcntl.fcntl(self.fd, cmd, _FLOCK.pack(kind, 0, start, length, 0))
        return _FLOCK.unpack(got)

    def pin(self, start: int, length: int) -> bool:
        """Pin ``[start, start + length)``; False where the lock is refused (then nothing is pinned)."""
        try:
            self._lock(_SETLK, fcntl.F_RDLCK, start, length)
        except OSError:
            return False
        return True

    def unpin(self, start: int, length: int) -> None:
        """Take back a pin of exactly that range (pins of one process on disjoint ranges)."""
        try:
            self._lock(_SETLK, fcntl.F_UNLCK, start, length)
        except OSError:
            pass  # the descriptor is gone (closed): so is the pin

    def pinned_elsewhere(self, start: int, length: int) -> tuple[int, int] | None:
        """A range another open file description (another process) pins within
        ``[start, start + length)``, as ``(start, length)``, or None where nothing there is pinned."""
        try:
            kind, _, at, n, _ = self._lock(_GETLK, fcntl.F_WRLCK, start, length)
        except OSError:
            return start, length  # cannot tell: the range is left alone, never overwritten under a reader
        if kind == fcntl.F_UNLCK:
            return None
        return at, n  # n == 0: pinned to the end of the file
