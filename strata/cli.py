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

from strata.config import format_size, presets
from strata.errors import ConfigError, StrataError, allowed

# A scope is a one-way hash of its facts; `strata inspect` names it by them from its label
# (StorageEngine.label_scope, kept beside the objects) or, as older writers did, from an object
# Key(ns, scope, SCOPE_LABEL) holding them as JSON.
SCOPE_LABEL = "__scope__"


def format_stats(stats: dict) -> str:
    """A human-readable table of ``StorageEngine.stats()``."""
    cols = ("bytes", "capacity", "objects", "hits", "misses", "evictions", "rejected", "checksum_failures", "errors")
    heads = ("tier", "kind", "used", "capacity", "objects", "hits", "misses", "evicted", "rejected", "bad-sum", "errors")
    rows = [heads]
    for name, t in stats["tiers"].items():
        rows.append((name, t["kind"], _size_or_na(t.get("bytes")), format_size(t["capacity"]),
                     *("n/a" if t.get(c) is None else str(t[c]) for c in cols[2:])))
    lines = _table(rows)
    for name, t in stats["tiers"].items():
        if t.get("server_memory") is not None:  # a server shared with others: its totals are not Strata's
            lines.append(f"{name}: the server uses {format_size(t['server_memory'])} for {t.get('server_keys')} keys "
                         "in all (Strata's and any others'); `strata inspect` counts Strata's own")
    ns_rows = [("namespace", "tier", "used", "objects")]
    for name, t in stats["tiers"].items():
        for ns, held in t["namespaces"].items():
            ns_rows.append((ns, name, format_size(held["bytes"]), str(held["objects"])))
    if len(ns_rows) > 1:
        lines += [""] + _table(ns_rows)
    traffic = [("namespace", "puts", "hits", "misses", "written", "read")]
    for ns, c in sorted(stats["namespaces"].items()):
        traffic.append((ns, str(c.get("puts", 0)), str(c.get("hits", 0)), str(c.get("misses", 0)),
                        format_size(c.get("bytes_written", 0)), format_size(c.get("bytes_read", 0))))
    if len(traffic) > 1:
        lines += [""] + _table(traffic)
    wb = stats["writeback"]
    lines.append("")
    lines.append(f"write-back: queue {wb['queue_depth']} ({format_size(wb['pending_bytes'])}), "
                 f"flushed {wb['flushed']}, failed {wb['failed']}, dropped dirty {wb['dropped_dirty']}")
    return "\n".join(lines)


def _size_or_na(n) -> str:
    """A size, or 'n/a' where a tier cannot tell cheaply (Strata's bytes in a shared Redis: absent)."""
    return "n/a" if n is None else format_size(n)


def _table(rows) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


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


def format_contents(store) -> str:
    """Per tier: where it lives, then objects and bytes by namespace and scope. A scope with a
    label (``StorageEngine.scope_labels``, or an older ``SCOPE_LABEL`` object, not counted as one
    of its objects) is named by its facts; others by their hash. Scopes owned by a process
    (``strata.store.owners``) get an owner column: alive, or an orphan its exit left."""
    from strata.keys import split_key

    labels = store.scope_labels()  # read once; never creates a sidecar
    lines = []
    owners: dict[str, str] = {}  # scope -> owner column, judged once per scope
    for tier in store.tiers:
        tier.refresh()
        extra = tier.stats()
        groups: dict[tuple[str, str], list[int]] = {}
        labelled: set[tuple[str, str]] = set()
        objects = stored = 0
        for raw, ns, size in tier.contents():
            try:
                ns, scope, name = split_key(raw)  # no registry: other processes' namespaces too
            except StrataError:
                scope, name = "?", ""
            held = groups.setdefault((ns, scope), [0, 0])
            if name == SCOPE_LABEL:
                labelled.add((ns, scope))
            else:
                held[0] += 1
            held[1] += size
            objects, stored = objects + 1, stored + size
        server = extra.get("server")
        cluster = bool(server and server.get("cluster"))
        where = cluster_location(extra) if cluster else tier.location()
        line = (f"{tier.name} ({tier.kind}, {where}): {objects} objects, "
                f"{format_size(stored)} of {format_size(extra['capacity'])}")
        if "fragmentation" in extra:
            line += f", fragmentation {extra['fragmentation']:.1%}"
        if server and server.get("connected"):
            rate = server["hit_rate"]
            line += (f"; server: {format_size(server['used_memory'])} used, {server['keys']} keys, maxmemory "
                     f"{format_size(server['maxmemory']) if server['maxmemory'] else 'unset'} "
                     f"({server['maxmemory_policy']}), hit rate {'n/a' if rate is None else f'{rate:.1%}'}")
        lines.append(line)
        if cluster:
            lines += cluster_nodes(server)
        for _, scope in groups:
            if scope not in owners:
                owners[scope] = describe_owner(scope)
        owned = any(owners[scope] for _, scope in groups)
        rows = [("  namespace", "scope", "objects", "bytes") + (("owner",) if owned else ())]
        for (ns, scope), (n, size) in sorted(groups.items()):
            named = describe_facts(labels[ns, scope], scope) if (ns, scope) in labels else None
            if named is None and (ns, scope) in labelled:
                named = scope_facts(store, tier.name, ns, scope)
            if named is None:
                named = scope if len(scope) <= 48 else scope[:45] + "..."
            row = (f"  {ns}", named, str(n), format_size(size))
            rows.append(row + ((owners[scope],) if owned else ()))
        if len(rows) > 1:
            lines += _table(rows)
    return "\n".join(lines)


