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

