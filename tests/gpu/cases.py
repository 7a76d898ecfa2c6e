"""The runs tests/gpu checks, shared by the tests and by sanitized.py (the same runs under
``TORCH_CUDA_SANITIZER=1`` in a subprocess), so both check exactly the same thing."""

from __future__ import annotations

import torch

import strata
from strata.kv.paged import PagedKV
from tiny_models import VOCAB, greedy, make

ARCHS = ("llama", "qwen2", "gpt2", "mixtral")
PREFETCH = (1, 2)
BUDGETS = ("none", "half")  # gpu_budget None (every block streamed), or half of the blocks resident
LAYERS = 8  # > 2 * (prefetch + 1): half the blocks resident leaves some to stream
NEW_TOKENS = 8


def prompt(device: torch.device) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1)).to(device)


def reference_tokens(arch: str, device: torch.device) -> list:
    """Greedy tokens of the same model (same seed) with every weight on ``device``."""
    model = make(arch, layers=LAYERS).to(device)
    return greedy(model, prompt(device), NEW_TOKENS)


def half_budget(handle) -> int:
    """A gpu_budget that keeps LAYERS // 2 blocks resident: the non-block modules, the ring of
    prefetch+1 slots and two blocks (the plan keeps the most blocks that fit, spread out)."""
    biggest = max(layout.nbytes for layout in handle.layouts)
    return handle.plan.other_bytes + handle.plan.ring_slots * biggest + (LAYERS // 2) * biggest


def offloaded_tokens(arch: str, device: torch.device, budget: str, prefetch: int) -> dict:
    """Greedy tokens of ``strata.offload``'ed ``arch`` on ``device``, with its plan and copy count.
    The model is detached afterwards, whatever happens."""
    model = make(arch, layers=LAYERS)
    handle = strata.offload(model, device=device, prefetch=prefetch, progress=False)
    try:
        if budget == "half":
            gpu_budget = half_budget(handle)
            handle.detach()
            handle = None
            handle = strata.offload(model, device=device, gpu_budget=gpu_budget, prefetch=prefetch, progress=False)
        tokens = greedy(model, prompt(device), NEW_TOKENS)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"tokens": tokens, "resident": len(handle.plan.resident), "offloaded": len(handle.plan.offloaded),
                "copies": handle.stats()["copies"]}
    finally:
        if handle is not None:
            handle.detach()


def all_offload_runs(device: torch.device) -> list[dict]:
    return [{"arch": arch, "budget": budget, "prefetch": prefetch,
             **offloaded_tokens(arch, device, budget, prefetch)}
            for arch in ARCHS for prefetch in PREFETCH for budget in BUDGETS]


# -- KV: gather -> put -> get_into a staging bundle -> scatter into other blocks -------------------------

KV_LAYERS, KV_BLOCK_SHAPE = 3, (2, 16, 64)  # vLLM-like: [blocks, kv heads, block size, 2 * head size]


def kv_round_trip(device: torch.device, tier: dict, save: str, chunks: int = 8, per_chunk: int = 4,
                  dtype: torch.dtype = torch.bfloat16) -> None:
    """Save ``chunks`` chunks of a paged KV cache on ``device`` through a store with ``tier``,
    load each into other block ids of a second cache through one reused staging bundle (no
    host synchronisation between chunks, as the connector does), and check every bit.

    ``save``: "gather_pinned" (``PagedKV.gather(pin=True)`` then put, the connector's path) or
    "device_bundle" (put of a bundle still on the device: the store copies it to the host)."""
    num_blocks = 2 * chunks * per_chunk
    g = torch.Generator().manual_seed(2)
    src_layers = [torch.randn(num_blocks, *KV_BLOCK_SHAPE, generator=g).to(dtype).to(device) for _ in range(KV_LAYERS)]
    dst_layers = [torch.zeros_like(t) for t in src_layers]
    src, dst = PagedKV(src_layers, num_blocks=num_blocks), PagedKV(dst_layers, num_blocks=num_blocks)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    src_ids = [perm[i * per_chunk:(i + 1) * per_chunk] for i in range(chunks)]
    dst_ids = [perm[(chunks + i) * per_chunk:(chunks + i + 1) * per_chunk] for i in range(chunks)]
    keys = [strata.Key("kv", "gpu-check", f"c{i}") for i in range(chunks)]
    with strata.open_store({"tiers": [tier]}) as store:
        for key, ids in zip(keys, src_ids):
            if save == "gather_pinned":
                bundle = src.gather(ids, pin=True)
            else:
                idx = torch.as_tensor(ids, dtype=torch.long, device=device)
                bundle = torch.stack([layer.index_select(0, idx) for layer in src_layers])
            assert store.put(key, bundle), f"put of chunk {key} refused"
        for key, ids in zip(keys, dst_ids):
            staging = dst.staging(len(ids))
            assert store.get_into(key, staging), f"get_into of chunk {key} missed"
            dst.scatter(staging, ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        failures = store.stats()["tiers"][tier.get("name", tier["kind"])]["checksum_failures"]
    assert failures == 0
    written = [i for ids in dst_ids for i in ids]
    untouched = sorted(set(range(num_blocks)) - set(written))
    for n, (s, d) in enumerate(zip(src_layers, dst_layers)):
        for s_ids, d_ids in zip(src_ids, dst_ids):
            assert torch.equal(d[d_ids].cpu(), s[s_ids].cpu()), f"layer {n}: blocks {d_ids} differ from {s_ids}"
        assert not d[untouched].any(), f"layer {n}: blocks no chunk was loaded into were written"


def kv_tiers(tmp_dir) -> dict[str, dict]:
    return {"cpu": {"kind": "cpu", "capacity": "64MiB", "pin": "auto"},
            "cxl": {"kind": "cxl", "path": str(tmp_dir / "kv-region"), "size": "64MiB"}}
