"""A failing tier degrades to misses and counters, never an exception to the caller."""

import shutil

import torch

import strata
from strata import Key


def chain(tmp_path, write="through"):
    return {"tiers": [{"kind": "cpu", "capacity": "64KiB", "write": write},
                      {"kind": "file", "path": str(tmp_path / "t"), "capacity": "1MiB"}]}


def test_file_tier_write_errors_are_counted_and_the_cpu_copy_still_serves(tmp_path):
    with strata.open_store(chain(tmp_path)) as store:
        shutil.rmtree(tmp_path / "t" / "tmp")
        (tmp_path / "t" / "tmp").write_text("not a directory")  # every write now fails
        k = Key("kv", "m", "x")
        assert store.put(k, torch.ones(100))
        assert torch.equal(store.get(k), torch.ones(100))
        s = store.stats()["tiers"]["file"]
        assert s["errors"] == 1 and s["objects"] == 0 and s["bytes"] == 0


def test_file_vanishing_under_the_index_is_a_miss(tmp_path):
    with strata.open_store({"tiers": [{"kind": "file", "path": str(tmp_path), "capacity": "1MiB"}]}) as store:
        k = Key("kv", "m", "x")
        store.put(k, torch.ones(100))
        shutil.rmtree(tmp_path / "objects")
        assert store.get(k) is None
        assert not store.get_into(k, torch.empty(100))
        s = store.stats()["tiers"]["file"]
        # Removed under the index (as another process's eviction does): a plain miss, not an I/O error.
        assert s["misses"] == 2 and s["errors"] == 0 and s["objects"] == 0 and s["bytes"] == 0


def test_write_back_to_a_failing_tier_keeps_serving_and_counts(tmp_path):
    with strata.open_store(chain(tmp_path, "back")) as store:
        shutil.rmtree(tmp_path / "t" / "tmp")
        (tmp_path / "t" / "tmp").write_text("x")
        for i in range(40):  # 40 x 4 KiB through a 64 KiB CPU tier: evictions must demote or drop
            assert store.put(Key("kv", "m", str(i)), torch.full((1024,), i, dtype=torch.int32))
        store.flush()
        s = store.stats()
        assert s["writeback"]["failed"] > 0 and s["writeback"]["dropped_dirty"] > 0
        got = store.get(Key("kv", "m", "39"))
        assert got is not None and got[0].item() == 39
