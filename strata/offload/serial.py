"""One forward at a time through an offloaded model.

A model's ring is one: its slots, and the books of which block each holds. Two threads running
forwards at once (a web server's workers sharing one model, as a plain model allows) would copy
blocks into slots the other is computing with, giving wrong tokens, and leave the books wrong
for every forward after. A forward pre-hook on the model takes a lock and a forward hook that
torch calls also when the forward raises gives it back, so such calls run one after another,
each on its own weights; ``detach()`` waits for the running one the same way.

A thread that finds the lock its own (a forward it began ended by ``KeyboardInterrupt``, which
torch's always-called hooks do not see) goes on, and its next forward's end gives it back. Under
``torch.compile`` the hooks of hook mode are graph breaks and lock as in eager mode; those of
``static=True`` are traced away (``fullgraph=True`` allows no break), so compiled static forwards
are not serialised: run those from one thread.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from strata.hooks import _eager
from strata.offload.blocks import Uncopyable
from strata.offload.state import _Hook


class ForwardLock(Uncopyable):
    """Serialises ``model``'s forwards until ``detach``; ``traced``: leave compiled forwards alone."""

    def __init__(self, model: torch.nn.Module, traced: bool):
        self._lock = threading.Lock()
        self._owner: int | None = None

        def pre(module, args) -> None:  # None: the forward's arguments stay as they are
            if not (traced and torch.compiler.is_compiling()):
                self.acquire()

        def post(module, args, output) -> None:
            if not (traced and torch.compiler.is_compiling()):
                self.release()

        if not traced:
            pre, post = _eager(pre), _eager(post)
        self._handles = [model.register_forward_pre_hook(_Hook(pre), prepend=True),
                         model.register_forward_hook(_Hook(post), always_call=True)]

    def acquire(self) -> bool:
        """Hold the lock (waiting for another thread's forward); False if this thread held it already."""
        me = threading.get_ident()
        if self._owner == me:
            return False
        self._lock.acquire()
        self._owner = me
        return True

    def release(self) -> None:
        if self._owner == threading.get_ident():
            self._owner = None
            self._lock.release()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The lock for a block of code (``detach``), unless this thread's forward holds it already."""
        took = self.acquire()
        try:
            yield
        finally:
            if took:
                self.release()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
