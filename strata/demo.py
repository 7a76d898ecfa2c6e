"""``strata demo``: the store serving weight blocks and KV chunks side by side."""

from __future__ import annotations

import torch
from tqdm import tqdm

from strata.cli import format_stats
from strata.keys import Key, make_scope
from strata.store.engine import open_store


def run_demo(config=None) -> int:
    scope = make_scope(model="demo-tiny", dtype="float32")
    with open_store(config) as store:
        print(store)
        blocks = {f"layers.{i}": torch.randn(256, 256) for i in range(8)}
        for name, w in tqdm(blocks.items(), desc="weights -> store", unit="block"):
            store.put(Key("param", scope, name), w)
        chunks = {f"chunk{i}": torch.randn(2, 16, 64) for i in range(32)}
        for name, kv in tqdm(chunks.items(), desc="kv chunks -> store", unit="chunk"):
            store.put(Key("kv", scope, name), kv)
        ok = all(torch.equal(store.get(Key("param", scope, n)), w) for n, w in blocks.items())
        ok &= all(torch.equal(store.get(Key("kv", scope, n)), c) for n, c in chunks.items())
        print(format_stats(store.stats()))
        print("round trip:", "every byte back" if ok else "MISMATCH")
    return 0 if ok else 1
