"""The redis tier against a real redis-server: values, checks, sharing, faults, config."""

import logging
import os
import signal
import threading
import time
import uuid

import pytest
import torch

import strata
from strata import Key
from strata.cli import main as cli_main
from strata.errors import ConfigError
from waits import WaitSpy


def redis_tier(url, **extra):
    return {"kind": "redis", "url": url, "key_prefix": f"t-{uuid.uuid4().hex}:", **extra}


def cpu_redis(url, write="through", cpu="4MiB", **extra):
    return {"tiers": [{"kind": "cpu", "capacity": cpu, "write": write}, redis_tier(url, **extra)]}


K = Key("kv", "llama-x", "chunk-0")


def test_values_carry_the_header_and_checksum_and_are_shared_by_a_second_store(redis_url):
    cfg = cpu_redis(redis_url)
    t = torch.randn(64, 32)
    with strata.open_store(cfg) as a, strata.open_store(cfg) as b:  # two instances, one Redis
        assert a.put(K, t)
        raw = a.tiers[1].client.get(a.tiers[1].prefix + K.encoded)
        assert raw[:4] == b"STRO" and len(raw) > t.numel() * 4  # Strata's header, then the payload
        assert b.contains(K) and torch.equal(b.get(K), t)
        s = b.stats()["tiers"]
        assert s["redis"]["hits"] == 1 and s["cpu"]["promotions"] == 1  # promoted into b's CPU tier
        assert torch.equal(b.get(K, mode="exact", tier="cpu"), t)
        out = torch.empty(64 * 32 * 4, dtype=torch.uint8)  # get_into in the stored bytes
        assert b.get_into(K, out, mode="exact", tier="redis") and torch.equal(out.view(torch.float32).view(64, 32), t)
        assert b.delete(K) and not a.contains(K, mode="exact", tier="redis")


@pytest.mark.parametrize("damage", ["flip", "cut", "other_key", "garbage"])
def test_a_damaged_value_is_a_miss_counted_and_deleted(redis_url, damage):
    cfg = {"tiers": [redis_tier(redis_url)]}
    with strata.open_store(cfg) as store:
        tier = store.tiers[0]
        other = Key("kv", "llama-x", "chunk-1")
        assert store.put(K, torch.arange(1000.0)) and store.put(other, torch.arange(1000.0))
        name = tier.prefix + K.encoded
        raw = tier.client.get(name)
        if damage == "flip":
            tier.client.setrange(name, len(raw) - 100, b"\xff")
        elif damage == "cut":
            tier.client.set(name, raw[:-8])
        elif damage == "other_key":
            tier.client.set(name, tier.client.get(tier.prefix + other.encoded))
        else:
            tier.client.set(name, b"not a strata value")
        assert store.get(K) is None
        s = store.stats()["tiers"]["redis"]
        assert s["checksum_failures"] == 1 and s["misses"] == 1
        assert tier.client.exists(name) == 0  # dropped: never served again
        assert torch.equal(store.get(other), torch.arange(1000.0))


def test_scopes_and_prefixes_never_read_each_other(redis_url):
    prefix = f"t-{uuid.uuid4().hex}:"
    with strata.open_store({"tiers": [redis_tier(redis_url, key_prefix=prefix)]}) as a, \
            strata.open_store({"tiers": [redis_tier(redis_url)]}) as other_prefix:
        assert a.put(Key("kv", "model-a", "c0"), b"a's bytes")
        assert a.get(Key("kv", "model-b", "c0")) is None and not a.contains(Key("param", "model-a", "c0"))
        assert other_prefix.get(Key("kv", "model-a", "c0")) is None
        assert [k.scope for k in a.keys("kv")] == ["model-a"]


