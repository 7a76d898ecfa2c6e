"""The cxl tier on a mapped file: crash consistency under SIGKILL, two processes on one
region, and clear errors. (The engine's property test covers it alone and under a CPU tier.)"""

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

import strata
from strata import ConfigError
from strata.store.tiers.pins import RangePins
from regions import assert_exact_accounting

CHILD = r"""
import sys, torch, strata
path, mode, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "32MiB"}]})

def value(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(int(torch.randint(16, 50_000, (1,), generator=g)), generator=g)

if mode == "crash":  # put forever; say each index once its put has returned
    i = first
    print("ready", flush=True)
    while True:
        print(f"start {i}", flush=True)
        assert store.put(strata.Key("kv", "crash", f"k{i % 40}"), value(i))
        print(f"done {i}", flush=True)
        i += 1
else:  # share: read what the parent wrote, write our own, exit
    for i in range(10):
        got = store.get(strata.Key("param", "share", f"p{i}"))
        assert got is not None and torch.equal(got, value(1000 + i)), f"p{i}"
    for i in range(20):
        assert store.put(strata.Key("kv", "share", f"c{i}"), value(i))
    print("written", flush=True)
"""


def value(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(int(torch.randint(16, 50_000, (1,), generator=g)), generator=g)


def cxl_tier(store):
    return next(t for t in store.tiers if t.kind == "cxl")


def test_objects_survive_sigkill_at_random_moments_and_nothing_torn_is_readable(tmp_path):
    path = str(tmp_path / "region")
    cfg = {"tiers": [{"kind": "cxl", "path": path, "size": "32MiB"}]}
    rng = random.Random(3)
    latest: dict[str, int] = {}  # key -> index of its last put that returned
    first, kills = 0, 0
    for _ in range(10):
        child = subprocess.Popen([sys.executable, "-c", CHILD, path, "crash", str(first)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        in_flight = None
        for line in out.splitlines():
            what, i = line.split()
            if what == "start":
                in_flight = int(i)
            else:
                latest[f"k{int(i) % 40}"] = int(i)
                in_flight = None
        kills += 1
        with strata.open_store(cfg) as store:
            for name in {f"k{i}" for i in range(40)}:
                got = store.get(strata.Key("kv", "crash", name))
                allowed = [latest[name]] if name in latest else []
                if in_flight is not None and f"k{in_flight % 40}" == name:
                    allowed.append(in_flight)  # committed just before the kill, or not at all
                if got is None:
                    assert name not in latest, f"{name}: a put that returned was lost"
                else:
                    match = [i for i in allowed if torch.equal(got, value(i))]
                    assert match, f"{name}: torn or stale bytes"
                    latest[name] = match[-1]  # an in-flight put that committed is the value from now on
            assert_exact_accounting(cxl_tier(store))
            assert cxl_tier(store).stats()["checksum_failures"] == 0
        if in_flight is not None:  # the next child starts after every index this one may have used
            first = in_flight + 1
        else:
            first = max(latest.values(), default=-1) + 1
    assert kills == 10 and len(latest) >= 10


def in_region(tier, view) -> bool:
    start = tier.bytes.data_ptr()
    return start <= view.data_ptr() < start + tier.bytes.numel()


@pytest.fixture(params=[True, False], ids=["pins", "no-pins"])
def pins(request, monkeypatch):
    """Whether regions take cross-process pins; without (a file that refuses the locks), leases
    of cxl objects must be copies."""
    if not request.param:
        monkeypatch.setattr(RangePins, "_probe", lambda self: (False, "refused by the test"))
    elif not RangePins(os.open(os.devnull, os.O_RDONLY)).supported:
        pytest.skip("this platform has no open file description locks")
    return request.param


@pytest.mark.parametrize("above", [False, True], ids=["cxl-only", "cpu-above"])
def test_a_lease_keeps_its_bytes_while_another_process_reuses_the_space(tmp_path, above, pins):
    """Another process sharing the region may delete a leased object and put other bytes. With
    pins the lease is a view of the region (zero-copy) whose record no other process's put
    takes; without, it is a checked copy (promoted to the cpu tier above, or private). Either
    way the view keeps its bytes. (Two stores on one region file act as two processes: the
    region lock and the pins belong to an open file.)"""
    region = {"kind": "cxl", "path": str(tmp_path / "r"), "size": "4MiB"}
    mine = strata.open_store({"tiers": ([{"kind": "cpu", "capacity": "1MiB"}] if above else []) + [region]})
    other = strata.open_store({"tiers": [region]})
    try:
        k, k2 = strata.Key("kv", "lease", "k"), strata.Key("kv", "lease", "other")
        want = torch.full((4096,), 7, dtype=torch.int32)
        assert other.put(k, want)  # in the region only
        with mine.lease(k) as view:
            assert torch.equal(view, want)
            assert in_region(cxl_tier(mine), view) == pins
            assert other.delete(k)
            assert other.put(k2, torch.full((4096,), 9, dtype=torch.int32))  # freed space, unless pinned
            assert torch.equal(view, want)
        with mine.lease_many([k2]) as (view,):
            assert view is not None and int(view[0]) == 9
        assert cxl_tier(mine).stats()["pins"]["held"] == 0
    finally:
        mine.close()
        other.close()


def test_space_a_lease_pins_is_not_reused_until_it_is_released(tmp_path):
    """A put of another process that fits only where a deleted object is still leased is refused
    (counted in ``passed_over``), and takes that space once the lease is given back."""
    region = {"kind": "cxl", "path": str(tmp_path / "r"), "size": "1MiB"}
    mine, other = strata.open_store({"tiers": [region]}), strata.open_store({"tiers": [region]})
    try:
        k, k2 = strata.Key("kv", "pin", "k"), strata.Key("kv", "pin", "k2")
        big = torch.arange(600 << 10, dtype=torch.uint8)  # more than half the region: one fits
        assert other.put(k, big)
        with mine.lease(k) as view:
            assert in_region(cxl_tier(mine), view)
            assert other.delete(k)
            assert not other.put(k2, torch.ones(600 << 10, dtype=torch.uint8))
            assert cxl_tier(other).stats()["pins"]["passed_over"] >= 1
            assert torch.equal(view, big)
        assert other.put(k2, torch.ones(600 << 10, dtype=torch.uint8))
        assert torch.equal(mine.get(k2), torch.ones(600 << 10, dtype=torch.uint8)) and mine.get(k) is None
    finally:
        mine.close()
        other.close()


@pytest.mark.parametrize("copies", [True, False], ids=["lease", "static-ring-lease"])
def test_a_leased_object_deleted_here_is_gone_for_every_process_at_once_and_never_comes_back(
        tmp_path, pins, copies):
    """A delete of an object this process still leases takes it out of the region at once (its
    bytes stay for the lease): another process no longer sees it, and this one's next look at
    the slot table (after another process's change) does not index it again. (It did: the slot
    stayed committed until the lease ended.)"""
    region = {"kind": "cxl", "path": str(tmp_path / "r"), "size": "4MiB"}
    mine, other = strata.open_store({"tiers": [region]}), strata.open_store({"tiers": [region]})
    try:
        k, x = strata.Key("kv", "gone", "k"), strata.Key("kv", "gone", "x")
        want = torch.full((1000,), 7.0)
        assert mine.put(k, want)
        with mine.lease_many([k], copies=copies) as (view,):
            assert mine.delete(k)
            assert not other.contains(k) and other.get(k) is None
            assert other.put(x, torch.ones(10))  # a change: mine re-reads the slot table
            assert not mine.contains(k) and mine.get(k) is None and mine.keys() == [x]
            if pins or copies:  # without pins another process may reuse bytes leased in place
                assert torch.equal(view, want)
        assert not mine.contains(k) and not other.contains(k)
        assert mine.put(k, torch.full((1000,), 8.0)) and torch.equal(other.get(k), torch.full((1000,), 8.0))
    finally:
        mine.close()
        other.close()


def test_this_processs_puts_never_take_the_bytes_of_a_lease_another_process_removed(tmp_path, pins):
    """Another process deletes an object this one leases in place (the static ring's way, which
    leases in place with or without pins); once this process has seen the delete, its own puts
    still leave those bytes alone until the lease ends."""
    region = {"kind": "cxl", "path": str(tmp_path / "r"), "size": "1MiB"}
    mine, other = strata.open_store({"tiers": [region]}), strata.open_store({"tiers": [region]})
    try:
        k, y = strata.Key("kv", "gone", "k"), strata.Key("kv", "gone", "y")
        want = torch.arange(600 << 10, dtype=torch.uint8)
        assert mine.put(k, want)
        with mine.lease_many([k], copies=False) as (view,):
            assert in_region(cxl_tier(mine), view)
            assert other.delete(k)
            assert not mine.contains(k)  # seen here
            assert not mine.put(y, torch.ones(600 << 10, dtype=torch.uint8))  # only k's bytes would fit
            assert torch.equal(view, want)
        assert mine.put(y, torch.ones(600 << 10, dtype=torch.uint8))
        assert torch.equal(other.get(y), torch.ones(600 << 10, dtype=torch.uint8))
    finally:
        mine.close()
        other.close()


LEASER = r"""
import sys, time, strata
store = strata.open_store({"tiers": [{"kind": "cxl", "path": sys.argv[1], "size": "1MiB"}]})
with store.lease(strata.Key("kv", "pin", "k")) as view:
    assert view is not None
    print("leased", flush=True)
    time.sleep(600)
"""


def test_the_pins_of_a_killed_process_go_with_it(tmp_path):
    """Pins are locks the kernel holds for the process: SIGKILL leaves none behind."""
    path = str(tmp_path / "r")
    with strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "1MiB"}]}) as store:
        k, k2 = strata.Key("kv", "pin", "k"), strata.Key("kv", "pin", "k2")
        assert store.put(k, torch.arange(600 << 10, dtype=torch.uint8))
        child = subprocess.Popen([sys.executable, "-c", LEASER, path], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "leased"
            assert store.delete(k)
            assert not store.put(k2, torch.ones(600 << 10, dtype=torch.uint8))  # the child's lease pins it
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        assert store.put(k2, torch.ones(600 << 10, dtype=torch.uint8))


def test_an_object_removed_between_the_lookup_and_the_pin_is_a_miss_never_other_bytes(tmp_path, monkeypatch):
    """The pin is taken, then the slot read again: an index that has not yet seen another
    process replace an object (its sync held back here, as in the window between a lookup and
    the pin) gives a miss, not the bytes now in that space."""
    region = {"kind": "cxl", "path": str(tmp_path / "r"), "size": "4MiB"}
    mine, other = strata.open_store({"tiers": [region]}), strata.open_store({"tiers": [region]})
    try:
        k, k2 = strata.Key("kv", "race", "k"), strata.Key("kv", "race", "k2")
        assert other.put(k, torch.full((4096,), 7, dtype=torch.int32))
        assert mine.contains(k)  # indexed here
        assert other.delete(k) and other.put(k2, torch.full((4096,), 9, dtype=torch.int32))  # into its space
        monkeypatch.setattr(cxl_tier(mine), "_sync", lambda force=False: 0)
        with mine.lease(k) as view:
            assert view is None
        assert mine.get(k) is None or torch.equal(mine.get(k), torch.full((4096,), 7, dtype=torch.int32))
    finally:
        mine.close()
        other.close()


def test_contains_and_keys_see_what_another_process_put_and_deleted(tmp_path):
    """The index of a shared region is brought up to date before ``contains`` answers (a KV
    lookup of chunks another vLLM server saved), not only before a read."""
    region = {"kind": "cxl", "path": str(tmp_path / "r"), "size": "4MiB"}
    mine, other = strata.open_store({"tiers": [region]}), strata.open_store({"tiers": [region]})
    try:
        k = strata.Key("kv", "seen", "k")
        assert not mine.contains(k)
        assert other.put(k, torch.ones(64))
        assert mine.contains(k) and mine.contains_many([k]) == [True] and mine.keys() == [k]
        assert other.delete(k)
        assert not mine.contains(k) and mine.keys() == []
    finally:
        mine.close()
        other.close()


def test_two_processes_share_one_region_bit_for_bit(tmp_path):
    path = str(tmp_path / "region")
    cfg = {"tiers": [{"kind": "cxl", "path": path, "size": "32MiB"}]}
    with strata.open_store(cfg) as store:
        for i in range(10):
            assert store.put(strata.Key("param", "share", f"p{i}"), value(1000 + i))
        # the other process opens the region while this one still has it open
        out = subprocess.run([sys.executable, "-c", CHILD, path, "share", "0"], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0 and "written" in out.stdout, out.stderr[-3000:]
        for i in range(20):
            got = store.get(strata.Key("kv", "share", f"c{i}"))
            assert got is not None and torch.equal(got, value(i)), f"c{i}"
        # this process's allocator learned of the other's objects: new puts never overlap them
        for i in range(10, 20):
            assert store.put(strata.Key("param", "share", f"p{i}"), value(1000 + i))
        assert_exact_accounting(cxl_tier(store))
        for i in range(20):
            assert torch.equal(store.get(strata.Key("kv", "share", f"c{i}")), value(i))
            assert torch.equal(store.get(strata.Key("param", "share", f"p{i}")), value(1000 + i))


def test_a_corrupted_payload_is_a_miss_and_counted(tmp_path):
    path = tmp_path / "region"
    cfg = {"tiers": [{"kind": "cxl", "path": str(path), "size": "4MiB"}]}
    key = strata.Key("kv", "s", "x")
    with strata.open_store(cfg) as store:
        assert store.put(key, torch.arange(4096, dtype=torch.int32))
        tier = cxl_tier(store)
        e = tier.index[key.encoded]
        e.view.view(torch.uint8)[100] ^= 0xFF  # a stray write into the mapping
        assert store.get(key) is None
        assert tier.stats()["checksum_failures"] == 1
    with strata.open_store(cfg) as store:
        assert store.get(key) is None  # dropped for good, not served after a restart


def test_reset_wipes_the_region_and_bad_settings_name_the_field(tmp_path):
    path = str(tmp_path / "region")
    key = strata.Key("kv", "s", "x")
    with strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "4MiB"}]}) as store:
        store.put(key, b"kept")
    with strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "4MiB"}]}) as store:
        assert store.get(key) == b"kept"
    with strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "4MiB", "reset": True}]}) as store:
        assert store.get(key) is None
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.size: missing"):
        strata.open_store({"tiers": [{"kind": "cxl", "path": path}]})
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.path"):
        strata.open_store({"tiers": [{"kind": "cxl", "size": "4MiB"}]})
    with pytest.raises(ConfigError, match="cannot open"):
        strata.open_store({"tiers": [{"kind": "cxl", "path": str(tmp_path / "no" / "dir" / "r"), "size": "4MiB"}]})
    other = tmp_path / "other"
    other.write_bytes(b"not a region" + bytes(8 << 20))
    with pytest.raises(ConfigError, match="holds something other than a Strata region"):
        strata.open_store({"tiers": [{"kind": "cxl", "path": str(other), "size": "4MiB"}]})  # never overwritten
    assert other.read_bytes().startswith(b"not a region")
    with strata.open_store({"tiers": [{"kind": "cxl", "path": str(other), "size": "4MiB", "reset": True}]}) as store:
        assert store.put(key, b"x") and store.get(key) == b"x"


