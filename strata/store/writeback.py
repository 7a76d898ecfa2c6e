"""Write-back: a bounded queue of dirty objects and one background flusher.

Writers wait (back-pressure) while ``max_pending`` objects or ``max_pending_bytes`` bytes
are not yet flushed (queued or being written); the flusher itself never waits on its own
queue. The flusher
takes what is queued, up to ``BATCH`` objects at once, so a remote tier below gets them
in few round trips.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

log = logging.getLogger("strata.writeback")
BATCH = 16  # queued objects handed to one flush (a remote tier below writes them in one round trip)


class WriteBack:
    def __init__(self, flush_many: Callable[[list], list[bool]], max_pending: int, max_pending_bytes: int):
        self._flush_many = flush_many
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._queued: set = set()  # the entries in the queue: one is queued once (a flush of it twice
        # in one batch would make it wait for its own write of the key)
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
                while (self._queue or self._busy) and (
                    len(self._queue) + self._busy >= self.max_pending
                    or self._pending_bytes + entry.size > self.max_pending_bytes
                ):
                    waited = True
                    self._cond.wait()
                self.waits += waited
            if entry in self._queued:  # queued already (``flush`` queues again what is still dirty)
                return
            self._queued.add(entry)
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
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), BATCH))]
                self._queued.difference_update(entry for _, entry in batch)
                self._busy += len(batch)
            done = [False] * len(batch)
            try:
                done = self._flush_many(batch)
            except Exception:  # a flush must never kill the flusher
                log.exception("write-back of %d objects failed", len(batch))
            with self._cond:
                self._busy -= len(batch)
                self._pending_bytes -= sum(entry.size for _, entry in batch)
                self.flushed += sum(done)
                self.failed += len(batch) - sum(done)
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
