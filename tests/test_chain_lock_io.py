"""No file or network I/O, and no wait on a device copy, while a thread holds the chain's lock.

Each test wraps the I/O a tier does (unlinking an object file, flushing a cxl region, a backing
store's DEL round trip, a device copy's ``synchronize``) with a probe that records whether the
calling thread holds ``store.chain.lock`` at that moment, and checks that what the I/O was for
is done by the time the store call returns (no file or value left behind)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

import strata
from strata import Key

K = Key("kv", "lock-io", "chunk-0")
JOIN_S = 30  # a bound on joins, never a way of waiting for something to happen


class Probe:
    """Records (what, lock held by the calling thread) for each wrapped call."""

    def __init__(self, store):
        self.lock = store.chain.lock
        assert hasattr(self.lock, "_is_owned"), f"cannot tell who holds a {type(self.lock).__name__}"
        self.calls: list[tuple[str, bool]] = []

    def held(self) -> bool:
        return self.lock._is_owned()

    def record(self, what: str) -> None:
        self.calls.append((what, self.held()))

    def wrap(self, what: str, fn):
        def wrapper(*args, **kwargs):
            self.record(what)
            return fn(*args, **kwargs)

        return wrapper

    def under_lock(self) -> list[str]:
        return [w for w, held in self.calls if held]

    def done(self, what: str) -> int:
        return sum(w == what for w, _ in self.calls)


# -- the file tier: unlinks ---------------------------------------------------------------------
def file_store(tmp_path, capacity="16MiB"):
    return strata.open_store({"tiers": [{"kind": "file", "path": str(tmp_path / "tier"), "capacity": capacity}]})


def watch_unlinks(monkeypatch, store, root: Path) -> Probe:
    """Record every unlink of a file under ``root`` (os.unlink and Path.unlink, however the tier calls it)."""
    probe = Probe(store)
    real_os_unlink, real_path_unlink = os.unlink, Path.unlink

    def os_unlink(path, *args, **kwargs):
        if str(path).startswith(str(root)):
            probe.record("unlink")
        return real_os_unlink(path, *args, **kwargs)

    def path_unlink(self, *args, **kwargs):
        if str(self).startswith(str(root)) and os.unlink is real_os_unlink:  # else os_unlink records it
            probe.record("unlink")
        return real_path_unlink(self, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", os_unlink)
    monkeypatch.setattr(Path, "unlink", path_unlink)
    return probe


def files_of(root: Path, key: Key) -> list[Path]:
    digest = hashlib.sha256(key.encoded).hexdigest()
    return sorted((root / "objects" / digest[:2]).glob(f"{digest}-*.obj"))


def test_an_overwrite_unlinks_the_old_file_outside_the_lock_and_before_put_returns(tmp_path, monkeypatch):
    root = tmp_path / "tier"
    with file_store(tmp_path) as store:
        assert store.put(K, torch.zeros(1000))
        first = files_of(root, K)
        probe = watch_unlinks(monkeypatch, store, root)
        assert store.put(K, torch.ones(1000))
        assert probe.done("unlink") >= 1 and probe.under_lock() == []
        now = files_of(root, K)
        assert len(now) == 1 and now != first  # the old version is gone, nothing leaked
        assert torch.equal(store.get(K), torch.ones(1000))


def test_a_delete_unlinks_outside_the_lock_and_leaves_no_file(tmp_path, monkeypatch):
    root = tmp_path / "tier"
    with file_store(tmp_path) as store:
        assert store.put(K, torch.zeros(1000))
        probe = watch_unlinks(monkeypatch, store, root)
        assert store.delete(K)
        assert probe.done("unlink") >= 1 and probe.under_lock() == []
        assert files_of(root, K) == [] and store.get(K) is None


def test_evictions_unlink_outside_the_lock(tmp_path, monkeypatch):
    root = tmp_path / "tier"
    with file_store(tmp_path, capacity="64KiB") as store:
        probe = watch_unlinks(monkeypatch, store, root)
        keys = [Key("kv", "lock-io", f"c{i}") for i in range(12)]
        for i, k in enumerate(keys):
            assert store.put(k, torch.full((4096,), float(i)))  # 16 KiB each: evictions from the 4th on
        tier = store.tiers[0]
        assert tier.counters.evictions >= 8 and probe.done("unlink") >= 8
        assert probe.under_lock() == []
        on_disk = sorted(p.name for p in (root / "objects").glob("*/*.obj"))
        assert on_disk == sorted(e.loc.name for e in tier.index.values())  # evicted files are gone


def test_a_corrupt_file_is_unlinked_outside_the_lock_before_get_returns(tmp_path, monkeypatch):
    root = tmp_path / "tier"
    with file_store(tmp_path) as store:
        assert store.put(K, torch.arange(1000.0))
        (path,) = files_of(root, K)
        raw = bytearray(path.read_bytes())
        raw[-10] ^= 0xFF
        path.write_bytes(bytes(raw))
        probe = watch_unlinks(monkeypatch, store, root)
        assert store.get(K) is None
        assert store.tiers[0].counters.checksum_failures == 1
        assert probe.done("unlink") >= 1 and probe.under_lock() == []
        assert files_of(root, K) == []


def test_a_deferred_unlink_of_an_old_version_never_removes_a_newer_file(tmp_path, monkeypatch):
    """Thread A's put of v2 retires v1; just as A unlinks v1's file, thread B puts v3 (retiring v2).
    A's unlink must take v1's file only: v3's file stays and is served. (On the old code B could not
    even start: A unlinked under the lock.)"""
    root = tmp_path / "tier"
    with file_store(tmp_path) as store:
        assert store.put(K, torch.full((1000,), 1.0))
        (v1,) = files_of(root, K)
        real_unlink = os.unlink
        errors: list[BaseException] = []
        b_done = threading.Event()
        started: list[bool] = []  # whether B's put had finished when A's unlink went on

        def put_v3():
            try:
                assert store.put(K, torch.full((1000,), 3.0))
                b_done.set()
            except BaseException as e:  # noqa: BLE001 - re-raised by the test below
                errors.append(e)

        b = threading.Thread(target=put_v3)

        def unlink(path, *args, **kwargs):
            if str(path) == str(v1) and not started:
                b.start()
                b.join(10)  # B runs its whole put now, unless this thread holds the chain's lock
                started.append(not b.is_alive())
            return real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", unlink)
        try:
            store.put(K, torch.full((1000,), 2.0))  # False: v3 replaced it before it returned
        finally:
            if b.is_alive() or started:
                b.join(JOIN_S)
        assert not b.is_alive() and not errors, errors
        assert started == [True] and b_done.is_set(), "B's put waited for A's unlink (done under the lock)"
        monkeypatch.setattr(os, "unlink", real_unlink)
        files = files_of(root, K)
        assert len(files) == 1 and files[0] == store.tiers[0].index[K.encoded].loc
        assert torch.equal(store.get(K), torch.full((1000,), 3.0))


def test_concurrent_overwrites_leave_exactly_the_served_version_on_disk(tmp_path):
    root = tmp_path / "tier"
    with file_store(tmp_path) as store:
        errors: list[BaseException] = []

        def writer(base: float):
            try:
                for i in range(25):
                    store.put(K, torch.full((256,), base + i))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(b,)) for b in (0.0, 1000.0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_S)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        files = files_of(root, K)
        assert len(files) == 1 and files[0] == store.tiers[0].index[K.encoded].loc
        assert store.get(K)[0].item() in (24.0, 1024.0)


# -- the cxl tier: flushes of the region ------------------------------------------------------------
def cxl_store(tmp_path, capacity=None):
    tier = {"kind": "cxl", "path": str(tmp_path / "region"), "size": "4MiB"}
    if capacity:
        tier["capacity"] = capacity
    return strata.open_store({"tiers": [tier]})


def watch_flushes(monkeypatch, store) -> Probe:
    probe = Probe(store)
    tier = store.tiers[0]
    monkeypatch.setattr(tier.region, "flush", probe.wrap("flush", tier.region.flush))
    return probe


def test_cxl_overwrites_and_deletes_flush_the_region_outside_the_lock(tmp_path, monkeypatch):
    with cxl_store(tmp_path) as store:
        assert store.put(K, torch.zeros(1000))
        probe = watch_flushes(monkeypatch, store)
        assert store.put(K, torch.ones(1000))  # the old slot is cleared, and that flushed
        assert store.delete(K)
        assert probe.done("flush") >= 3 and probe.under_lock() == []
        assert store.get(K) is None


def test_cxl_evictions_flush_outside_the_lock(tmp_path, monkeypatch):
    with cxl_store(tmp_path, capacity="256KiB") as store:
        probe = watch_flushes(monkeypatch, store)
        for i in range(12):
            assert store.put(Key("kv", "lock-io", f"c{i}"), torch.full((16384,), float(i)))  # 64 KiB each
        assert store.tiers[0].counters.evictions >= 8
        assert probe.under_lock() == []


def test_a_cxl_put_waits_for_another_processes_region_lock_outside_the_chain_lock(tmp_path, monkeypatch):
    """Another process's put in flight holds the region's file lock (here a descriptor of the test's
    own holds it). A put of this process waits for it without the chain's lock, so this process's
    reads go on meanwhile, and it lands once the lock is let go."""
    import fcntl

    from strata.store.tiers import cxl

    with cxl_store(tmp_path) as store:
        a, b = Key("kv", "lock-io", "a"), Key("kv", "lock-io", "b")
        assert store.put(a, torch.ones(1000))
        probe, waiting = Probe(store), threading.Event()
        real = cxl._RegionUnlocked.synchronize

        def wait_for_region(self):  # the put's wait, seen as it happens
            probe.record("region wait")
            waiting.set()
            return real(self)

        monkeypatch.setattr(cxl._RegionUnlocked, "synchronize", wait_for_region)
        fd = os.open(store.tiers[0].path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's put in flight
        got: list = []
        putter = threading.Thread(target=lambda: got.append(store.put(b, torch.full((1000,), 2.0))))
        try:
            putter.start()
            assert waiting.wait(JOIN_S), "the put never waited for the region lock outside the chain lock"
            reader = threading.Thread(target=lambda: got.append(torch.equal(store.get(a), torch.ones(1000))))
            reader.start()
            reader.join(JOIN_S)
            assert not reader.is_alive() and got == [True], "a read waited behind the put's wait for the region"
            assert putter.is_alive()  # still waiting: the lock is the other process's
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            putter.join(JOIN_S)
        assert not putter.is_alive() and got == [True, True] and probe.under_lock() == []
        assert torch.equal(store.get(b), torch.full((1000,), 2.0))


def test_a_cxl_delete_clears_its_slot_once_another_process_lets_the_region_go(tmp_path):
    """A delete while another process holds the region lock: the object is gone at once for this
    process (a rescan of the region does not bring it back), reads go on, the delete returns
    once its slot is cleared, and a store opened on the region afterwards does not find it."""
    import fcntl

    with cxl_store(tmp_path) as store:
        a, b = Key("kv", "lock-io", "a"), Key("kv", "lock-io", "b")
        assert store.put(a, torch.ones(1000)) and store.put(b, torch.full((1000,), 2.0))
        tier = store.tiers[0]
        fd = os.open(tier.path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's put in flight
        done: list = []
        deleter = threading.Thread(target=lambda: done.append(store.delete(a)))
        try:
            deleter.start()
            deadline = time.monotonic() + JOIN_S
            while not tier._unfreed and time.monotonic() < deadline:
                time.sleep(0.001)
            assert tier._unfreed, "the delete never left its slot for after the region lock"
            with store.chain.lock:
                tier._sync(force=True)  # a rescan of the region, as after another process's change
            assert not store.contains(a) and store.get(a) is None  # gone for this process already
            assert torch.equal(store.get(b), torch.full((1000,), 2.0))  # reads go on meanwhile
            assert deleter.is_alive() and done == []  # returns only once its slot is cleared
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            deleter.join(JOIN_S)
        assert not deleter.is_alive() and done == [True] and tier._unfreed == {}
    with cxl_store(tmp_path) as again:
        assert again.get(a) is None and torch.equal(again.get(b), torch.full((1000,), 2.0))


# -- device copies: waiting for their events ------------------------------------------------------
class SlowCopy:
    """A device copy's event that has not completed until someone waits for it."""

    def __init__(self, probe: Probe):
        self.probe, self.complete = probe, False

    def query(self) -> bool:
        return self.complete

    def synchronize(self) -> None:
        self.probe.record("synchronize")
        self.complete = True

    def record(self, stream=None) -> None:
        pass