def test_numa_node_binds_the_region_or_says_why_not(tmp_path, caplog):
    import ctypes.util

    from strata.store.numa import node_exists

    with strata.open_store({"tiers": [{"kind": "cxl", "path": str(tmp_path / "a"), "size": "4MiB",
                                       "numa_node": 0}]}) as store:
        numa = cxl_tier(store).stats()["numa"]
        assert numa["node"] == 0
        if node_exists(0) and ctypes.util.find_library("numa"):
            assert numa["bound"], numa["reason"]
        assert store.put(strata.Key("kv", "s", "x"), b"on node 0") and store.get(strata.Key("kv", "s", "x"))
    with strata.open_store({"tiers": [{"kind": "cxl", "path": str(tmp_path / "b"), "size": "4MiB",
                                       "numa_node": 4095}]}) as store:  # absent: a warning, never a crash
        numa = cxl_tier(store).stats()["numa"]
        assert not numa["bound"] and "NUMA node 4095 does not exist" in numa["reason"]
        assert "does not exist" in caplog.text
        assert store.put(strata.Key("kv", "s", "x"), b"anywhere") and store.get(strata.Key("kv", "s", "x"))
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.numa_node: got -1"):
        strata.open_store({"tiers": [{"kind": "cxl", "path": str(tmp_path / "c"), "size": "4MiB", "numa_node": -1}]})


