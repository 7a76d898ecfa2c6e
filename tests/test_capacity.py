"""Capacity is a hard bound: random workloads on small tiers, quotas, pinning, priorities."""

import random
import threading
import traceback
import uuid

import pytest
import torch
from hypothesis import given, settings, strategies as st

import strata
from strata import Key, StoreError
from regions import assert_exact_accounting
from values import same


def check_accounting(store):
    for t in store.tiers:
        assert 0 <= t.used <= t.capacity
        live = sum(e.size for e in t.index.values())
        assert live <= t.used
        if t.kind == "cpu":
            assert t.used + t.allocator.free_bytes == t.capacity
        for ns, b in t.counters.ns_bytes.items():
            quota = store.config.policy(ns).quota.get(t.name)
            assert quota is None or b <= quota


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
@pytest.mark.parametrize("two_tiers", [False, True])
def test_random_workload_never_exceeds_bounds_and_never_returns_wrong_bytes(tmp_path_factory, policy, two_tiers):
    reads = {"gets": 0, "hits": 0}  # over all examples: a store that always misses must not pass

    @given(seed=st.integers(0, 2**32 - 1))
    def workload(seed):
        rng = random.Random(seed)
        tiers = [{"kind": "cpu", "capacity": "64KiB", "policy": policy, "write": rng.choice(["through", "back"])}]
        if two_tiers:
            tiers.append({"kind": "file", "path": str(tmp_path_factory.mktemp("f")), "capacity": "160KiB",
                          "policy": policy})
        cfg = {"tiers": tiers, "namespaces": {"kv": {"quota": "40KiB"}, "param": {"evict": "drop", "priority": 5}}}
        last = {}
        with strata.open_store(cfg) as store:
            for step in range(120):
                k = Key(rng.choice(["kv", "param"]), "s", str(rng.randrange(24)))
                op = rng.random()
                if op < 0.55:
                    v = torch.full((rng.randrange(1, 4096),), step, dtype=torch.int32)
                    if store.put(k, v):
                        last[k] = v
                    # refused by every tier: an older version still held stays the newest acknowledged
                    # one (TierChain._settle_put), so a later get may serve it; never the refused bytes
                elif op < 0.9:
                    got = store.get(k)
                    reads["gets"] += 1
                    if got is not None:
                        reads["hits"] += 1
                        assert same(got, last.get(k)), (k, step)
                else:
                    store.delete(k)
                    last.pop(k, None)
                check_accounting(store)
            store.flush()
            check_accounting(store)

    workload()
    # about one get in eight hits with these sizes (one in twenty would already be far from "none")
    assert reads["hits"] > 0 and reads["hits"] * 20 >= reads["gets"], reads


def test_oversized_object_is_a_clear_error():
    with strata.open_store({"tiers": [{"kind": "cpu", "capacity": "64KiB"}]}) as store:
        with pytest.raises(StoreError, match=r"value: 128.0 KiB is larger than every tier \(cpu=64.0 KiB\)"):
            store.put(Key("kv", "s", "big"), torch.empty(128 << 10, dtype=torch.uint8))


def test_pinned_namespace_is_never_evicted_and_a_full_tier_rejects_without_crashing():
    cfg = {"tiers": [{"kind": "cpu", "capacity": "64KiB"}], "namespaces": {"param": {"evict": "never"}}}
    with strata.open_store(cfg) as store:
        blocks = [Key("param", "m", f"b{i}") for i in range(8)]
        results = [store.put(k, torch.full((4096,), i, dtype=torch.int32)) for i, k in enumerate(blocks)]
        assert results[:4] == [True] * 4 and results[4:] == [False] * 4
        assert store.stats()["tiers"]["cpu"]["rejected"] == 4
        assert store.stats()["namespaces"]["param"]["put_rejected"] == 4
        # KV cannot push pinned weights out either.
        assert not store.put(Key("kv", "m", "c"), torch.zeros(1024, dtype=torch.int32))
        for i, k in enumerate(blocks[:4]):
            assert store.get(k)[0].item() == i


