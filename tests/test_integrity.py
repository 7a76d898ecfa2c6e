"""Stored bytes are checksummed: flipped, torn or foreign bytes are a miss and a counter."""

import os
from pathlib import Path

import torch

import strata
from strata import Key


def file_cfg(path):
    return {"tiers": [{"kind": "file", "path": str(path), "capacity": "16MiB"}]}


def object_files(path):
    return sorted(Path(path, "objects").glob("*/*.obj"))


def flip(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_payload_byte_in_file_tier_is_a_miss_and_counted(tmp_path):
    k = Key("kv", "m", "chunk")
    with strata.open_store(file_cfg(tmp_path)) as store:
        store.put(k, torch.arange(1000, dtype=torch.float32))
        (f,) = object_files(tmp_path)
        flip(f, 7)
        assert store.get(k) is None
        s = store.stats()["tiers"]["file"]
        assert s["checksum_failures"] == 1 and s["misses"] == 1
        assert not store.contains(k)  # dropped, not served again


def test_flipped_header_byte_is_discarded_on_restart(tmp_path):
    k = Key("kv", "m", "chunk")
    with strata.open_store(file_cfg(tmp_path)) as store:
        store.put(k, torch.arange(100, dtype=torch.int64))
    (f,) = object_files(tmp_path)
    data = bytearray(f.read_bytes())
    data[20] ^= 0x01  # inside the fixed header (sizes / checksum fields)
    f.write_bytes(bytes(data))
    with strata.open_store(file_cfg(tmp_path)) as store:
        assert store.get(k) is None
        assert store.stats()["tiers"]["file"]["discarded"] == 1
        assert not object_files(tmp_path)


def test_torn_file_and_interrupted_put_are_never_readable_after_restart(tmp_path):
    keys = [Key("kv", "m", str(i)) for i in range(3)]
    with strata.open_store(file_cfg(tmp_path)) as store:
        for i, k in enumerate(keys):
            store.put(k, torch.full((4096,), i, dtype=torch.int32))
    files = object_files(tmp_path)
    with open(files[0], "r+b") as f:  # a torn write: payload cut short
        f.truncate(os.path.getsize(files[0]) - 100)
    (tmp_path / "tmp" / "dead.tmp").write_bytes(b"half a put")  # an interrupted put
    with strata.open_store(file_cfg(tmp_path)) as store:
        got = [store.get(k) for k in keys]
        assert sum(g is None for g in got) == 1
        for i, g in enumerate(got):
            assert g is None or torch.equal(g, torch.full((4096,), i, dtype=torch.int32))
        s = store.stats()["tiers"]["file"]
        assert s["discarded"] == 1 and s["recovered"] == 2 and s["objects"] == 2
        assert s["bytes"] == sum(os.path.getsize(p) for p in object_files(tmp_path))
    assert not list((tmp_path / "tmp").iterdir())


def test_another_keys_file_in_place_is_a_miss(tmp_path):
    a, b = Key("kv", "m", "a"), Key("kv", "m", "b")
    with strata.open_store(file_cfg(tmp_path)) as store:
        store.put(a, torch.zeros(10))
        store.put(b, torch.ones(10))
        ea = store.tiers[0].index[a.encoded]
        eb = store.tiers[0].index[b.encoded]
        os.replace(eb.loc, ea.loc)  # b's bytes now sit where a's belong
        assert store.get(a) is None
        assert store.stats()["tiers"]["file"]["checksum_failures"] == 1


def test_flipped_byte_in_verified_cpu_tier_is_a_miss():
    with strata.open_store({"tiers": [{"kind": "cpu", "capacity": "1MiB", "verify": True}]}) as store:
        k = Key("kv", "m", "x")
        store.put(k, torch.arange(256, dtype=torch.int32))
        e = store.tiers[0].index[k.encoded]
        e.view[5] ^= 1
        assert store.get(k) is None
        assert store.stats()["tiers"]["cpu"]["checksum_failures"] == 1


def test_corrupt_lower_copy_falls_back_to_a_miss_not_wrong_bytes(tmp_path):
    cfg = {"tiers": [{"kind": "cpu", "capacity": "1MiB"}, {"kind": "file", "path": str(tmp_path), "capacity": "4MiB"}]}
    k = Key("kv", "m", "x")
    with strata.open_store(cfg) as store:
        store.put(k, torch.arange(512, dtype=torch.int32))
    flip(object_files(tmp_path)[0], 3)
    with strata.open_store(cfg) as store:  # CPU tier empty after restart: the read goes to the file
        assert store.get(k) is None
        assert store.stats()["tiers"]["file"]["checksum_failures"] == 1