class FakeCudart:
    """Stands in for torch.cuda.cudart() on a machine without CUDA: records what is asked."""

    def __init__(self, code):
        self.code, self.registered, self.unregistered = code, [], []

    def cudaHostRegister(self, ptr, size, flags):
        self.registered.append((ptr, size, flags))
        return self.code

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


@pytest.mark.parametrize("code", [0, 1])
def test_the_mapping_is_registered_with_cuda_or_says_why_not(tmp_path, monkeypatch, caplog, code):
    from strata.store import cudahost

    fake = FakeCudart(code)
    monkeypatch.setattr(cudahost, "_cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    store = strata.open_store({"tiers": [{"kind": "cxl", "path": str(tmp_path / "r"), "size": "4MiB"}]})
    tier = cxl_tier(store)
    ptr = tier.bytes.data_ptr()
    assert fake.registered == [(ptr, 4 << 20, cudahost.REGISTER_PORTABLE)]
    cuda = tier.stats()["cuda"]
    assert cuda["registered"] is (code == 0) and tier.pinned is (code == 0)
    if code:  # refused: a warning, copies stay pageable, serving goes on
        assert "cudaError 1" in cuda["reason"] and "refused" in caplog.text
    key = strata.Key("kv", "s", "x")
    assert store.put(key, torch.arange(100.0)) and torch.equal(store.get(key), torch.arange(100.0))
    store.close()
    assert fake.unregistered == ([ptr] if code == 0 else [])


def test_without_cuda_the_mapping_stays_pageable_and_pin_never_skips_it(tmp_path):
    with strata.open_store({"tiers": [{"kind": "cxl", "path": str(tmp_path / "a"), "size": "4MiB"}]}) as store:
        cuda = cxl_tier(store).stats()["cuda"]
        if not torch.cuda.is_available():
            assert cuda == {"registered": False, "reason": "no CUDA device: host-to-device copies are not needed"}
    with strata.open_store({"tiers": [{"kind": "cxl", "path": str(tmp_path / "b"), "size": "4MiB",
                                       "pin": "never"}]}) as store:
        assert "cuda" not in cxl_tier(store).stats() and not cxl_tier(store).pinned
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.pin: got 'sometimes'"):
        strata.open_store({"tiers": [{"kind": "cxl", "path": str(tmp_path / "c"), "size": "4MiB", "pin": "sometimes"}]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the GPU machine)")
@pytest.mark.parametrize("verify", [True, False])
def test_get_into_the_gpu_from_the_registered_mapping(tmp_path, verify):
    cfg = {"tiers": [{"kind": "cxl", "path": str(tmp_path / "r"), "size": "64MiB", "verify": verify}]}
    with strata.open_store(cfg) as store:
        assert cxl_tier(store).stats()["cuda"]["registered"], cxl_tier(store).stats()["cuda"]["reason"]
        values = [torch.randn(1 << 18) for _ in range(8)]
        for i, v in enumerate(values):
            assert store.put(strata.Key("kv", "gpu", f"c{i}"), v)
        out = torch.empty(1 << 18, device="cuda")
        for i, v in enumerate(values):
            assert store.get_into(strata.Key("kv", "gpu", f"c{i}"), out)
            assert torch.equal(out.cpu(), v)
        torch.cuda.synchronize()
        assert cxl_tier(store).stats()["checksum_failures"] == 0


# -- issue #16: a shared region keeps other processes' namespaces; a small tmpfs is refused, not SIGBUS ----

FOREIGN = r"""
import sys, torch, strata
path, role = sys.argv[1], sys.argv[2]

def value(i):
    return torch.arange(i * 1000, i * 1000 + 4096 + i, dtype=torch.float32)

if role in ("A", "A2", "C"):  # knows the namespace
    strata.register_namespace("embeddings")
store = strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "32MiB"}]})
tier = store.tiers[0]
if role in ("A", "A2"):  # A2: a second batch, put while B has the region open
    first = 0 if role == "A" else 5
    for i in range(first, first + 5):
        assert store.put(strata.Key("embeddings", "e", f"o{i}"), value(i))
    print("put", flush=True)
elif role == "B":  # never registers it: opens, then waits for the parent before its own puts and gets
    print("opened", tier.stats().get("foreign_namespaces"), flush=True)
    sys.stdin.readline()
    for i in range(20):
        assert store.put(strata.Key("kv", "b", f"k{i}"), value(100 + i))  # _sync runs on each _alloc
    for i in range(20):
        assert torch.equal(store.get(strata.Key("kv", "b", f"k{i}")), value(100 + i))
    s = tier.stats()
    print("done", s.get("foreign_namespaces"), s["namespaces"].get("embeddings", {}).get("objects"), flush=True)
else:  # C: reads A's objects bit for bit
    for i in range(10):
        got = store.get(strata.Key("embeddings", "e", f"o{i}"))
        assert got is not None, f"o{i} lost"
        assert torch.equal(got, value(i)), f"o{i} differs"
    print("read", tier.stats().get("foreign_namespaces"), flush=True)
store.close()
"""


def run_role(path, role):
    out = subprocess.run([sys.executable, "-c", FOREIGN, path, role], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{role}: {out.stderr[-3000:]}"
    return out.stdout.split()


def test_a_process_that_never_registered_a_namespace_keeps_its_objects_in_a_shared_region(tmp_path):
    path = str(tmp_path / "region")
    assert run_role(path, "A") == ["put"]
    b = subprocess.Popen([sys.executable, "-c", FOREIGN, path, "B"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        opened = b.stdout.readline().split()
        assert opened == ["opened", "5"], (opened, b.stderr.read()[-3000:] if not opened else "")
        assert run_role(path, "A2") == ["put"]  # B sees these at its next sync, on _alloc
        out, err = b.communicate("go\n", timeout=300)
    finally:
        if b.poll() is None:
            b.kill()
            b.wait()
    assert b.returncode == 0, err[-3000:]
    assert out.split() == ["done", "10", "10"]  # indexed and counted, never cleared
    assert run_role(path, "C") == ["read", "0"]


def test_objects_of_an_unregistered_namespace_are_evicted_by_policy_like_any_other(tmp_path):
    path = str(tmp_path / "region")
    fill = ("import sys, torch, strata\nstrata.register_namespace('foreign-evict')\n"
            "s = strata.open_store({'tiers': [{'kind': 'cxl', 'path': sys.argv[1], 'size': '4MiB'}]})\n"
            "for i in range(6):\n    assert s.put(strata.Key('foreign-evict', 's', f'o{i}'), torch.zeros(100_000))\n"
            "s.close()\n")
    out = subprocess.run([sys.executable, "-c", fill, path], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "foreign-evict" not in strata.keys.namespaces()
    with strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "4MiB"}]}) as store:
        tier = cxl_tier(store)
        assert tier.stats()["foreign_namespaces"] == 6 and tier.stats()["namespaces"]["foreign-evict"]["objects"] == 6
        e = next(iter(tier.index.values()))
        room = tier.data_size // tier.allocator.rounded(e.size)  # objects of this size the region holds
        for i in range(room):  # as many of this process's own: every foreign object makes way
            assert store.put(strata.Key("kv", "s", f"k{i}"), torch.ones(100_000))
        assert tier.stats()["evictions"] == 6 and tier.stats()["foreign_namespaces"] == 0
        for i in range(room):
            assert torch.equal(store.get(strata.Key("kv", "s", f"k{i}")), torch.ones(100_000))
        assert_exact_accounting(tier)


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs mounted for the test (needs root); unmounted afterwards whatever happens."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {got.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:  # still mapped by a failed test: detach it
            subprocess.run(["umount", "-l", str(mnt)], check=True)


SMALL = r"""
import sys, torch, strata
try:
    store = strata.open_store({"tiers": [{"kind": "cxl", "path": sys.argv[1], "size": "64MiB"}]})
except strata.ConfigError as e:
    print("refused:", e, flush=True)
    sys.exit(0)
for i in range(32):  # 32 MiB into a region the filesystem cannot back: the old code dies here with SIGBUS
    store.put(strata.Key("kv", "s", f"k{i}"), torch.zeros(1 << 18))
print("stored", flush=True)
"""


def test_a_region_larger_than_its_filesystem_is_refused_at_open_not_killed_by_sigbus(small_tmpfs):
    import os

    from strata.config import format_size

    path = str(small_tmpfs / "region")
    out = subprocess.run([sys.executable, "-c", SMALL, path], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode} (-{int(signal.SIGBUS)} is SIGBUS): {out.stderr[-2000:]}"
    st = os.statvfs(small_tmpfs)
    msg = out.stdout
    assert msg.startswith("refused:"), msg
    assert "tiers[cxl].size" in msg and "64.0 MiB" in msg and path in msg, msg
    assert format_size(st.f_bavail * st.f_frsize) in msg and "8.0 MiB" in msg, msg
    assert not os.path.exists(path)  # the open created it, so the refusal removed it
    with strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "4MiB"}]}) as store:  # one that fits
        for i in range(12):
            assert store.put(strata.Key("kv", "s", f"k{i}"), torch.full((1 << 16,), float(i)))
        for i in range(12):
            assert torch.equal(store.get(strata.Key("kv", "s", f"k{i}")), torch.full((1 << 16,), float(i)))