def cluster_location(stats: dict) -> str:
    """Where a redis tier over a cluster lives, for its line: the seed, the cluster's shape and
    slot coverage, without its nodes (``cluster_nodes`` puts each on a line of its own; six
    nodes on the tier's line made it hundreds of characters long)."""
    server = stats["server"]
    nodes = server.get("nodes") or []
    primaries = sum(1 for n in nodes if n.get("role") == "primary")
    state = "connected" if server.get("connected") else "unreachable"
    if not nodes:
        return f"redis cluster {stats.get('url', '?')}, {state}"
    return (f"redis cluster {stats.get('url', '?')}: {primaries} primaries, {len(nodes) - primaries} replicas, "
            f"{server.get('slots_covered', 0)}/16384 slots covered, state {server.get('cluster_state', '?')}, {state}")


def cluster_nodes(server: dict) -> list[str]:
    """One line per node of a cluster (primaries first, as ``stats()`` lists them): its address,
    role, slots served and memory used, or 'unreachable'."""
    rows = [(f"  {n['node']}", str(n.get("role", "?")), str(n.get("slots", 0)),
             format_size(n["used_memory"]) if n.get("connected") and n.get("used_memory") is not None
             else "unreachable") for n in server.get("nodes") or []]
    if not rows:
        return []
    return _table([("  node", "role", "slots", "memory")] + rows)


def scope_facts(store, tier: str, ns: str, scope: str) -> str | None:
    """'model=... dtype=... (hash prefix)' from a scope's label object in ``tier``, or None where
    the label cannot be read or is no JSON mapping (the caller shows the hash)."""
    from strata.keys import Key

    try:
        raw = store.get(Key(ns, scope, SCOPE_LABEL), mode="exact", tier=tier)
        facts = json.loads(bytes(raw).decode() if raw is not None else "null")
    except (StrataError, ValueError, TypeError):
        return None
    if not isinstance(facts, dict) or not facts:
        return None
    return describe_facts(facts, scope)


def describe_facts(facts: dict, scope: str) -> str:
    """'model=... dtype=... (hash prefix)': a scope named by its facts, with enough of its hash
    (an owned scope's fingerprint, not its 'pid:host' prefix) to tell two alike apart."""
    from strata.store.owners import owner_of

    text = " ".join(f"{k}={v}" for k, v in facts.items())
    text = text if len(text) <= 96 else text[:93] + "..."
    owner = owner_of(scope)
    return f"{text} ({(owner.fingerprint if owner else scope)[:8]})"


def describe_owner(scope: str) -> str:
    """The owner column of a scope: '' (no owner), 'pid N alive', 'orphan: pid N dead', or
    'pid N on HOST (unknown)' where this host cannot tell."""
    from strata.store.owners import is_alive, owner_of

    owner = owner_of(scope)
    if owner is None:
        return ""
    alive = is_alive(owner)
    if alive is None:
        return f"pid {owner.pid} on {owner.host} (unknown)"
    return f"pid {owner.pid} alive" if alive else f"orphan: pid {owner.pid} dead"


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
