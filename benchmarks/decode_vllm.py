"""Decode speed in real vLLM: ``--load-format strata`` in compiled mode against plain vLLM, compiled
and eager, in one run.

    python benchmarks/decode_vllm.py                          # 8 layers, 512 wide, half streamed (CPU: ~6 min)
    python benchmarks/decode_vllm.py --layers 4 --hidden 256  # a quick smoke run

A Llama (random weights, float32) is made locally. Each method runs in its own engine process,
one after another, on the same prompts: plain vLLM eager (``enforce_eager``), plain vLLM compiled
(vLLM's default mode: inductor on the CPU build, CUDA graphs on a GPU), Strata compiled
(``--load-format strata``, a ``gpu_budget`` that keeps half the decoder layers resident and
streams the rest through the static ring, from a CPU tier) and, for reference, Strata eager
(the hook ring). Each engine warms up once, then decodes ``--tokens`` tokens for a batch of
``--batch`` short prompts ``--repeats`` times; printed per method: the median decode throughput
(generated tokens per second, prefill excluded by subtracting a one-token run) and its ratio
to plain compiled vLLM. On the CPU build the "device" is host memory, so a streamed layer's copy
is a memcpy inside the step: the ratio shows what streaming costs there, not what a GPU hides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("eager", "compiled", "strata-compiled", "strata-eager")


def make_model(path: Path, layers: int, hidden: int) -> None:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = tf.LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=4096)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)


def half_budget(path: Path, layers: int) -> int:
    """Bytes for the non-layer weights, a ring of two layer slots and half the layers (plus half a
    layer of slack, so both rings stream the same, even, number of layers)."""
    from safetensors import safe_open

    per_layer, other = 0, 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name in f.keys():
            t = f.get_slice(name)
            nbytes = 4
            for d in t.get_shape():
                nbytes *= d
            if ".layers.0." in name:
                per_layer += nbytes
            elif ".layers." not in name:
                other += nbytes
    return other + (2 + layers // 2) * per_layer + per_layer // 2


def engine(args) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    kwargs = {}
    if args.method.startswith("strata"):
        kwargs.update(load_format="strata", model_loader_extra_config={
            "gpu_budget": args.budget, "prefetch": 1,
            "config": {"tiers": [{"kind": "cpu", "capacity": "2GiB"}], "namespaces": {"param": {"evict": "never"}}}})
    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32", seed=0, max_model_len=1024,
              max_num_seqs=args.batch, enforce_eager=args.method.endswith("eager"), kv_cache_memory_bytes=1 << 30,
              enable_prefix_caching=False, **kwargs)
    prompts = [{"prompt_token_ids": [(7 * i + j) % 4000 + 1 for j in range(32)]} for i in range(args.batch)]

    def run(tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    run(args.tokens)  # warm-up: compiles, fills caches
    rates = []
    for _ in range(args.repeats):
        first = run(1)
        full = run(args.tokens)
        rates.append(args.batch * (args.tokens - 1) / max(full - first, 1e-9))
    out = {"tokens_per_s": statistics.median(rates), "rates": rates}
    if args.method.startswith("strata"):
        from strata.integrations.vllm_loader import handles

        (handle,) = handles()
        s = handle.stats()
        out.update(offloaded=s["offloaded_blocks"], resident=s["resident_blocks"], static=s.get("static", False),
                   copies=s.get("copies", 0))
    print("DECODE-JSON " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        return engine(args)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: got {unknown}; allowed: {', '.join(METHODS)}")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        make_model(model, args.layers, args.hidden)
        budget = half_budget(model, args.layers)
        results = {}
        for m in methods:
            cmd = [sys.executable, __file__, "--engine", "--method", m, "--model", str(model), "--budget", str(budget),
                   "--batch", str(args.batch), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("DECODE-JSON ")]
            if proc.returncode or not lines:
                sys.exit(f"{m}: engine failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            results[m] = json.loads(lines[-1].split(" ", 1)[1])
            print(f"{m}: {results[m]['tokens_per_s']:.1f} tokens/s", flush=True)
    base = results.get("compiled")
    print(f"\nLlama {args.layers} layers x {args.hidden}, float32, batch {args.batch}, {args.tokens} tokens, "
          f"median of {args.repeats}")
    print(f"{'method':<17}{'tokens/s':>10}{'vs compiled':>13}  streamed")
    for m, r in results.items():
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        streamed = (f"{r['offloaded']}/{r['offloaded'] + r['resident']} layers"
                    f"{' (static ring)' if r['static'] else ' (hooks)'}") if "offloaded" in r else "-"
        print(f"{m:<17}{r['tokens_per_s']:>10.1f}{ratio:>13}  {streamed}")


if __name__ == "__main__":
    main()