def test_without_fallocate_the_free_space_is_checked_instead(small_tmpfs, monkeypatch):
    import errno
    import os

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    path = str(small_tmpfs / "region")
    with pytest.raises(ConfigError, match=r"tiers\[cxl\]\.size: .*64\.0 MiB") as err:
        strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "64MiB"}]})
    assert path in str(err.value) and "8.0 MiB" in str(err.value)
    assert not os.path.exists(path)
    with strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "4MiB"}]}) as store:
        assert store.put(strata.Key("kv", "s", "x"), b"fits") and store.get(strata.Key("kv", "s", "x")) == b"fits"


def test_a_region_in_memory_larger_than_the_ram_available_is_refused_not_oom_killed(tmp_path, monkeypatch):
    """A region file under /dev/shm takes RAM when its space is reserved, and a tmpfs may be sized
    above the RAM that is free: the cpu_cxl preset's 16 GiB region got a new user's process
    OOM-killed on a 24 GiB machine with 13 GiB available. Refused at open instead, naming what fits
    (the filesystem and the RAM available are stood in for here)."""
    from strata.store import memfs

    monkeypatch.setattr(memfs, "ram_backed", lambda path: "tmpfs")
    monkeypatch.setattr(memfs, "available_ram", lambda: 600 << 20)
    path = str(tmp_path / "region")
    with pytest.raises(ConfigError, match=r"tiers\[cxl\]\.size: got 256\.0 MiB .*a file in memory \(tmpfs\)") as err:
        strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "256MiB"}]})
    assert "600.0 MiB available" in str(err.value) and "at most 88.0 MiB" in str(err.value)
    assert not os.path.exists(path)  # what this open created is removed
    with strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "64MiB"}]}) as store:
        assert store.put(strata.Key("kv", "s", "x"), b"fits")
    with strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "64MiB"}]}) as store:
        assert store.get(strata.Key("kv", "s", "x")) == b"fits"  # reserved already: nothing more to take


def test_create_false_opens_an_existing_region_and_never_creates_one(tmp_path):
    import os

    from strata.config_load import load_config
    from strata.store.tiers import build_tier
    from strata.store.tiers.cxl import CxlTier
    from strata.store.tiers.cxl_region import RegionAbsent

    path = tmp_path / "region"
    cfg = load_config({"tiers": [{"kind": "cxl", "path": str(path), "size": "4MiB"}]})
    with pytest.raises(RegionAbsent, match=str(path)) as err:
        CxlTier(cfg.tiers[0], cfg, create=False)
    assert isinstance(err.value, strata.errors.StoreError) and "tiers[cxl].path" in str(err.value)
    with pytest.raises(RegionAbsent):
        build_tier(cfg.tiers[0], cfg, create=False)
    assert not path.exists()
    path.write_bytes(b"")  # a file holding no region yet: still nothing to look at, and left as it was
    with pytest.raises(RegionAbsent, match="no Strata region"):
        CxlTier(cfg.tiers[0], cfg, create=False)
    assert path.read_bytes() == b""
    os.unlink(path)
    key = strata.Key("kv", "s", "x")
    with strata.open_store(cfg) as store:
        assert store.put(key, b"there")
    tier = build_tier(cfg.tiers[0], cfg, create=False)
    try:
        assert tier.stats()["objects"] == 1 and key.encoded in tier.index
    finally:
        tier.close()


# -- capacity below the region size, and records damaged while the store was closed --------------