def test_lower_priority_namespace_is_evicted_first():
    cfg = {"tiers": [{"kind": "cpu", "capacity": "64KiB"}],
           "namespaces": {"kv": {"priority": 0}, "param": {"evict": "drop", "priority": 10}}}
    with strata.open_store(cfg) as store:
        store.put(Key("param", "m", "w"), torch.zeros(4096, dtype=torch.int32))  # 16 KiB, oldest
        for i in range(6):
            store.put(Key("kv", "m", str(i)), torch.zeros(4096, dtype=torch.int32))
        assert store.contains(Key("param", "m", "w"))
        assert store.stats()["tiers"]["cpu"]["evictions"] == 3


def test_lower_policy_demotes_to_the_tier_below_before_evicting(tmp_path):
    cfg = {"tiers": [{"kind": "cpu", "capacity": "64KiB"},
                     {"kind": "file", "path": str(tmp_path), "capacity": "1MiB"}],
           "namespaces": {"param": {"evict": "lower"}}}
    with strata.open_store(cfg) as store:
        keys = [Key("param", "m", str(i)) for i in range(8)]
        for i, k in enumerate(keys):
            assert store.put(k, torch.full((4096,), i, dtype=torch.int32))
        for i, k in enumerate(keys):
            assert store.get(k, mode="exact", tier="file")[0].item() == i
    # Only one tier: 'lower' objects have nowhere to go, so they stay.
    with strata.open_store({"tiers": [{"kind": "cpu", "capacity": "64KiB"}]}) as store:
        assert store.put(Key("param", "m", "a"), torch.zeros(16 << 10, dtype=torch.uint8))
        assert not store.put(Key("param", "m", "b"), torch.zeros(60 << 10, dtype=torch.uint8))
        assert store.contains(Key("param", "m", "a"))


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_weights_read_in_a_cycle_through_a_smaller_tier_hit_what_it_holds_on_every_pass(tmp_path, policy):
    """Offloaded weights are read in one cycle, every forward in the same order. Promoted into a
    full CPU tier by evicting as its policy says, each read evicted the block read soonest after
    (LRU), so a CPU tier a third of the blocks' size over a file tier hit nothing, and every read
    cost a copy up and an eviction as well as the file read. ``param``'s ``promote: keep`` (its
    default) keeps what the tier holds: three hits a pass, no copies up, nothing written."""
    keys = [Key("param", "m", f"w{i}") for i in range(8)]
    want = [torch.full((4096,), i, dtype=torch.int32) for i in range(8)]  # 16 KiB each
    out = torch.empty(4096, dtype=torch.int32)

    def passes(promote: str) -> list[tuple[int, int, int]]:
        cfg = {"tiers": [{"kind": "cpu", "capacity": "50KiB", "policy": policy},  # three of the eight
                         {"kind": "file", "path": str(tmp_path / promote), "capacity": "1MiB"}],
               "namespaces": {"param": {"promote": promote}} if promote == "evict" else {}}
        seen = []
        with strata.open_store(cfg) as store:
            for k, v in zip(keys, want):  # as strata.offload stores blocks: the tier keeps the last three
                assert store.put(k, v)
            for _ in range(4):
                before = store.stats()["tiers"]
                for k, v in zip(keys, want):
                    store.get_into(k, out)
                    assert torch.equal(out, v)
                after = store.stats()["tiers"]
                seen.append(tuple(after[t][c] - before[t][c]
                                  for t, c in (("cpu", "hits"), ("cpu", "promotions"), ("file", "puts"))))
        return seen

    assert passes("keep") == [(3, 0, 0)] * 4
    evicting = passes("evict")
    assert all(promoted == 8 - hits and written == 0 for hits, promoted, written in evicting)
    if policy == "lru":
        assert evicting == [(0, 8, 0)] * 4


