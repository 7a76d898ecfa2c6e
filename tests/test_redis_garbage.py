"""A Redis server that answers garbage: the redis tier degrades to misses and counters.

A small fake server on 127.0.0.1 (one thread, one selector, stopped at the end) answers
every command with bytes that are not RESP, RESP that does not fit the command, replies cut
short, closed connections or silence; or, in the second form, well-formed RESP whose GET
answers are not Strata values. A store in front of it (a CPU tier, then the redis tier)
must never raise, never return bytes it was not given for that key, and never hang: every
call returns within a bound set by ``timeout_ms``.

The server, its answerers and the workload live in ``benchmarks/fake_redis.py``: the
``redis_garbage`` scenario of ``benchmarks/reliability.py`` runs them for the Reliability table in
docs/BENCHMARKS.md, counting what here fails a test.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

import strata
from strata import Key

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from fake_redis import CALL_BOUND_S, Drip, FakeRedis, exercise, garbage, wellformed  # noqa: E402

pytest.importorskip("redis")


@pytest.fixture
def every_call_asks_the_server(monkeypatch):
    """No back-off after a fault: every call meets the garbage, not a skip."""
    from strata.store.tiers import backing as redis_tier

    monkeypatch.setattr(redis_tier, "BACKOFF_S", 0.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_server_answering_garbage_is_misses_and_errors_never_an_exception(every_call_asks_the_server, seed):
    server = FakeRedis(garbage, seed)
    try:
        seen, redis = exercise(server, seed)
    finally:
        server.stop()
    assert server.replies > 0 and seen["calls"] > 200
    assert redis["hits"] == 0  # nothing the server said was ever served
    assert redis["errors"] > 0 and redis["misses"] > 0  # the garbage was met, and counted


@pytest.mark.parametrize("seed", [1, 2])
def test_a_server_answering_well_formed_resp_that_holds_no_strata_value_is_misses(every_call_asks_the_server, seed):
    server = FakeRedis(wellformed, seed)
    try:
        seen, redis = exercise(server, seed)
    finally:
        server.stop()
    assert server.replies > 0
    assert redis["hits"] == 0 and redis["misses"] > 0
    assert redis["checksum_failures"] > 0  # values read, checked, refused (and deleted)


def test_the_fake_server_speaks_enough_resp_for_a_real_client():
    """The second server is a fair test only if a real client can talk to it."""
    import redis

    server = FakeRedis(wellformed, 0)
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        assert client.set("x", b"1") is True and client.dbsize() in (0, 1)
        got = client.get("x")
        assert got is None or isinstance(got, bytes)
        client.close()
    finally:
        server.stop()


def test_a_server_that_drips_a_reply_cannot_hold_a_call_past_its_bound():
    """``timeout_ms`` bounds each call, not each socket read: a reply that comes one byte at a
    time, every byte well inside the timeout, must not hold a read for (here) half a minute."""
    timeout_ms = 500  # a byte every 25 ms: 20 times inside it, so a busy machine cannot end the drip early

    def dripping(cmd, rng):
        if cmd[:1] == [b"GET"]:
            return Drip(b"$1200\r\n" + bytes(1200) + b"\r\n", timeout_ms / 20_000)
        return wellformed(cmd, rng)

    server = FakeRedis(dripping, 0)
    cfg = {"tiers": [{"kind": "redis", "url": server.url, "timeout_ms": timeout_ms, "key_prefix": "drip:"}]}
    got: dict = {}
    try:
        with strata.open_store(cfg) as store:
            reader = threading.Thread(target=lambda: got.setdefault("value", store.get(Key("kv", "drip", "a"))),
                                      daemon=True)
            t0 = time.monotonic()
            reader.start()
            reader.join(CALL_BOUND_S)  # ten times timeout_ms
            took = time.monotonic() - t0
            held = reader.is_alive()
            server.stop()  # ends the drip: a reader still waiting gets a closed connection
            reader.join(10)
    finally:
        server.stop()
    assert not held, f"a get was held {took:.1f} s by a server dripping its reply (timeout_ms={timeout_ms})"
    assert got == {"value": None}
