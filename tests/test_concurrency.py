"""Threads reading and writing at once never see another key's bytes; leases hold bytes still."""

import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

import strata
from strata import Key, StoreError
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


def test_a_leased_view_used_after_its_lease_ended_raises_instead_of_reading_reused_bytes():
    # Before: the view (and any slice of it) kept reading the slab after the with block, where by then
    # another object's bytes lay: a stale read that looked like data.
    with strata.open_store({"tiers": [{"kind": "cpu", "capacity": "32KiB"}]}) as store:
        k = Key("kv", "m", "held")
        store.put(k, torch.full((2048,), 7, dtype=torch.int32))  # 8 KiB
        with store.lease(k) as view:
            part, kept = view[:16], view.clone()
            assert bool((view == 7).all()) and bool((part == 7).all())
        store.delete(k)
        for i in range(8):  # other objects take the freed bytes
            store.put(Key("kv", "m", str(i)), torch.full((2048,), -1, dtype=torch.int32))
        for use in (lambda: view.sum(), lambda: part + 1, lambda: view[0], lambda: view.numpy(),
                    lambda: torch.add(part, 1), lambda: view.clone()):
            with pytest.raises(StoreError, match="a leased view used after its lease ended"):
                use()
        assert "lease ended" in repr(view)
        assert bool((kept == 7).all())  # a clone made inside the block is the caller's for good
        with store.lease_many([Key("kv", "m", "6"), Key("kv", "m", "7")]) as views:
            assert all(v is not None for v in views)
            pass
        with pytest.raises(StoreError, match="after its lease ended"):
            views[1].float()


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
    write-back tier above, its flush failed and the object was lost at close). The eviction waits
    for the put's own write of v2 (a demotion alongside it would race it)."""
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
            threading.Timer(0.3, release.set).start()  # v2's write lands while the eviction below waits
            assert store.put(other, torch.full((1024,), 3, dtype=torch.int32))  # evicts v2 from the cpu tier
        finally:
            release.set()
            putter.join(30)
        assert result == [True], "v2 was refused although the file tier took it"
        got = store.get(k)
        assert got is not None and int(got[0]) == 2
        assert int(store.get(k, mode="exact", tier="file")[0]) == 2


@pytest.mark.parametrize("below", ["redis", "file"])
@pytest.mark.parametrize("write", ["through", "back"])
def test_an_older_version_written_down_never_overwrites_a_newer_put_that_went_past_the_tier(
        request, tmp_path, monkeypatch, write, below):
    """v2 of a key is too big for the cpu tier, which still holds v1: the put goes straight to the
    tier below and retires v1 above once that took v2. Between the two, another thread wrote v1 down
    (an eviction's demotion with ``evict: lower``, or the write-back flusher): its version was still
    current above, so it overwrote v2 below and v2, acknowledged, was gone. A version that a
    newer put overtook is never written down."""
    from strata.store.chain import TierChain
    from strata.store.codec import describe

    k, other = Key("param", "m", "w"), Key("param", "m", "other")
    lower = ({"kind": "redis", "url": request.getfixturevalue("redis_url"), "key_prefix": f"t-{uuid.uuid4().hex}:"}
             if below == "redis" else {"kind": "file", "path": str(tmp_path / "f"), "capacity": "1MiB"})
    cfg = {"tiers": [{"kind": "cpu", "capacity": "8KiB", "write": write}, lower],
           "namespaces": {"param": {"evict": "lower"}}}
    released = threading.Event()
    if write == "back":  # the flusher takes v1 only when the test says
        real_flush = TierChain._flush_many
        monkeypatch.setattr(TierChain, "_flush_many",
                            lambda self, items: (released.wait(30), real_flush(self, items))[1])
    real_settle, interleaved = TierChain._settle_put, []

    def settle(self, kept, refused):  # v2 is in Redis, v1 still above: another thread writes v1 down now
        if not interleaved and any(old.key == k.encoded for _, old in refused):
            interleaved.append(True)
            released.set()
            if write == "back":
                self.flush()
            else:  # another put evicts v1, which is demoted
                self.put(other.encoded, "param", *describe(torch.full((1536,), 3, dtype=torch.int32)))
        return real_settle(self, kept, refused)

    monkeypatch.setattr(TierChain, "_settle_put", settle)
    with strata.open_store(cfg) as store:
        assert store.put(k, torch.full((1024,), 1, dtype=torch.int32))
        assert store.put(k, torch.full((4096,), 2, dtype=torch.int32))  # 16 KiB: the cpu tier refuses it
        assert interleaved
        store.flush()
        got = store.get(k)
        assert got is not None and got.shape == (4096,) and int(got[0]) == 2
        got = store.get(k, mode="exact", tier=below)
        assert got is not None and got.shape == (4096,) and int(got[0]) == 2
    with strata.open_store(cfg) as store:  # and what the tier below keeps is v2
        got = store.get(k)
        assert got is not None and got.shape == (4096,) and int(got[0]) == 2


