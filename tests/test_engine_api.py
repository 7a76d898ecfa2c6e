"""The engine's surface: modes, promotion, get_into checks, bad input, stats."""

import pytest
import torch

import strata
from strata import Key, StoreError


@pytest.fixture
def store(cpu_file_config):
    with strata.open_store(cpu_file_config()) as s:
        yield s


def test_modes_exact_prefer_and_promotion(store):
    k = Key("kv", "m", "x")
    v = torch.arange(64, dtype=torch.bfloat16).reshape(8, 8)
    store.put(k, v)
    store.tiers[0].retire(store.tiers[0].index[k.encoded])  # only the file copy remains
    assert store.get(k, mode="exact", tier="cpu") is None
    assert torch.equal(store.get(k, mode="exact", tier="file"), v)
    assert not store.contains(k, mode="exact", tier="cpu")  # exact never promotes
    assert torch.equal(store.get(k), v)  # chain: misses the cpu tier, hits the file, promotes
    assert store.contains(k, mode="exact", tier="cpu")
    cpu_hits = store.stats()["tiers"]["cpu"]["hits"]
    assert torch.equal(store.get(k, mode="prefer", tier="file"), v)  # file first although cpu has it
    assert store.stats()["tiers"]["cpu"]["hits"] == cpu_hits
    store.tiers[0].retire(store.tiers[0].index[k.encoded])
    assert torch.equal(store.get(k, mode="prefer", tier="file"), v)  # prefer promotes like chain
    assert store.contains(k, mode="exact", tier="cpu")
    assert store.stats()["tiers"]["cpu"]["promotions"] == 2


def test_get_into_checks_dtype_and_size_and_accepts_raw_bytes(store):
    k = Key("param", "m", "w")
    v = torch.randn(4, 5)
    store.put(k, v)
    out = torch.empty(4, 5)
    assert store.get_into(k, out) and torch.equal(out, v)
    flat = torch.empty(20)
    assert store.get_into(k, flat) and torch.equal(flat, v.reshape(-1))
    raw = torch.empty(80, dtype=torch.uint8)
    assert store.get_into(k, raw) and torch.equal(raw.view(torch.float32).reshape(4, 5), v)
    with pytest.raises(StoreError, match=r"out: got torch.float16 with 20 elements; allowed: torch.float32 with 20"):
        store.get_into(k, torch.empty(20, dtype=torch.float16))
    with pytest.raises(StoreError, match="contiguous"):
        store.get_into(k, torch.empty(5, 4).t())


def test_bad_calls_name_what_is_allowed(store):
    k = Key("kv", "m", "x")
    with pytest.raises(StoreError, match=r"mode: got 'nearest'; allowed: chain, exact, prefer"):
        store.get(k, mode="nearest")
    with pytest.raises(StoreError, match=r"tier \(mode='exact'\): got 'ssd'; allowed: cpu, file"):
        store.get(k, mode="exact", tier="ssd")
    with pytest.raises(StoreError, match=r"key: got tuple; allowed: strata.Key"):
        store.get(("kv", "m", "x"))
    with pytest.raises(StoreError, match=r"value: got list; allowed: torch.Tensor, bytes"):
        store.put(k, [1, 2, 3])
    with pytest.raises(StoreError, match=r"value: got layout"):
        store.put(k, torch.eye(3).to_sparse())
    with pytest.raises(StoreError, match=r"value: got a nested tensor; allowed: dense tensors"):
        store.put(k, torch.nested.as_nested_tensor([torch.ones(2), torch.ones(3)]))  # was a torch internal error
    with pytest.raises(StoreError, match=r"items\[0\]: got Key; allowed: a \(strata.Key, value\) pair"):
        store.put_many([k])  # was: cannot unpack non-iterable Key object
    with pytest.raises(StoreError, match=r"keys: got Key; allowed: a list of strata.Key \(for one key, the call"):
        store.get_many(k)  # was: 'Key' object is not iterable
    with pytest.raises(StoreError, match=r"keys\[1\]: got str; allowed: strata.Key"):
        store.contains_many([k, "x"])


def test_the_many_calls_take_any_iterable_of_keys(store):
    """get_many read a generator twice: once to check the keys, once to pair them with what it
    found, so it returned [] for a generator of keys that the store held."""
    ks = [Key("kv", "m", f"g{i}") for i in range(3)]
    assert store.put_many((k, torch.full((2,), float(i))) for i, k in enumerate(ks)) == [True] * 3
    got = store.get_many(k for k in ks)
    assert [t.tolist() for t in got] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    assert store.contains_many(iter(ks)) == [True] * 3
    with store.lease_many(k for k in ks) as views:
        assert len(views) == 3 and all(v is not None for v in views)


def test_values_keep_dtype_shape_and_bytes_roundtrip(store):
    cases = {
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 7),
        "bool": torch.tensor([True, False, True]),
        "noncontig": torch.arange(12).reshape(3, 4).t(),
    }
    for name, v in cases.items():
        assert store.put(Key("kv", "m", name), v)
        got = store.get(Key("kv", "m", name))
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), name
    store.put(Key("kv", "m", "raw"), b"\x00\x01bytes")
    assert store.get(Key("kv", "m", "raw")) == b"\x00\x01bytes"
    assert sorted(k.name for k in store.keys("kv")) == sorted([*cases, "raw"])


def test_closed_store_refuses_calls(cpu_file_config):
    s = strata.open_store(cpu_file_config())
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get(Key("kv", "m", "x"))


def test_stats_show_tiers_namespaces_and_writeback(cpu_file_config):
    with strata.open_store(cpu_file_config(write="back")) as s:
        s.put(Key("kv", "m", "a"), torch.zeros(10))
        s.get(Key("kv", "m", "a"))
        s.get(Key("param", "m", "missing"))
        s.flush()
        st = s.stats()
    assert set(st) == {"tiers", "namespaces", "writeback"}
    assert st["namespaces"]["kv"]["hits"] == 1 and st["namespaces"]["param"]["misses"] == 1
    assert st["tiers"]["cpu"]["namespaces"]["kv"]["objects"] == 1
    assert st["tiers"]["file"]["objects"] == 1 and st["writeback"]["flushed"] == 1
    for field in ("bytes", "objects", "hits", "misses", "evictions", "checksum_failures"):
        assert field in st["tiers"]["cpu"]
