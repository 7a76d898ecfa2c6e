"""The ``strata`` command: stats and contents of a store, gc of orphans, presets, the demo, ``serve``,
and two commands of optional modules: ``stats --prometheus`` (strata.metrics) and ``plot``
(strata.timeline), imported only when asked for."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from importlib import resources
from pathlib import Path

from strata.config import format_size
from strata.config_load import presets
from strata.errors import ConfigError, StrataError, allowed
from strata.report import format_contents, format_stats


def _cmd_stats(args) -> int:
    from strata.store.engine import open_store

    with open_store(args.config, create=False) as store:  # looking never creates a region or directory
        stats = store.stats()
    if args.prometheus:
        text = _optional("strata.metrics", "metrics", "stats --prometheus").exposition(stats)
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def _optional(module: str, extra: str, command: str):
    """``module``, imported only now: a command of an optional part fails as one line naming
    what to install, and the other commands never pay for (or break on) its imports."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        if missing == module:
            raise StrataError(f"{command}: {module} is not part of this install of Strata") from None
        raise StrataError(f"{command}: needs {missing}; install it with pip install 'strata[{extra}]'") from None


def _cmd_inspect(args) -> int:
    from strata.store.engine import open_store

    with open_store(args.config, create=False) as store:
        print(format_contents(store))
        orphans = len(store.orphans())
    if orphans:
        print(f"\nstrata gc {args.config} drops {orphans} orphaned objects (left by processes that exited)")
    return 0


def _cmd_gc(args) -> int:
    from strata.store.engine import open_store

    with open_store(args.config, create=False) as store:
        orphans = {k.encoded for k in store.orphans()}
        nbytes = sum(size for tier in store.tiers for raw, _, size in tier.contents() if raw in orphans)
        dropped = store.gc()
    print(f"dropped {dropped} orphaned objects ({format_size(nbytes)})")
    return 0


def _cmd_presets(args) -> int:
    if args.show is not None:
        if args.show not in presets():
            raise ConfigError(allowed("presets --show", args.show, presets()))
        print(resources.files("strata.configs").joinpath(f"{args.show}.yaml").read_text(), end="")
        return 0
    for p in presets():
        print(p)
    return 0


def _cmd_plot(args) -> int:
    trace = Path(args.trace)
    if not trace.is_file():
        raise StrataError(f"plot: trace: got {args.trace!r}; allowed: a trace file that exists")
    out = args.output or str(trace.with_suffix(".png"))
    _optional("strata.timeline", "plot", "plot").plot(str(trace), out)
    print(f"wrote {out}")
    return 0


def _cmd_demo(args) -> int:
    from strata.demo import run_demo

    return run_demo(args.config)


def _cmd_serve(args) -> int:
    from strata.serve import serve

    return serve(args)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="vLLM's OpenAI server with weights offloaded to and KV reused from one store",
                       description="Starts vLLM's OpenAI server (`vllm serve MODEL`) with --load-format strata, the "
                                   "StrataConnector on one store and --enable-prompt-tokens-details. Arguments after "
                                   "-- go to vLLM unchanged and win over Strata's defaults. Every argument is checked "
                                   "before vLLM starts.")
    p.add_argument("model", help="model directory (with config.json) or Hugging Face id, as vllm serve takes it")
    p.add_argument("--config", default=None, help="store preset or YAML path, shared by weights and KV (default: cpu)")
    p.add_argument("--gpu-budget", default=None, help="device memory for resident weights and the ring, like 4GiB "
                                                      "(default: stream every decoder layer)")
    p.add_argument("--prefetch", type=int, default=1, help="decoder layers copied ahead (default 1)")
    p.add_argument("--chunk-size", type=int, default=256,
                   help="tokens per stored KV chunk, a multiple of vLLM's block size (default 256)")
    p.add_argument("--kv-cache-memory", default=None,
                   help="memory for vLLM's own KV cache, like 2GiB, passed as --kv-cache-memory-bytes (default: "
                        "2GiB or a quarter of the RAM on vLLM's CPU build, whose own default reserves 92%% of the "
                        "RAM; vLLM's default on a GPU)")
    p.add_argument("--no-offload", action="store_true", help="keep the weights in vLLM's hands; KV reuse only")
    p.add_argument("--no-kv", action="store_true", help="no KV connector; weight offload only")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print vLLM's command line and stop")
    p.set_defaults(func=_cmd_serve)


def _parser() -> argparse.ArgumentParser:
    from strata import __version__

    parser = argparse.ArgumentParser(prog="strata", description="Strata: one tiered tensor store for weights and KV.")
    parser.add_argument("--version", action="version", version=f"strata {__version__}")
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("stats", help="open a store and print its tiers, namespaces and counters")
    p.add_argument("--config", default=None, help="preset name or YAML path (default: the cpu preset)")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the raw stats() dict as JSON")
    shown.add_argument("--prometheus", action="store_true",
                       help="print the stats in Prometheus's text format (strata.metrics; pip install "
                            "'strata[metrics]')")
    p.set_defaults(func=_cmd_stats)
    p = sub.add_parser("inspect", help="open a store and summarise what each tier holds, by namespace and scope")
    p.add_argument("config", help="preset name or YAML path")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("gc", help="drop the objects of processes that exited without deleting them "
                                  "(e.g. the weights of a killed vLLM worker)")
    p.add_argument("config", help="preset name or YAML path")
    p.set_defaults(func=_cmd_gc)
    p = sub.add_parser("presets", help="list the YAML presets shipped with Strata, or print one to copy")
    p.add_argument("--show", metavar="NAME", default=None, help="print preset NAME's YAML, comments included")
    p.set_defaults(func=_cmd_presets)
    p = sub.add_parser("demo", help="run the demo on the default CPU tier")
    p.add_argument("--config", default=None, help="preset name or YAML path (default: the cpu preset)")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("plot", help="draw a trace as a timeline picture (strata.timeline; pip install "
                                    "'strata[plot]')")
    p.add_argument("trace", help="the trace file to draw")
    p.add_argument("-o", "--output", default=None, help="the PNG to write (default: TRACE with .png)")
    p.set_defaults(func=_cmd_plot)
    _serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. A reader that goes away (``strata stats | head``) ends
    the command quietly with status 1, as Python's docs advise, not with a traceback."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here for short outputs
        return code
    except BrokenPipeError:
        _stdout_to_devnull()
        return 1


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of what is still buffered
    does not raise BrokenPipeError again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind stdout (captured): nothing to flush
        pass


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passed: list[str] = []  # `strata serve ... -- <vllm serve args>`
    if "--" in argv:
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if args.cmd is None:  # bare `strata`: what it can do, not an error
        parser.print_help()
        return 0
    args.vllm_args = passed
    try:
        return args.func(args)
    except BrokenPipeError:
        raise
    except Exception as e:  # clear one-line errors for the command line
        from strata.store.tiers import RegionAbsent

        if isinstance(e, RegionAbsent) and args.cmd in ("stats", "inspect", "gc"):
            print(f"strata: tier {e.tier}: {e.path!r} {e.why}: nothing is stored there yet (looking creates nothing)")
            return 0
        if isinstance(e, StrataError):
            print(f"strata: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
