"""Redis Cluster under the redis tier (``cluster: true``): the client, batches split per node, the report.

The redis tier's code is the same for one server and for a cluster: it fills a batch of
single-key commands (``client.pipeline()``) and reads one reply per command. Here a batch is
split by hash slot over the primaries that serve them, written to every node before any reply
is read (one round trip to each, all in flight at once), and its replies put back in order.
redis-py's cluster client keeps the slot map and a connection pool per node; the routing,
redirections and failures are handled here, because its own pipeline retries a CLUSTERDOWN
with sleeps and refreshes the map through every known node in turn, neither bounded by
``timeout_ms``:

- A MOVED reply patches the slot map and the command goes to the new owner; an ASK reply (a
  slot being migrated) sends ASKING and the command to the importing node; at most
  ``MAX_REDIRECTS`` rounds. Past them, or on TRYAGAIN or CLUSTERDOWN, the command's reply is
  the error: a miss or a dropped write, as for one server. A value is still checked by its
  header (key, checksum), so a redirection never serves another key's bytes.
- A node that does not answer (refused, timed out, an unreadable reply) fails its own commands
  (``NodeDown``: an error, not an outage) and is skipped for ``BACKOFF_S``; the slot map is
  then refreshed, at most every ``REFRESH_S`` and only from nodes that answer, so the replica
  promoted in a dead primary's place takes its slots. When every primary is down, or no node
  answers, the call raises ConnectionError: the tier backs off as it does for one server.
- The client is built at the first call that reaches a seed node, not when the store opens: a
  store opens while the cluster is down, and picks it up when it answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster, get_connection
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, RedisClusterException, ResponseError
from redis.retry import Retry

from strata.errors import StoreError
from strata.keys import split_key

SLOTS = 16384
MAX_REDIRECTS = 3  # MOVED/ASK rounds one command may follow within a call
BACKOFF_S = 1.0  # a node that did not answer is skipped (its commands fail at once) this long
REFRESH_S = 0.5  # the slot map is asked again at most this often while it names a node that is down
TAG_LEN = 18  # b"{" + 16 hex digits + b"}"


class NodeDown(redis.RedisError):
    """A node did not answer: its commands fail, the rest of the cluster may well answer (not a
    ConnectionError, which the tier takes for an outage of the whole store)."""


def scope_tag(key: bytes) -> bytes:
    """``hash_tag: scope``: the hash tag of a key's namespace and scope, so every object of a scope
    falls in one slot (one shard), whatever its name."""
    try:
        ns, scope, _ = split_key(key)
    except StoreError:  # no key: its own bytes decide its slot
        return b"{" + hashlib.sha256(key).hexdigest()[:16].encode() + b"}"
    return b"{" + hashlib.sha256(f"{ns}/{scope}".encode("utf-8", "surrogatepass")).hexdigest()[:16].encode() + b"}"


def has_hash_tag(prefix: bytes) -> bool:
    """Whether Redis hashes keys under ``prefix`` by a tag in it (``{`` then ``}`` with something
    between): all of them in one slot."""
    lo = prefix.find(b"{")
    hi = prefix.find(b"}", lo + 1) if lo >= 0 else -1
    return hi > lo + 1


class _Pools:
    """``connection_pool`` as the tier uses it (its watchdog; a reset after an unreadable reply):
    every known node's pool, the seeds' included while the client is being built."""

    def __init__(self, client: "ClusterClient"):
        self._client = client

    def disconnect(self, inuse_connections: bool = True) -> None:
        for node in self._client.known_nodes():
            r = node.redis_connection
            if r is not None:
                with contextlib.suppress(Exception):
                    r.connection_pool.disconnect(inuse_connections=inuse_connections)


class Batch:
    """The tier's pipeline of single-key commands; ``execute`` routes and sends them."""

    def __init__(self, client: "ClusterClient"):
        self._client = client
        self._cmds: list[tuple] = []

    def __len__(self) -> int:
        return len(self._cmds)

    def get(self, name: bytes) -> "Batch":
        self._cmds.append(("GET", name))
        return self

    def set(self, name: bytes, value: bytes) -> "Batch":
        self._cmds.append(("SET", name, value))
        return self

    def exists(self, name: bytes) -> "Batch":
        self._cmds.append(("EXISTS", name))
        return self

    def delete(self, name: bytes) -> "Batch":
        self._cmds.append(("DEL", name))
        return self

    def strlen(self, name: bytes) -> "Batch":
        self._cmds.append(("STRLEN", name))
        return self

    def execute(self, raise_on_error: bool = True) -> list:
        cmds, self._cmds = self._cmds, []
        return self._client.run(cmds, raise_on_error)


