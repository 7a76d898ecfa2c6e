"""KV chunk transfer between a vLLM-shaped paged KV cache and the CPU tier, against the
pinned host-device bandwidth measured in the same run. No vLLM needed.

    python benchmarks/kv_transfer.py           # GPU: Llama-3-8B KV shapes (32 layers, 8 KV heads,
                                               # head size 128, bf16, block size 16)
    python benchmarks/kv_transfer.py --small   # any machine: 4 layers (smoke run; CPU when no GPU)

The paged cache has vLLM 0.32's per-layer layout for FlashAttention,
``[num_blocks, kv_heads, block_size, 2 * head_size]``, blocks on dim 0 (the connector reads
whatever layout vLLM registers; only dim 0 matters to it). A chunk is 256 tokens: every
layer's 16 blocks, one bundle in the store. Block ids are scattered over the cache, as
vLLM hands them out.

Measured, per chunk, over a working set of chunks larger than the GPU's L2:
- save: the connector's path (``PagedKV.gather`` into pinned memory, then ``store.put``) and
  the direct path (gather on the device, ``store.put`` of the device bundle: one
  device-to-host copy into the tier's pinned slab);
- load: the connector's path (``store.get_into`` a device staging bundle, then
  ``PagedKV.scatter`` on the device).
Baselines: a pinned host-to-device and device-to-host copy of the same bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import strata  # noqa: E402
from strata.kv.paged import PagedKV  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    """Median seconds of ``fn()``, device work included."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="4 layers, fewer chunks (smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunks", type=int, default=None, help="chunks per timed pass (default 32; 8 with --small)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    layers = 4 if args.small else 32
    kv_heads, head, block, chunk_tokens = 8, 128, 16, 256
    n_chunks = args.chunks or (8 if args.small else 32)
    per_chunk = chunk_tokens // block
    num_blocks = n_chunks * per_chunk * 2
    dtype = torch.bfloat16
    caches = [torch.randn(num_blocks, kv_heads, block, 2 * head, dtype=dtype, device=device) for _ in range(layers)]
    paged = PagedKV(caches, num_blocks=num_blocks)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    chunk_ids = [perm[i * per_chunk:(i + 1) * per_chunk] for i in range(n_chunks)]
    chunk_bytes = layers * per_chunk * kv_heads * block * 2 * head * dtype.itemsize
    total = chunk_bytes * n_chunks
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"paged KV: {layers} layers x {num_blocks} blocks of {block} tokens, {kv_heads} KV heads x {head}, "
          f"bf16; chunk {chunk_tokens} tokens = {chunk_bytes / 2**20:.1f} MiB; {n_chunks} chunks a pass", flush=True)

    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    on_dev = torch.empty(total, dtype=torch.uint8, device=device)
    h2d = total / timed(lambda: on_dev.copy_(pinned, non_blocking=True), device, args.reps) / 1e9
    d2h = total / timed(lambda: pinned.copy_(on_dev, non_blocking=True), device, args.reps) / 1e9
    del pinned, on_dev

    capacity = 2 * total + (64 << 20)
    results = []
    with strata.open_store({"tiers": [{"kind": "cpu", "capacity": capacity}]}) as store:
        keys = [strata.Key("kv", "bench", f"c{i}") for i in range(n_chunks)]

        def save_connector():
            for k, ids in zip(keys, chunk_ids):
                store.put(k, paged.gather(ids, pin=True))

        def save_direct():
            for k, ids in zip(keys, chunk_ids):
                idx = torch.as_tensor(ids, dtype=torch.long, device=device)
                store.put(k, torch.stack([layer.index_select(0, idx) for layer in paged.layers]))

        def load():
            for k, ids in zip(keys, chunk_ids):
                bundle = paged.staging(len(ids))
                assert store.get_into(k, bundle)
                paged.scatter(bundle, ids)

        for name, fn, base_name, base in (("save (gather to pinned, put)", save_connector, "D2H", d2h),
                                          ("save (put of device bundle)", save_direct, "D2H", d2h),
                                          ("load (get_into staging, scatter)", load, "H2D", h2d)):
            gbs = total / timed(fn, device, args.reps) / 1e9
            results.append((name, gbs, base_name, base))
        kept = [c.clone() for c in caches]
        for c in caches:
            c.zero_()
        load()
        sync(device)
        assert all(torch.equal(a[i], b[i]) for a, b in zip(caches, kept) for ids in chunk_ids for i in ids), \
            "loaded KV differs from what was saved"

    print(f"\npinned host-to-device {h2d:.1f} GB/s, device-to-host {d2h:.1f} GB/s")
    print(f"{'path':34} {'GB/s':>7} {'baseline':>14} {'fraction':>9}")
    for name, gbs, base_name, base in results:
        print(f"{name:34} {gbs:7.1f} {base_name:>5} {base:6.1f} GB/s {gbs / base:8.0%}")


if __name__ == "__main__":
    main()
