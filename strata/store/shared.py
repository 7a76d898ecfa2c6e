"""One StorageEngine per process and config, shared by every client in that process
(vLLM's scheduler-side and worker-side connectors, the weight-offload plugin)."""

from __future__ import annotations

import json
import threading

from strata.config import StoreConfig, load_config
from strata.store.engine import StorageEngine

_lock = threading.Lock()
_engines: dict[str, StorageEngine] = {}


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