class ClusterClient:
    """What the redis tier calls ``client`` for a cluster: ``pipeline()`` batches, ``get`` and
    ``delete`` through them, node-by-node commands for the report and listings; anything else
    (the scope labels' hash commands, tests' raw access) goes to redis-py's cluster client."""

    def __init__(self, url: str, nodes: Iterable[str], password: str | None, timeout: float, max_connections: int):
        self.url = url
        self._seeds = [(p.hostname, p.port or 6379) for p in map(urlsplit, nodes)]
        self._kw: dict[str, Any] = dict(
            socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            connection_pool_class=redis.BlockingConnectionPool, max_connections=max_connections, timeout=timeout,
            require_full_coverage=False, reinitialize_steps=0)
        if password:
            self._kw["password"] = password
        self._rc: RedisCluster | None = None
        self._building: list[ClusterNode] = []  # the seeds of the build in progress, for the watchdog
        self._build = threading.Lock()
        self._state = threading.Lock()
        self._down: dict[str, float] = {}  # node name -> monotonic time until which it is skipped
        self._map_stale = False  # the slot map may name a node that is down, or miss a slot
        self._next_refresh = 0.0
        self.connection_pool = _Pools(self)
        self.redirects = 0  # MOVED and ASK replies followed
        self.node_failures = 0  # times a node did not answer
        self.refreshes = 0  # slot map refreshes

    # -- the client: built when a seed first answers ---------------------------------------------------
    def cluster(self) -> RedisCluster:
        rc = self._rc
        if rc is not None:
            return rc
        if not self._build.acquire(blocking=False):  # another call is building it: this one misses
            raise redis.ConnectionError("the cluster client is being built by another call")
        try:
            if self._rc is None:
                self._building = [ClusterNode(h, p) for h, p in self._seeds]  # redis-py appends the url's
                try:
                    self._rc = RedisCluster(url=self.url, startup_nodes=self._building, **self._kw)
                except (RedisClusterException, redis.RedisError, OSError) as e:
                    with contextlib.suppress(Exception):
                        self.connection_pool.disconnect()
                    raise redis.ConnectionError(f"no seed node answers as a cluster ({e})") from None
            return self._rc
        finally:
            self._build.release()

    def known_nodes(self) -> list[ClusterNode]:
        rc = self._rc
        nodes = list(self._building)
        if rc is not None:
            nodes += rc.get_nodes()
        return nodes

    def primaries(self) -> list[ClusterNode]:
        """The primaries of the slot map, each once, by the slots they serve."""
        rc = self.cluster()
        seen: dict[str, ClusterNode] = {}
        with rc.nodes_manager._lock:
            for owners in rc.nodes_manager.slots_cache.values():
                if owners:
                    seen.setdefault(owners[0].name, owners[0])
        return sorted(seen.values(), key=lambda n: n.name)

    # -- nodes that do not answer ----------------------------------------------------------------
    def _is_down(self, name: str) -> bool:
        until = self._down.get(name)
        return until is not None and time.monotonic() < until

    def _failed(self, node: ClusterNode, why: Exception) -> NodeDown:
        with self._state:
            self._down[node.name] = time.monotonic() + BACKOFF_S
            self._map_stale = True
            self.node_failures += 1
        with contextlib.suppress(Exception):  # its connections may be out of step with their replies
            node.redis_connection.connection_pool.disconnect(inuse_connections=False)
        return NodeDown(f"node {node.name}: {type(why).__name__}: {why}")

    def _answered(self, node: ClusterNode) -> None:
        if node.name in self._down:
            with self._state:
                self._down.pop(node.name, None)

    def _refresh_if_due(self, rc: RedisCluster) -> None:
        """Ask the slot map again, from nodes that answer, when it may be out of date."""
        if not self._map_stale or time.monotonic() < self._next_refresh:
            return
        with self._state:
            if not self._map_stale or time.monotonic() < self._next_refresh:
                return
            self._next_refresh = time.monotonic() + REFRESH_S
        nm = rc.nodes_manager
        alive = [n for n in rc.get_nodes() if not self._is_down(n.name)]
        alive.sort(key=lambda n: n.server_type != "primary")  # primaries first
        if not alive:
            raise redis.ConnectionError("no node of the cluster answers")
        with nm._initialization_lock:  # only nodes that answer are asked, so the refresh ends in timeout_ms
            with nm._lock:
                before = nm.startup_nodes
                nm.startup_nodes = {n.name: n for n in alive[:3]}
            try:
                nm.initialize(disconnect_startup_nodes_pools=False)
            except (RedisClusterException, redis.RedisError, OSError) as e:
                with nm._lock:
                    nm.startup_nodes = before
                raise redis.ConnectionError(f"the cluster's slot map could not be read: {e}") from None
        self.refreshes += 1
        with self._state:
            owners = {o[0].name for o in nm.slots_cache.values() if o}
            self._map_stale = (len(nm.slots_cache) < SLOTS or any(self._is_down(n) for n in owners))

    def _check_alive(self, rc: RedisCluster) -> None:
        """ConnectionError when every primary of the map is down: the cluster is, for this tier."""
        primaries = self.primaries()
        if primaries and all(self._is_down(n.name) for n in primaries):
            raise redis.ConnectionError("every primary of the cluster is unreachable")

    # -- batches ---------------------------------------------------------------------------------
    def pipeline(self, transaction: bool = False) -> Batch:
        return Batch(self)

    def run(self, cmds: list[tuple], raise_on_error: bool = True) -> list:
        """The replies of single-key ``cmds`` in order, each the value or its error: split per node,
        one round trip to each, MOVED/ASK followed."""
        rc = self.cluster()
        self._refresh_if_due(rc)
        out: list = [None] * len(cmds)
        todo = list(range(len(cmds)))
        ask: dict[int, ClusterNode] = {}
        for _ in range(1 + MAX_REDIRECTS):
            groups: dict[str, tuple[ClusterNode, list[tuple[int, bool]]]] = {}
            for i in todo:
                node = ask.get(i)
                if node is None:
                    try:
                        node = rc.nodes_manager.get_node_from_slot(key_slot(cmds[i][1]))
                    except RedisClusterException as e:  # a slot no node serves (a failover under way)
                        self._map_stale = True
                        out[i] = ClusterDownError(str(e))
                        continue
                if self._is_down(node.name):
                    out[i] = NodeDown(f"node {node.name} did not answer; asked again after a back-off")
                    continue
                groups.setdefault(node.name, (node, []))[1].append((i, i in ask))
            ask.clear()
            self._send(rc, [(node, [(i, asking, cmds[i]) for i, asking in items]) for node, items in groups.values()],
                       out)
            todo = []
            for _, items in groups.values():
                for i, _ in items:
                    reply = out[i]
                    if isinstance(reply, MovedError):
                        rc.nodes_manager.move_slot(reply)
                        todo.append(i)
                    elif isinstance(reply, AskError):
                        target = rc.get_node(host=reply.host, port=reply.port)
                        if target is None:  # a node the map does not know yet
                            target = ClusterNode(reply.host, reply.port)
                            self._map_stale = True
                        rc.get_redis_connection(target)
                        ask[i] = target
                        todo.append(i)
                    elif isinstance(reply, ClusterDownError):
                        self._map_stale = True
            if not todo:
                break
            with self._state:
                self.redirects += len(todo)
        if any(isinstance(r, NodeDown) for r in out):
            self._check_alive(rc)
        if raise_on_error:
            first = next((r for r in out if isinstance(r, Exception)), None)
            if first is not None:
                raise first if not isinstance(first, redis.ConnectionError) else NodeDown(str(first))
        return out

    def _send(self, rc: RedisCluster, groups: list[tuple[ClusterNode, list[tuple[int, bool, tuple]]]],
              out: list) -> None:
        """Each group's commands to its node: all written, then each node's replies read. A node
        that fails fails its own commands (``NodeDown``), never the others'."""
        sent: list[list] = []  # [node, redis client, connection, items, read]
        try:
            for node, items in groups:
                try:
                    r = rc.get_redis_connection(node)
                    conn = get_connection(r)
                except Exception as e:  # noqa: BLE001 - refused, timed out, pool exhausted
                    busy = isinstance(e, redis.ConnectionError) and "No connection available" in str(e)
                    down = NodeDown(f"node {node.name}: every connection busy") if busy else self._failed(node, e)
                    for i, _, _ in items:  # a busy pool fails this call's commands, the node is not down
                        out[i] = down
                    continue
                entry = [node, r, conn, items, False]
                sent.append(entry)
                args = []
                for _, asking, cmd in items:
                    if asking:
                        args.append(("ASKING",))
                    args.append(cmd)
                try:
                    conn.send_packed_command(conn.pack_commands(args))
                except Exception as e:  # noqa: BLE001
                    entry[4] = None
                    down = self._failed(node, e)
                    for i, _, _ in items:
                        out[i] = down
            for entry in sent:
                node, r, conn, items, state = entry
                if state is None:
                    continue
                try:
                    for i, asking, cmd in items:
                        if asking:
                            try:
                                r.parse_response(conn, "ASKING")
                            except ResponseError:
                                pass  # the command's own reply says what came of it
                        try:
                            out[i] = r.parse_response(conn, _command_name(cmd))
                        except ResponseError as e:  # this command's error reply (MOVED, ASK, OOM, ...)
                            out[i] = e
                    entry[4] = True
                    self._answered(node)
                except Exception as e:  # noqa: BLE001 - timed out, closed, an unreadable reply
                    entry[4] = None
                    down = self._failed(node, e)
                    for i, _, _ in items:  # replies read before the failure are dropped too: the stream broke
                        out[i] = down
        finally:
            for node, r, conn, items, state in sent:
                if state is not True:  # written and not all read: its stream is out of step
                    with contextlib.suppress(Exception):
                        conn.disconnect()
                with contextlib.suppress(Exception):
                    r.connection_pool.release(conn)

    # -- single commands the tier sends ----------------------------------------------------------
    def get(self, name: bytes):
        return self.run([("GET", name)])[0]

    def delete(self, *names: bytes) -> int:
        return sum(self.run([("DEL", n) for n in names]))

    def config_set(self, name: str, value) -> bool:
        """CONFIG SET on every node, replicas too (one may be promoted); RedisError naming the
        nodes that refused or did not answer."""
        results = self.on_nodes(self.cluster().get_nodes(), [("CONFIG", "SET", name, value)])
        failed = {n: r[0] for n, r in results.items() if isinstance(r[0], Exception)}
        if failed:
            raise redis.RedisError("; ".join(f"{n}: {e}" for n, e in failed.items()))
        return True

    def on_nodes(self, nodes: list[ClusterNode], cmds: list[tuple]) -> dict[str, list]:
        """``cmds`` on each of ``nodes`` (one round trip each, all in flight at once): node name ->
        replies (a node down: its back-off's NodeDown for each)."""
        rc = self.cluster()
        out: list = [None] * (len(nodes) * len(cmds))
        groups = []
        for j, node in enumerate(nodes):
            items = [(j * len(cmds) + k, False, cmd) for k, cmd in enumerate(cmds)]
            if self._is_down(node.name):
                for i, _, _ in items:
                    out[i] = NodeDown(f"node {node.name} did not answer; asked again after a back-off")
            else:
                groups.append((node, items))
        self._send(rc, groups, out)
        return {node.name: out[j * len(cmds):(j + 1) * len(cmds)] for j, node in enumerate(nodes)}

    def scan_node(self, node: ClusterNode, cursor: int, match: bytes, count: int):
        """One SCAN step on one node; NodeDown if it does not answer."""
        reply = self.on_nodes([node], [("SCAN", cursor, "MATCH", match, "COUNT", count)])[node.name][0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def __getattr__(self, name: str) -> Callable:
        if name.startswith("_"):  # copy, pickle and hasattr probes never build a client
            raise AttributeError(name)
        return getattr(self.cluster(), name)

    def close(self) -> None:
        rc = self._rc
        if rc is not None:
            rc.close()
        for node in self._building:
            if node.redis_connection is not None:
                with contextlib.suppress(Exception):
                    node.redis_connection.close()

    # -- the report: nodes, slots, memory ---------------------------------------------------------
    def report(self) -> dict:
        """What ``stats()`` shows of the cluster: the state its nodes agree on, the slots served,
        and per node its role, slots, memory and keys; totals over the primaries."""
        rc = self.cluster()
        with contextlib.suppress(redis.ConnectionError):
            self._refresh_if_due(rc)
        nm = rc.nodes_manager
        slots: dict[str, int] = {}
        with nm._lock:
            for owners in nm.slots_cache.values():
                if owners:
                    slots[owners[0].name] = slots.get(owners[0].name, 0) + 1
            nodes = sorted(nm.nodes_cache.values(), key=lambda n: (n.server_type != "primary", n.name))
        cmds = [("INFO", "memory"), ("INFO", "stats"), ("DBSIZE",), ("CLUSTER", "INFO"), ("CLUSTER", "NODES")]
        replies = self.on_nodes(nodes, cmds)
        rows, infos = [], []
        for node in nodes:
            mem, st, keys, cinfo, _ = replies[node.name]
            ok = not any(isinstance(r, Exception) for r in (mem, st, keys, cinfo))
            row = {"node": node.name, "role": node.server_type or "?", "slots": slots.get(node.name, 0),
                   "connected": ok}
            if ok:
                row.update(used_memory=mem.get("used_memory", 0), maxmemory=mem.get("maxmemory", 0),
                           maxmemory_policy=mem.get("maxmemory_policy"), keys=keys,
                           evicted_keys=st.get("evicted_keys", 0))
                infos.append((node, mem, st, keys, cinfo))
            rows.append(row)
        rows += _unmapped(rows, [replies[n.name][4] for n in nodes])
        return _summary(rows, infos)

    def describe(self, server: dict) -> str:
        """A line for logs and ``strata inspect``: the seed, the cluster's shape and coverage (the
        nodes, one line each, are ``server["nodes"]``)."""
        if not server.get("nodes"):
            return f"redis cluster {self.url}"
        primaries = [n for n in server["nodes"] if n["role"] == "primary"]
        return (f"redis cluster {self.url}: {len(primaries)} primaries, {len(server['nodes']) - len(primaries)} "
                f"replicas, {server.get('slots_covered', 0)}/{SLOTS} slots covered, state "
                f"{server.get('cluster_state', '?')}")


def _command_name(cmd: tuple) -> str:
    """The name redis-py keys its reply parsers by (``CLUSTER INFO``, ``CONFIG SET``, ``GET``)."""
    return f"{cmd[0]} {cmd[1]}" if cmd[0] in ("CLUSTER", "CONFIG") else cmd[0]


def _unmapped(rows: list[dict], views: list) -> list[dict]:
    """Rows for the nodes CLUSTER NODES names but the client's slot map (CLUSTER SLOTS) does not:
    Redis 7 leaves out a replica whose replication offset is still 0, so a cluster just formed
    would show no replicas. Their role and link state from the first node that answered; their
    memory is not asked (the client keeps no connection to them)."""
    view = next((v for v in views if isinstance(v, dict)), None)
    if view is None:
        return []
    known = {r["node"] for r in rows}
    out = []
    for addr, info in sorted(view.items()):
        flags = set(str(info.get("flags", "")).split(","))
        if addr in known or "noaddr" in flags or "handshake" in flags:
            continue
        role = "primary" if "master" in flags else "replica" if "slave" in flags else "?"
        out.append({"node": addr, "role": role, "slots": 0,
                    "connected": bool(info.get("connected")) and not flags & {"fail", "fail?"}})
    return out


def _summary(rows: list[dict], infos: list) -> dict:
    """The cluster's server dict: totals over the primaries that answered (memory, keys, the
    hit rate of their keyspace), the cluster's own view of its slots, and the rows."""
    prim = [(mem, st, keys) for node, mem, st, keys, _ in infos if node.server_type == "primary"]
    hits = sum(st.get("keyspace_hits", 0) for _, st, _ in prim)
    misses = sum(st.get("keyspace_misses", 0) for _, st, _ in prim)
    policies = {mem.get("maxmemory_policy") for mem, _, _ in prim}
    maxmem = [mem.get("maxmemory", 0) for mem, _, _ in prim]
    cinfo = next((c for _, _, _, _, c in infos if isinstance(c, dict)), {})
    return {
        "connected": bool(prim),
        "cluster": True,
        "cluster_state": cinfo.get("cluster_state"),
        "slots_covered": int(cinfo.get("cluster_slots_ok", 0) or 0),
        "slots_assigned": int(cinfo.get("cluster_slots_assigned", 0) or 0),
        "used_memory": sum(mem.get("used_memory", 0) for mem, _, _ in prim),
        "maxmemory": sum(maxmem) if maxmem and all(maxmem) else 0,
        "maxmemory_policy": policies.pop() if len(policies) == 1 else ("mixed" if policies else None),
        "keys": sum(keys for _, _, keys in prim),
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        "evicted_keys": sum(st.get("evicted_keys", 0) for _, st, _ in prim),
        "nodes": rows,
    }


def scan_all(client: ClusterClient, call: Callable, match: bytes, count: int) -> Iterator[list[bytes]]:
    """Batches of key names matching ``match`` on every primary (SCAN each to its end), each step
    through ``call`` (the tier's bounded call)."""
    for node in call(client.primaries, "CLUSTER SLOTS"):
        cursor = 0
        while True:
            cursor, batch = call(lambda: client.scan_node(node, cursor, match, count), "SCAN")
            yield batch
            if not int(cursor):
                break