def test_contains_many_is_one_round_trip(redis_url):
    with strata.open_store({"tiers": [redis_tier(redis_url)]}) as store:
        keys = [Key("kv", "s", f"c{i}") for i in range(16)]
        for k in keys[:5]:
            store.put(k, b"x")
        tier = store.tiers[0]
        calls = []
        real = tier.client.pipeline

        def counting(*a, **kw):
            calls.append(1)
            return real(*a, **kw)

        tier.client.pipeline = counting
        assert store.contains_many(keys) == [True] * 5 + [False] * 11
        assert len(calls) == 1


def test_a_batch_of_reads_takes_a_round_trip_per_16_keys(redis_url):
    cfg = cpu_redis(redis_url, cpu="8MiB")
    keys = [Key("kv", "s", f"c{i}") for i in range(20)]
    values = [torch.randn(1000 + i) for i in range(18)]  # the last two keys were never stored
    with strata.open_store(cfg) as a, strata.open_store(cfg) as b, strata.open_store(cfg) as c:
        for k, v in zip(keys, values):
            assert a.put(k, v)
        redis = b.tiers[1]
        before = redis.round_trips
        got = b.get_many(keys)
        assert redis.round_trips - before == 2  # 20 keys: two pipelined round trips, not 20 GETs
        assert all(torch.equal(g, v) for g, v in zip(got, values)) and got[18:] == [None, None]
        s = b.stats()
        assert s["tiers"]["redis"]["hits"] == 18 and s["tiers"]["cpu"]["promotions"] == 18
        assert s["namespaces"]["kv"]["hits"] == 18 and s["namespaces"]["kv"]["misses"] == 2
        before = redis.round_trips
        assert all(torch.equal(g, v) for g, v in zip(b.get_many(keys[:18]), values))
        assert redis.round_trips == before  # all from b's CPU tier now

        redis = c.tiers[1]
        before = redis.round_trips
        assert c.prefetch(keys) == 18 and redis.round_trips - before == 2
        assert c.prefetch(keys[:18]) == 0 and redis.round_trips - before == 2  # local now: not asked
        for k, v in zip(keys, values):
            assert torch.equal(c.get(k, mode="exact", tier="cpu"), v)


def test_write_back_sends_what_is_queued_to_redis_in_batches(redis_url):
    with strata.open_store(cpu_redis(redis_url, write="back", cpu="8MiB")) as store:
        redis = store.tiers[1]
        real, go = redis.write_many, threading.Event()
        sizes = []

        def held(pairs):  # the first flush waits, so the other puts queue up behind it
            sizes.append(len(pairs))
            go.wait(5)
            return real(pairs)

        redis.write_many = held
        keys = [Key("kv", "s", f"c{i}") for i in range(20)]
        before = redis.round_trips
        for i, k in enumerate(keys):
            assert store.put(k, torch.full((1000,), float(i)))
        go.set()
        store.flush()
        # the first flush takes what was queued when it woke; the rest follow in batches of 16
        assert sum(sizes) == 20 and max(sizes) <= 16 and len(sizes) <= 3
        assert redis.round_trips - before == len(sizes)  # not 20 SETs
        assert store.stats()["writeback"]["flushed"] == 20
        for i, k in enumerate(keys):
            assert torch.equal(store.get(k, mode="exact", tier="redis"), torch.full((1000,), float(i)))


def test_lease_many_leases_what_is_local_and_brings_the_rest_up_in_one_batch(redis_url):
    cfg = cpu_redis(redis_url, cpu="8MiB")
    keys = [Key("kv", "s", f"c{i}") for i in range(12)]
    values = [torch.randn(500 + i) for i in range(11)]  # the last key was never stored
    with strata.open_store(cfg) as a, strata.open_store(cfg) as b:
        for k, v in zip(keys, values):
            assert a.put(k, v)
        assert b.get(keys[0]) is not None  # one chunk already in b's CPU tier
        cpu, redis = b.tiers
        before = redis.round_trips
        with b.lease_many(keys) as views:
            assert redis.round_trips - before == 1  # 10 keys from Redis: one pipelined round trip
            assert all(torch.equal(w, v) for w, v in zip(views, values)) and views[11] is None
            assert all(cpu.index[k.encoded].leases == 1 for k in keys[:11])  # in place, held
        assert all(cpu.index[k.encoded].leases == 0 for k in keys[:11])
        ns = b.stats()["namespaces"]["kv"]
        assert ns["hits"] == 1 + 11 and ns["misses"] == 1
    with strata.open_store({"tiers": [dict(cfg["tiers"][1])]}) as alone:  # Redis alone: private copies
        before = alone.tiers[0].round_trips
        with alone.lease_many(keys) as views:
            assert alone.tiers[0].round_trips - before == 1
            assert all(torch.equal(w, v) for w, v in zip(views, values)) and views[11] is None