def copy_in_flight(store, key: Key) -> SlowCopy:
    """Lease ``key``'s cpu entry until a (fake) device copy out of it completes, as ``get_into`` does."""
    probe = Probe(store)
    event = SlowCopy(probe)
    tier = store.tiers[0]
    with store.chain.lock:
        tier.hold_until(tier.lookup(key.encoded), event)
    return event


def test_a_put_waiting_for_a_device_copy_to_free_room_waits_outside_the_lock():
    with strata.open_store({"tiers": [{"kind": "cpu", "capacity": "1MiB", "pin": "never"}]}) as store:
        a, b = Key("kv", "lock-io", "a"), Key("kv", "lock-io", "b")
        assert store.put(a, torch.zeros(150_000))  # 600 KB of a 1 MiB slab
        event = copy_in_flight(store, a)
        assert store.delete(a)  # its bytes stay until the copy out of them completes
        assert store.put(b, torch.ones(150_000))  # room only once the copy has completed
        assert event.probe.done("synchronize") == 1 and event.probe.under_lock() == []
        assert torch.equal(store.get(b), torch.ones(150_000))


def test_close_waits_for_device_copies_outside_the_lock():
    store = strata.open_store({"tiers": [{"kind": "cpu", "capacity": "1MiB", "pin": "never"}]})
    try:
        assert store.put(K, torch.zeros(1000))
        event = copy_in_flight(store, K)
    finally:
        store.close()
    assert event.probe.done("synchronize") == 1 and event.probe.under_lock() == []
    assert store.tiers[0].lookup(K.encoded).leases == 0


