"""The store on CUDA: a pinned CPU slab, a CXL mapping registered with CUDA, KV staging round trips."""

import time

import pytest
import torch

import strata
# The CXL check already lives in test_cxl.py (skipped there without CUDA); collected here too so the
# GPU run (pytest tests/gpu) includes it: a registered mapping, get_into a GPU tensor, bit-exact.
from test_cxl import test_get_into_the_gpu_from_the_registered_mapping  # noqa: F401

from .cases import kv_round_trip, kv_tiers

MiB = 1 << 20


@pytest.mark.cuda_only
def test_a_256mib_cpu_tier_is_one_pinned_slab_of_the_size_asked():
    t0 = time.perf_counter()
    store = strata.open_store({"tiers": [{"kind": "cpu", "capacity": "256MiB", "pin": "auto"}]})
    opened = time.perf_counter() - t0
    t0 = time.perf_counter()
    baseline = torch.empty(256 * MiB, dtype=torch.uint8, pin_memory=True)
    pinned_empty = time.perf_counter() - t0
    del baseline
    print(f"gpu-check: 256 MiB pinned cpu tier opened in {opened * 1e3:.1f} ms "
          f"(torch.empty(pin_memory=True) of the same size: {pinned_empty * 1e3:.1f} ms)")
    with store:
        s = store.stats()["tiers"]["cpu"]
        assert s["pinned"] is True, s
        assert s["capacity"] == 256 * MiB
        value = torch.randn(MiB)
        key = strata.Key("kv", "gpu", "pinned")
        assert store.put(key, value)
        out = torch.empty(MiB, device="cuda")
        assert store.get_into(key, out)
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), value)


@pytest.mark.parametrize("tier", ["cpu", "cxl"])
@pytest.mark.parametrize("save", ["gather_pinned", "device_bundle"])
def test_kv_chunks_round_trip_bit_exact_through_one_staging_bundle(device, tmp_path, tier, save):
    kv_round_trip(device, kv_tiers(tmp_path)[tier], save)
