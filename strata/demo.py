"""``strata demo``: the main job on the embedded default (the cpu preset), with tiny Llamas made
locally. First ``strata.offload`` on a transformers model: its decoder layers live in the store and
stream back per forward, and the greedy tokens are checked against the model without Strata. Then,
when vLLM is installed, the whole story in one vLLM engine: weights offloaded with ``--load-format
strata`` and prompt KV saved to and reused from the same store, with the outputs, the hit rates and
where the bytes lived."""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from strata.report import format_stats
from strata.store.engine import open_store


def _tiny_llama():
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise SystemExit("strata demo needs transformers: pip install transformers") from None
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def run_demo(config=None) -> int:
    ok = offload_demo(config)
    try:
        from strata.integrations.vllm_version import check_vllm

        check_vllm()
    except Exception as e:  # noqa: BLE001 - vLLM missing or unsupported: the first half still ran
        print(f"\nvLLM part skipped: {e}")
        return 0 if ok else 1
    return 0 if vllm_demo(config) and ok else 1


def offload_demo(config=None) -> bool:
    from strata.offload import offload

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _tiny_llama()
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t0 = time.perf_counter()
        want = model.to(device).generate(ids.to(device), max_new_tokens=24, do_sample=False, pad_token_id=0)
        plain_s = time.perf_counter() - t0
    with open_store(config) as store:
        print(f"store: {store!r}; model: tiny Llama, 8 layers, {sum(p.numel() for p in model.parameters()):,} "
              f"parameters, on {device}")
        handle = offload(model, store=store, device=device, prefetch=1)
        print(handle.placement())
        with torch.no_grad():
            t0 = time.perf_counter()
            got = model.generate(ids.to(device), max_new_tokens=24, do_sample=False, pad_token_id=0)
            offload_s = time.perf_counter() - t0
        same = torch.equal(got.cpu(), want.cpu())
        stats = handle.stats()
        print(f"generate 24 tokens: {plain_s:.3f} s in place, {offload_s:.3f} s streamed from the store")
        print("offload stats:", json.dumps({k: v for k, v in stats.items() if k != "wait_seconds_by_block"},
                                            default=str))
        print(format_stats(store.stats()))
        handle.detach()
    print("greedy tokens:", "identical to the model without Strata" if same else "MISMATCH")
    return same


def vllm_demo(config=None) -> bool:
    """One vLLM engine, weights streamed from the store and prompt KV reused from it; two rounds of
    the same four requests (a shared 512-word preamble, each its own question). vLLM's own prefix
    cache is off, so every reused token was loaded from the store."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: its stats are ours
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams

    from strata.integrations.vllm_loader import handles
    from strata.integrations.vllm_plugin import kv_transfer_config
    from strata.kv.vllm import connectors, worker_connector
    from strata.tiny import sentence, write_tiny_llama

    print("\n== vLLM: weights offloaded and prompt KV reused, one store ==")
    with tempfile.TemporaryDirectory(prefix="strata-demo-") as tmp:
        model = write_tiny_llama(os.path.join(tmp, "model"), layers=6, hidden=256)
        store_cfg = config or "cpu"
        llm = LLM(model=str(model), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                  enable_prefix_caching=False, kv_cache_memory_bytes=1 << 30,  # not vLLM's CPU default, 90% of RAM
                  load_format="strata", model_loader_extra_config={"config": store_cfg, "gpu_budget": "12MiB"},
                  kv_transfer_config=kv_transfer_config(store_cfg))
        preamble = sentence(512, seed=1)
        prompts = [f"{preamble} {sentence(40, seed=10 + i)}" for i in range(4)]
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        rounds = []
        for name in ("cold", "warm"):
            t0 = time.perf_counter()
            out = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            for c in connectors():
                c.flush()
            total = sum(len(r.prompt_token_ids) for r in out)
            cached = sum(r.num_cached_tokens or 0 for r in out)
            rounds.append([r.outputs[0].text for r in out])
            print(f"{name} round: 4 requests in {dt:.2f} s, {cached}/{total} prompt tokens "
                  f"({cached / total:.0%}) loaded from the store instead of computed")
        for i, text in enumerate(rounds[1]):
            print(f"  request {i}: ...{prompts[i][-30:]!r} -> {text.strip()!r}")
        (handle,) = handles()
        print(handle.placement())
        stats = handle.stats()
        print(f"weights: {stats['offloaded_blocks']} of {stats['blocks']} layers streamed, "
              f"{stats['bytes_streamed'] / 2**20:.0f} MiB over {stats['forwards']} forwards")
        worker = worker_connector()
        kv = worker.stats()
        print(f"KV: {kv['chunks_saved']} chunks saved, {kv['chunks_loaded']} loaded "
              f"({kv['tokens_loaded']} tokens)")
        print(format_stats(handle.store.stats()))
        same = rounds[0] == rounds[1]
        one = worker.store is handle.store
        print("warm outputs:", "identical to the cold round" if same else "MISMATCH",
              "| weights and KV in one StorageEngine:", one)
        del llm
    return same and one
