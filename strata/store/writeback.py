"""Write-back: a bounded queue of dirty objects and one background flusher.

Writers wait (back-pressure) while the queue holds ``max_pending`` objects or
``max_pending_bytes`` bytes; the flusher itself never waits on its own queue.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

log = logging.getLogger("strata.writeback")


class WriteBack:
    def __init__(self, flush_one: Callable[[int, object], bool], max_pending: int, max_pending_bytes: int):
        self._flush_one = flush_one
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._pending_bytes = 0
        self._busy = 0
        self._stop = False
        self.flushed = 0
        self.failed = 0
        self.waits = 0  # times a writer waited for room
        self._thread = threading.Thread(target=self._run, name="strata-writeback", daemon=True)
        self._thread.start()

    def enqueue(self, tier_index: int, entry, block: bool = True) -> None:
        block = block and threading.current_thread() is not self._thread
        with self._cond:
            if block:
                waited = False
                while self._queue and (
                    len(self._queue) >= self.max_pending
                    or self._pending_bytes + entry.size > self.max_pending_bytes
                ):
                    waited = True
                    self._cond.wait()
                self.waits += waited
            self._queue.append((tier_index, entry))
            self._pending_bytes += entry.size
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                tier_index, entry = self._queue.popleft()
                self._busy += 1
            ok = False
            try:
                ok = self._flush_one(tier_index, entry)
            except Exception:  # a flush must never kill the flusher
                log.exception("write-back of one object failed")
            with self._cond:
                self._busy -= 1
                self._pending_bytes -= entry.size
                self.flushed += ok
                self.failed += not ok
                self._cond.notify_all()

    def drain(self) -> None:
        """Wait until everything queued so far has been flushed (or has failed)."""
        if threading.current_thread() is self._thread:
            return
        with self._cond:
            while self._queue or self._busy:
                self._cond.wait()

    def close(self) -> None:
        self.drain()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def stats(self) -> dict:
        with self._cond:
            return {
                "queue_depth": len(self._queue) + self._busy,
                "pending_bytes": self._pending_bytes,
                "flushed": self.flushed,
                "failed": self.failed,
                "writer_waits": self.waits,
            }