def test_a_capacity_below_the_region_size_evicts_or_refuses_like_the_cpu_tier(tmp_path):
    """8 MiB region, 256 KiB capacity: 40 puts of 64 KiB. The old code filled the region (2.6 MB
    held, nothing evicted) and reported the region size as its capacity."""
    tier_cfg = {"kind": "cxl", "path": str(tmp_path / "region"), "size": "8MiB", "capacity": "256KiB", "pin": "never"}
    cfg = {"tiers": [tier_cfg], "namespaces": {"param": {"evict": "never"}}}
    with strata.open_store(cfg) as store:
        tier = cxl_tier(store)
        assert tier.stats()["capacity"] == 256 << 10
        for i in range(40):
            k, v = strata.Key("kv", "s", f"k{i}"), torch.full((16384,), float(i))
            assert store.put(k, v) and torch.equal(store.get(k), v)
            assert tier.stats()["bytes"] <= 256 << 10
        assert tier.stats()["evictions"] >= 37 and tier.stats()["rejected"] == 0
        for i in range(40):
            store.delete(strata.Key("kv", "s", f"k{i}"))
        taken = [store.put(strata.Key("param", "s", f"p{i}"), torch.full((16384,), float(i))) for i in range(6)]
        assert taken == [True] * 3 + [False] * 3  # three records of 64 KiB and a header fit, never evicted
        assert tier.stats()["rejected"] == 3 and tier.stats()["bytes"] <= 256 << 10
        for i in range(3):
            assert torch.equal(store.get(strata.Key("param", "s", f"p{i}")), torch.full((16384,), float(i)))
        assert_exact_accounting(tier)


def _records(store, *keys):
    """(offset, length) of each key's record in the region, read while the store is open."""
    tier = cxl_tier(store)
    return [(tier.index[k.encoded].loc[1], tier.index[k.encoded].size) for k in keys]


def _pwrite(path, data: bytes, offset: int) -> None:
    import os

    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _pread(path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def test_records_whose_header_fails_at_open_are_counted_discarded_with_one_warning(tmp_path, caplog):
    """A flipped header byte and garbage over a header, made while the store was closed: the old
    code cleared both at open and counted nothing."""
    path = str(tmp_path / "region")
    cfg = {"tiers": [{"kind": "cxl", "path": path, "size": "4MiB", "pin": "never"}]}
    a, b, c = (strata.Key("kv", "s", n) for n in "abc")
    with strata.open_store(cfg) as store:
        for i, k in enumerate((a, b, c)):
            assert store.put(k, torch.full((512,), float(i)))
        (off_a, _), (off_c, _) = _records(store, a, c)
    _pwrite(path, bytes([_pread(path, off_a, 1)[0] ^ 0x01]), off_a)
    _pwrite(path, b"not a strata record " * 4, off_c)
    with caplog.at_level("WARNING", logger="strata.cxl"), strata.open_store(cfg) as store:
        s = cxl_tier(store).stats()
        assert s["discarded"] == 2 and s["objects"] == 1 and s["recovered"] == 1
        assert store.get(a) is None and store.get(c) is None
        assert torch.equal(store.get(b), torch.full((512,), 1.0))
    warned = [r.getMessage() for r in caplog.records if r.name == "strata.cxl"]
    assert len(warned) == 1 and "2 records" in warned[0] and "discarded" in warned[0], warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="strata.cxl"), strata.open_store(cfg) as store:
        assert cxl_tier(store).stats()["discarded"] == 0  # cleared once, not found again
    assert not [r for r in caplog.records if r.name == "strata.cxl"]


@pytest.mark.parametrize("first", ["victim", "other"])
def test_another_keys_record_put_over_a_keys_bytes_is_discarded_never_served(tmp_path, first):
    """b's record put over a's bytes while a's slot still stood (b's slot moved there, as a put
    that took a's bytes leaves it): a slot names no key, so the region sees two records of b in one
    place. The slot that lost its record is counted discarded, whichever slot is newer; a is a
    miss, b keeps its value. The old code cleared it with no counter."""
    from strata.store.tiers import cxl_region as cxl

    path = str(tmp_path / "region")
    cfg = {"tiers": [{"kind": "cxl", "path": path, "size": "4MiB", "pin": "never"}]}
    a, b = strata.Key("kv", "s", "a"), strata.Key("kv", "s", "b")
    va, vb = torch.zeros(512), torch.ones(512)
    with strata.open_store(cfg) as store:
        for k, v in ((a, va), (b, vb)) if first == "victim" else ((b, vb), (a, va)):
            assert store.put(k, v)
        (off_a, len_a), (off_b, len_b) = _records(store, a, b)
        slot_b, _, seq_b = cxl_tier(store).index[b.encoded].loc
    assert len_a == len_b
    _pwrite(path, _pread(path, off_b, len_b), off_a)
    _pwrite(path, cxl.SLOT.pack(cxl.commit_word(off_a, len_b, seq_b), off_a, len_b, seq_b),
            cxl.SLOTS_AT + slot_b * cxl.SLOT.size)
    with strata.open_store(cfg) as store:
        s = cxl_tier(store).stats()
        assert s["discarded"] == 1 and s["twins"] == 0 and s["objects"] == 1  # one place: no crash explains it
        assert store.get(a) is None and not store.contains(a)
        assert torch.equal(store.get(b), vb)
        assert_exact_accounting(cxl_tier(store))


@pytest.mark.parametrize("same", [False, True], ids=["another-value", "same-value"])
def test_an_older_version_left_committed_by_a_crash_is_cleared_but_not_counted(tmp_path, same):
    """A put that replaced k and died before clearing k's older slot leaves two records of k: the
    newer wins, the older (another value, so a version, not damage) is cleared without a count. Of
    the very same value (a KV chunk saved again) the region cannot tell it from a copy: counted,
    and counted a twin, so a soak tells it from damage no crash explains."""
    from strata.store.tiers import cxl_region as cxl

    path = str(tmp_path / "region")
    cfg = {"tiers": [{"kind": "cxl", "path": path, "size": "4MiB", "pin": "never"}]}
    k = strata.Key("kv", "s", "k")
    with strata.open_store(cfg) as store:
        assert store.put(k, torch.zeros(512))
        slot, off, seq = cxl_tier(store).index[k.encoded].loc
        length = cxl_tier(store).index[k.encoded].size
        assert store.put(k, torch.zeros(512) if same else torch.ones(512))
    _pwrite(path, cxl.SLOT.pack(cxl.commit_word(off, length, seq), off, length, seq),
            cxl.SLOTS_AT + slot * cxl.SLOT.size)  # the older slot as the crash left it: committed
    with strata.open_store(cfg) as store:
        s = cxl_tier(store).stats()
        assert (s["discarded"], s["twins"], s["objects"]) == ((1, 1, 1) if same else (0, 0, 1))
        assert torch.equal(store.get(k), torch.zeros(512) if same else torch.ones(512))


RACER = r"""
import sys, torch, strata
path, me, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "8MiB"}]})
latest = {}
for r in range(rounds):
    k = strata.Key("kv", me, f"k{r % 16}")
    v = torch.full((int(1000 + (r * 7919) % 60_000),), float(r))
    if r % 5 == 4:
        store.delete(k)
        latest[k] = None
    elif store.put(k, v):
        latest[k] = v
    for key, want in latest.items():  # never another version's bytes, never a deleted object
        got = store.get(key)
        assert got is None or (want is not None and torch.equal(got, want)), (me, r, key)
print("ok", store.stats()["tiers"]["cxl"]["region_waits"], flush=True)
store.close()
"""


def test_two_processes_putting_and_deleting_at_once_never_read_wrong_bytes(tmp_path):
    """Two processes put, replace and delete their own keys in one small region at the same time
    (each put evicts by policy, either process's objects; each waits for the other's region lock
    outside its chain lock): every read returns the reader's newest value of the key or a miss."""
    path = str(tmp_path / "region")
    strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "8MiB"}]}).close()
    procs = [subprocess.Popen([sys.executable, "-c", RACER, path, f"p{i}", "300"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "ok" in out, err[-3000:]
    with strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "8MiB"}]}) as store:
        assert_exact_accounting(cxl_tier(store))


