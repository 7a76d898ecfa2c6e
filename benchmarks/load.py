"""Big-model loading: time to first token and peak RSS, strata.load against Accelerate.

    python benchmarks/load.py                     # CPU: a generated ~2 GB checkpoint
    python benchmarks/load.py --device cuda       # GPU: an 8B-shaped checkpoint (~16 GB, bf16)
    python benchmarks/load.py --path DIR          # an existing checkpoint directory
    python benchmarks/load.py --layers 4          # the same shapes, fewer decoder layers (a shorter run)

Each method runs in a fresh process on the same checkpoint; the time runs from the
call that loads the model to the first generated token, and peak RSS is the
process's own high-water mark (VmHWM) less its RSS before loading.
- CPU: host memory is the bound. Accelerate: ``load_checkpoint_and_dispatch`` with
  ``max_memory={"cpu": budget}`` (the rest offloaded to disk). Strata: ``strata.load``
  file-backed with a CPU tier of the same budget.
- GPU: ``max_memory={0: half the weights, "cpu": ...}`` (Accelerate's CPU offload)
  against ``strata.load(device="cuda", gpu_budget=half the weights)``.
Targets: time to first token at most half of Accelerate's; peak RSS no more than the
CPU tier's configured capacity plus 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def make_checkpoint(path: str, gpu: bool, layers: int | None = None) -> None:
    import torch
    import transformers as tf
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    if gpu:  # Llama-3-8B shapes, bf16
        cfg = tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=layers or 32, num_attention_heads=32, num_key_value_heads=8,
                             rope_theta=500000.0)
        dtype = torch.bfloat16
    else:  # ~2.1 GB in float32
        cfg = tf.LlamaConfig(vocab_size=8000, hidden_size=2048, intermediate_size=5632,
                             num_hidden_layers=layers or 11, num_attention_heads=16, num_key_value_heads=4)
        dtype = torch.float32
    with init_empty_weights():
        model = tf.LlamaForCausalLM(cfg)
    cfg.dtype = str(dtype).replace("torch.", "")
    cfg.save_pretrained(path)
    shard, shard_bytes, index, n = {}, 0, {}, 0
    g = torch.Generator().manual_seed(0)

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, shard_bytes, n = {}, 0, n + 1

    for name, p in model.state_dict().items():
        t = (torch.randn(p.shape, generator=g) * 0.02).to(dtype)
        shard[name] = t
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes > 1 << 30:
            flush()
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)


def child(method: str, path: str, device: str, budget: int, offload_dir: str) -> None:
    import torch
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported by both methods: not counted)

    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    base = status("VmRSS")
    t0 = time.perf_counter()
    if method == "strata":
        import strata

        if device == "cpu":
            model = strata.load(path, device="cpu", file_backed=True, cpu_cache=budget, progress=False)
        else:
            model = strata.load(path, device=device, gpu_budget=budget, progress=False)
    else:
        from accelerate import init_empty_weights, load_checkpoint_and_dispatch

        config = transformers.AutoConfig.from_pretrained(path)
        with init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(config)
        max_memory = {"cpu": budget} if device == "cpu" else {0: budget, "cpu": "200GiB"}
        model = load_checkpoint_and_dispatch(model, path, device_map="auto", max_memory=max_memory,
                                             no_split_module_classes=["LlamaDecoderLayer"],
                                             offload_folder=offload_dir).eval()
    with torch.no_grad():
        model.generate(ids.to(device), max_new_tokens=1, do_sample=False, pad_token_id=0)
    if device != "cpu":
        torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    print(json.dumps({"ttft": ttft, "peak_rss": status("VmHWM") - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--path", help="an existing checkpoint directory (default: generate one)")
    ap.add_argument("--budget", help="CPU: the CPU tier / max_memory; GPU: the GPU budget (default: a quarter "
                                     "of the checkpoint on CPU, half on GPU)")
    ap.add_argument("--layers", type=int, help="decoder layers of the generated checkpoint (default: 32 on GPU, "
                                               "11 on CPU); fewer keep each layer's shape and shorten the run")
    ap.add_argument("--child", choices=["strata", "accelerate"], help=argparse.SUPPRESS)
    ap.add_argument("--offload-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.path, args.device, int(args.budget), args.offload_dir)
        return
    from strata.config import format_size, parse_size

    with tempfile.TemporaryDirectory(dir=os.environ.get("STRATA_BENCH_DIR")) as tmp:
        path = args.path
        if path is None:
            path = os.path.join(tmp, "ckpt")
            t0 = time.perf_counter()
            make_checkpoint(path, gpu=args.device != "cpu", layers=args.layers)
            print(f"generated checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        budget = parse_size(args.budget) if args.budget else size // (4 if args.device == "cpu" else 2)
        print(f"checkpoint {format_size(size)} at {path}; device {args.device}; budget {format_size(budget)}", flush=True)
        rows = {}
        for method in ("accelerate", "strata"):
            offload_dir = os.path.join(tmp, f"offload-{method}")
            os.sync()
            out = subprocess.run([sys.executable, __file__, "--child", method, "--path", path, "--device", args.device,
                                  "--budget", str(budget), "--offload-dir", offload_dir],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{method} failed:\n{out.stderr[-3000:]}")
                continue
            rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {method:10} time to first token {rows[method]['ttft']:8.2f} s   "
                  f"peak RSS +{format_size(rows[method]['peak_rss'])}", flush=True)
        if len(rows) == 2:
            a, s = rows["accelerate"], rows["strata"]
            print(f"\nstrata / accelerate: time to first token {s['ttft'] / a['ttft']:.2f}x (target <= 0.5x); "
                  f"peak RSS {format_size(s['peak_rss'])} vs bound {format_size(budget + (1 << 30))} "
                  f"(CPU tier + 1 GiB)" if args.device == "cpu" else
                  f"\nstrata / accelerate: time to first token {s['ttft'] / a['ttft']:.2f}x (target <= 0.5x)")


if __name__ == "__main__":
    main()