def test_a_kept_namespace_promotes_over_a_lower_priority_one_and_never_over_its_own(tmp_path):
    """``promote: keep`` spares the namespace's own objects and those of a priority as high, not
    those of a lower priority: a weight read from the file tier takes a KV chunk's room, and once
    no KV chunk is left it is read from the file tier without being copied up."""
    cfg = {"tiers": [{"kind": "cpu", "capacity": "64KiB"}, {"kind": "file", "path": str(tmp_path), "capacity": "1MiB"}]}
    params = [Key("param", "m", f"w{i}") for i in range(6)]
    chunk = Key("kv", "m", "c")
    block = torch.zeros(4096, dtype=torch.int32)  # 16 KiB: four fit
    with strata.open_store(cfg) as store:
        for k in params + [chunk]:  # the CPU tier ends holding w3, w4, w5 and c
            assert store.put(k, block)
        in_cpu = lambda k: store.get(k, mode="exact", tier="cpu") is not None  # noqa: E731
        assert [in_cpu(k) for k in params + [chunk]] == [False] * 3 + [True] * 4
        for k in params[:3]:
            assert torch.equal(store.get(k), block)
        assert [in_cpu(k) for k in params + [chunk]] == [True, False, False, True, True, True, False]
        assert store.stats()["tiers"]["cpu"]["promotions"] == 1


_SHARED_OPS = 0.78  # a draw below this is one of ``_shared_op``'s


def _shared_op(store, op: float, k, step: int, key, value, last: dict, check) -> bool:
    """The ops both random workloads draw with ``op`` below ``_SHARED_OPS``: a put, a batch of three,
    a get, a get_many of four, a lease; each read handed to ``check(what, key, got, step)``. False
    where a check said stop."""
    if op < 0.35:
        v = value(step)
        if store.put(k, v):
            last[k] = v
    elif op < 0.42:
        items = [(key(), value(step * 10 + j)) for j in range(3)]
        for (kk, v), ok in zip(items, store.put_many(items)):
            if ok:
                last[kk] = v
    elif op < 0.65:
        return check("get", k, store.get(k), step)
    elif op < 0.72:
        ks = [key() for _ in range(4)]
        return all(check("get_many", kk, got, step) for kk, got in zip(ks, store.get_many(ks)))
    else:
        with store.lease(k) as view:
            return check("lease", k, None if view is None else view.clone(), step)
    return True


def _lower_chain(d, rng, shape):
    """Small tiers over a lowest one with room for every key: ``evict: lower`` may never lose a byte."""
    pol = rng.choice(["lru", "s3fifo"])
    top = {"kind": "cpu", "capacity": "64KiB", "write": rng.choice(["through", "back"]), "policy": pol}
    big_file = {"kind": "file", "path": f"{d}/f", "capacity": "8MiB", "policy": pol}
    tiers = {"cpu-file": [top, big_file],
             "cpu-cxl": [top, {"kind": "cxl", "path": f"{d}/r", "size": "8MiB", "policy": pol}],
             "cpu-cxl-file": [top, {"kind": "cxl", "path": f"{d}/r", "size": "160KiB", "policy": pol,
                                    "write": rng.choice(["through", "back"])}, big_file]}[shape]
    return {"tiers": tiers, "namespaces": {"kv": {"evict": "lower"}, "param": {"evict": "lower"}},
            "writeback": {"max_pending": rng.choice([1, 3, 64])}}


@pytest.mark.parametrize("shape", ["cpu-file", "cpu-cxl", "cpu-cxl-file"])
@settings(max_examples=15)
@given(seed=st.integers(0, 2**32 - 1))
def test_with_room_below_and_evict_lower_nothing_acknowledged_is_lost(tmp_path_factory, shape, seed):
    """Random puts, batches, reads, leases, deletes, flushes and restarts through small upper tiers
    (write-through and write-back, demotions all the time) over a lowest tier that has room for
    everything: every read, and every read after the last close, is the last acknowledged version."""
    rng = random.Random(seed)
    d = tmp_path_factory.mktemp("lower")
    cfg = _lower_chain(d, rng, shape)
    last: dict = {}

    def key():
        return Key(rng.choice(["kv", "param"]), "s", str(rng.randrange(24)))

    def value(n):
        return torch.full((rng.randrange(1, 4096),), n, dtype=torch.int32)

    def check(what, k, got, step):
        assert same(got, last.get(k)), (what, k, step)
        return True

    store = strata.open_store(cfg)
    try:
        for step in range(150):
            k, op = key(), rng.random()
            if op < _SHARED_OPS:
                _shared_op(store, op, k, step, key, value, last, check)
            elif op < 0.92:
                assert store.delete(k) == (k in last), (k, step)
                last.pop(k, None)
            elif op < 0.97:
                store.flush()
            else:
                store.close()
                store = strata.open_store(cfg)
        store.close()
        store = strata.open_store(cfg)
        for k, v in last.items():
            assert same(store.get(k), v), k
    finally:
        store.close()


