"""The redis tier over a Redis Cluster (``cluster: true``): 3 primaries and 3 replicas of real
redis-server processes on loopback ports. The conformance kit over it (alone and under a cpu
tier); batches spread over the shards; the cluster in stats() and ``strata inspect``; a primary
killed mid-run (misses, never wrong bytes, hits again once its replica is promoted); a slot
migrated while reading and writing (ASK and MOVED followed)."""

import contextlib
import logging
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
from strata.testing import check_tier


def _need_cluster():
    from redis_server import need_redis

    need_redis()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the module's tests (each keeps to its own key prefix); torn down even when
    forming it fails half-way (``start`` stops what it started)."""
    from redis_server import ClusterServers

    _need_cluster()
    servers = ClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of this test's own, to kill a node of; its other shards serve while one has no
    primary (cluster-require-full-coverage no, as a cache's cluster should)."""
    from redis_server import ClusterServers

    _need_cluster()
    servers = ClusterServers(tmp_path / "cluster", full_coverage=False).start()
    try:
        yield servers
    finally:
        servers.stop()


def cluster_tier(url, **extra):
    return {"kind": "redis", "url": url, "cluster": True, "key_prefix": f"t-{uuid.uuid4().hex}:",
            "timeout_ms": 500, **extra}


def raw_client(servers):
    import redis
    from redis.cluster import RedisCluster

    return RedisCluster.from_url(servers.url, socket_timeout=5, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 3))


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tier, message", [
    ({"url": "redis://h:1", "cluster": "yes"}, r"tiers\[0\]\.cluster: got 'yes'; allowed: true, false"),
    ({"url": "unix:///tmp/r.sock", "cluster": True}, r"tiers\[0\]\.url: got 'unix:///tmp/r\.sock'; allowed with "
                                                     r"cluster: true: redis:// or rediss://"),
    ({"url": "redis://h:1/2", "cluster": True}, r"tiers\[0\]\.url: database '2'; allowed with cluster: true: "
                                                r"database 0 only"),
    ({"url": "redis://h:1", "nodes": ["redis://h:2"]}, r"tiers\[0\]\.nodes: set without cluster: true"),
    ({"url": "redis://h:1", "cluster": True, "nodes": "redis://h:2"}, r"tiers\[0\]\.nodes: got 'redis://h:2'; "
                                                                      r"allowed: a list of seed nodes"),
    ({"url": "redis://h:1", "cluster": True, "nodes": ["h:2"]}, r"tiers\[0\]\.nodes\[0\]: got 'h:2'; allowed: "
                                                                r"redis://host:port"),
    ({"url": "redis://h:1", "cluster": True, "hash_tag": "model"}, r"tiers\[0\]\.hash_tag: got 'model'"),
    ({"url": "redis://h:1", "hash_tag": "scope"}, r"tiers\[0\]\.hash_tag: set without cluster: true"),
    ({"url": "redis://h:1", "cluster": True, "hash_tag": "scope", "key_prefix": "{s}:"},
     r"tiers\[0\]\.key_prefix: got '\{s\}:' with hash_tag: scope; allowed: a prefix without '\{'"),
])
def test_cluster_config_errors_name_the_field(tier, message):
    with pytest.raises(ConfigError, match=message):
        strata.open_store({"tiers": [{"kind": "redis", **tier}]})


def test_a_store_opens_while_the_cluster_is_down_and_says_so(caplog):
    from redis_server import free_port

    _need_cluster()
    cfg = {"tiers": [{"kind": "cpu", "capacity": "1MiB"},
                     cluster_tier(f"redis://127.0.0.1:{free_port()}", timeout_ms=100)]}
    with caplog.at_level(logging.WARNING, logger="strata.redis"):
        store = strata.open_store(cfg)
    with store:
        assert "unreachable" in caplog.text
        k = Key("kv", "s", "c0")
        assert store.put(k, b"kept in the CPU tier") and store.get(k) == b"kept in the CPU tier"
        s = store.stats()["tiers"]["redis"]
        assert s["server"]["connected"] is False and s["errors"] + s["dropped_writes"] >= 1


# -- the conformance kit ----------------------------------------------------------------------------


