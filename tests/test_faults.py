"""A failing tier degrades to misses and counters, never an exception to the caller."""

import shutil

import pytest
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


@pytest.mark.parametrize("then", ["flush", "close"])
def test_a_write_back_object_whose_flush_failed_is_written_by_the_next_flush_or_at_close(tmp_path, then):
    """A flush that fails (the tier below refuses for a while) leaves the object dirty above; the
    next ``flush()``, and ``close()``, write it down again, so a fault that passed loses nothing
    acknowledged (it used to stay dirty in the cpu tier, out of every queue, and go with it)."""
    cfg = chain(tmp_path, "back")
    k, v = Key("param", "m", "x"), torch.arange(1000, dtype=torch.int32)
    tmp = tmp_path / "t" / "tmp"
    with strata.open_store(cfg) as store:
        shutil.rmtree(tmp)
        tmp.write_text("not a directory")  # the file tier's writes fail until it is a directory again
        assert store.put(k, v)
        store.flush()  # fails, and so does its second try
        assert store.stats()["writeback"]["failed"] == 2
        assert store.get(k, mode="exact", tier="file") is None
        tmp.unlink()
        tmp.mkdir()
        if then == "flush":
            store.flush()
            assert torch.equal(store.get(k, mode="exact", tier="file"), v)
    with strata.open_store(cfg) as store:
        assert torch.equal(store.get(k), v)