def test_a_put_is_never_refused_for_a_region_another_process_keeps_busy(tmp_path):
    """Another process (a store of its own descriptor: the region lock excludes it as it would a
    process) puts back to back from three threads, so the region lock is free only for moments:
    a put here waits for it as long as it takes, never refused with the region near empty (it
    was refused after 16 waits in a row, and a write-through to the region was lost with it)."""
    import threading

    cfg = {"tiers": [{"kind": "cxl", "path": str(tmp_path / "region"), "size": "16MiB"}]}
    with strata.open_store(cfg) as mine, strata.open_store(cfg) as other:
        stop = threading.Event()
        theirs: list[bool] = []

        def hammer(t):
            i = 0
            while not stop.is_set():
                theirs.append(other.put(strata.Key("kv", f"other{t}", str(i % 40)), torch.full((1024,), i)))
                i += 1

        threads = [threading.Thread(target=hammer, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        try:
            refused = [i for i in range(400) if not mine.put(strata.Key("kv", "mine", str(i % 40)), torch.full((1024,), i))]
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert cxl_tier(mine).stats()["region_waits"] > 0  # the region was busy, and waited for
        assert refused == [] and all(theirs), (refused, theirs.count(False))
        assert cxl_tier(mine).stats()["rejected"] == 0


def test_a_promotion_into_the_cxl_tier_syncs_its_index_under_the_chain_lock(tmp_path, monkeypatch):
    """A read that hits the file tier below promotes into the cxl tier above; looking the key up
    there brings the cxl index up to date with the region (``_sync``), which must hold the chain
    lock like every other change to an index."""
    cfg = {"tiers": [{"kind": "cxl", "path": str(tmp_path / "region"), "size": "8MiB"},
                     {"kind": "file", "path": str(tmp_path / "files"), "capacity": "8MiB"}]}
    with strata.open_store(cfg) as store:
        k = strata.Key("kv", "promote", "a")
        assert store.put(k, value(1))
        tier = cxl_tier(store)
        with store.chain.lock:
            tier.retire(tier.lookup(k.encoded))  # only the file tier holds it now
        unlocked: list[str] = []
        real = tier._sync

        def sync(force=False):
            if not store.chain.lock._is_owned():
                unlocked.append("sync")
            return real(force)

        monkeypatch.setattr(tier, "_sync", sync)
        assert torch.equal(store.get(k), value(1))
        assert unlocked == [] and tier.counters.promotions == 1
        assert torch.equal(store.get(k, mode="exact", tier="cxl"), value(1))


# -- processes sharing a region over a file tier they share too: writes down are the owner's ------

def _over_files(tmp_path) -> dict:
    """A small write-back region over a file tier with room for everything (``evict: lower``)."""
    return {"tiers": [{"kind": "cxl", "path": str(tmp_path / "region"), "size": "1MiB", "write": "back"},
                      {"kind": "file", "path": str(tmp_path / "files"), "capacity": "64MiB"}],
            "namespaces": {"kv": {"evict": "lower"}}}


def _fill(store, name: str, n: int) -> None:
    """Puts of ``n`` 100 KB objects: the 1 MiB region evicts all the time."""
    for i in range(n):
        assert store.put(strata.Key("kv", name, str(i)), torch.full((25_000,), float(i)))


def _in_region(store, key) -> bool:
    with store.chain.lock:
        return cxl_tier(store).lookup(key.encoded) is not None


def test_another_processs_object_not_yet_written_below_is_left_to_it_then_evicted_unwritten(tmp_path):
    """Store ``b`` (a process of its own: its own descriptor, locks and index) needs the room that
    ``a``'s object takes, which ``a``'s flusher has not written to the files yet: ``b`` keeps it
    rather than write it down itself (unordered with ``a``'s own writes of the key, that write
    landed an older version over a newer one, or brought back a deleted object). Once ``a`` wrote
    it and marked it so, ``b`` evicts it without writing it again."""
    cfg = _over_files(tmp_path)
    with strata.open_store(cfg) as a, strata.open_store(cfg) as b, \
            strata.open_store({"tiers": [cfg["tiers"][1]]}) as files:
        go = threading.Event()
        flush = a.chain.writeback._flush_many
        a.chain.writeback._flush_many = lambda batch: (go.wait(60), flush(batch))[1]
        x = strata.Key("kv", "a", "x")
        try:
            assert a.put(x, value(1))  # dirty in the region until a's flusher goes on
            _fill(b, "b", 30)
            assert _in_region(b, x) and not files.contains(x)
            assert cxl_tier(a).stats()["unwritten_owned"] == 1
        finally:
            go.set()
        a.flush()
        assert files.contains(x) and cxl_tier(a).stats()["unwritten_owned"] == 0
        with b.chain.lock:
            assert cxl_tier(b).written_below(cxl_tier(b).lookup(x.encoded))
        _fill(b, "b2", 30)
        assert not _in_region(b, x)
        digest = hashlib.sha256(x.encoded).hexdigest()
        assert len(list((tmp_path / "files").rglob(f"{digest}-*"))) == 1  # written once, by a
        assert torch.equal(b.get(x), value(1)) and torch.equal(a.get(x), value(1))


OWNER = r"""
import sys, time, torch, strata
cfg = {"tiers": [{"kind": "cxl", "path": sys.argv[1] + "/region", "size": "1MiB", "write": "back"},
                 {"kind": "file", "path": sys.argv[1] + "/files", "capacity": "64MiB"}],
       "namespaces": {"kv": {"evict": "lower"}}}
store = strata.open_store(cfg)
store.chain.writeback._flush_many = lambda batch: time.sleep(3600)  # never written down
assert store.put(strata.Key("kv", "owner", "x"), torch.arange(20_000, dtype=torch.float32))
print("put", flush=True)
time.sleep(3600)
"""


def test_what_a_killed_process_never_wrote_below_is_written_down_by_the_process_that_evicts_it(tmp_path):
    """The owner's claim on an object it has not written below is a lock the kernel drops with the
    process: while it lives another process leaves the object to it; once it is killed, the process
    that evicts the object writes it down itself, so nothing of the dead process is lost."""
    cfg = _over_files(tmp_path)
    x = strata.Key("kv", "owner", "x")
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().split() == ["put"], owner.stderr.read()[-3000:]
        with strata.open_store(cfg) as b, strata.open_store({"tiers": [cfg["tiers"][1]]}) as files:
            _fill(b, "b", 30)
            assert _in_region(b, x) and not files.contains(x)  # its owner lives: left to it
            owner.kill()
            owner.wait(60)
            _fill(b, "b2", 30)
            assert not _in_region(b, x) and files.contains(x)
            assert torch.equal(b.get(x), torch.arange(20_000, dtype=torch.float32))
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


# -- a sync reads only the slots that changed -------------------------------------------------------

def _synced_state(tier) -> tuple:
    """What a sync decides, in a form two syncs can be compared by: the index (key -> slot and seq,
    and slot -> key), the bytes held, the free extents and the free slots."""
    return ({k: tier._slot_of.get(k) for k in tier.index}, dict(tier._key_at), tier.used,
            sorted(tier.allocator._start.items()), frozenset(tier._free_slots))


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "put", "put", "delete", "lease", "release", "get", "burst"]),
                              st.integers(0, 1), st.integers(0, 11), st.integers(1, 60_000)), min_size=10, max_size=80))
