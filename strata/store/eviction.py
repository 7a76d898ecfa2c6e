"""Eviction policies: which object of one namespace in one tier goes first.

A policy only orders keys; the tier decides what may go (leases, pinning) through
the ``eligible`` predicate and removes the victim itself.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

Eligible = Callable[[Hashable], bool]


class LRU:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def insert(self, key: Hashable, size: int) -> None:
        self._order[key] = size
        self._order.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self, eligible: Eligible) -> Hashable | None:
        for key in self._order:
            if eligible(key):
                return key
        return None


class S3FIFO:
    """S3-FIFO (Yang et al., SOSP'23): a small probation FIFO, a main FIFO with
    lazy promotion, and a ghost FIFO remembering recent one-hit wonders."""

    SMALL_FRACTION = 0.1
    MAX_FREQ = 3

    def __init__(self) -> None:
        self._small: OrderedDict[Hashable, int] = OrderedDict()
        self._main: OrderedDict[Hashable, int] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}
        self._small_bytes = 0
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._freq)

    def insert(self, key: Hashable, size: int) -> None:
        self.remove(key)
        self._freq[key] = 0
        self._bytes += size
        if self._ghost.pop(key, 0) is None:
            self._main[key] = size
        else:
            self._small[key] = size
            self._small_bytes += size

    def touch(self, key: Hashable) -> None:
        f = self._freq.get(key)
        if f is not None and f < self.MAX_FREQ:
            self._freq[key] = f + 1

    def remove(self, key: Hashable) -> None:
        if self._freq.pop(key, None) is None:
            return
        size = self._small.pop(key, None)
        if size is not None:
            self._small_bytes -= size
            self._bytes -= size
            self._ghost[key] = None  # remembered: a quick return goes straight to main
            while len(self._ghost) > max(len(self._freq), 16):
                self._ghost.popitem(last=False)
        else:
            self._bytes -= self._main.pop(key)

    def victim(self, eligible: Eligible) -> Hashable | None:
        # Each key is looked at most a bounded number of times (freq <= 3 decrements, one move).
        budget = 2 * (self.MAX_FREQ + 2) * (len(self._freq) + 1)
        while budget > 0 and self._freq:
            budget -= 1
            if self._small and (self._small_bytes > self.SMALL_FRACTION * self._bytes or not self._main):
                key, size = next(iter(self._small.items()))
                if self._freq[key] > 0 or not eligible(key):
                    # Seen again while on probation (or in use): move to main.
                    del self._small[key]
                    self._small_bytes -= size
                    self._main[key] = size
                    self._freq[key] = 0
                    continue
                return key
            key = next(iter(self._main))
            if self._freq[key] > 0 or not eligible(key):
                self._freq[key] = max(0, self._freq[key] - 1)
                self._main.move_to_end(key)
                continue
            return key
        return None


POLICIES = {"lru": LRU, "s3fifo": S3FIFO}


def make_policy(name: str):
    return POLICIES[name]()
