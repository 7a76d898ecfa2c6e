"""Stateful property test: the engine against a plain dict, for each tier and two-tier chains."""

import tempfile
import uuid

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import strata
from strata import Key
from values import same, values

KEYS = st.builds(Key, st.sampled_from(["kv", "param"]), st.sampled_from(["s1", "s2"]), st.sampled_from("abcde"))


def machine(make_config, persistent: bool, lowest: str):
    class StoreModel(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.dir = tempfile.TemporaryDirectory()
            self.cfg = make_config(self.dir.name)
            self.store = strata.open_store(self.cfg)
            self.model: dict = {}

        def teardown(self):
            self.store.close()
            self.dir.cleanup()

        @rule(k=KEYS, v=values)
        def put(self, k, v):
            assert self.store.put(k, v)
            self.model[k] = v

        @rule(k=KEYS)
        def get(self, k):
            assert same(self.store.get(k), self.model.get(k))

        @rule(k=KEYS)
        def get_into(self, k):
            want = self.model.get(k)
            if isinstance(want, bytes):
                out = torch.empty(len(want), dtype=torch.uint8)
                assert self.store.get_into(k, out)
                assert bytes(out.tolist()) == want
            elif want is not None:
                out = torch.empty_like(want)
                assert self.store.get_into(k, out) and torch.equal(out, want)
            else:
                assert not self.store.get_into(k, torch.empty(1))

        @rule(k=KEYS)
        def delete(self, k):
            assert self.store.delete(k) == (k in self.model)
            self.model.pop(k, None)
            assert not self.store.contains(k)

        @rule(k=KEYS)
        def contains(self, k):
            assert self.store.contains(k) == (k in self.model)

        @rule(ks=st.lists(KEYS, max_size=4))
        def batch(self, ks):
            assert self.store.contains_many(ks) == [k in self.model for k in ks]
            for got, k in zip(self.store.get_many(ks), ks):
                assert same(got, self.model.get(k))

        @rule(k=KEYS)
        def flush_then_read_lowest(self, k):
            self.store.flush()
            assert same(self.store.get(k, mode="exact", tier=lowest), self.model.get(k))

        @precondition(lambda self: persistent)
        @rule()
        def restart(self):
            self.store.close()
            self.store = strata.open_store(self.cfg)

        @invariant()
        def bounded(self):
            for t in self.store.tiers:
                assert 0 <= t.used <= t.capacity

    return StoreModel


def cpu(d):
    return {"tiers": [{"kind": "cpu", "capacity": "4MiB"}]}


def cpu_verified(d):
    return {"tiers": [{"kind": "cpu", "capacity": "4MiB", "policy": "s3fifo", "verify": True}]}


def file(d):
    return {"tiers": [{"kind": "file", "path": d, "capacity": "16MiB"}]}


def chain(write):
    def make(d):
        return {"tiers": [{"kind": "cpu", "capacity": "4MiB", "write": write},
                          {"kind": "file", "path": d, "capacity": "16MiB"}],
                "writeback": {"max_pending": 3}}
    return make


def cxl(d):
    return {"tiers": [{"kind": "cxl", "path": f"{d}/region", "size": "8MiB", "policy": "s3fifo"}]}


def cpu_cxl(write):
    def make(d):
        return {"tiers": [{"kind": "cpu", "capacity": "4MiB", "write": write},
                          {"kind": "cxl", "path": f"{d}/region", "size": "16MiB"}],
                "writeback": {"max_pending": 3}}
    return make


def cpu_redis(write):
    def make(d):
        return {"tiers": [{"kind": "cpu", "capacity": "4MiB", "write": write},
                          {"kind": "redis", "url": REDIS["url"], "key_prefix": f"model-{uuid.uuid4().hex}:"}],
                "writeback": {"max_pending": 3}}
    return make


REDIS: dict = {}


@pytest.fixture
def _redis(redis_url):
    REDIS["url"] = redis_url


TestCpuTier = machine(cpu, False, "cpu").TestCase
TestCpuTierVerified = machine(cpu_verified, False, "cpu").TestCase
TestFileTier = machine(file, True, "file").TestCase
TestChainWriteThrough = machine(chain("through"), True, "file").TestCase
TestChainWriteBack = machine(chain("back"), True, "file").TestCase
TestCxlTier = machine(cxl, True, "cxl").TestCase
TestCpuCxlWriteThrough = machine(cpu_cxl("through"), True, "cxl").TestCase
TestCpuCxlWriteBack = machine(cpu_cxl("back"), True, "cxl").TestCase
TestCpuRedisWriteThrough = pytest.mark.usefixtures("_redis")(machine(cpu_redis("through"), True, "redis").TestCase)
TestCpuRedisWriteBack = pytest.mark.usefixtures("_redis")(machine(cpu_redis("back"), True, "redis").TestCase)
