"""Threads reading and writing at once never see another key's bytes; leases hold bytes still."""

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import strata
from strata import Key
from waits import WaitSpy


def run_threads(targets: list, limit_s: float = 120) -> list[str]:
    """Start a thread per target, join each within ``limit_s`` in all, and return what went wrong:
    an exception a thread raised, or a thread still running at the deadline."""
    failures: list[str] = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported to the test, not lost in a warning
                failures.append(f"{threading.current_thread().name}: {e!r}")
        return run

    threads = [threading.Thread(target=guarded(fn), name=f"t{i}") for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + limit_s  # a safety bound against a hang, not a timing assumption
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    failures += [f"{t.name} still running after {limit_s} s" for t in threads if t.is_alive()]
    return failures


@pytest.mark.parametrize("write", ["through", "back"])
def test_concurrent_readers_and_writers_never_see_another_keys_bytes(tmp_path, write):
    cfg = {"tiers": [{"kind": "cpu", "capacity": "96KiB", "write": write},
                     {"kind": "file", "path": str(tmp_path), "capacity": "512KiB"}],
           "writeback": {"max_pending": 4}}
    keys = [Key("kv", "m", str(i)) for i in range(16)]
    errors: list[str] = []
    writers_done, writers_left, count = threading.Event(), [3], threading.Lock()
    hits = {"get": 0, "lease": 0}

    def writer(seed):
        rng = random.Random(seed)
        try:
            for version in range(1, 301):  # a fixed amount of work, not a wall-clock duration
                i = rng.randrange(len(keys))
                store.put(keys[i], torch.full((rng.randrange(256, 4096),), i * 1_000_000 + version, dtype=torch.int64))
        finally:
            with count:  # the last writer to stop, even by an exception, ends the readers
                writers_left[0] -= 1
                if not writers_left[0]:
                    writers_done.set()

    def reader(seed):
        rng = random.Random(seed)
        out = torch.empty(4096, dtype=torch.int64)
        while not writers_done.is_set():
            i = rng.randrange(len(keys))
            v = store.get(keys[i])
            if v is not None:
                hits["get"] += 1
                first = int(v[0])
                if first // 1_000_000 != i or not bool((v == first).all()):
                    errors.append(f"key {i} returned bytes of {first // 1_000_000} or mixed versions")
            with store.lease(keys[i]) as view:
                if view is not None:
                    hits["lease"] += 1
                    n = view.numel()
                    out[:n].copy_(view)
                    if int(out[0]) // 1_000_000 != i or not bool((out[:n] == out[0]).all()):
                        errors.append(f"lease of key {i} saw foreign or torn bytes")

    with strata.open_store(cfg) as store:
        workers = [lambda s=s: writer(s) for s in range(3)] + [lambda s=s: reader(100 + s) for s in range(3)]
        failures = run_threads(workers)
        assert not failures, failures
        store.flush()
        for t in store.tiers:
            assert t.used <= t.capacity
        stats = store.stats()
    assert not errors, errors[:5]
    assert hits["get"] > 0 and hits["lease"] > 0  # the readers really read bytes, not only misses
    assert stats["tiers"]["cpu"]["evictions"] > 0  # the slab was really reused under the readers


def test_a_leased_view_is_never_reused_by_eviction_or_overwrite():
    with strata.open_store({"tiers": [{"kind": "cpu", "capacity": "32KiB"}]}) as store:
        k = Key("kv", "m", "held")
        store.put(k, torch.full((2048,), 7, dtype=torch.int32))  # 8 KiB
        with store.lease(k) as view:
            store.put(k, torch.full((2048,), 8, dtype=torch.int32))  # overwrite while leased
            for i in range(20):  # and churn the rest of the slab
                store.put(Key("kv", "m", str(i)), torch.full((2048,), -1, dtype=torch.int32))
            assert bool((view == 7).all())
            assert store.tiers[0].used <= 32 << 10
        free_after = store.tiers[0].allocator.free_bytes
        assert store.tiers[0].used + free_after == store.tiers[0].capacity


def test_write_back_applies_back_pressure_and_flush_drains(tmp_path, monkeypatch):
    from strata.store.tiers.file import FileTier

    real_write = FileTier.write
    writing, release = threading.Event(), threading.Event()

    def held(self, e, data):  # the flusher's writes land only once the test says so
        writing.set()
        assert release.wait(30), "the test never released the held write"
        return real_write(self, e, data)

    monkeypatch.setattr(FileTier, "write", held)
    cfg = {"tiers": [{"kind": "cpu", "capacity": "1MiB", "write": "back"},
                     {"kind": "file", "path": str(tmp_path), "capacity": "4MiB"}],
           "writeback": {"max_pending": 2}}
    with strata.open_store(cfg) as store:
        wb = store.chain.writeback
        depths: list[int] = []

        def putter():
            for i in range(12):
                assert store.put(Key("kv", "m", str(i)), torch.full((256,), i))
                depths.append(store.stats()["writeback"]["queue_depth"])

        spy = WaitSpy(wb._cond, putter)  # a writer waiting for room: back-pressure, seen as it happens
        try:
            assert writing.wait(10)
            assert spy.blocked(), "every put went in while the flush was held: no back-pressure"
            assert len(depths) <= 2  # with the flush held, the third put cannot go in
        finally:
            release.set()
            spy.thread.join(30)
        assert not spy.thread.is_alive() and len(depths) == 12
        assert max(depths) <= 2  # max_pending bounds what is queued plus what is being written
        assert store.stats()["writeback"]["writer_waits"] > 0
        store.flush()
        assert store.stats()["writeback"]["queue_depth"] == 0
        for i in range(12):
            assert store.get(Key("kv", "m", str(i)), mode="exact", tier="file")[0] == i


def test_an_uncaught_exception_in_a_thread_fails_the_test(tmp_path):
    """conftest's autouse fixture turns pytest's warning about a thread's exception into a failure."""
    (tmp_path / "test_thread.py").write_text(
        "import threading\n"
        "def test_raises():\n"
        "    t = threading.Thread(target=lambda: 1 / 0)\n"
        "    t.start()\n"
        "    t.join()\n"
        "def test_ends_quietly():\n"
        "    t = threading.Thread(target=lambda: None, daemon=True)\n"
        "    t.start()\n"
        "    t.join()\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                          "test_thread.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout[-3000:]
    # test_raises errors at teardown (its call itself passed); test_ends_quietly passes clean
    assert "ERROR test_thread.py::test_raises" in out.stdout and "ZeroDivisionError" in out.stdout, out.stdout[-3000:]
    assert "test_ends_quietly" not in out.stdout and "1 error" in out.stdout, out.stdout[-3000:]


def test_an_older_version_below_is_no_copy_an_eviction_may_drop_the_newer_one_for(tmp_path, monkeypatch):
    """``evict: lower`` evicts an object only once a tier below holds it: the same version, not
    merely the same key. A write-through put of v2 whose write to the file tier is still in flight
    finds v1 there; an eviction of v2 meanwhile must demote v2 first (once it dropped v2 for the
    stale v1, the put's own write lost its guard and the put returned False, or, under a
    write-back tier above, its flush failed and the object was lost at close)."""
    from strata.store.tiers.file import FileTier

    k, other = Key("param", "m", "w"), Key("param", "m", "other")
    real_write = FileTier.write
    writing, release = threading.Event(), threading.Event()
    held = []

    def slow(self, e, data):  # the first write of v2 to the file tier waits for the test
        if e.key == k.encoded and int(data.view(torch.int32)[0]) == 2 and not held:
            held.append(e)
            writing.set()
            assert release.wait(30), "the test never released the held write"
        return real_write(self, e, data)

    monkeypatch.setattr(FileTier, "write", slow)
    cfg = {"tiers": [{"kind": "cpu", "capacity": "6KiB", "write": "through"},  # one 4 KiB object
                     {"kind": "file", "path": str(tmp_path), "capacity": "1MiB"}]}
    with strata.open_store(cfg) as store:
        assert store.put(k, torch.full((1024,), 1, dtype=torch.int32))
        result = []
        putter = threading.Thread(target=lambda: result.append(store.put(k, torch.full((1024,), 2, dtype=torch.int32))))
        putter.start()
        try:
            assert writing.wait(10)
            assert store.put(other, torch.full((1024,), 3, dtype=torch.int32))  # evicts v2 from the cpu tier
        finally:
            release.set()
            putter.join(30)
        assert result == [True], "v2 was refused although the file tier took it"
        got = store.get(k)
        assert got is not None and int(got[0]) == 2
        assert int(store.get(k, mode="exact", tier="file")[0]) == 2