def test_a_sync_of_the_changed_slots_alone_agrees_with_a_whole_rescan(tmp_path_factory, ops):
    """Two processes (stores of their own descriptors) put, replace, delete, lease and read keys of
    one small region, so each put evicts the other's objects too and leases keep removed bytes
    (and now and then makes more changes than the change log keeps, 300 puts). After every step each
    store syncs the slots that changed since its last sync (``_index_slots``);
    at about one step in three (so that such syncs also build on one another) that is checked to
    leave the index, the bytes held, the free extents and the free slots exactly as a rescan of the
    whole table and a rebuild of the allocator (``_sync(force=True)``) then find them."""
    path = str(tmp_path_factory.mktemp("sync") / "region")
    cfg = {"tiers": [{"kind": "cxl", "path": path, "size": "1MiB"}]}
    with strata.open_store(cfg) as a, strata.open_store(cfg) as b, contextlib.ExitStack() as leases:
        stores, held = (a, b), [[], []]
        for op, who, k, n in ops:
            store, key = stores[who], strata.Key("kv", "s", str(k))
            if op == "put":
                store.put(key, torch.full((n // 4 + 1,), float(n)))
            elif op == "delete":
                store.delete(key)
            elif op == "lease":
                cm = store.lease(key)
                cm.__enter__()
                held[who].append(cm)
            elif op == "release" and held[who]:
                held[who].pop().__exit__(None, None, None)
            elif op == "get":
                got = store.get(key)
                assert got is None or bool((got == got[0]).all())
            elif op == "burst":  # more changes than the region's change log keeps
                for i in range(300):
                    store.put(strata.Key("kv", f"burst{who}", str(i)), torch.full((16,), float(i)))
            for s in stores:
                tier = cxl_tier(s)
                with s.chain.lock:
                    tier._sync()
                    if (n + who) % 3 == 0:  # else syncs of changed slots follow one another unchecked
                        changed = _synced_state(tier)
                        tier._sync(force=True)
                        assert _synced_state(tier) == changed
        for cms in held:
            for cm in cms:
                leases.callback(cm.__exit__, None, None, None)


@pytest.mark.parametrize("whole", [False, True], ids=["changed-slots", "whole-table"])
def test_a_put_committed_but_not_yet_published_is_never_indexed_by_another_threads_sync(tmp_path, whole):
    """A put's record is committed in the region before the put publishes it, and the threads of a
    process share its hold of the region lock, so another thread may sync in that window. A sync
    that read the whole table took the record for another process's object and indexed it; the
    put's publish then retired that copy, which cleared the put's own slot: the put returned True
    and its object was gone for every other process and after a restart."""
    cfg = {"tiers": [{"kind": "cxl", "path": str(tmp_path / "region"), "size": "4MiB"}]}
    k, want = strata.Key("kv", "window", "k"), torch.arange(1000.0)
    with strata.open_store(cfg) as mine, strata.open_store(cfg) as other:
        tier, written, go = cxl_tier(mine), threading.Event(), threading.Event()
        write = tier.write
        tier.write = lambda e, data: (write(e, data), written.set(), go.wait(30))[0]
        putter = threading.Thread(target=lambda: mine.put(k, want))
        putter.start()
        try:
            assert written.wait(30)
            with mine.chain.lock:  # a change this process has not followed yet (another thread's, say)
                if whole:
                    tier.generation = -1  # lost track: the next sync reads every slot
                else:
                    tier.generation -= 1
            assert not mine.contains(strata.Key("kv", "window", "absent"))  # the sync, in the window
        finally:
            go.set()
            putter.join(30)
        assert other.contains(k) and torch.equal(other.get(k), want)
    with strata.open_store(cfg) as again:
        assert torch.equal(again.get(k), want)


# -- regions of an older format, and processes of an older Strata on one ----------------------------

def test_a_region_of_format_version_1_opens_with_its_objects_and_is_marked_version_2(tmp_path):
    """Version 1 (before the change log and the written-below marks) has the same layout: its
    objects are kept, not wiped, and the region says version 2 from then on, so an older Strata,
    which would ignore the log and the marks, refuses it. A version this code does not know is
    refused with the field and the way out named."""
    import struct

    path = str(tmp_path / "region")
    cfg = {"tiers": [{"kind": "cxl", "path": path, "size": "4MiB"}]}
    keys = [strata.Key("kv", "v1", str(i)) for i in range(5)]
    with strata.open_store(cfg) as store:
        for i, k in enumerate(keys):
            assert store.put(k, torch.full((1000,), float(i)))
    _pwrite(path, struct.pack("<I", 1), 8)
    _pwrite(path, bytes(2048), 2048)  # and no change log, as version 1 left it
    with strata.open_store(cfg) as store, strata.open_store(cfg) as other:
        assert struct.unpack("<I", _pread(path, 8, 4)) == (2,)
        for i, k in enumerate(keys):
            assert torch.equal(store.get(k), torch.full((1000,), float(i)))
        assert other.delete(keys[3]) and other.put(keys[1], torch.zeros(10))
        assert store.get(keys[3]) is None and torch.equal(store.get(keys[1]), torch.zeros(10))
    _pwrite(path, struct.pack("<I", 3), 8)
    with pytest.raises(ConfigError, match=r"tiers\[cxl\]\.path: .*version 3.*reset: true"):
        strata.open_store(cfg)


def test_generations_an_older_process_bumped_without_logging_them_are_never_read_as_its_slots(tmp_path):
    """A process of Strata before the change log, still running on a region a newer one opened,
    bumps the generation without writing the log. The log's entries at those generations are
    older ones (another slot): read as the changed slots, they hid its delete and its newer put,
    and the newer process served the deleted object and the older value. Each entry names its
    generation, so those are no entries of theirs: the table is compared instead."""
    import struct

    cfg = {"tiers": [{"kind": "cxl", "path": str(tmp_path / "region"), "size": "4MiB"}]}
    keys = [strata.Key("kv", "old", str(i)) for i in range(6)]
    with strata.open_store(cfg) as new, strata.open_store(cfg) as old:
        for i, k in enumerate(keys):
            assert new.put(k, torch.full((1000,), float(i)))
        assert all(old.contains(k) for k in keys)
        tier = cxl_tier(old)

        def bump_without_log(slots):  # what Strata before the change log did
            gen = tier.region.gen()
            struct.pack_into("<Q", tier.map, 64, gen + len(slots))
            tier.generation = gen + len(slots) if gen == tier.generation else -1

        tier._bump = bump_without_log
        assert old.delete(keys[4]) and old.put(keys[2], torch.zeros(10))
        assert new.get(keys[4]) is None and not new.contains(keys[4])
        assert torch.equal(new.get(keys[2]), torch.zeros(10))
        assert_exact_accounting(cxl_tier(new))


# -- a sync reads what the slots hold as of one generation ------------------------------------------

class _FirstOf(set):
    """A set of free slots whose ``pop`` hands out ``first`` while it is there (a put into that slot)."""

    def __init__(self, items, first):
        super().__init__(items)
        self.first = first

    def pop(self):
        if self.first in self:
            self.discard(self.first)
            return self.first
        return super().pop()


def test_a_sync_never_indexes_a_record_newer_than_the_generation_it_read(tmp_path):
    """A sync reads the generation and the change log, then the slots the log names, without the
    region lock. Another process deleting q and putting r over q's bytes in between (into a slot
    the log named already) was seen half: r indexed, q's removal (a later generation) not, and
    forgetting q at the next sync freed r's bytes: this process's next put went over r. A read
    during which the generation moved is made again."""
    cfg = {"tiers": [{"kind": "cxl", "path": str(tmp_path / "region"), "size": "1MiB"}]}
    q, x, r = (strata.Key("kv", "future", n) for n in ("q", "x", "r"))
    with strata.open_store(cfg) as a, strata.open_store(cfg) as b:
        ta, tb = cxl_tier(a), cxl_tier(b)
        assert b.put(q, torch.full((4000,), 1.0)) and a.contains(q)
        assert b.put(x, torch.full((9000,), 2.0)) and b.delete(x)  # x's slot: in the log a reads next
        logged = ta._logged

        def meanwhile(gen):  # b deletes q and puts r over its bytes, into x's slot, as a reads
            slots = logged(gen)
            if slots is not None and not meanwhile.done:
                meanwhile.done = True
                free = [i for i in slots if tb.region.read_slot(i) is None]
                tb._free_slots = _FirstOf(tb._free_slots, free[0])
                assert b.delete(q) and b.put(r, torch.full((4000,), 3.0))
                assert tb.index[r.encoded].loc[1] == ta.index[q.encoded].loc[1], "r is not over q's bytes"
            return slots

        meanwhile.done = False
        ta._logged = meanwhile
        assert torch.equal(a.get(r), torch.full((4000,), 3.0)) and a.get(q) is None
        del ta._logged
        assert meanwhile.done
        assert_exact_accounting(ta)
        assert a.put(strata.Key("kv", "future", "mine"), torch.full((4000,), 4.0))
        assert torch.equal(b.get(r), torch.full((4000,), 3.0)), "this process's put went over r"
        assert_exact_accounting(ta)


def test_the_bytes_of_a_leased_object_whose_slot_is_not_cleared_yet_go_back_with_the_slot(tmp_path):
    """A leased object deleted while another process held the region lock: its slot is left to
    clear later (``_unfreed``) and its bytes kept for the lease. The last release gave the bytes
    back while the slot still named them; an allocator rebuilt meanwhile held them again for the
    slot, and clearing the slot (bytes kept for the lease, it said) never gave them back."""
    cfg = {"tiers": [{"kind": "cxl", "path": str(tmp_path / "region"), "size": "1MiB"}]}
    k = strata.Key("kv", "linger", "k")
    with strata.open_store(cfg) as a:
        ta = cxl_tier(a)
        assert a.put(k, torch.full((4000,), 1.0))
        lease = a.lease(k)
        assert lease.__enter__() is not None
        ta.region.try_acquire = lambda: False  # another process's put holds the region lock
        ta.after_unlock = lambda fn: None  # and the clear waits for the next put
        try:
            assert a.delete(k)
            assert ta._unfreed
            lease.__exit__(None, None, None)
            with a.chain.lock:
                ta._rebuild_allocator()  # a sync meanwhile rebuilds the free space
        finally:
            del ta.region.try_acquire, ta.after_unlock
        assert a.put(strata.Key("kv", "linger", "next"), torch.full((10,), 2.0))  # clears the slot first
        assert not ta._unfreed
        assert_exact_accounting(ta)


DIES_MIDWAY = r"""
import os, signal, sys, torch, strata
from strata.store.tiers.cxl import CxlTier

path, what = sys.argv[1], sys.argv[2]
store = strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": "1MiB", "pin": "never"}]})
if what == "put":  # killed once the put's slot is committed, before the change is logged
    publish = CxlTier.publish
    CxlTier.publish = lambda self, e, count=True: (os.kill(os.getpid(), signal.SIGKILL) if count
                                                   else publish(self, e, count))
    store.put(strata.Key("kv", "dies", "new"), torch.full((4096,), 7.0))
elif what == "replace":  # killed once the new version is committed, before the old one is cleared
    CxlTier._drop_record = lambda self, e, keep_bytes: os.kill(os.getpid(), signal.SIGKILL)
    store.put(strata.Key("kv", "dies", "old"), torch.full((4096,), 7.0))
else:  # killed once the delete's slot is cleared, before the change is logged
    clear = CxlTier._clear_slot
    CxlTier._clear_slot = lambda self, i: (clear(self, i), os.kill(os.getpid(), signal.SIGKILL))
    store.delete(strata.Key("kv", "dies", "old"))
"""


@pytest.mark.parametrize("what", ["put", "delete"])
def test_a_change_a_killed_process_made_without_logging_it_is_seen_by_every_process(tmp_path, what):
    """A process killed between committing (or clearing) a slot and logging the change left a
    region whose log never names it: a process following the log never saw that put (and took its
    bytes for its own puts, leaving a committed slot over another's record: the damage a soak with
    SIGKILLs counted) or that delete (it went on holding the object's bytes and serving it). The
    next process to take the region lock finds the dead holder's mark and makes every process
    compare the table whole: each then sees what a process opening the region afresh sees."""
    path = str(tmp_path / "region")
    cfg = {"tiers": [{"kind": "cxl", "path": path, "size": "1MiB", "pin": "never"}]}
    old, new = strata.Key("kv", "dies", "old"), strata.Key("kv", "dies", "new")
    with strata.open_store(cfg) as a, strata.open_store(cfg) as b:
        assert a.put(old, torch.full((4096,), 1.0)) and b.contains(old)
        out = subprocess.run([sys.executable, "-c", DIES_MIDWAY, path, what], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == -signal.SIGKILL, out.stderr
        assert b.put(strata.Key("kv", "dies", "after"), torch.full((4096,), 2.0))  # takes the region lock
        with strata.open_store(cfg) as fresh:
            truth = {k: fresh.contains(k) for k in (old, new)}
            assert truth == ({old: True, new: True} if what == "put" else {old: False, new: False})
            for store in (a, b):
                assert {k: store.contains(k) for k in (old, new)} == truth
                assert_exact_accounting(cxl_tier(store))
                got = store.get(new)
                assert (got is not None and torch.equal(got, torch.full((4096,), 7.0))) == truth[new]
            assert cxl_tier(b).stats_extra()["dead_holders"] == 1


def test_an_older_version_a_killed_process_left_committed_keeps_its_bytes_until_its_slot_is_cleared(tmp_path):
    """A process killed holding the region lock, between committing a put and clearing the slot of
    the version it replaced, left two committed records of one key. Another process (here ``b``,
    deleting) took the lock next and moved the generation past the dead holder's; it made no put,
    so it never looked at the table under the lock. Then ``a`` met both records in a get, without
    the lock: it forgot the older and freed its bytes, leaving the slot for the next holder of the
    lock to clear. Its next put took the lock, found the generation unchanged, looked at nothing
    and put a record over those bytes while the older slot still stood: the next process to open
    the region cleared a damaged record (what a soak with SIGKILLs counted). Now a sync under the
    lock clears the slots left for it before a put allocates."""
    path = str(tmp_path / "region")
    cfg = {"tiers": [{"kind": "cxl", "path": path, "size": "1MiB", "pin": "never"}]}
    old, gone, other = (strata.Key("kv", "dies", n) for n in ("old", "gone", "other"))
    with strata.open_store(cfg) as a, strata.open_store(cfg) as b:
        assert a.put(old, torch.full((4096,), 1.0)) and a.put(gone, torch.full((4096,), 3.0))
        assert b.contains(old) and b.contains(gone)
        out = subprocess.run([sys.executable, "-c", DIES_MIDWAY, path, "replace"], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == -signal.SIGKILL, out.stderr
        assert b.delete(gone)  # takes the region lock after the dead holder, puts nothing
        assert torch.equal(a.get(old), torch.full((4096,), 7.0))  # the newer version, met without the lock
        assert a.put(other, torch.full((4096,), 2.0))
        assert_exact_accounting(cxl_tier(a))
        with strata.open_store(cfg) as fresh:
            assert cxl_tier(fresh).stats_extra()["discarded"] == 0
            assert torch.equal(fresh.get(old), torch.full((4096,), 7.0))
            assert torch.equal(fresh.get(other), torch.full((4096,), 2.0))
            assert not fresh.contains(gone)
