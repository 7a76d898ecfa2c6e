"""Keys with writes under way, so that a delete can wait until none of its key's is."""

from __future__ import annotations

import threading


class KeysInFlight:
    """Per key, how many writes of it are under way. Every call holds the lock of ``cond``, on
    which ``wait_out`` waits and which the end of a key's last write notifies."""

    __slots__ = ("_n", "_cond")

    def __init__(self, cond: threading.Condition):
        self._n: dict[bytes, int] = {}
        self._cond = cond

    def __contains__(self, key: bytes) -> bool:
        return key in self._n

    def begin(self, key: bytes) -> None:
        self._n[key] = self._n.get(key, 0) + 1

    def end(self, key: bytes) -> None:
        n = self._n[key] - 1
        if n:
            self._n[key] = n
        else:
            del self._n[key]
            self._cond.notify_all()

    def wait_out(self, key: bytes, timeout: float | None = None) -> bool:
        """Wait until no write of ``key`` is under way (at most ``timeout`` seconds): whether none is."""
        return self._cond.wait_for(lambda: key not in self._n, timeout)


class KeyChanges:
    """Which keys changed (a put or a delete under way, or ended) since a moment, for a read that
    promotes what it found below into a tier above: it publishes only where its key did not
    change since it looked (else it would land over the newer version, or bring a deleted one
    back). Every call but ``now`` holds the chain's lock. Ends are remembered for the last
    ``remembered`` changes; a key whose end was forgotten counts as changed (a promotion skipped
    is a later miss above, never a stale read)."""

    __slots__ = ("_under_way", "_ended", "_seq", "_floor", "_remembered")

    def __init__(self, remembered: int = 1 << 14):
        self._under_way: dict[bytes, int] = {}
        self._ended: dict[bytes, int] = {}  # key -> the sequence number its last change ended at (oldest first)
        self._seq = 0
        self._floor = 0  # the newest sequence number forgotten
        self._remembered = remembered

    def now(self) -> int:
        """The moment to compare with later (no lock needed: it only grows, and an earlier one is stricter)."""
        return self._seq

    def begin(self, keys) -> None:
        for k in keys:
            self._under_way[k] = self._under_way.get(k, 0) + 1

    def end(self, keys) -> None:
        self._seq += 1
        for k in keys:
            n = self._under_way[k] - 1
            if n:
                self._under_way[k] = n
            else:
                del self._under_way[k]
            self._ended.pop(k, None)
            self._ended[k] = self._seq
        while len(self._ended) > self._remembered:
            old = next(iter(self._ended))
            self._floor = self._ended.pop(old)

    def unchanged(self, key: bytes, since: int) -> bool:
        """Whether no change of ``key`` was under way or ended after ``since``."""
        return key not in self._under_way and self._ended.get(key, self._floor) <= since
