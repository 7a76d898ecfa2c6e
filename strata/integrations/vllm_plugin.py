"""The ``vllm.general_plugins`` entry point: registers ``--load-format strata`` and nothing else.

vLLM calls ``register()`` in every process it starts (front end, engine core, workers). It is
inert unless a user asks for the load format: no store is opened and no model is touched here.
"""

from __future__ import annotations

import logging

log = logging.getLogger("strata.vllm")

LOAD_FORMAT = "strata"
_registered = False


def kv_transfer_config(config=None, chunk_size: int | None = None) -> dict:
    """vLLM's ``kv_transfer_config`` for the StrataConnector on store ``config`` (None: the cpu
    preset), recomputing any chunk that fails to load."""
    extra = {"strata.config": config, "strata.chunk_size": chunk_size}
    return {"kv_connector": "StrataConnector", "kv_connector_module_path": "strata.kv.vllm", "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {k: v for k, v in extra.items() if v is not None}}


def register() -> None:
    """Add ``strata`` to vLLM's model-loader registry (once per process)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from strata.integrations.vllm_loader import StrataModelLoader

    register_model_loader(LOAD_FORMAT)(StrataModelLoader)
    _registered = True
