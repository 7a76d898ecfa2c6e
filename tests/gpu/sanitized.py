"""Run by test_gpu_offload.py under TORCH_CUDA_SANITIZER=1: every offload run of cases.py and the
KV staging round trips on CUDA, results written as JSON to argv[1] (stdout is left to libraries).

    TORCH_CUDA_SANITIZER=1 PYTHONPATH=.:tests python tests/gpu/sanitized.py OUT.json TMPDIR

The sanitizer raises on the first cross-stream access it finds unsynchronised, so any such
race ends this process with a non-zero exit and the report on stderr."""

import json
import sys
from pathlib import Path

import torch
import torch.cuda._sanitizer as csan

from gpu.cases import all_offload_runs, kv_round_trip, kv_tiers


def main() -> None:
    out, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    device = torch.device("cuda", torch.cuda.current_device())
    result = {"sanitizer_enabled": bool(csan.cuda_sanitizer.enabled), "offload": all_offload_runs(device),
              "kv_round_trips": []}
    for name, tier in kv_tiers(tmp).items():
        kv_round_trip(device, tier, "gather_pinned")
        result["kv_round_trips"].append(name)
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