# -- backing tiers: DEL round trips -------------------------------------------------------------------
def redis_tier(url):
    return {"kind": "redis", "url": url, "key_prefix": f"t-{uuid.uuid4().hex}:"}


def watch_deletes(monkeypatch, store, tier) -> Probe:
    probe = Probe(store)
    monkeypatch.setattr(tier.backend, "delete_many", probe.wrap("delete", tier.backend.delete_many))
    return probe


def test_a_corrupt_value_is_deleted_outside_the_lock_before_get_returns(redis_url, monkeypatch):
    with strata.open_store({"tiers": [redis_tier(redis_url)]}) as store:
        tier = store.tiers[0]
        assert store.put(K, torch.arange(1000.0))
        name = tier.prefix + K.encoded
        tier.client.set(name, b"not a strata value")
        probe = watch_deletes(monkeypatch, store, tier)
        assert store.get(K) is None
        assert tier.counters.checksum_failures == 1
        assert probe.done("delete") >= 1 and probe.under_lock() == []
        assert tier.client.exists(name) == 0  # deleted on the server by the time get returned
        assert store.get(K) is None


def test_a_put_that_lost_to_a_newer_one_takes_its_value_back_outside_the_lock(redis_url, monkeypatch):
    """Write-through cpu -> redis: while put A's SET of v1 is in flight, put B stores v2 in both
    tiers; A's SET then lands over v2, A finds it lost (the cpu tier holds v2) and deletes its value."""
    cfg = {"tiers": [{"kind": "cpu", "capacity": "4MiB"}, redis_tier(redis_url)]}
    with strata.open_store(cfg) as store:
        tier = store.tiers[1]
        name = tier.prefix + K.encoded
        probe = watch_deletes(monkeypatch, store, tier)
        real_put_many = tier.backend.put_many
        errors: list[BaseException] = []
        started = []

        def put_v2():
            try:
                assert store.put(K, torch.full((1000,), 2.0))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        b = threading.Thread(target=put_v2)

        def put_many(pairs):
            if not started:
                started.append(True)
                b.start()
                b.join(JOIN_S)
            return real_put_many(pairs)

        monkeypatch.setattr(tier.backend, "put_many", put_many)
        store.put(K, torch.full((1000,), 1.0))
        b.join(JOIN_S)
        assert not b.is_alive() and not errors, errors
        assert probe.done("delete") >= 1 and probe.under_lock() == []
        assert tier.client.exists(name) == 0  # v1's value, taken back before put returned
        assert torch.equal(store.get(K), torch.full((1000,), 2.0))


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