def cluster_kit(servers):
    """``check_tier``'s hooks for a cluster: raw values through redis-py's cluster client; faults
    over the whole cluster (every node killed and started again empty, or every node hung)."""
    from redis_server import PrefixedRaw

    def make_tier(workdir, capacity=None):
        return cluster_tier(servers.url)

    def raw(tier):
        return PrefixedRaw(raw_client(servers), tier)

    @contextlib.contextmanager
    def fault(tier, kind):
        if kind == "error":
            ports = servers.live()
            for port in ports:
                servers.kill(port)
            try:
                yield
            finally:
                for port in ports:
                    servers.restart(port)
                servers.wait_ok()
        else:
            servers.signal_all(signal.SIGSTOP)
            try:
                yield
            finally:
                servers.signal_all(signal.SIGCONT)
                servers.wait_ok()

    return dict(make_tier=make_tier, persistent=True, raw=raw, fault=fault)


@pytest.mark.parametrize("check", ["model", "damage", "faults"])
def test_the_cluster_tier_conforms_alone_and_under_a_cpu_tier(cluster, check, tmp_path):
    """``model`` and ``faults`` run each in three modes: the cluster alone, and under a cpu tier
    writing through and back (``cpu -> redis(cluster)``)."""
    report = check_tier(**cluster_kit(cluster), name="redis-cluster", checks=[check],
                        workdir=tmp_path)
    assert report.passed, str(report)
    print(report)


# -- spreading, reporting ----------------------------------------------------------------------------


def test_a_batch_of_keys_spreads_over_all_three_primaries_one_round_trip_each(cluster):
    cfg = {"tiers": [cluster_tier(cluster.url)]}
    keys = [Key("kv", "prompt", f"chunk-{i}") for i in range(16)]  # one prompt's chunks: no hash tag
    values = [torch.full((256,), float(i)) for i in range(16)]
    with strata.open_store(cfg) as store:
        assert store.put_many(list(zip(keys, values))) == [True] * 16
        client = store.tiers[0].client
        sends = []
        real = client._send

        def recording(rc, groups, out):
            sends.append({node.name: len(items) for node, items in groups})
            return real(rc, groups, out)

        client._send = recording
        got = store.get_many(keys)
        assert all(torch.equal(g, v) for g, v in zip(got, values))
        primaries = {n.name for n in client.primaries()}
        assert len(primaries) == 3
        assert len(sends) == 1 and set(sends[0]) == primaries  # one round trip to each primary, at once
        assert sum(sends[0].values()) == 16
        names = [store.tiers[0].prefix + k.encoded for k in keys]
        raw = raw_client(cluster)
        try:  # and the values live there: each primary holds some of them
            held = {n.name: 0 for n in raw.get_primaries()}
            for name in names:
                held[raw.get_node_from_key(name).name] += 1
        finally:
            raw.close()
        assert len(held) == 3 and all(n > 0 for n in held.values()), held
        assert store.tiers[0].stats()["redirects"] == 0


