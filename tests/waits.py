"""Seeing a thread block, as it happens: no sleep and no guess."""

from __future__ import annotations

import threading
from typing import Callable


class WaitSpy:
    """Runs ``target`` on a thread of its own and sees that thread start waiting on ``cond`` (a
    ``threading.Condition``): ``waiting`` is set then; ``settled`` is set then too, or when
    ``target`` returns without ever waiting, so a test waits on ``settled`` and asks ``waiting``."""

    def __init__(self, cond: threading.Condition, target: Callable[[], object]):
        self.waiting, self.settled = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(target,))
        real = cond.wait

        def wait(timeout=None):
            if threading.current_thread() is self.thread:
                self.waiting.set()
                self.settled.set()
            return real(timeout)

        cond.wait = wait
        self.thread.start()

    def _run(self, target: Callable[[], object]) -> None:
        try:
            target()
        finally:
            self.settled.set()

    def blocked(self, timeout: float = 10) -> bool:
        """Whether the thread is waiting on the condition (and has not returned) within ``timeout``."""
        return self.settled.wait(timeout) and self.waiting.is_set() and self.thread.is_alive()
