"""Extent allocator over one fixed arena: best fit, coalescing, no per-object malloc."""

from __future__ import annotations

import bisect


class ExtentAllocator:
    """Hands out aligned ``[offset, offset + size)`` extents of a ``capacity``-byte arena."""

    def __init__(self, capacity: int, alignment: int = 256):
        self.alignment = alignment
        self.capacity = capacity - capacity % alignment
        self._by_size: list[tuple[int, int]] = []  # (size, offset), sorted
        self._start: dict[int, int] = {}  # free offset -> size
        self._end: dict[int, int] = {}  # free end -> offset
        self.free_bytes = 0
        if self.capacity:
            self._add(0, self.capacity)

    def rounded(self, size: int) -> int:
        """``size`` rounded up to the alignment (at least one unit): what ``alloc`` takes."""
        a = self.alignment
        return (size + a - 1) // a * a if size > 0 else a

    def _add(self, off: int, size: int) -> None:
        bisect.insort(self._by_size, (size, off))
        self._start[off] = size
        self._end[off + size] = off
        self.free_bytes += size

    def _drop(self, off: int, size: int) -> None:
        i = bisect.bisect_left(self._by_size, (size, off))
        del self._by_size[i]
        del self._start[off]
        del self._end[off + size]
        self.free_bytes -= size

    def take_all(self) -> None:
        """Mark the whole arena in use (to rebuild free space from known holes with ``free``)."""
        for size, off in list(self._by_size):
            self._drop(off, size)

    def largest_free(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    def alloc(self, size: int) -> int | None:
        """Offset of a free extent of ``size`` bytes (a ``rounded`` size), or None if none is large enough."""
        i = bisect.bisect_left(self._by_size, (size, -1))
        if i == len(self._by_size):
            return None
        fsize, off = self._by_size[i]
        self._drop(off, fsize)
        if fsize > size:
            self._add(off + size, fsize - size)
        return off

    def take(self, off: int, size: int) -> list[tuple[int, int]]:
        """Take the free parts of ``[off, off + size)`` (widened to the alignment; ``size`` 0: to the
        end) out of the free space, as if allocated; the pieces taken, each to ``free`` back."""
        a = self.alignment
        end = self.capacity if size == 0 else min(self.capacity, (off + size + a - 1) // a * a)
        off = max(0, off - off % a)
        taken = []
        for start, n in [(s, n) for s, n in self._start.items() if s < end and s + n > off]:
            lo, hi = max(start, off), min(start + n, end)
            self._drop(start, n)
            if start < lo:
                self._add(start, lo - start)
            if hi < start + n:
                self._add(hi, start + n - hi)
            taken.append((lo, hi - lo))
        return taken

    def free(self, off: int, size: int) -> None:
        """Return an extent that ``alloc(size)`` handed out."""
        end = off + size
        if (prev := self._end.get(off)) is not None:
            psize = self._start[prev]
            self._drop(prev, psize)
            off, size = prev, size + psize
        if (nsize := self._start.get(end)) is not None:
            self._drop(end, nsize)
            size += nsize
        self._add(off, size)
