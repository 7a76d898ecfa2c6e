"""One vLLM engine (CPU build) with the Strata connector: runs prompts several times, prints JSON.

    python tests/vllm_job.py MODEL_DIR STORE_YAML RUNS [--no-connector] [--concurrent] [--prefix-cache]
                             [--same-prompts] [--redis-fault JSON] [--eager] [--offload JSON] [--compiled]
                             [--engine-stats] [--layerwise]

With --prefix-cache vLLM's own prefix cache is on and reset (``LLM.reset_prefix_cache()``)
before every run, so a repeat is served by the connector, not by vLLM's GPU-side cache.
With --same-prompts every run sends run 0's prompts. With --redis-fault '{"pid": P, "argv": [...]}'
the Redis server P is killed after run 0 and started again from ``argv`` after run 1.
With --engine-stats the LLM logs stats (``disable_log_stats=False``) and the output carries
``strata.kv.vllm.engine_stats(llm)`` as this process received it through vLLM's stats plumbing.
With --layerwise the connector runs in layer-wise mode (``strata.layerwise``: hits load within the
step that computes on them, through vLLM's ``wait_for_layer_load`` / ``save_kv_layer`` hooks).
With --offload '{"gpu_budget": ...}' the weights load with ``--load-format strata`` and that
extra config, eagerly unless --compiled is given (vLLM's compiled mode: the static ring); --eager
runs eagerly without it.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: its store is ours


def prompts(run: int):
    """Run 0: a 640-token and a 300-token prompt. Run 1 repeats them and adds a prompt that
    shares only the first 300 tokens of the first one, then diverges; run 2 is one more such
    prompt, alone."""
    import random

    rng = random.Random(7)
    shared = [rng.randrange(1, 500) for _ in range(600)]
    first = shared + [rng.randrange(1, 500) for _ in range(40)]
    second = [rng.randrange(1, 500) for _ in range(300)]
    diverging = shared[:300] + [rng.randrange(1, 500) for _ in range(340)]
    alone = shared[:300] + [rng.randrange(1, 500) for _ in range(200)]
    return [[first, second], [first, second, diverging], [alone]][run]


def concurrent_prompts():
    """16 requests over 4 shared 512-token prefixes, each with its own 100-token tail."""
    import random

    rng = random.Random(11)
    prefixes = [[rng.randrange(1, 500) for _ in range(512)] for _ in range(4)]
    return [prefixes[i % 4] + [rng.randrange(1, 500) for _ in range(100)] for i in range(16)]


def redis_fault(run: int, out: dict) -> None:
    """Kill the Redis server after run 0; start it again (empty) after run 1."""
    import signal
    import subprocess
    import time

    if "--redis-fault" not in sys.argv:
        return
    fault = json.loads(sys.argv[sys.argv.index("--redis-fault") + 1])
    if run == 0:
        os.kill(fault["pid"], signal.SIGKILL)
        time.sleep(0.5)
    elif run == 1:
        proc = subprocess.Popen(fault["argv"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out["redis_pid"] = proc.pid  # outlives this process: the test stops it
        time.sleep(2.0)  # up, and past the tier's back-off


# vLLM's CPU default reserves 90% of RAM for the KV cache and refuses to start when less is free
# (another test's engine still exiting is enough); these models need a few MiB of it.
KV_CACHE_BYTES = 1 << 30


def main():
    model_dir, store_cfg, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    use_connector = "--no-connector" not in sys.argv
    from vllm import LLM, SamplingParams

    kwargs = {}
    if use_connector:
        from strata.integrations.vllm_plugin import kv_transfer_config

        kwargs["kv_transfer_config"] = kv_transfer_config(store_cfg, chunk_size=256)
        if "--layerwise" in sys.argv:
            kwargs["kv_transfer_config"]["kv_connector_extra_config"]["strata.layerwise"] = True
    if "--offload" in sys.argv:
        kwargs.update(load_format="strata", model_loader_extra_config=json.loads(sys.argv[sys.argv.index("--offload") + 1]))
    if ("--offload" in sys.argv or "--eager" in sys.argv) and "--compiled" not in sys.argv:
        kwargs["enforce_eager"] = True
    concurrent = "--concurrent" in sys.argv
    prefix_cache = "--prefix-cache" in sys.argv
    if "--engine-stats" in sys.argv:
        kwargs["disable_log_stats"] = False
    llm = LLM(model=model_dir, skip_tokenizer_init=True, enable_prefix_caching=prefix_cache, max_model_len=1024,
              max_num_seqs=16 if concurrent else 4, dtype="float32", seed=0, kv_cache_memory_bytes=KV_CACHE_BYTES,
              **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1)
    out = {"runs": [], "logprobs": [], "cached": [], "reset": []}
    for run in range(runs):
        if prefix_cache:
            out["reset"].append(llm.reset_prefix_cache())
        batch = concurrent_prompts() if concurrent else prompts(0 if "--same-prompts" in sys.argv else run)
        results = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        out["runs"].append([list(r.outputs[0].token_ids) for r in results])
        out["cached"].append([r.num_cached_tokens or 0 for r in results])
        out["logprobs"].append([[step[t].logprob for t, step in zip(r.outputs[0].token_ids, r.outputs[0].logprobs)]
                                for r in results])
        if use_connector:
            from strata.kv.vllm import connectors, worker_connector

            for c in connectors():
                c.flush()
            out.setdefault("per_run", []).append(worker_connector().stats())
        redis_fault(run, out)
    if "--engine-stats" in sys.argv:
        from strata.kv.vllm import engine_stats

        out["engine_stats"] = engine_stats(llm)
    if use_connector:
        from strata.kv.vllm import connectors, worker_connector

        worker = worker_connector()
        out["connector"] = worker.stats() if worker else None
        out["block_size"] = worker.block_size if worker else None
        out["store"] = worker.store.stats() if worker else None
        out["same_engine"] = len({id(c.store) for c in connectors()}) == 1
        out["layer_waits"] = worker.worker_half.layer_waits if worker else None
    if "--offload" in sys.argv:
        from strata.integrations.vllm_loader import handles
        from strata.kv.vllm import connectors

        (handle,) = handles()
        out["offload"] = handle.stats()
        out["store"] = handle.store.stats()
        out["one_engine_for_weights_and_kv"] = not use_connector or {id(c.store) for c in connectors()} == {id(handle.store)}
    print("STRATA-JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