@pytest.mark.parametrize("below", ["redis", "file"])
def test_a_read_promoting_an_older_version_never_lands_over_a_put_made_meanwhile(request, tmp_path, monkeypatch, below):
    """A read of v1 from the tier below promotes it into the cpu tier, which had no copy when the read
    looked. A put of v2 that lands in the cpu tier before the promotion's write must win: the
    promotion used to publish v1 over it, so every later read (and a demotion) had v1 back."""
    from strata.store.tiers.cpu import CpuTier

    k, other = Key("param", "m", "w"), Key("param", "m", "other")
    lower = ({"kind": "redis", "url": request.getfixturevalue("redis_url"), "key_prefix": f"t-{uuid.uuid4().hex}:"}
             if below == "redis" else {"kind": "file", "path": str(tmp_path / "f"), "capacity": "1MiB"})
    cfg = {"tiers": [{"kind": "cpu", "capacity": "6KiB", "write": "through"}, lower],  # one 4 KiB object
           "namespaces": {"param": {"promote": "evict"}}}  # the read of k promotes it over other
    real_write = CpuTier.write_many
    writing, release = threading.Event(), threading.Event()

    def slow(self, pairs):  # the promotion's write of v1 waits for the test
        if threading.current_thread().name == "reader" and any(e.key == k.encoded for e, _ in pairs):
            writing.set()
            assert release.wait(30), "the test never released the held write"
        return real_write(self, pairs)

    monkeypatch.setattr(CpuTier, "write_many", slow)
    with strata.open_store(cfg) as store:
        assert store.put(k, torch.full((1024,), 1, dtype=torch.int32))
        assert store.put(other, torch.full((1024,), 3, dtype=torch.int32))  # v1 leaves the cpu tier
        got = []
        reader = threading.Thread(target=lambda: got.append(store.get(k)), name="reader")
        reader.start()
        try:
            assert writing.wait(10)
            assert store.put(k, torch.full((1024,), 2, dtype=torch.int32))
        finally:
            release.set()
            reader.join(30)
        assert int(got[0][0]) in (1, 2)  # a read that overlaps a put sees either version
        v = store.get(k)
        assert v is not None and int(v[0]) == 2, "a read after the put returned served the older version"
        assert int(store.get(k, mode="exact", tier=below)[0]) == 2


def test_the_flusher_never_writes_down_an_object_an_eviction_is_writing_down(tmp_path, monkeypatch):
    """The flusher's batch [a, b]: b is being demoted by an eviction, so the flusher waits for it,
    and the lock goes meanwhile. Another eviction took a then and demoted it; the flusher, done
    waiting, wrote a as well: two writers of one object (below a Redis tier, the one whose write
    lost its guard deleted the other's copy). The flusher holds each object as soon as it is free,
    so an eviction finds it busy."""
    from strata.store.chain import TierChain
    from strata.store.tiers.file import FileTier

    z, a, b, c, d = (Key("param", "m", n) for n in "zabcd")
    start = threading.Event()
    held = {k.encoded: (threading.Event(), threading.Event()) for k in (a, b)}  # (entered, go)
    real_flush, real_write, real_hold = TierChain._flush_many, FileTier.write, TierChain._hold_down

    def flush_many(self, items):  # the flusher starts when the test says
        assert start.wait(30), "the test never started the flusher"
        return real_flush(self, items)

    def write(self, e, data):  # the evictions' writes of a and b wait for the test
        if e.key in held and threading.current_thread().name != "strata-writeback":
            entered, go = held[e.key]
            entered.set()
            assert go.wait(30), "the test never released a held write"
        return real_write(self, e, data)

    doubled = []

    def hold_down(self, tier, e):
        if e in self._down:
            doubled.append(e.key)
        return real_hold(self, tier, e)

    monkeypatch.setattr(TierChain, "_flush_many", flush_many)
    monkeypatch.setattr(FileTier, "write", write)
    monkeypatch.setattr(TierChain, "_hold_down", hold_down)
    cfg = {"tiers": [{"kind": "cpu", "capacity": "14KiB", "write": "back", "policy": "lru"},  # three 4 KiB objects
                     {"kind": "file", "path": str(tmp_path), "capacity": "1MiB"}],
           "namespaces": {"param": {"evict": "lower"}}}
    v = {k: torch.full((1024,), n, dtype=torch.int32) for n, k in enumerate((z, a, b, c, d))}
    with strata.open_store(cfg) as store:
        threads = []
        try:
            assert store.put(z, v[z])  # the flusher takes z alone, and waits
            assert store.put(a, v[a]) and store.put(b, v[b])  # queued: the flusher's next batch is [a, b]
            with store.lease(z):  # z stays
                assert store.get(a) is not None  # b is the least recently used
                threads.append(threading.Thread(target=store.put, args=(c, v[c])))  # evicts b: its write waits
                threads[-1].start()
                assert held[b.encoded][0].wait(10)
                start.set()  # the flusher writes z, then waits for b
                time.sleep(0.3)
                threads.append(threading.Thread(target=store.put, args=(d, v[d])))  # evicts a
                threads[-1].start()
                held[a.encoded][0].wait(0.5)  # a's demotion began (or the eviction waits for the flusher)
                held[b.encoded][1].set()  # b's write lands: the flusher goes on
                time.sleep(0.3)
        finally:
            start.set()
            for _, go in held.values():
                go.set()
            for t in threads:
                t.join(30)
        assert doubled == [], "an object was written down by two writers at once"
        store.flush()
        for k, t in v.items():
            got = store.get(k)
            assert got is not None and torch.equal(got, t), k
