"""strata.offload on CUDA: greedy tokens bit-equal to the model fully on the GPU, also under the
CUDA stream sanitizer (which fails the process on an unsynchronised cross-stream access)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .cases import ARCHS, BUDGETS, LAYERS, PREFETCH, offloaded_tokens, reference_tokens

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prefetch", PREFETCH)
def test_offloaded_greedy_tokens_equal_the_model_fully_on_the_device(device, arch, prefetch):
    ref = reference_tokens(arch, device)
    streamed = offloaded_tokens(arch, device, "none", prefetch)
    assert (streamed["resident"], streamed["offloaded"]) == (0, LAYERS)
    assert streamed["copies"] > 0
    assert streamed["tokens"] == ref
    half = offloaded_tokens(arch, device, "half", prefetch)
    assert (half["resident"], half["offloaded"]) == (LAYERS // 2, LAYERS - LAYERS // 2)
    assert half["copies"] > 0
    assert half["tokens"] == ref


@pytest.mark.cuda_only
def test_the_same_runs_pass_the_cuda_stream_sanitizer(tmp_path):
    out = tmp_path / "sanitized.json"
    tests_dir, root = HERE.parent, HERE.parent.parent
    env = dict(os.environ, TORCH_CUDA_SANITIZER="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(root), str(tests_dir), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(HERE / "sanitized.py"), str(out), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"exit {proc.returncode} under TORCH_CUDA_SANITIZER=1:\n{proc.stderr[-6000:]}"
    got = json.loads(out.read_text())
    assert got["sanitizer_enabled"] is True
    assert got["kv_round_trips"] == ["cpu", "cxl"]
    runs = got["offload"]
    assert len(runs) == len(ARCHS) * len(PREFETCH) * len(BUDGETS)
    device = torch.device("cuda", torch.cuda.current_device())
    refs = {arch: reference_tokens(arch, device) for arch in ARCHS}
    for r in runs:
        assert r["tokens"] == refs[r["arch"]], f"{r['arch']} budget {r['budget']} prefetch {r['prefetch']}"