def _racer(store, tid: int, seed: int, last: dict, errors: list) -> None:
    """One thread of ``test_threads_...``: its own keys, checked against the last version it put."""
    rng = random.Random(seed * 100 + tid)

    def key():
        return Key(rng.choice(["kv", "param"]), f"t{tid}", str(rng.randrange(12)))

    def value(n):
        return torch.full((rng.randrange(1, 4096),), n, dtype=torch.int32)

    def check(what, k, got, step):
        if not same(got, last.get(k)):
            errors.append(f"thread {tid} step {step}: {what} {k}: got {None if got is None else int(got[0])}, "
                          f"want {None if k not in last else int(last[k][0])}")
        return not errors

    try:
        for step in range(150):
            k, op = key(), rng.random()
            if op < _SHARED_OPS:
                if not _shared_op(store, op, k, step, key, value, last, check):
                    return
            elif op < 0.93:
                if store.delete(k) != (k in last):
                    errors.append(f"thread {tid} step {step}: delete {k} said {k not in last}")
                    return
                last.pop(k, None)
            elif op < 0.97:
                if store.contains(k) != (k in last):
                    errors.append(f"thread {tid} step {step}: contains {k} said {k not in last}")
                    return
            else:
                store.flush()
    except Exception:  # noqa: BLE001 - reported by the test, with where it was raised
        errors.append(f"thread {tid}: {traceback.format_exc()}")


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("shape", ["cpu-file", "cpu-cxl", "cpu-cxl-file", "cpu-redis"])
def test_threads_racing_on_one_store_never_lose_or_go_back_on_an_acknowledged_put(request, tmp_path, shape, seed):
    """Four threads, each on its own keys, put, read, lease and delete through small upper tiers
    that evict into one another all the time (``evict: lower``; demotions, flushes, promotions and
    write-throughs of one key in different threads at once): each thread reads back what it last
    put, and so does the next process. Threads order nothing, so this samples interleavings: the
    races it found each have a deterministic test (test_concurrency, test_redis)."""
    rng = random.Random(seed)
    if shape == "cpu-redis":
        cfg = {"tiers": [{"kind": "cpu", "capacity": "64KiB", "write": rng.choice(["through", "back"]),
                          "policy": rng.choice(["lru", "s3fifo"])},
                         {"kind": "redis", "url": request.getfixturevalue("redis_url"),
                          "key_prefix": f"race-{uuid.uuid4().hex}:", "timeout_ms": 5000}],
               "namespaces": {"kv": {"evict": "lower"}, "param": {"evict": "lower"}},
               "writeback": {"max_pending": rng.choice([1, 3, 64])}}
    else:
        cfg = _lower_chain(tmp_path, rng, shape)
    _race(cfg, [strata.open_store(cfg)], seed)


@pytest.mark.parametrize("seed", range(16))
def test_processes_sharing_a_region_over_a_file_tier_never_lose_or_go_back_on_an_acknowledged_put(tmp_path, seed):
    """As above, with the four threads on two stores (two processes, as far as the region and the
    files can tell: descriptors, locks and indexes of their own) over one cxl region and one file
    directory: each evicts the other's objects from the region, and only the process that put an
    object writes it down (another's write of it was not ordered with the owner's)."""
    cfg = _lower_chain(tmp_path, random.Random(seed), "cpu-cxl-file")
    _race(cfg, [strata.open_store(cfg), strata.open_store(cfg)], seed)


def _assert_region_accounted(store) -> None:
    """A cxl tier's allocator, brought up to the region, agrees with what it indexes: no two
    objects share bytes, and free plus held bytes make the data area (another process's put over
    bytes this one still counted, or bytes freed twice, would show)."""
    for tier in store.tiers:
        if tier.kind == "cxl":
            with store.chain.lock:
                tier._sync()
                assert_exact_accounting(tier)


