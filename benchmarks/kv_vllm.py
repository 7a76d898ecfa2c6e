"""Prefix KV reuse in real vLLM: time to first token, cold against warm through Strata, and
against vLLM's own ``ExampleConnector`` on the same prompts, in one run.

    python benchmarks/kv_vllm.py                      # 1K, 4K, 8K-token prompts, five engines (CPU: ~15 min with --repeats 1)
    python benchmarks/kv_vllm.py --lengths 512 --layers 2 --hidden 256   # a quick smoke run

A Llama of 8 layers, 1024 wide (random weights) is made locally, large enough that a
prefill costs real time. Its dtype is float32 by default: CPUs without native bf16 (the
2-core machines here: a bf16 matmul runs at ~1 GFLOP/s against ~60 in float32) would spend
minutes on one prefill; ``--dtype bfloat16`` where the CPU has it. Each method runs in its own engine process, one after another:
no connector, ``ExampleConnector`` (safetensors files under a temporary directory) and
``StrataConnector`` on a CPU tier, and ``StrataConnector`` on a Redis tier alone (a
redis-server started for the run; the row is skipped without one), so its warm chunks
come from Redis only, and ``StrataConnector`` on a Redis Cluster tier alone
(``strata-redis-cluster``: 3 primaries with a replica each, redis-server processes started for
the run, ``cluster: true``), so its warm chunks come from the shards, and ``StrataConnector``
on a Mooncake Store tier alone (``strata-mooncake``: a mooncake_master and one store-server
process holding the pool's segment, started for the run; the engine contributes none,
``segment: 0``; the row is skipped without the Mooncake client), so its warm chunks come from
the store server's memory over loopback TCP. For every prompt length,
two distinct prompts are sent cold, then again warm (without a connector a repeat is just another cold request, so that
engine sends each prompt once); before every request vLLM's own prefix cache is reset
(``LLM.reset_prefix_cache()``), so a warm request is served by the connector or not at all.
Prefill is not chunked (``max_num_batched_tokens`` covers the longest prompt) in every
engine: ``ExampleConnector`` saves only the tokens of the step it runs in, so with an 8K
prompt split into two steps it stores half the prompt and then fails on load.
The time to first token is the wall time of a one-token ``generate``.

Printed: per method and length, the median cold (first, saving) and warm TTFT, the tokens
the warm request found cached, and the ratios the targets are about: Strata's warm TTFT
against ``ExampleConnector``'s warm TTFT, and Strata's first (saving) request against the
no-connector cold TTFT.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("none", "example", "strata", "strata-redis", "strata-redis-cluster", "strata-mooncake")
REDIS_METHODS = ("strata-redis", "strata-redis-cluster")  # a Redis tier alone: skipped without redis-server
MOONCAKE_SEGMENT = 2 << 30  # the store server's share of the pool: every chunk of the run fits (pages touched as used)


def make_model(path: Path, layers: int, hidden: int, dtype: str) -> None:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = tf.LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=16384, torch_dtype=dtype)
    tf.LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(path)


def prompt(length: int, index: int) -> list[int]:
    rng = random.Random(length * 100 + index)
    return [rng.randrange(1, 8000) for _ in range(length)]


def engine(args) -> None:
    """One engine, one method: prints a JSON line of timings."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the connector's store lives in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU default sizes it to most of the RAM
    from vllm import LLM, SamplingParams

    kwargs = {}
    if args.engine == "example":
        kwargs["kv_transfer_config"] = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                                        "kv_connector_extra_config": {"shared_storage_path": args.scratch}}
    elif args.engine == "strata":
        cfg = Path(args.scratch) / "store.yaml"
        cfg.write_text("tiers:\n  - kind: cpu\n    capacity: 4GiB\n")
    elif args.engine == "strata-redis":
        cfg = Path(args.scratch) / "store.yaml"
        cfg.write_text(f"tiers:\n  - kind: redis\n    url: {args.redis_url}\n    timeout_ms: 5000\n")
    elif args.engine == "strata-redis-cluster":
        cfg = Path(args.scratch) / "store.yaml"
        cfg.write_text(f"tiers:\n  - kind: redis\n    url: {args.redis_url}\n    cluster: true\n    timeout_ms: 5000\n")
    elif args.engine == "strata-mooncake":
        cfg = Path(args.scratch) / "store.yaml"
        m = json.loads(args.mooncake)  # the servers' addresses (MooncakeServers.url)
        cfg.write_text(f"tiers:\n  - kind: mooncake\n    master: {m['master']}\n    metadata_url: {m['metadata_url']}\n"
                       f"    admin_url: {m['admin_url']}\n    segment: 0\n    buffer: 512MiB\n    timeout_ms: 5000\n")
    if args.engine.startswith("strata"):
        from strata.integrations.vllm_plugin import kv_transfer_config

        kwargs["kv_transfer_config"] = kv_transfer_config(str(cfg))
    lengths = [int(x) for x in args.lengths.split(",")]
    llm = LLM(model=args.model, skip_tokenizer_init=True, enable_prefix_caching=True, dtype=args.dtype,
              max_model_len=max(lengths) + 64, max_num_batched_tokens=max(lengths) + 64, max_num_seqs=1,
              seed=0, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=1)

    def flush():
        if args.engine.startswith("strata"):
            from strata.kv.vllm import connectors

            for c in connectors():
                c.flush()

    def ttft(tokens):
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": tokens}], params, use_tqdm=False)[0]
        dt = time.perf_counter() - t0
        flush()  # a saving request's background puts finish before the next request is timed
        return dt, out.num_cached_tokens or 0, list(out.outputs[0].token_ids)

    ttft(prompt(256, 99))  # warm-up: first-call overheads are no one's prefill
    ttft(prompt(256, 99))
    result = {}
    for n in lengths:
        cold, warm, cached, tokens = [], [], [], []
        for i in range(args.repeats):
            dt, _, tok_cold = ttft(prompt(n, i))
            cold.append(dt)
            if args.engine == "none":
                continue
            dt, hit, tok_warm = ttft(prompt(n, i))
            warm.append(dt)
            cached.append(hit)
            tokens.append(tok_cold == tok_warm)
        result[n] = {"cold": statistics.median(cold), "warm": statistics.median(warm) if warm else None,
                     "cached": min(cached, default=0), "same_tokens": all(tokens)}
        print(f"{args.engine}: {n} tokens {result[n]}", file=sys.stderr, flush=True)
    if args.engine.startswith("strata"):
        from strata.kv.vllm import worker_connector

        worker = worker_connector()
        result["connector"] = worker.stats() if worker else None
    print("KV-BENCH " + json.dumps(result), flush=True)


