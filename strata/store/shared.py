"""One StorageEngine per process and config, shared by every client in that process
(vLLM's scheduler-side and worker-side connectors, the weight-offload plugin).

A process forked from one that opened engines opens its own: the parent's have no threads in
the child (the write-back flusher), may hold locks taken at the fork, and share the parent's
open files, whose region lock and lease pins are the parent's too (``flock`` and open file
description locks belong to the open file), so a child using them would unlock the parent's."""

from __future__ import annotations

import json
import os
import threading

from strata.config import StoreConfig
from strata.config_load import load_config
from strata.store.engine import StorageEngine

_lock = threading.Lock()
_engines: dict[str, StorageEngine] = {}


def _forget_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    _engines.clear()  # left to the parent, never closed here: closing would let go of the parent's locks


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _fingerprint(cfg: StoreConfig) -> str:
    return json.dumps(repr(cfg), sort_keys=True)


def shared_store(config=None) -> StorageEngine:
    """The process's engine for ``config`` (opened on first use)."""
    cfg = load_config(config)
    fp = _fingerprint(cfg)
    with _lock:
        engine = _engines.get(fp)
        if engine is None or engine._closed:
            engine = _engines[fp] = StorageEngine(cfg)
        return engine

