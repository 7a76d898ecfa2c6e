"""What the ``strata`` command and the demo print of a store: ``format_stats`` (the table of
``StorageEngine.stats()``) and ``format_contents`` (``strata inspect``: per tier, objects and
bytes by namespace and scope, scopes named by their facts and owners)."""

from __future__ import annotations

import json

from strata.config import format_size
from strata.errors import StrataError

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
