"""``strata demo``: the main job on the embedded default — a tiny Llama made locally, its
decoder layers offloaded into the store (default CPU tier) and streamed back per forward,
with the greedy tokens checked against the model run without Strata."""

from __future__ import annotations

import json
import time

import torch

from strata.cli import format_stats
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
    return 0 if same else 1