class MooncakeServers:
    """A mooncake_master and a store server holding the pool (tests/mooncake_server.py): the
    engine is a client with no segment of its own. ``url``: their addresses, as JSON."""

    def __init__(self, scratch: Path):
        from mooncake_server import MooncakeMaster, StoreServer

        self.master = MooncakeMaster(scratch).start()
        try:
            self.server = StoreServer(self.master, MOONCAKE_SEGMENT).start()
        except BaseException:
            self.master.stop()
            raise
        self.url = json.dumps({"master": self.master.master, "metadata_url": self.master.metadata_url,
                               "admin_url": self.master.admin_url})

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            self.master.stop()


def mooncake_missing() -> str | None:
    """Why the strata-mooncake row cannot run here, or None."""
    try:
        import mooncake.store  # noqa: F401
    except ImportError as e:
        return f"the Mooncake client does not import: {e}"
    from mooncake_server import master_binary

    return None if master_binary() else "mooncake_master is missing from the mooncake package"


def redis_for(method: str, scratch: Path):
    """The servers a method's engine uses, started (tests/redis_server.py, tests/mooncake_server.py):
    one redis-server, a 3-primary cluster with a replica each, a mooncake master and store
    server, or None. Each has ``url`` and ``stop()``."""
    from redis_server import ClusterServers, RedisServer

    if method == "strata-redis":
        return RedisServer(scratch).start()
    if method == "strata-redis-cluster":
        return ClusterServers(scratch / "cluster", masters=3, replicas=1).start()
    if method == "strata-mooncake":
        return MooncakeServers(scratch)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096,8192", help="prompt lengths in tokens, comma separated")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=2, help="distinct prompts per length")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--engine", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    ap.add_argument("--mooncake", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        return engine(args)

    results = {}
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from redis_server import REDIS_SERVER

    methods = args.methods.split(",")
    for method in REDIS_METHODS:
        if method in methods and REDIS_SERVER is None:
            print(f"{method}: skipped (no redis-server on PATH)")
            methods.remove(method)
    if "strata-mooncake" in methods and (why := mooncake_missing()):
        print(f"strata-mooncake: skipped ({why})")
        methods.remove("strata-mooncake")
    with tempfile.TemporaryDirectory(prefix="strata-kv-bench-") as tmp:
        model = Path(tmp) / "model"
        make_model(model, args.layers, args.hidden, args.dtype)
        print(f"model: Llama, {args.layers} layers, hidden {args.hidden}, {args.dtype}; prompts {args.lengths} tokens, "
              f"{args.repeats} each; CPU threads {os.cpu_count()}", flush=True)
        for method in methods:
            scratch = Path(tmp) / method
            scratch.mkdir()
            server = redis_for(method, scratch)
            t0 = time.perf_counter()
            try:
                urls = ["--redis-url", server.url] if method in REDIS_METHODS else \
                    ["--mooncake", server.url] if method == "strata-mooncake" else []
                proc = subprocess.run([sys.executable, __file__, "--engine", method, "--model", str(model),
                                       "--scratch", str(scratch), "--lengths", args.lengths, "--dtype", args.dtype,
                                       "--repeats", str(args.repeats), *urls], capture_output=True, text=True)
            finally:
                if server is not None:
                    server.stop()
            lines = [l for l in proc.stdout.splitlines() if l.startswith("KV-BENCH ")]
            if proc.returncode or not lines:
                sys.exit(f"{method} engine failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            results[method] = json.loads(lines[-1].split(" ", 1)[1])
            print(f"  {method} engine done in {time.perf_counter() - t0:.0f} s", flush=True)

    lengths = args.lengths.split(",")
    print(f"\n{'method':20} {'tokens':>7} {'cold s':>8} {'warm s':>8} {'cached':>7} {'same':>5}")
    for method, row in results.items():
        for n in lengths:
            r = row[n]
            warm = "-" if r["warm"] is None else f"{r['warm']:8.3f}"
            print(f"{method:20} {n:>7} {r['cold']:8.3f} {warm:>8} {r['cached']:7d} {str(r['same_tokens']):>5}")
    if "strata" in results:
        s = results["strata"]
        print("\nstrata warm / ExampleConnector warm, strata first (saving) / no-connector cold:")
        for n in lengths:
            parts = [f"{n:>6} tokens"]
            if "example" in results:
                e = results["example"][n]
                parts.append(f"warm {s[n]['warm'] / e['warm']:5.2f}x (hits {s[n]['cached']} vs {e['cached']})")
            if "none" in results:
                parts.append(f"saving {s[n]['cold'] / results['none'][n]['cold']:5.2f}x")
            print("  ".join(parts))
        print("connector:", s.get("connector"))
    for method, alone in (("strata-redis", "Redis"), ("strata-redis-cluster", "Redis Cluster (3 shards)"),
                          ("strata-mooncake", "Mooncake Store (1 store server)")):
        if method not in results:
            continue
        r = results[method]
        print(f"\nstrata over {alone} alone, warm / no-connector cold (its own cold where no such engine ran; "
              "target at 4K tokens: <= 0.5x):")
        for n in lengths:
            base = results["none"][n]["cold"] if "none" in results else r[n]["cold"]
            print(f"{n:>6} tokens  warm {r[n]['warm']:.3f} s = {r[n]['warm'] / base:5.2f}x cold (hits {r[n]['cached']})")


if __name__ == "__main__":
    main()
