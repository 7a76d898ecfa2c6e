"""The chain's lock: one reentrant lock over every tier's index, which runs the I/O deferred
under it (``Tier.after_unlock``) in the thread that lets it go."""

from __future__ import annotations

import _thread
import logging
from typing import Callable

log = logging.getLogger("strata.chain")

_RLock_release = _thread.RLock.release


class ChainLock(_thread.RLock):
    """The chain's lock: reentrant; as its owner lets go of it entirely, the I/O tiers deferred under
    it (``Tier.after_unlock``) runs in that thread, so no thread waits for another's unlinks,
    flushes or round trips, and a store call still returns only after its own. A
    ``threading.Condition`` over it waits as over an RLock: the waiter's deferred I/O stays its own.
    Every store call takes it a few times, so taking it is the C lock's own ``acquire``; letting it
    go looks at the deferred list only on the way out of the outermost hold."""

    __slots__ = ("_pending",)

    def __init__(self):
        super().__init__()
        self._pending: list[Callable[[], None]] = []  # I/O the owner deferred (only the owner touches it)

    def release(self, *_exc) -> None:
        if self._pending and self._recursion_count() == 1:
            self._run_pending()
        else:
            _RLock_release(self)

    __exit__ = release  # the lock's every use ends here: no extra call on the way out

    def _run_pending(self) -> None:
        """Let the outermost hold go, then run what was deferred under it, in this thread."""
        pending, self._pending = self._pending, []
        _RLock_release(self)
        for fn in pending:
            try:
                fn()
            except Exception:  # noqa: BLE001 - deferred I/O must not fail the store call that caused it
                log.warning("I/O deferred past the chain's lock failed", exc_info=True)

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` as the owner lets the lock go entirely (the owner calls this)."""
        self._pending.append(fn)

    # what threading.Condition uses to wait on a reentrant lock: the waiter's deferred I/O waits with it
    def _release_save(self):
        saved, self._pending = self._pending, []
        return super()._release_save(), saved

    def _acquire_restore(self, state) -> None:
        inner, saved = state
        super()._acquire_restore(inner)
        self._pending = saved
