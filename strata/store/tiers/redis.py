"""The redis tier: objects in a Redis server, shared by every process and host that reaches it.

``RedisBackend`` is the backing store (``strata.store.tiers.backing``): a batch of names is one
pipelined round trip of GET, SET, EXISTS or DEL; a listing is SCAN and STRLEN. Everything Redis
shares with every other backing store (the value format and its checks, the back-off after a
fault, the watchdog that bounds whole calls, stale keys, batching) is ``BackingTier``'s.

Capacity and eviction are Redis's own (``maxmemory``, ``maxmemory-policy``): set on the
server when the config names them, always read back into ``stats()``. Every socket read is
bounded by ``timeout_ms``; no retries.

A Redis Cluster (``cluster: true``) is the same backend over ``redis_cluster.ClusterClient``:
batches split by hash slot, one round trip to each node, MOVED/ASK followed, a node that does
not answer failing only its own keys (misses, dropped writes) while the others serve; an
outage of every primary backs off as for one server.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from strata.config import UNBOUNDED, parse_size, positive_int
from strata.errors import ConfigError, StoreError, allowed
from strata.store.tiers.backing import LABELS_KEY, BackingTier, Features  # noqa: F401 - LABELS_KEY: labels

log = logging.getLogger("strata.redis")

MAX_VALUE = 512 << 20  # Redis's default proto-max-bulk-len: a larger value is refused by the server
_SCAN_BATCH = 1000
BATCH = 16  # GETs or SETs per pipelined round trip (a 4K-token prompt's 256-token chunks: one)
BATCH_BYTES = 16 << 20  # bytes of values sent in one round trip: each must go within timeout_ms
TAG_LEN = 18  # hash_tag: scope: b"{" + 16 hex digits + b"}" after the prefix (redis_cluster.scope_tag)


# -- config: the keys of a redis tier, checked by strata.config_load through RedisTier's declarations

SCHEMES = ("redis://", "rediss://", "unix://")
MEMORY_POLICIES = ("allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu", "volatile-random",
                   "volatile-ttl", "noeviction")


def _url(value: object, where: str) -> str:
    """a URL starting with redis://, rediss://, unix:// (e.g. redis://127.0.0.1:6379/0)."""
    if not isinstance(value, str) or not value.startswith(SCHEMES):
        raise ConfigError(f"{where}: got {value!r}; allowed: a URL starting with {', '.join(SCHEMES)} "
                          "(e.g. redis://127.0.0.1:6379/0)")
    return value


def _secret(value: object, where: str) -> str | None:
    """a non-empty string (never echoed back: a password)."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{where}: got a {type(value).__name__}; allowed: a non-empty string")
    return value  # type: ignore[return-value]


def _key_prefix(value: object, where: str) -> str:
    """a string (may be empty)."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: got {value!r}; allowed: a string (may be empty)")
    return value


def _maxmemory(value: object, where: str) -> int | None:
    """bytes as an int or a string like '8GiB', or null (leave the server's setting)."""
    return None if value is None else parse_size(value, where)


def _memory_policy(value: object, where: str) -> str | None:
    """one of Redis's maxmemory-policy values, or null (leave the server's setting)."""
    if value is not None and value not in MEMORY_POLICIES:
        raise ConfigError(allowed(where, value, MEMORY_POLICIES))
    return value  # type: ignore[return-value]