def test_stats_and_inspect_show_the_nodes_the_slots_and_strata_s_share(cluster, tmp_path, capsys):
    prefix = f"t-{uuid.uuid4().hex}:"
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"tiers:\n  - kind: redis\n    url: {cluster.url}\n    cluster: true\n    key_prefix: '{prefix}'\n")
    with strata.open_store(str(cfg)) as store:
        for i in range(30):
            assert store.put(Key("kv", "llama-x", f"c{i}"), torch.zeros(1000))
        store.tiers[0].refresh()
        s = store.stats()["tiers"]["redis"]
    server = s["server"]
    assert server["cluster"] is True and server["connected"] is True and server["cluster_state"] == "ok"
    assert server["slots_covered"] == 16384 and server["slots_assigned"] == 16384
    primaries = [n for n in server["nodes"] if n["role"] == "primary"]
    assert len(primaries) == 3 and sum(n["slots"] for n in primaries) == 16384
    assert all(n["connected"] and n["used_memory"] > 0 for n in primaries)
    assert server["used_memory"] == sum(n["used_memory"] for n in primaries) == s["server_memory"]
    assert cli_main(["inspect", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "redis cluster" in out and "3 primaries" in out and "16384/16384 slots covered, state ok" in out
    assert all(any(line.split()[:2] == [n["node"], "primary"] for line in out.splitlines()) for n in primaries)
    assert ": 30 objects" in out and "llama-x" in out  # Strata's share: every primary scanned


def test_inspect_shows_one_line_per_node_with_its_role_slots_and_memory(cluster, tmp_path, capsys):
    """Six nodes on the tier's own line were one line of some 400 characters: each node gets a
    line of its own (node, role, slots, memory), below the cluster's shape and coverage."""
    import re

    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"tiers:\n  - kind: redis\n    url: {cluster.url}\n    cluster: true\n"
                   f"    key_prefix: 't-{uuid.uuid4().hex}:'\n")
    with strata.open_store(str(cfg)) as store:
        assert store.put(Key("kv", "s", "c0"), torch.zeros(1000))
        store.tiers[0].refresh()
        nodes = store.stats()["tiers"]["redis"]["server"]["nodes"]
    replicas = len(nodes) - 3  # those CLUSTER SLOTS lists: see the test below
    assert cli_main(["inspect", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    (header,) = [line for line in lines if "redis cluster" in line]
    assert f"3 primaries, {replicas} replicas, 16384/16384 slots covered, state ok" in header
    assert " primary " not in header and " replica " not in header  # no node crammed onto the tier's line
    size = r"\d+(\.\d+)? (B|KiB|MiB|GiB)"
    rows = [line for line in lines if line.split()[:1] and line.split()[0] in {n["node"] for n in nodes}]
    assert [row.split()[0] for row in rows] == [n["node"] for n in nodes]  # one line each, primaries first
    for n, row in zip(nodes, rows):
        assert re.fullmatch(rf"\s+{re.escape(n['node'])}\s+{n['role']}\s+{n['slots']}\s+{size}", row), row
    assert [row.split()[1] for row in rows] == ["primary"] * 3 + ["replica"] * replicas


def test_stats_count_every_replica_of_a_fresh_cluster(own_cluster):
    """A cluster just formed, nothing written yet: Redis 7's CLUSTER SLOTS leaves out a replica
    whose replication offset is 0 (until the data or the primary's periodic PING reach it), so
    a report built from the client's slot map shows 3 primaries and no replicas, and ``strata
    inspect`` says '0 replicas' of a cluster that has three."""
    servers = own_cluster
    listed = {int(node[1]) for _, _, *nodes in servers.command(servers.ports[0], "CLUSTER", "SLOTS") for node in nodes}
    if len(listed) == 6:
        pytest.skip("CLUSTER SLOTS already lists every replica: the case is gone by now")
    with strata.open_store({"tiers": [cluster_tier(servers.url)]}) as store:
        nodes = store.stats()["tiers"]["redis"]["server"]["nodes"]
    assert sorted(n["role"] for n in nodes) == ["primary"] * 3 + ["replica"] * 3


# -- failover ------------------------------------------------------------------------------------------


def _poll(what: str, done, limit_s: float):
    """Until ``done()`` is true: a safety bound on a wait for the cluster (failure detection,
    election), which ends as soon as it holds."""
    deadline = time.monotonic() + limit_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {limit_s}s")
        time.sleep(0.05)


def test_a_primary_killed_mid_run_is_misses_never_wrong_bytes_and_hits_again_after_promotion(own_cluster):
    servers = own_cluster
    cfg = {"tiers": [cluster_tier(servers.url)]}
    keys = [Key("kv", "s", f"c{i}") for i in range(48)]
    values = {k: torch.full((512,), float(i)) for i, k in enumerate(keys)}
    wrong: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    with strata.open_store(cfg) as store:
        assert store.put_many(list(values.items())) == [True] * len(keys)
        tier = store.tiers[0]
        _poll("replicas caught up", lambda: all(servers.replicated(p) for p in servers.primaries()), 10)
        victim = next(iter(servers.primaries()))
        on_victim = [k for k in keys if tier.client.cluster().get_node_from_key(tier.prefix + k.encoded).port == victim]
        assert on_victim

        def reader():
            try:
                while not stop.is_set():
                    for k, got in zip(keys, store.get_many(keys)):
                        if got is not None and not torch.equal(got, values[k]):
                            wrong.append(f"{k}: other bytes than were put")
            except BaseException as e:  # noqa: BLE001 - re-raised by the test below
                failures.append(e)

        def writer():
            try:
                i = 0
                while not stop.is_set():  # puts during the outage: dropped, or taken; never an exception
                    k = Key("kv", "w", f"n{i}")
                    if store.put(k, torch.full((64,), -1.0)):
                        got = store.get(k)
                        if got is not None and not torch.equal(got, torch.full((64,), -1.0)):
                            wrong.append(f"{k}: other bytes than were put")
                    i += 1
            except BaseException as e:  # noqa: BLE001
                failures.append(e)

        threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
        for t in threads:
            t.start()
        try:
            servers.kill(victim)
            others = [k for k in keys if k not in on_victim]  # one shard lost: the others still serve
            assert all(g is not None and torch.equal(g, values[k]) for k, g in zip(others, store.get_many(others)))
            _poll("a replica promoted", lambda: victim not in servers.primaries()
                  and servers.cluster_info(servers.live()[0]).get("cluster_state") == "ok", 30)
            _poll("hits on the dead primary's keys again",
                  lambda: all(g is not None for g in store.get_many(on_victim)), 15)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not any(t.is_alive() for t in threads)
        if failures:
            raise failures[0]
        assert not wrong, wrong[:5]
        got = store.get_many(keys)  # what was replicated is served again, exactly
        assert all(g is not None and torch.equal(g, values[k]) for k, g in zip(keys, got))
        s = store.stats()["tiers"]["redis"]
        assert s["node_failures"] >= 1 and s["errors"] >= 1 and s["misses"] >= 1
        assert s["map_refreshes"] >= 1


# -- resharding ----------------------------------------------------------------------------------------


def test_a_slot_migrated_while_reading_and_writing_is_followed_without_wrong_bytes(cluster):
    """``hash_tag: scope`` puts the scope's objects in one slot; it is moved to another primary key
    by key (IMPORTING / MIGRATING, then MIGRATE), read and written between the steps and by a
    reader thread throughout; then the slot is given to its new owner (MOVED)."""
    from redis.crc import key_slot

    cfg = {"tiers": [cluster_tier(cluster.url, hash_tag="scope")]}
    keys = [Key("kv", "migrating", f"c{i}") for i in range(12)]
    values = {k: torch.full((300,), float(i)) for i, k in enumerate(keys)}
    wrong: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    with strata.open_store(cfg) as store, strata.open_store(cfg) as reader_store:
        tier = store.tiers[0]
        assert store.put_many(list(values.items())) == [True] * len(keys)
        names = [tier._name(k.encoded) for k in keys]
        slot = key_slot(names[0])
        assert {key_slot(n) for n in names} == {slot}  # one scope, one slot
        assert sorted(k for k, _, _ in tier.contents()) == sorted(k.encoded for k in keys)  # the tag is not listed
        owners = cluster.primaries()
        source = next(p for p, ranges in owners.items() if any(lo <= slot <= hi for lo, hi in ranges))
        target = next(p for p in owners if p != source)
        src_id, dst_id = cluster.node_id(source), cluster.node_id(target)

        originals = list(keys)  # the reader's own list: the test appends to ``keys``

        def read_all():
            try:
                while not stop.is_set():
                    for k, got in zip(originals, reader_store.get_many(originals)):
                        if got is not None and not torch.equal(got, values[k]):
                            wrong.append(f"{k}: other bytes than were put")
            except BaseException as e:  # noqa: BLE001 - re-raised below
                failures.append(e)

        reader = threading.Thread(target=read_all)
        reader.start()
        try:
            cluster.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            cluster.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            before = tier.stats()["redirects"]
            for j, name in enumerate(names):
                cluster.command(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", name)
                if j == len(names) // 2:  # half moved: reads of those are ASKed to the target
                    got = store.get_many(keys)
                    assert all(g is not None and torch.equal(g, values[k]) for k, g in zip(keys, got))
                    assert tier.stats()["redirects"] > before
                    fresh = Key("kv", "migrating", "written-mid-migration")  # absent at the source: ASK
                    values[fresh] = torch.full((300,), -7.0)
                    assert store.put(fresh, values[fresh])
                    keys.append(fresh)
                    names.append(tier._name(fresh.encoded))
            for port in owners:
                cluster.command(port, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            before = tier.stats()["redirects"]
            got = store.get_many(keys)  # the map still names the source: MOVED, followed
            assert all(g is not None and torch.equal(g, values[k]) for k, g in zip(keys, got))
            assert tier.stats()["redirects"] > before
            assert cluster.command(target, "CLUSTER", "COUNTKEYSINSLOT", slot) == len(keys)
        finally:
            stop.set()
            reader.join(30)
        assert not reader.is_alive()
        if failures:
            raise failures[0]
        assert not wrong, wrong[:5]
        s = store.stats()["tiers"]["redis"]
        assert s["errors"] == 0 and s["dropped_writes"] == 0  # followed, never failed