def test_a_damaged_value_in_a_batch_is_a_miss_and_the_rest_are_served(redis_url):
    with strata.open_store({"tiers": [redis_tier(redis_url)]}) as store:
        tier = store.tiers[0]
        keys = [Key("kv", "s", f"c{i}") for i in range(5)]
        for i, k in enumerate(keys):
            store.put(k, torch.full((100,), float(i)))
        tier.client.setrange(tier.prefix + keys[2].encoded, 200, b"\x00\x01")
        got = store.get_many(keys)
        assert got[2] is None and [g[0].item() for j, g in enumerate(got) if j != 2] == [0.0, 1.0, 3.0, 4.0]
        s = store.stats()["tiers"]["redis"]
        assert s["checksum_failures"] == 1 and s["hits"] == 4 and s["misses"] == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int16, torch.bool, torch.complex64])
def test_values_read_back_exactly_for_any_dtype_and_key_length(redis_url, dtype):
    with strata.open_store({"tiers": [redis_tier(redis_url)]}) as store:
        for n in range(1, 18):  # header lengths of every residue: the payload offset moves
            key = Key("kv", "s", "k" * n)
            value = (torch.randn(3, 7) * 100).to(dtype)
            assert store.put(key, value)
            got = store.get(key)
            assert got.dtype == dtype and got.shape == (3, 7) and torch.equal(got, value)
            got.zero_()  # the caller's own tensor: the stored value is untouched
            assert torch.equal(store.get_many([key])[0], value)


def test_a_lease_without_a_memory_tier_is_a_private_copy_and_a_miss_counts_once(redis_url):
    with strata.open_store({"tiers": [redis_tier(redis_url)]}) as store:
        store.put(K, torch.arange(10.0))
        with store.lease(K) as view:
            assert torch.equal(view, torch.arange(10.0))
        with store.lease(Key("kv", "llama-x", "absent")) as view:
            assert view is None
        ns = store.stats()["namespaces"]["kv"]
        assert ns["hits"] == 1 and ns["misses"] == 1 and store.stats()["tiers"]["redis"]["misses"] == 1
        before = store.tiers[0].round_trips
        assert store.prefetch([K]) == 0 and store.tiers[0].round_trips == before  # nowhere to bring it up to


