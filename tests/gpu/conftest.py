"""Every test under tests/gpu needs CUDA; without it each one is skipped, saying why.

``STRATA_GPU_TESTS_DEVICE=cpu`` runs the device-agnostic ones (offload tokens, the KV staging
round trip) on the CPU instead, so the test code itself is exercised on machines without a
GPU (``make gpu-check-dry`` and CI do this); tests marked ``cuda_only`` (pinned memory, a
mapping registered with CUDA, the stream sanitizer) still skip there.
"""

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
NO_CUDA = "needs CUDA (torch.cuda.is_available() is False)"
ON_CPU = os.environ.get("STRATA_GPU_TESTS_DEVICE") == "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_only: needs CUDA itself, even under STRATA_GPU_TESTS_DEVICE=cpu")


def pytest_collection_modifyitems(config, items):
    """Mark this directory's tests only: the hook sees every collected item of the session."""
    cuda = torch.cuda.is_available()
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue
        if ON_CPU:
            if item.get_closest_marker("cuda_only"):
                item.add_marker(pytest.mark.skip(reason="needs CUDA itself (STRATA_GPU_TESTS_DEVICE=cpu runs only "
                                                        "the device-agnostic checks)"))
        elif not cuda:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture
def device() -> torch.device:
    """The device the checks run on: CUDA, or the CPU under STRATA_GPU_TESTS_DEVICE=cpu."""
    return torch.device("cpu") if ON_CPU else torch.device("cuda", torch.cuda.current_device())
