"""``BackingTier`` over any ``Backend`` (issue #19): a backing store is a narrow object (exists /
get / put / delete of many names a round trip, a listing, a report, a features record), and
the tier around it owns the value format, its checks, the back-off, the watchdog and stale keys.

``DictBackend`` below is the smallest honest backend, a dict behind a "round trip" that can
fail or hang on demand, and the template for a new one (docs/TIERS.md). It passes the whole
conformance kit through the adapter, so what the kit proves of the redis tier's generic half it
proves here without a server; the tests after it pin what the adapter adds."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

import strata
from strata import Key
from strata.store.tiers.backing import BackingTier, Features
from strata.testing import check_tier
from waits import WaitSpy

STORES: dict[str, dict[bytes, bytes]] = {}  # store name -> its values: outlives a tier, as a server does
FAULTS: dict[str, str] = {}  # store name -> "error" | "timeout" while a fault is injected


class DictBackend:
    features = Features(zero_copy_reads=True, max_batch=4, max_batch_bytes=1 << 20)
    down_errors = (ConnectionError, TimeoutError)
    errors = (OSError,)

    def __init__(self, name: str):
        self.name, self.data = name, STORES.setdefault(name, {})
        self.calls = 0
        self._interrupted = threading.Event()

    def _round_trip(self) -> None:
        self.calls += 1
        fault = FAULTS.get(self.name)
        if fault == "error":
            raise ConnectionError(f"dict store {self.name} refused the connection")
        if fault == "timeout":  # hang until the tier's watchdog gives up on the call
            self._interrupted.clear()
            self._interrupted.wait(30)
            raise TimeoutError(f"dict store {self.name}: call interrupted")

    def exists_many(self, names):
        self._round_trip()
        return [n in self.data for n in names]

    def get_many(self, names):
        self._round_trip()
        return [self.data.get(n) for n in names]

    def put_many(self, pairs):
        self._round_trip()
        for n, v in pairs:
            self.data[n] = bytes(v)
        return [True] * len(pairs)

    def delete_many(self, names):
        self._round_trip()
        return [self.data.pop(n, None) is not None for n in names]

    def scan(self, prefix, call):
        yield call(lambda: [(n, len(v)) for n, v in list(self.data.items()) if n.startswith(prefix)], "list")

    def report(self):
        self._round_trip()
        return {"connected": True, "keys": len(self.data), "used_memory": sum(map(len, self.data.values()))}

    def describe(self, report):
        return f"dict store {self.name}"

    def interrupt(self):
        self._interrupted.set()

    def reset(self):
        pass

    def close(self):
        pass


class DictTier(BackingTier):
    kind = "dictstore"
    config_keys = {"store": str, "timeout_ms": int}
    config_required = ("store",)

    def __init__(self, cfg, store_cfg):
        opts = cfg.options
        super().__init__(cfg, store_cfg, DictBackend(opts["store"]), b"d:", opts.get("timeout_ms", 100))
        self.refresh()


@pytest.fixture
def dictstore(monkeypatch):
    """Kind ``dictstore`` known to configs in this test, as a built-in declared kind is."""
    from strata import config

    monkeypatch.setitem(config.DECLARED_KINDS, "dictstore", f"{__name__}:DictTier")
    yield
    STORES.clear()
    FAULTS.clear()


_count = iter(range(1 << 30))


def dict_tier(workdir, capacity=None):
    return {"kind": "dictstore", "store": f"s{next(_count)}"}


class DictRaw:
    def __init__(self, tier):
        self.data = STORES.setdefault(tier["store"], {})

    def get(self, key):
        return self.data.get(b"d:" + key)

    def set(self, key, value):
        self.data[b"d:" + key] = value


@contextlib.contextmanager
def dict_fault(tier, kind):
    FAULTS[tier["store"]] = kind
    try:
        yield
    finally:
        del FAULTS[tier["store"]]


def test_a_dict_behind_the_backing_adapter_passes_the_conformance_kit(dictstore, tmp_path):
    report = check_tier(dict_tier, name="dictstore", persistent=True, raw=DictRaw, fault=dict_fault,
                        examples=10, steps=30, workdir=tmp_path, call_bound_s=3.0)
    assert set(report.skipped) == {"capacity"}, str(report)  # the store's capacity is its own, as Redis's
    assert len(report.passed) == 31


def test_a_configured_kind_checks_its_declared_keys(dictstore):
    with pytest.raises(strata.ConfigError, match=r"tiers\[0\].store: missing; allowed: a str .*'dictstore'"):
        strata.open_store({"tiers": [{"kind": "dictstore"}]})
    with pytest.raises(strata.ConfigError, match=r"unknown key tiers\[0\]: got 'stroe'.*did you mean 'store'"):
        strata.open_store({"tiers": [{"kind": "dictstore", "stroe": "x"}]})
    with pytest.raises(strata.ConfigError, match=r"tiers\[0\].timeout_ms: got 'fast'; allowed: an integer"):
        strata.open_store({"tiers": [{"kind": "dictstore", "store": "x", "timeout_ms": "fast"}]})


def test_batches_follow_the_backends_features_and_a_hung_call_is_cut_by_the_watchdog(dictstore):
    with strata.open_store({"tiers": [{"kind": "dictstore", "store": "b", "timeout_ms": 50}]}) as store:
        tier, backend = store.tiers[0], store.tiers[0].backend
        keys = [Key("kv", "s", f"c{i}") for i in range(10)]
        before = backend.calls
        assert store.put_many([(k, torch.full((8,), float(i))) for i, k in enumerate(keys)]) == [True] * 10
        assert backend.calls - before == 3  # one batch down the chain, sent in max_batch 4: 4 + 4 + 2
        before = backend.calls
        got = store.get_many(keys)
        assert [int(g[0]) for g in got] == list(range(10)) and backend.calls - before == 3  # max_batch 4: 4 + 4 + 2
        before = backend.calls
        assert store.contains_many(keys) == [True] * 10 and backend.calls - before == 1
        FAULTS["b"] = "timeout"
        t0 = time.monotonic()
        assert store.get(keys[0]) is None  # the watchdog interrupts the hung call: a miss, counted
        assert time.monotonic() - t0 < 2.0
        assert tier.stats()["errors"] + tier.stats()["misses"] >= 1 and tier.stats()["server"] != {}
        del FAULTS["b"]
        assert store.get(keys[1]) is None  # within the back-off the store is not even asked
        assert tier.skipped >= 1


def test_a_damaged_value_is_a_miss_and_deleted_on_the_store(dictstore):
    with strata.open_store({"tiers": [{"kind": "dictstore", "store": "d"}]}) as store:
        k, other = Key("kv", "s", "a"), Key("kv", "s", "b")
        assert store.put(k, torch.arange(16.0)) and store.put(other, torch.ones(4))
        STORES["d"][b"d:" + k.encoded] = STORES["d"][b"d:" + other.encoded]  # another key's value
        assert store.get(k) is None
        s = store.stats()["tiers"]["dictstore"]
        assert s["checksum_failures"] == 1
        assert not store.contains(k) and b"d:" + k.encoded not in STORES["d"]
        assert torch.equal(store.get(other), torch.ones(4))


def test_a_demotion_of_many_victims_is_one_batch_to_the_backing_tier(dictstore, monkeypatch):
    """cpu (4 KiB, write: back) over a dict store, its flusher kept idle so the four values it
    holds stay dirty: a 4 KiB put must demote all four, and they reach the store in one put_many
    round trip (not one per victim), then read back from it."""
    from strata.store import writeback

    monkeypatch.setattr(writeback.WriteBack, "enqueue", lambda self, i, e, block=True: None)
    cfg = {"tiers": [{"kind": "cpu", "capacity": "4KiB", "write": "back", "pin": "never"},
                     {"kind": "dictstore", "store": "demote"}]}
    with strata.open_store(cfg) as store:
        backend = store.tiers[1].backend
        batches = []
        real = backend.put_many
        monkeypatch.setattr(backend, "put_many", lambda pairs: batches.append(len(pairs)) or real(pairs))
        keys = [Key("kv", "d", f"v{i}") for i in range(5)]
        values = [torch.full((256,), float(i)) for i in range(4)] + [torch.full((1024,), 4.0)]
        for k, v in zip(keys[:4], values[:4]):
            assert store.put(k, v)
        assert batches == []  # all four dirty in the cpu tier, nothing written below yet
        assert store.put(keys[4], values[4])
        assert batches == [4], batches
        for k, v in zip(keys, values):
            got = store.get(k)
            assert got is not None and torch.equal(got, v)


def test_a_delete_waits_for_a_put_of_the_key_in_flight_to_the_backing_tier(dictstore):
    """cpu write-through over a dict store: a put's value lands on the store before the chain
    publishes it there, so a delete that came meanwhile waits for it (inside the backing tier's
    ``remove``) and then deletes it: after the delete returns the store does not hold the key."""
    cfg = {"tiers": [{"kind": "cpu", "capacity": "1MiB", "pin": "never"}, {"kind": "dictstore", "store": "w"}]}
    with strata.open_store(cfg) as store:
        tier, k = store.tiers[1], Key("kv", "w", "a")
        real, entered, go, landed = tier.backend.put_many, threading.Event(), threading.Event(), threading.Event()

        def held_put(pairs):  # the store takes the value only when the test says
            entered.set()
            assert go.wait(30), "the test never released the held put"
            out = real(pairs)
            landed.set()
            return out

        tier.backend.put_many = held_put
        putter = threading.Thread(target=store.put, args=(k, torch.ones(10)))
        putter.start()
        assert entered.wait(10)
        seen: dict = {}

        def delete():
            seen["found"] = store.delete(k)
            seen["landed_before_return"] = landed.is_set()

        spy = WaitSpy(tier._writes_done, delete)  # the delete's wait for the put in flight, seen as it happens
        try:
            assert spy.blocked(), "the delete returned while the key's put was in flight"
        finally:
            go.set()
            spy.thread.join(30)
            putter.join(30)
        assert seen == {"found": True, "landed_before_return": True}
        assert b"d:" + k.encoded not in STORES["w"] and store.get(k) is None