class TierClock:
    """The redis tier's ``time`` module with ``monotonic()`` standing still until a test moves it."""

    def __init__(self):
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def _timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_server_is_misses_and_dropped_writes_within_the_timeout(redis_server, fault, monkeypatch):
    from strata.store.tiers import backing as redis_tier_module

    clock = TierClock()  # the back-off runs on this clock: moved past it, never slept through
    monkeypatch.setattr(redis_tier_module, "time", clock)
    cfg = cpu_redis(redis_server.url, cpu="1MiB", timeout_ms=300)
    with strata.open_store(cfg) as store:
        assert store.put(K, torch.ones(1000))
        if fault == "killed":
            redis_server.stop()
        else:
            os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            k2 = Key("kv", "llama-x", "chunk-2")
            ok, took = _timed(lambda: store.put(k2, torch.zeros(1000)))
            assert ok and took < 1.0  # the CPU tier took it; Redis's copy is dropped and counted
            got, took = _timed(lambda: store.get(Key("kv", "llama-x", "absent")))
            assert got is None and took < 1.0
            got, took = _timed(lambda: store.get_many([Key("kv", "llama-x", f"absent-{i}") for i in range(40)] + [K]))
            assert got[:40] == [None] * 40 and torch.equal(got[40], torch.ones(1000)) and took < 1.0
            assert store.contains_many([K, Key("kv", "x", "y")]) == [True, False]
            s = store.stats()["tiers"]["redis"]
            assert s["dropped_writes"] >= 1 and s["errors"] >= 1 and s["server"]["connected"] is False
            assert torch.equal(store.get(k2), torch.zeros(1000))  # served from the CPU tier
        finally:
            if fault == "hung":
                os.kill(redis_server.proc.pid, signal.SIGCONT)
        if fault == "killed":
            redis_server.start()  # back, empty, on the same port
        skipped = store.tiers[1].skipped
        assert store.get(Key("kv", "llama-x", "absent")) is None  # within the back-off: not even asked
        assert store.tiers[1].skipped == skipped + 1
        clock.now += redis_tier_module.BACKOFF_S + 0.001  # the back-off is over: the next call tries again
        k3 = Key("kv", "llama-x", "chunk-3")
        assert store.put(k3, torch.full((10,), 3.0))
        assert torch.equal(store.get(k3, mode="exact", tier="redis"), torch.full((10,), 3.0))
        assert store.stats()["tiers"]["redis"]["server"]["connected"] is True


def test_a_full_server_drops_writes_and_keeps_serving(redis_server, caplog):
    client = redis_server.client()
    client.config_set("maxmemory", 8 << 20)  # the query buffer of a put counts too
    client.config_set("maxmemory-policy", "noeviction")
    with caplog.at_level(logging.WARNING, logger="strata.redis"):
        store = strata.open_store({"tiers": [redis_tier(redis_server.url)]})
    assert "noeviction" in caplog.text
    with store:
        results = [store.put(Key("kv", "s", f"c{i}"), torch.zeros(256 << 10)) for i in range(12)]  # 1 MiB each
        assert results[0] and not all(results)
        s = store.stats()["tiers"]["redis"]
        assert s["dropped_writes"] == results.count(False) and s["server"]["connected"] is True
        assert torch.equal(store.get(Key("kv", "s", "c0")), torch.zeros(256 << 10))


def test_maxmemory_and_policy_are_set_and_read_back(redis_server):
    cfg = {"tiers": [redis_tier(redis_server.url, maxmemory="64MiB", maxmemory_policy="allkeys-lfu")]}
    with strata.open_store(cfg) as store:
        s = store.stats()["tiers"]["redis"]
        assert s["server"]["maxmemory"] == 64 << 20 and s["server"]["maxmemory_policy"] == "allkeys-lfu"
        assert s["capacity"] == 64 << 20
    assert redis_server.client().config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lfu"}


def test_a_password_from_the_environment_is_used_and_never_shown(redis_server, monkeypatch, caplog, capsys):
    secret = "s3cret-" + uuid.uuid4().hex
    redis_server.client().config_set("requirepass", secret)
    monkeypatch.setenv("STRATA_TEST_REDIS_PW", secret)
    with caplog.at_level(logging.DEBUG):
        with strata.open_store({"tiers": [redis_tier(redis_server.url, password_env="STRATA_TEST_REDIS_PW")]}) as s:
            assert s.put(K, b"behind a password") and s.get(K) == b"behind a password"
            assert secret not in repr(s.stats()) and secret not in repr(s.config)
        url = redis_server.url.replace("redis://", f"redis://:{secret}@")
        with strata.open_store({"tiers": [redis_tier(url)]}) as s:
            assert s.get(K) is None  # another prefix, same server: reachable with the password in the URL
            assert secret not in repr(s.stats()) and ":***@" in s.stats()["tiers"]["redis"]["url"]
        with strata.open_store({"tiers": [redis_tier(redis_server.url, password="wrong")]}) as s:
            assert s.put(K, b"x") is False and s.get(K) is None  # refused: a miss and a counter, no crash
            assert s.stats()["tiers"]["redis"]["errors"] >= 1
    assert secret not in caplog.text