def _race(cfg: dict, stores: list, seed: int) -> None:
    """Four ``_racer`` threads spread over ``stores`` (closed here): none hangs or reads a wrong
    version, and a store opened afterwards reads each thread's last puts."""
    lasts, errors = [{} for _ in range(4)], []
    try:
        threads = [threading.Thread(target=_racer, args=(stores[t % len(stores)], t, seed, lasts[t], errors))
                   for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert not errors, errors
        for store in stores:
            store.flush()  # no write down in flight
        for store in stores:
            _assert_region_accounted(store)
    finally:
        for store in stores:
            store.close()
    with strata.open_store(cfg) as store:
        for last in lasts:
            for k, v in last.items():
                assert same(store.get(k), v), k


def test_quota_keeps_a_namespace_inside_its_share():
    cfg = {"tiers": [{"kind": "cpu", "capacity": "64KiB"}], "namespaces": {"kv": {"quota": "16KiB"}}}
    with strata.open_store(cfg) as store:
        store.put(Key("param", "m", "w"), torch.zeros(8192, dtype=torch.int32))  # 32 KiB
        for i in range(10):
            assert store.put(Key("kv", "m", str(i)), torch.zeros(1024, dtype=torch.int32))  # 4 KiB each
        s = store.stats()["tiers"]["cpu"]["namespaces"]
        assert s["kv"]["bytes"] == 16 << 10 and s["param"]["bytes"] == 32 << 10


def test_lru_keeps_what_was_read_recently():
    with strata.open_store({"tiers": [{"kind": "cpu", "capacity": "16KiB", "policy": "lru"}]}) as store:
        ks = [Key("kv", "m", str(i)) for i in range(5)]
        for k in ks[:4]:
            store.put(k, torch.zeros(4096, dtype=torch.uint8))
        store.get(ks[0])
        store.put(ks[4], torch.zeros(4096, dtype=torch.uint8))
        assert [store.contains(k) for k in ks] == [True, False, True, True, True]


def test_s3fifo_drops_one_hit_wonders_before_reused_objects():
    with strata.open_store({"tiers": [{"kind": "cpu", "capacity": "40KiB", "policy": "s3fifo"}]}) as store:
        hot = [Key("kv", "hot", str(i)) for i in range(4)]
        for k in hot:
            store.put(k, torch.zeros(4096, dtype=torch.uint8))
            store.get(k)
        for i in range(40):  # a scan of objects read never
            store.put(Key("kv", "scan", str(i)), torch.zeros(4096, dtype=torch.uint8))
        assert all(store.contains(k) for k in hot)


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 8)), max_size=40), st.integers(0, 40), st.integers(0, 12))
def test_take_removes_exactly_the_free_part_of_a_range_and_free_gives_it_back(ops, start, length):
    """``ExtentAllocator.take`` (a range another process pins, kept out of an allocation's way):
    nothing it takes is handed out again until freed, and every byte outside it stays free."""
    from strata.store.allocator import ExtentAllocator
    a = ExtentAllocator(64 * 16, alignment=16)
    held: list[tuple[int, int]] = []
    for alloc, units in ops:  # some allocations and frees, so free space is fragmented
        if alloc or not held:
            off = a.alloc(units * 16)
            if off is not None:
                held.append((off, units * 16))
        else:
            a.free(*held.pop(random.Random(units).randrange(len(held))))
    used = {b for off, n in held for b in range(off, off + n, 16)}
    free_before = a.free_bytes
    lo, hi = start * 16, min(64, start + length) * 16 if length else 64 * 16
    taken = a.take(start * 16, length * 16)
    got = {b for off, n in taken for b in range(off, off + n, 16)}
    assert got == {b for b in range(lo, hi, 16) if b not in used}
    assert a.free_bytes == free_before - 16 * len(got)
    while (off := a.alloc(16)) is not None:  # everything else is still there to allocate
        assert off not in got and off not in used
    for piece in taken:
        a.free(*piece)
    back = set()
    while (off := a.alloc(16)) is not None:
        back.add(off)
    assert back == got