def _seed_nodes(value: object, where: str) -> tuple[str, ...]:
    """a list of seed nodes, e.g. [redis://10.0.0.2:6379, redis://10.0.0.3:6379]."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: got {value!r}; allowed: a list of seed nodes, e.g. "
                          "[redis://10.0.0.2:6379, redis://10.0.0.3:6379]")
    for i, node in enumerate(value):
        seed = urlsplit(node) if isinstance(node, str) else None
        try:
            port = seed.port if seed is not None else None
        except ValueError:
            port = None
        if (seed is None or seed.scheme not in ("redis", "rediss") or not seed.hostname or port is None
                or seed.path.strip("/") or seed.query):
            raise ConfigError(f"{where}[{i}]: got {node!r}; allowed: redis://host:port (the url's password "
                              "and TLS settings apply to every node)")
    return tuple(value)


def _check_password(values: dict, where: str) -> None:
    """One of password and password_env, and the variable named set now (not at the first call)."""
    if values.get("password") is not None and values.get("password_env") is not None:
        raise ConfigError(f"{where}.password_env: set with password; allowed: one of password, password_env")
    env = values.get("password_env")
    if env is not None and env not in os.environ:
        raise ConfigError(f"{where}.password_env: the environment variable {env!r} is not set; "
                          "allowed: the name of a variable that holds the password")


def _check_cluster(values: dict, where: str, prefix: str) -> None:
    """``cluster``, ``nodes`` and ``hash_tag``: a Redis Cluster reached through seed nodes over TCP
    (no unix sockets, database 0 only: a cluster has one keyspace)."""
    from urllib.parse import parse_qsl

    if not values.get("cluster"):
        for name in ("nodes", "hash_tag"):
            if name in values:
                raise ConfigError(f"{where}.{name}: set without cluster: true; allowed: only on a redis tier with "
                                  "cluster: true")
        return
    url = values["url"]
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"{where}.url: got {url!r}; allowed with cluster: true: redis:// or rediss:// (a Redis "
                          "Cluster has no unix sockets)")
    db = parts.path.strip("/") or dict(parse_qsl(parts.query)).get("db", "0")
    if db != "0":
        raise ConfigError(f"{where}.url: database {db!r}; allowed with cluster: true: database 0 only (a Redis "
                          "Cluster has one keyspace): redis://host:port or redis://host:port/0")
    hash_tag = values.get("hash_tag", "none")
    if hash_tag != "none" and "{" in prefix:
        raise ConfigError(f"{where}.key_prefix: got {prefix!r} with hash_tag: {hash_tag}; allowed: a prefix "
                          "without '{' (Redis would hash on the prefix's braces, not the tag)")


def redact(url: str) -> str:
    """The URL with any password replaced by ``***``, for stats and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class RedisBackend:
    """One Redis server, or a Redis Cluster, as a backing store: pipelined batches of names."""

    features = Features(batching=True, zero_copy_reads=True, prefetch=True, persistent=True, shared=True,
                        max_value=MAX_VALUE, max_batch=BATCH, max_batch_bytes=BATCH_BYTES)

    def __init__(self, cfg):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise StoreError(f"tier {cfg.name} (redis): the redis client is not installed; "
                             "allowed: pip install 'strata[redis]' (redis>=5)") from None
        self.down_errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self.errors = (redis.RedisError, OSError)
        password = cfg.password or (os.environ.get(cfg.password_env) if cfg.password_env else None)
        timeout = cfg.timeout_ms / 1000
        self.cluster = cfg.cluster
        self.tags = {"cluster": True} if self.cluster else {}
        self.url = redact(cfg.url)
        if self.cluster:
            from strata.store.tiers import redis_cluster

            self.client = redis_cluster.ClusterClient(cfg.url, cfg.nodes, password, timeout, cfg.max_connections)
            return
        kw = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                  max_connections=cfg.max_connections, timeout=timeout)
        if password:
            kw["password"] = password
        try:
            pool = redis.BlockingConnectionPool.from_url(cfg.url, **kw)
        except ValueError as e:
            raise StoreError(f"tier {cfg.name} (redis).url: {e}") from None
        self.client = redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))

    def _pipelined(self, command: str, args: list[tuple]) -> list:
        """One round trip: ``command`` for each of ``args``, a reply (or an error instance) each."""
        pipe = self.client.pipeline(transaction=False)
        for a in args:
            getattr(pipe, command)(*a)
        return pipe.execute(raise_on_error=False)

    def exists_many(self, names: list[bytes]) -> list:
        return [r if isinstance(r, Exception) else (isinstance(r, int) and r > 0)
                for r in self._pipelined("exists", [(n,) for n in names])]

    def get_many(self, names: list[bytes]) -> list:
        return self._pipelined("get", [(n,) for n in names])

    def put_many(self, pairs: list[tuple[bytes, bytes]]) -> list:
        return self._pipelined("set", pairs)

    def delete_many(self, names: list[bytes]) -> list:
        return [r if isinstance(r, Exception) else (isinstance(r, int) and r > 0)
                for r in self._pipelined("delete", [(n,) for n in names])]

    def _names(self, pattern: bytes, call: Callable) -> Iterator[list[bytes]]:
        """Batches of the server's key names matching ``pattern``: SCAN to its end (on every
        primary of a cluster)."""
        if self.cluster:
            from strata.store.tiers.redis_cluster import scan_all

            yield from scan_all(self.client, call, pattern, _SCAN_BATCH)
            return
        cursor = 0
        while True:
            cursor, batch = call(lambda: self.client.scan(cursor, match=pattern, count=_SCAN_BATCH), "SCAN")
            yield batch
            if not cursor:
                return

    def scan(self, prefix: bytes, call: Callable) -> Iterator[list[tuple[bytes, int]]]:
        pattern = prefix.replace(b"\\", b"\\\\").replace(b"*", b"\\*").replace(b"?", b"\\?") + b"*"
        labels = prefix + LABELS_KEY
        for batch in self._names(pattern, call):
            batch = [k for k in batch if k != labels]  # a hash: STRLEN would fail
            if batch:
                sizes = call(lambda: self._pipelined("strlen", [(k,) for k in batch]), "STRLEN")
                yield list(zip(batch, sizes))

    def configure(self, name: str, value) -> None:
        self.client.config_set(name, value)

    def report(self) -> dict:
        """The server's memory, policy, key count and hit rate (a cluster's: totals over its
        primaries, and per node its role, slots and memory)."""
        if self.cluster:
            return self.client.report()
        mem = self.client.info("memory")
        st = self.client.info("stats")
        keys = self.client.dbsize()
        hits, misses = st.get("keyspace_hits", 0), st.get("keyspace_misses", 0)
        return {
            "connected": True,
            "used_memory": mem.get("used_memory", 0),
            "maxmemory": mem.get("maxmemory", 0),
            "maxmemory_policy": mem.get("maxmemory_policy"),
            "keys": keys,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "evicted_keys": st.get("evicted_keys", 0),
        }

    def describe(self, report: dict) -> str:
        return self.client.describe(report) if self.cluster else f"redis at {self.url}"

    def interrupt(self) -> None:
        self.client.connection_pool.disconnect(inuse_connections=True)

    def reset(self) -> None:
        self.client.connection_pool.disconnect()

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()