def test_unix_socket_urls(tmp_path):
    from redis_server import RedisServer, need_redis

    need_redis()
    server = RedisServer(tmp_path)
    sock = tmp_path / "redis.sock"
    server.args += ["--unixsocket", str(sock)]
    server.start()
    try:
        with strata.open_store({"tiers": [redis_tier(f"unix://{sock}?db=1")]}) as store:
            assert store.put(K, b"over a socket") and store.get(K) == b"over a socket"
        assert server.client().dbsize() == 0  # db 0 is untouched
    finally:
        server.stop()


@pytest.mark.parametrize("tier, message", [
    ({"kind": "redis"}, r"tiers\[0\]\.url: got None; allowed: a URL starting with redis://, rediss://, unix://"),
    ({"kind": "redis", "url": "http://x"}, r"tiers\[0\]\.url: got 'http://x'"),
    ({"kind": "redis", "url": "redis://h", "capacity": "1GiB"}, r"unknown key tiers\[0\]: got 'capacity'"),
    ({"kind": "redis", "url": "redis://h", "timeout_ms": 0}, r"tiers\[0\]\.timeout_ms: got 0; allowed: an integer >= 1"),
    ({"kind": "redis", "url": "redis://h", "maxmemory_policy": "lru"}, r"tiers\[0\]\.maxmemory_policy: got 'lru'"),
    ({"kind": "redis", "url": "redis://h", "password": "a", "password_env": "B"},
     r"tiers\[0\]\.password_env: set with password"),
    ({"kind": "redis", "url": "redis://h", "password_env": "STRATA_NO_SUCH_VARIABLE"},
     r"tiers\[0\]\.password_env: the environment variable 'STRATA_NO_SUCH_VARIABLE' is not set"),
])
def test_config_errors_name_the_field(tier, message):
    with pytest.raises(ConfigError, match=message):
        strata.open_store({"tiers": [tier]})


def test_quotas_on_a_redis_tier_are_refused():
    cfg = {"tiers": [{"kind": "cpu", "capacity": "1MiB"}, {"kind": "redis", "url": "redis://127.0.0.1:1/0"}],
           "namespaces": {"kv": {"quota": {"redis": "1GiB"}}}}
    with pytest.raises(ConfigError, match=r"namespaces\.kv\.quota\.redis: a redis tier is bounded by the server's "
                                          r"maxmemory; allowed: quotas on cpu"):
        strata.open_store(cfg)


def test_a_store_opens_while_redis_is_down_and_says_so(caplog):
    from redis_server import free_port, need_redis

    need_redis()
    with caplog.at_level(logging.WARNING, logger="strata.redis"):
        store = strata.open_store(cpu_redis(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=100))
    with store:
        assert "unreachable" in caplog.text
        assert store.put(K, b"kept in the CPU tier") and store.get(K) == b"kept in the CPU tier"


