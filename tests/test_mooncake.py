"""The mooncake tier (issue #21) against a real mooncake_master: the conformance kit over
``cpu -> mooncake`` and alone, damage made by another client, a master killed mid-run (misses,
serving goes on, hits resume after it comes back), config errors, and the preset.

A store server holds the pool's memory here, as in a deployment: one long-lived client of this
module (``holder``) contributes the segment, and the stores under test contribute none
(``segment: 0``), so what a store put outlives it, as it does when store servers run elsewhere."""

from __future__ import annotations

import contextlib
import uuid

import pytest
import torch

import strata
from strata import Key
from strata.testing import check_tier
from mooncake_server import MooncakeMaster, need_mooncake


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    need_mooncake()
    m = MooncakeMaster(tmp_path_factory.mktemp("mooncake-tier")).start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def holder(master):
    """The store server: 256 MiB of the pool, and a raw client for the damage checks."""
    b = master.backend(segment_bytes=256 << 20, buffer_bytes=32 << 20, timeout_ms=1000)
    yield b
    b.close()


def tier_of(master, **kw) -> dict:
    return {"kind": "mooncake", "master": master.master, "metadata_url": master.metadata_url,
            "admin_url": master.admin_url, "segment": 0, "buffer": "32MiB", "timeout_ms": 500,
            "key_prefix": f"conf-{uuid.uuid4().hex}:", **kw}


class HolderRaw:
    """A value as the tier stores it, through the store server's own client."""

    def __init__(self, holder, tier):
        self.b, self.prefix = holder, tier["key_prefix"].encode()

    def get(self, key):
        got = self.b.get_many([self.prefix + key])[0]
        return None if got is None or isinstance(got, Exception) else bytes(got)

    def set(self, key, value):
        if not value:
            raise NotImplementedError("Mooncake refuses an empty value")
        assert self.b.put_many([(self.prefix + key, value)]) == [True]


def test_the_mooncake_tier_conforms_alone_and_under_a_cpu_tier(master, holder, tmp_path):
    @contextlib.contextmanager
    def paused(tier, kind):
        """timeout: the master hangs (SIGSTOP). error: killed, then started again (empty)."""
        if kind == "error":
            raise NotImplementedError("a killed master forgets every value: tested on its own below")
        master.pause()
        try:
            yield
        finally:
            master.resume()

    report = check_tier(lambda workdir, capacity=None: tier_of(master), name="mooncake", persistent=True,
                        raw=lambda tier: HolderRaw(holder, tier), fault=paused, examples=6, steps=25,
                        workdir=tmp_path, call_bound_s=4.0)
    print(report)
    assert set(report.skipped) <= {"capacity", "faults/error/alone", "faults/error/through", "faults/error/back"}, \
        str(report)


def test_a_killed_master_is_misses_serving_goes_on_and_hits_resume_after_it_returns(tmp_path):
    need_mooncake()
    m = MooncakeMaster(tmp_path).start()
    try:
        server = m.backend(segment_bytes=64 << 20, buffer_bytes=16 << 20)
        cfg = {"tiers": [{"kind": "cpu", "capacity": "64KiB"}, tier_of(m)]}
        with strata.open_store(cfg) as store:
            keys = [Key("kv", "s", f"c{i}") for i in range(8)]
            values = [torch.full((4096,), float(i)) for i in range(8)]  # 16 KiB each: most live only below
            assert store.put_many(list(zip(keys, values))) == [True] * 8
            m.stop()
            got = store.get_many(keys)
            assert all(g is None or torch.equal(g, v) for g, v in zip(got, values))  # misses, never wrong bytes
            assert any(g is None for g in got)
            assert store.put(Key("kv", "s", "during"), torch.ones(8))  # the cpu tier takes it
            s = store.stats()["tiers"]["mooncake"]
            assert s["errors"] + s["skipped_while_down"] >= 1 and s["server"]["connected"] is False
            m.start()  # empty: a master keeps its index in memory
            k = Key("kv", "s", "after")

            def served_again():
                store.tiers[1]._down_until = 0.0  # past the back-off, as time would make it
                return store.put(k, torch.full((4096,), 7.0)) and \
                    store.get(k, mode="exact", tier="mooncake") is not None

            deadline = __import__("time").monotonic() + 30
            while not served_again():  # the segments remount by themselves within a second or so
                assert __import__("time").monotonic() < deadline, "the tier did not serve again after the restart"
            assert torch.equal(store.get(k, mode="exact", tier="mooncake"), torch.full((4096,), 7.0))
        server.close()
    finally:
        m.stop()


def test_a_value_another_client_overwrote_is_a_miss_and_dropped(master, holder):
    cfg = {"tiers": [tier_of(master)]}
    with strata.open_store(cfg) as store:
        k, other = Key("kv", "s", "a"), Key("kv", "s", "b")
        assert store.put(k, torch.arange(64.0)) and store.put(other, torch.ones(64))
        raw = HolderRaw(holder, cfg["tiers"][0])
        raw.set(k.encoded, raw.get(other.encoded))
        assert store.get(k) is None
        assert store.stats()["tiers"]["mooncake"]["checksum_failures"] == 1
        assert not store.contains(k) and raw.get(k.encoded) is None  # deleted on the store
        assert torch.equal(store.get(other), torch.ones(64))


@pytest.mark.parametrize("tier, says", [
    ({"kind": "mooncake", "metadata_url": "http://h:1/metadata"}, r"tiers\[0\].master: missing; allowed: 'host:port'"),
    ({"kind": "mooncake", "master": "h", "metadata_url": "http://h:1/metadata"},
     r"tiers\[0\].master: got 'h'; allowed: 'host:port'"),
    ({"kind": "mooncake", "master": "h:1", "metadata_url": "ftp://x"}, r"tiers\[0\].metadata_url: got 'ftp://x'"),
    ({"kind": "mooncake", "master": "h:1", "metadata_url": "http://h:1/m", "protocol": "udp"},
     r"tiers\[0\].protocol: got 'udp'; allowed: .*rdma.*tcp"),
    ({"kind": "mooncake", "master": "h:1", "metadata_url": "http://h:1/m", "segmnet": 0},
     r"unknown key tiers\[0\]: got 'segmnet'.*did you mean 'segment'"),
])
def test_bad_config_names_the_field_and_what_is_allowed(tier, says):
    with pytest.raises(strata.ConfigError, match=says):
        strata.load_config({"tiers": [tier]})