class RedisTier(BackingTier):
    kind = "redis"
    # Redis holds its own capacity (maxmemory) and eviction (maxmemory_policy), and every value is
    # checked on read (persistent): no capacity, policy or verify here.
    config_refused = ("capacity", "policy", "verify")
    config_keys = {
        "url": _url,
        "password": _secret,  # never printed or logged
        "password_env": _secret,  # the environment variable holding the password
        "timeout_ms": positive_int,  # the longest any one call may block
        "max_connections": positive_int,  # the connection pool's bound
        "key_prefix": _key_prefix,  # prepended to every key this tier reads or writes
        "maxmemory": _maxmemory,  # set on the server with CONFIG SET (null: leave it)
        "maxmemory_policy": _memory_policy,
        "cluster": bool,  # the url (and nodes) are seed nodes of a Redis Cluster
        "nodes": _seed_nodes,  # more seed nodes, redis://host:port
        "hash_tag": ("none", "scope"),  # scope: a scope's objects in one hash slot (one shard)
    }
    defaults = {"timeout_ms": 200, "max_connections": 8, "key_prefix": "strata:", "cluster": False, "nodes": (),
                "hash_tag": "none"}

    @classmethod
    def check_config(cls, values: dict, raw, where: str) -> dict:
        """The url is required; the rules between keys (password, cluster); the tier's capacity, for
        the store's accounting, is the server's maxmemory when the config sets one."""
        if "url" not in values:
            _url(None, f"{where}.url")
        _check_password(values, where)
        _check_cluster(values, where, values.get("key_prefix", cls.defaults["key_prefix"]))
        values["capacity"] = values.get("maxmemory") or UNBOUNDED
        return values

    def __init__(self, cfg, store_cfg):
        backend = RedisBackend(cfg)
        super().__init__(cfg, store_cfg, backend, cfg.key_prefix.encode(), cfg.timeout_ms)
        self.url = backend.url
        self.cluster = backend.cluster
        self._tagged = self.cluster and cfg.hash_tag == "scope"
        if self.cluster:
            from strata.store.tiers import redis_cluster

            if redis_cluster.has_hash_tag(self.prefix):
                log.warning("tier %s: key_prefix %r holds a hash tag: every key falls in one slot, on one shard of "
                            "the cluster", cfg.name, cfg.key_prefix)
        self._configure()

    @property
    def client(self):
        """The Redis client (a ``ClusterClient`` for a cluster): tests and labels talk to it."""
        return self.backend.client

    def _configure(self) -> None:
        cfg = self.cfg
        for name, value in (("maxmemory", cfg.maxmemory), ("maxmemory-policy", cfg.maxmemory_policy)):
            if value is None:
                continue
            try:
                self._call(lambda: self.backend.configure(name, value), "CONFIG SET")
            except OSError as e:
                log.warning("tier %s: could not set %s on %s (%s); the server keeps its own", self.name, name,
                            self.url, e)
        self.refresh()
        policy = self.server.get("maxmemory_policy")
        if policy == "noeviction" or (policy or "").startswith("volatile"):
            log.warning("tier %s: redis maxmemory-policy is %s, which never evicts Strata's values (they carry "
                        "no TTL): once the server is full, writes are dropped; allowed: allkeys-lru, allkeys-lfu",
                        self.name, policy)

    def _name(self, key: bytes) -> bytes:
        """The Redis key of Strata's ``key``: the prefix, the scope's hash tag if configured, the key."""
        if self._tagged:
            from strata.store.tiers.redis_cluster import scope_tag

            return self.prefix + scope_tag(key) + key
        return self.prefix + key

    def _key_of(self, name: bytes) -> bytes:
        return name[len(self.prefix) + (TAG_LEN if self._tagged else 0):]

    def location_of_store(self) -> str:
        return self.backend.describe(self.server) if self.cluster else self.url

    def stats(self) -> dict:
        out = super().stats()
        out.update(url=self.url, key_prefix=self.cfg.key_prefix)
        if self.cluster:  # what the cluster did to this tier's calls: redirections followed, nodes lost
            out.update(redirects=self.client.redirects, node_failures=self.client.node_failures,
                       map_refreshes=self.client.refreshes)
        return out
