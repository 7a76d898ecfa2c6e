"""Serving with KV reuse, measured by vLLM's own benchmark client: Strata over a CPU tier, over
Redis, and over Redis 2 ms away, next to plain vLLM and vLLM's ExampleConnector, in one run.

    python benchmarks/serve_vllm.py                       # every method (CPU: ~20 min)
    python benchmarks/serve_vllm.py --before ae42948^     # plus Strata's rows at an older commit
    python benchmarks/serve_vllm.py --methods plain,strata-cpu --num-prompts 8   # a quick run

A Llama (8 layers, 512 wide, random weights, float32, a word-level tokenizer) is made locally.
Each method runs its own OpenAI-compatible server, one after another, with vLLM's prefix cache
off (the reuse measured is the connector's) and ``--enforce-eager`` (the same for all; compiled
mode is ``decode_vllm.py``'s subject): ``plain`` (no connector), ``example`` (ExampleConnector,
safetensors files under a temporary directory), ``strata-cpu`` (``strata serve --no-offload`` on a
CPU tier), ``strata-redis`` (a Redis tier alone, a redis-server started for the run) and
``strata-redis-2ms`` (the same behind ``latency_proxy.py``, 2 ms per round trip). The client is
``vllm.benchmarks.serve`` with dataset ``prefix_repetition`` (a few long prefixes shared by many
prompts with their own suffixes), ``--max-concurrency 4``. With ``--before REV`` the Strata rows
run again with Strata checked out at REV (a git worktree on PYTHONPATH).

Printed per method: mean and p99 time to first token, mean and p99 inter-token latency of the
running requests, request throughput, and the ratios the targets are about: p99 ITL with KV in
Redis against the same with a CPU tier (target <= 1.2x), and Strata's TTFT and throughput
against ExampleConnector's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("plain", "example", "strata-cpu", "strata-redis", "strata-redis-2ms")
KV_BYTES = str(2 << 30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not open after {limit_s} s")


def wait_healthy(port: int, proc: subprocess.Popen, log: Path, limit_s: float = 900) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"server not healthy after {limit_s} s:\n{log.read_text()[-4000:]}")


def server_argv(method: str, model: Path, port: int, work: Path, redis_url: str | None) -> list[str]:
    common = ["--port", str(port), "--no-enable-prefix-caching", "--enforce-eager", "--max-model-len", "2048",
              "--kv-cache-memory-bytes", KV_BYTES]
    if method == "plain":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *common]
    if method == "example":
        cfg = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"shared_storage_path": str(work / "example")}}
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *common,
                "--kv-transfer-config", json.dumps(cfg)]
    store = work / f"{method}.yaml"
    if method == "strata-cpu":
        store.write_text("tiers:\n  - kind: cpu\n    capacity: 2GiB\n")
    else:
        store.write_text(f"tiers:\n  - kind: redis\n    url: {redis_url}\n    timeout_ms: 500\n")
    return [sys.executable, "-m", "strata.cli", "serve", str(model), "--no-offload", "--config", str(store),
            "--", *common]


def run_client(model: Path, port: int, out_dir: Path, name: str, args) -> dict:
    from_module = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
                   "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                   "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
    argv = [sys.executable, "-c", from_module, "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
            "--model", str(model), "--dataset-name", "prefix_repetition",
            "--prefix-repetition-prefix-len", str(args.prefix_len), "--prefix-repetition-suffix-len",
            str(args.suffix_len), "--prefix-repetition-num-prefixes", str(args.num_prefixes),
            "--prefix-repetition-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
            "--max-concurrency", "4", "--ignore-eos", "--seed", "0", "--save-result", "--result-dir", str(out_dir),
            "--result-filename", f"{name}.json", "--percentile-metrics", "ttft,itl,tpot",
            "--metric-percentiles", "50,99"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"client failed for {name}:\n{proc.stderr[-4000:]}")
    return json.loads((out_dir / f"{name}.json").read_text())


def one(method: str, label: str, model: Path, work: Path, args, env: dict, redis_port: int | None) -> dict:
    port = free_port()
    extra_procs = []
    redis_url = None
    if method.startswith("strata-redis"):
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        subprocess.run(["redis-cli", "-p", str(redis_port), "FLUSHALL"], capture_output=True)
        if method.endswith("2ms"):
            proxy_port = free_port()
            proxy = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "latency_proxy.py"), str(proxy_port),
                                      str(redis_port), "2"])
            extra_procs.append(proxy)
            wait_port(proxy_port, proxy, 10)
            redis_url = f"redis://127.0.0.1:{proxy_port}/0"
    log = work / f"{label}.log"
    with open(log, "w") as f:
        server = subprocess.Popen(server_argv(method, model, port, work, redis_url), stdout=f,
                                  stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(port, server, log)
        result = run_client(model, port, work, label, args)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        for p in extra_procs:
            p.kill()
    return result


def row(name: str, r: dict) -> str:
    return (f"{name:<26}{r['mean_ttft_ms']:>10.0f}{r['p99_ttft_ms']:>10.0f}{r['mean_itl_ms']:>10.1f}"
            f"{r['p99_itl_ms']:>10.1f}{r['request_throughput']:>10.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--before", help="also run the Strata rows with Strata at this git revision")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--num-prefixes", type=int, default=4)
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: got {unknown}; allowed: {', '.join(METHODS)}")
    redis_server = shutil.which("redis-server")
    if any(m.startswith("strata-redis") for m in methods) and not redis_server:
        sys.exit("redis-server is not installed (apt-get install redis-server); drop the strata-redis methods")
    from strata.tiny import write_tiny_llama

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_tiny_llama(work / "model", layers=args.layers, hidden=args.hidden)
        redis_port, redis_proc = None, None
        if redis_server:
            redis_port = free_port()
            redis_proc = subprocess.Popen([redis_server, "--port", str(redis_port), "--save", "", "--appendonly", "no",
                                           "--maxmemory", "2gb", "--maxmemory-policy", "allkeys-lru"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(redis_port, redis_proc, 10)
        runs = [(m, m, dict(os.environ)) for m in methods]
        if args.before:
            before = work / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                           check=True, capture_output=True)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(before), os.environ.get("PYTHONPATH")]))}
            runs += [(m, f"{m}@before", env) for m in methods if m.startswith("strata")]
        try:
            for method, label, env in runs:
                results[label] = one(method, label, model, work, args, env, redis_port)
                r = results[label]
                print(f"{label}: TTFT mean {r['mean_ttft_ms']:.0f} ms, p99 ITL {r['p99_itl_ms']:.1f} ms, "
                      f"{r['request_throughput']:.3f} req/s", flush=True)
        finally:
            if redis_proc is not None:
                redis_proc.kill()
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "before")],
                               capture_output=True)
    print(f"\nLlama {args.layers} x {args.hidden}, prefix_repetition: {args.num_prompts} prompts over "
          f"{args.num_prefixes} prefixes of {args.prefix_len} tokens + {args.suffix_len}, {args.output_len} "
          "out, concurrency 4, vLLM's prefix cache off")
    print(f"{'method':<26}{'TTFT ms':>10}{'p99 TTFT':>10}{'ITL ms':>10}{'p99 ITL':>10}{'req/s':>10}")
    for name, r in results.items():
        print(row(name, r))
    for suffix in ("", "@before"):
        cpu, redis_, slow = (results.get(f"strata-{m}{suffix}") for m in ("cpu", "redis", "redis-2ms"))
        if cpu:
            for name, r in (("redis", redis_), ("redis-2ms", slow)):
                if r:
                    print(f"p99 ITL, Strata {name}{suffix} / cpu{suffix}: {r['p99_itl_ms'] / cpu['p99_itl_ms']:.2f}x "
                          "(target <= 1.2x)")
    ex, st = results.get("example"), results.get("strata-cpu")
    if ex and st:
        print(f"Strata cpu / ExampleConnector: mean TTFT {st['mean_ttft_ms'] / ex['mean_ttft_ms']:.2f}x, "
              f"throughput {st['request_throughput'] / ex['request_throughput']:.2f}x")


if __name__ == "__main__":
    main()