def test_inspect_shows_the_connection_bytes_objects_and_hit_rate(redis_url, tmp_path, capsys):
    cfg = tmp_path / "s.yaml"
    prefix = f"t-{uuid.uuid4().hex}:"
    cfg.write_text(f"tiers:\n  - kind: redis\n    url: {redis_url}\n    key_prefix: '{prefix}'\n")
    with strata.open_store(str(cfg)) as store:
        for i in range(3):
            store.put(Key("kv", "llama-x", f"c{i}"), torch.zeros(1000))
        store.get(Key("kv", "llama-x", "c0"))
    assert cli_main(["inspect", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"redis (redis, {redis_url}, connected): 3 objects" in out
    assert "hit rate" in out and "keys" in out and "llama-x" in out


def _listening(port: int, proc, limit_s: float = 10) -> bool:
    """True once 127.0.0.1:``port`` accepts a connection; False if ``proc`` exits first or at the
    deadline (a safety bound: the wait ends as soon as either happens)."""
    import socket

    deadline = time.monotonic() + limit_s
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def test_tls_with_a_ca_file_in_the_url(tmp_path):
    """rediss:// against a TLS-only redis-server; the CA file rides in the URL's query."""
    import subprocess

    from redis_server import RedisServer, free_port, need_redis

    need_redis()
    ca, key, crt = tmp_path / "ca.crt", tmp_path / "server.key", tmp_path / "server.crt"

    def ssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    try:
        ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=strata-test-ca",
            "-keyout", str(tmp_path / "ca.key"), "-out", str(ca))
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key),
            "-out", str(tmp_path / "server.csr"))
        (tmp_path / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
        ssl("x509", "-req", "-in", str(tmp_path / "server.csr"), "-CA", str(ca), "-CAkey", str(tmp_path / "ca.key"),
            "-CAcreateserial", "-days", "1", "-extfile", str(tmp_path / "ext"), "-out", str(crt))
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"openssl could not make test certificates: {e}")
    server = RedisServer(tmp_path)
    tls_port = free_port()
    server.args += ["--port", "0", "--tls-port", str(tls_port), "--tls-cert-file", str(crt), "--tls-key-file",
                    str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
    server.proc = subprocess.Popen(server.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not _listening(tls_port, server.proc):
            if server.proc.poll() is not None:
                pytest.skip(f"this redis-server has no TLS: {server.proc.stderr.read()[-300:]!r}")
            pytest.fail(f"redis-server did not listen on its TLS port {tls_port} within 10 s")
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}"
        with strata.open_store({"tiers": [redis_tier(url, timeout_ms=2000)]}) as store:
            assert store.put(K, b"over TLS") and store.get(K) == b"over TLS"
            assert store.stats()["tiers"]["redis"]["server"]["connected"] is True
        with strata.open_store({"tiers": [redis_tier(f"rediss://127.0.0.1:{tls_port}/0", timeout_ms=2000)]}) as s:
            assert s.put(K, b"x") is False  # an unknown CA: refused, a dropped write, no crash
    finally:
        server.stop()


def test_a_delete_waits_for_a_write_back_of_the_key_in_flight(redis_url):
    with strata.open_store(cpu_redis(redis_url, write="back")) as store:
        tier = store.tiers[1]
        real, entered, go, landed = tier.write_many, threading.Event(), threading.Event(), threading.Event()

        def held_write(pairs):  # the flush's SET lands only when the test says
            entered.set()
            assert go.wait(30), "the test never released the held write"
            ok = real(pairs)
            landed.set()
            return ok

        tier.write_many = held_write
        assert store.put(K, torch.ones(10))
        assert entered.wait(10)
        seen: dict = {}

        def delete():
            seen["found"] = store.delete(K)
            seen["landed_before_return"] = landed.is_set()

        spy = WaitSpy(store.chain._writes_done, delete)  # the delete's wait for the write in flight
        try:
            assert spy.blocked(), "the delete returned while the key's SET was in flight"
        finally:
            go.set()
            spy.thread.join(30)
        assert not spy.thread.is_alive() and seen == {"found": True, "landed_before_return": True}
        store.flush()  # the flusher is done with K: its SET landed and was taken back, or never counted
        # the delete returned only after the flush's SET: nothing of K is left anywhere
        assert not store.contains(K) and tier.client.exists(tier.prefix + K.encoded) == 0
        assert store.get(K) is None


def test_two_write_downs_of_one_key_never_cross_at_the_server(redis_url, monkeypatch):
    """The flusher writes v1 of a key down to Redis while a newer v2 replaces it above and is then
    evicted, so a demotion writes v2 down too. Redis holds one value a key: the two writes used to
    cross, and the flusher's, losing its guard, deleted the key (its write taken back), so v2 was
    gone. A write down of a key now waits for the one in flight, and one whose version is no
    longer current above is not made at all."""
    from strata.store.tiers.backing import BackingTier

    k, other = Key("param", "m", "w"), Key("param", "m", "other")
    real = BackingTier.write_many
    held, go = threading.Event(), threading.Event()

    def slow(self, pairs):  # the flusher's write of v1 waits for the test
        if any(e.key == k.encoded and int(d.view(torch.int32)[0]) == 1 for e, d in pairs):
            held.set()
            assert go.wait(30), "the test never released the held write"
        return real(self, pairs)

    monkeypatch.setattr(BackingTier, "write_many", slow)
    cfg = cpu_redis(redis_url, write="back", cpu="8KiB")  # two 4 KiB objects
    with strata.open_store(cfg) as store:
        assert store.put(k, torch.full((1024,), 1, dtype=torch.int32))
        assert held.wait(10)  # the flusher is writing v1 down
        assert store.put(k, torch.full((1024,), 2, dtype=torch.int32))
        threading.Timer(0.5, go.set).start()  # v1's write lands (and loses its guard) meanwhile
        assert store.put(other, torch.full((1024,), 3, dtype=torch.int32))  # evicts v2: written down
        store.flush()
        got = store.get(k)
        assert got is not None and int(got[0]) == 2
        assert int(store.get(k, mode="exact", tier="redis")[0]) == 2


def test_a_flush_racing_puts_queues_each_object_once_and_ends(redis_url, monkeypatch):
    """``flush`` queues again what is still dirty once the queue drained. A put made meanwhile has its
    object queued already: queued twice, both landed in one flusher batch, and the batch's second
    write of the key waited for its first, its own, in Redis: the flusher, then every put behind
    it, hung for good. An object is queued once, and the flush ends."""
    from strata.store.chain import TierChain

    real_dirty, real_flush = TierChain._dirty, TierChain._flush_many
    hold, held, batches = threading.Event(), threading.Event(), []

    def flush_many(self, items):  # the flusher waits for the test while the test holds it
        if hold.is_set():
            held.set()
            assert hold_until.wait(30), "the test never let the flusher go"
        batches.append([e.key for _, e in items])
        return real_flush(self, items)

    hold_until = threading.Event()

    def dirty(self):  # between the drain and flush's look at what is dirty, two puts queue objects
        if not hold.is_set():
            hold.set()
            assert store.put(Key("kv", "m", "a"), torch.ones(256))
            assert held.wait(10)  # the flusher holds a's batch; b waits in the queue
            assert store.put(Key("kv", "m", "b"), torch.ones(256))
            threading.Timer(0.3, hold_until.set).start()
        return real_dirty(self)

    monkeypatch.setattr(TierChain, "_flush_many", flush_many)
    monkeypatch.setattr(TierChain, "_dirty", dirty)
    with strata.open_store(cpu_redis(redis_url, write="back")) as store:
        done = threading.Thread(target=store.flush, daemon=True)
        done.start()
        done.join(20)
        assert not done.is_alive(), "flush hung"
        assert all(len(b) == len(set(b)) for b in batches), batches
        assert store.get(Key("kv", "m", "b"), mode="exact", tier="redis") is not None


@pytest.mark.parametrize("write", ["through", "back"])
def test_an_eviction_writes_to_redis_again_only_what_redis_let_go(redis_url, write):
    """``evict: lower`` over Redis: every eviction of a clean object wrote it to Redis again, so a
    weight streamed through a CPU tier smaller than the model crossed the network twice per pass
    (read, then written back as it made room for the next). A clean object whose very version
    reached Redis (written through, flushed, or promoted from there) is now evicted once Redis
    says it still holds the key (one EXISTS round trip); one Redis let go meanwhile (its own
    eviction) is written down again, never lost."""
    cfg = cpu_redis(redis_url, write=write, cpu="1MiB")  # three of the eight objects
    cfg["namespaces"] = {"param": {"evict": "lower", "promote": "evict"}}  # every read a promotion
    keys = [Key("param", "m", f"w{i}") for i in range(8)]
    want = [torch.full((65536,), float(i)) for i in range(8)]
    with strata.open_store(cfg) as store:
        redis = store.tiers[1]
        for k, v in zip(keys, want):
            assert store.put(k, v)
        store.flush()
        assert store.stats()["tiers"]["redis"]["puts"] == 8
        for _ in range(3):  # three passes over the weights, each read promoted, evicting another
            for k, v in zip(keys, want):
                assert torch.equal(store.get(k), v)
        s = store.stats()["tiers"]
        assert s["cpu"]["promotions"] >= 20 and s["cpu"]["evictions"] >= 20
        assert s["redis"]["puts"] == 8, "clean objects Redis holds were written to it again"
        assert torch.equal(store.get(keys[0]), want[0]) and store.contains(keys[0], mode="exact", tier="cpu")
        redis.client.delete(redis.prefix + keys[0].encoded)  # Redis evicts it while the CPU tier holds it
        for k, v in zip(keys[1:], want[1:]):
            assert torch.equal(store.get(k), v)
        assert not store.contains(keys[0], mode="exact", tier="cpu")
        assert redis.client.exists(redis.prefix + keys[0].encoded) == 1
        assert store.stats()["tiers"]["redis"]["puts"] == 9
        assert torch.equal(store.get(keys[0]), want[0])


def test_an_eviction_never_writes_down_an_object_its_own_put_is_still_writing(redis_url, monkeypatch):
    """A write-through put of k is in the cpu tier, on its way to Redis, when another put evicts it
    (``evict: lower``): the eviction's demotion wrote k to Redis and dropped it above, and the put's
    own write, reserved in between, lost its guard as it landed and took its value back with a DEL,
    which took the demotion's copy: k, acknowledged, was gone. The eviction now waits for the put's
    own write instead of writing k alongside it."""
    from strata.store.chain import TierChain
    from strata.store.tiers.backing import BackingTier

    k, other = Key("param", "m", "w"), Key("param", "m", "other")
    go, reserved = threading.Event(), threading.Event()
    real_landed, real_settle, real_write = TierChain._landed, TierChain._settle_put, BackingTier.write_many

    def landed(self, i, tier, p, e, write_back, block):  # the put pauses between the cpu tier and Redis
        if threading.current_thread().name == "putter" and i == 0 and p.key == k.encoded:
            go.wait(2)
        return real_landed(self, i, tier, p, e, write_back, block)

    def settle(self, kept, refused):  # the demotion's copy is in Redis: the put reserves its write now
        if threading.current_thread().name != "putter" and any(e.key == k.encoded for _, e in kept) and not go.is_set():
            go.set()
            reserved.wait(2)
        return real_settle(self, kept, refused)

    def write(self, pairs):
        if threading.current_thread().name == "putter":
            reserved.set()
        return real_write(self, pairs)

    monkeypatch.setattr(TierChain, "_landed", landed)
    monkeypatch.setattr(TierChain, "_settle_put", settle)
    monkeypatch.setattr(BackingTier, "write_many", write)
    cfg = cpu_redis(redis_url, cpu="6KiB")  # one 4 KiB object
    cfg["namespaces"] = {"param": {"evict": "lower"}}
    with strata.open_store(cfg) as store:
        result = []
        putter = threading.Thread(target=lambda: result.append(store.put(k, torch.full((1024,), 1, dtype=torch.int32))),
                                  name="putter")
        putter.start()
        time.sleep(0.2)  # the put of k is in the cpu tier, held before Redis
        assert store.put(other, torch.full((1024,), 2, dtype=torch.int32))  # evicts k
        putter.join(30)
        assert result == [True]
        got = store.get(k)
        assert got is not None and int(got[0]) == 1, "an acknowledged put was lost"
