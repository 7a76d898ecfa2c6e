"""Weight offload: time per step against full-GPU, Accelerate, diffusers, and the PCIe roofline.

    python benchmarks/offload.py            # GPU: a Llama-3-8B-shaped model, bf16, random weights
    python benchmarks/offload.py --small    # any machine: a small model (smoke run; CPU when no GPU)
    python benchmarks/offload.py --layers 8 # the same block shapes, fewer blocks (a shorter run)

Workloads: decode (batch 1, 512-token context), decode (batch 32), prefill (4K tokens;
1K with --small). Methods, in one run on one model: every weight on the device;
Accelerate's ``cpu_offload``; diffusers' ``apply_group_offloading`` (block level, one
block per group, ``use_stream=True`` on a GPU) when diffusers is installed (it is pure
Python: ``pip install --no-deps --target DIR diffusers`` and ``PYTHONPATH=DIR`` carries it
to a machine without a registry); ``strata.offload``
streaming every block; ``strata.offload`` with a budget of half the weights. The
roofline is max(full-device time, streamed bytes / pinned host-to-device bandwidth
measured in the same run); every offloaded time is printed as a ratio to it.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import strata  # noqa: E402


def llama(small: bool, device: torch.device, dtype: torch.dtype, layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704,
                          num_hidden_layers=layers or 8, num_attention_heads=8, num_key_value_heads=2,
                          max_position_embeddings=4096)
    else:  # Llama-3-8B shapes
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=layers or 32, num_attention_heads=32, num_key_value_heads=8,
                          max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device(device):  # initialise where it is fast, then copy out
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval().cpu()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def h2d_bandwidth(device: torch.device) -> float:
    """Pinned host-to-device GB/s (memcpy on the CPU for a CPU device)."""
    n = 1 << 30 if device.type == "cuda" else 1 << 27
    src = torch.empty(n, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    sync(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return n / min(times) / 1e9


def workloads(small: bool):
    ctx, prefill = (128, 1024) if small else (512, 4096)
    return [("decode b1", 1, ctx, True), ("decode b32", 32, ctx, True), (f"prefill {prefill}", 1, prefill, False)]


def step_time(model, device, batch, length, decode, vocab, steps) -> float:
    """Median seconds of one decode step after a ``length``-token prefill, or of one prefill."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    times = []
    # transformers 5 renamed past_key_values to cache; the GPU image may run either
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        if decode:
            out = model(ids, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(steps + 1):
                sync(device)
                t0 = time.perf_counter()
                out = model(nxt, use_cache=True, **{cache_kw: out[cache_kw]})
                sync(device)
                times.append(time.perf_counter() - t0)
                nxt = out.logits[:, -1:].argmax(-1)
        else:
            for _ in range(steps + 1):
                sync(device)
                t0 = time.perf_counter()
                model(ids, use_cache=False)
                sync(device)
                times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def block_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.model.layers.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small model and context (smoke run)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, help="decoder blocks (default: 32, or 8 with --small); fewer keep each "
                                               "block's shape and shorten the run")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    bw = h2d_bandwidth(device)
    print(f"pinned host-to-device: {bw:.1f} GB/s", flush=True)
    model = llama(args.small, device, dtype, args.layers)
    vocab = model.config.vocab_size
    streamed_all = block_bytes(model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {total / 1e9:.2f} GB of weights, decoder blocks {streamed_all / 1e9:.2f} GB", flush=True)
    loads = workloads(args.small)
    results: dict[str, dict[str, float]] = {}

    def run(method, m, streamed):
        results[method] = {}
        for name, batch, length, decode in loads:
            t = step_time(m, device, batch, length, decode, vocab, args.steps)
            results[method][name] = t
            print(f"  {method:24} {name:12} {t * 1e3:10.1f} ms", flush=True)
        results[method]["_streamed"] = streamed

    # 1. everything on the device
    model.to(device)
    run("all on device", model, 0)
    full = dict(results["all on device"])
    model.cpu()
    gc.collect()

    # 2. strata, streaming every block
    handle = strata.offload(model, device=device, prefetch=1, progress=False)
    run("strata.offload", model, streamed_all)
    print("   ", {k: v for k, v in handle.stats().items() if k != "wait_seconds_by_block"}, flush=True)
    handle.detach()

    # 3. strata with a budget of half the weights
    handle = strata.offload(model, device=device, prefetch=1, gpu_budget=total // 2, progress=False)
    half_streamed = sum(handle.layouts[b].nbytes for b in handle.plan.offloaded)
    run("strata.offload half", model, half_streamed)
    handle.detach()
    gc.collect()

    # 4. Accelerate cpu_offload
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_submodules

    cpu_offload(model, execution_device=device)
    run("accelerate cpu_offload", model, total)
    remove_hook_from_submodules(model)
    model.cpu()
    gc.collect()

    # 5. diffusers group offloading, when installed
    try:
        from diffusers.hooks import apply_group_offloading
    except ImportError:
        print("  diffusers not installed: group offloading skipped", flush=True)
    else:
        # block_modules=["model"]: descend into LlamaModel so each decoder layer is its own group
        # (without it the whole LlamaModel is one unmatched group, loaded at once). Streams
        # need a device that has them: on the CPU smoke run use_stream is off.
        cuda = device.type == "cuda"
        apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=cuda,
                               non_blocking=cuda, block_modules=["model"])
        run("diffusers group offload", model, streamed_all)

    print("\nroofline = max(all-on-device time, streamed bytes / pinned H2D bandwidth)")
    print(f"{'method':24} {'workload':12} {'ms/step':>10} {'roofline':>10} {'ratio':>7}")
    for method, row in results.items():
        for name, *_ in loads:
            roof = max(full[name], row["_streamed"] / (bw * 1e9))
            print(f"{method:24} {name:12} {row[name] * 1e3:10.1f} {roof * 1e3:10.1f} {row[name] / roof:7.2f}x")


if __name__ == "__main__":
    main()
