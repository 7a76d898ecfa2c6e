"""The redis tier: objects in a Redis server, shared by every process and host that reaches it.

Redis is the index. This tier keeps none of its own, since another instance may add an
object and Redis may evict one at any moment: a read is one GET that may find nothing, and
a lookup of many keys is one pipelined round trip of EXISTS. A value is Strata's header
(key, dtype, shape, payload checksum) followed by the payload, written with one SET, so a
reader sees all of it or none. A value that fails a check (another key's, cut short,
flipped) is a miss, counted, and deleted. No pickle: the header is a fixed struct.

Capacity and eviction are Redis's own (``maxmemory``, ``maxmemory-policy``): set on the
server when the config names them, always read back into ``stats()``.

Faults never reach the caller. Every socket read is bounded by ``timeout_ms`` and every
whole call by ``CALL_BOUND`` times it (a watchdog shuts the connection of a call a server
keeps alive by dripping its reply); no retries. A failure, or a reply the client cannot
parse, marks the server down for a short back-off, during which calls return at once as
misses and dropped writes; the first call after it tries again, so a restarted server is
picked up without restarting anything.

A Redis Cluster (``cluster: true``) is the same tier over ``redis_cluster.ClusterClient``:
batches split by hash slot, one round trip to each node, MOVED/ASK followed, a node that does
not answer failing only its own keys (misses, dropped writes) while the others serve; an
outage of every primary backs off as above.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import warnings
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch

from strata.errors import StoreError
from strata.keys import key_namespace
from strata.store.codec import (CorruptObject, FIXED_HEADER_SIZE, checksum_buffer, flat_bytes, header_size,
                                header_size_for, pack_header, unpack_header)
from strata.store.tiers.base import Entry, NotStored, Tier

log = logging.getLogger("strata.redis")
T = TypeVar("T")

MAX_VALUE = 512 << 20  # Redis's default proto-max-bulk-len: a larger value is refused by the server
BACKOFF_S = 1.0  # after a failed call, calls answer at once (as misses) for this long
CALL_BOUND = 4  # a whole call (a pipelined batch included) ends within this many timeout_ms
_SCAN_BATCH = 1000
BATCH = 16  # GETs or SETs per pipelined round trip (a 4K-token prompt's 256-token chunks: one)
BATCH_BYTES = 16 << 20  # bytes of values sent in one round trip: each must go within timeout_ms
_ALIGN = 16  # the payload starts this far into a value: a tensor over the reply is aligned for any dtype
TAG_LEN = 18  # hash_tag: scope: b"{" + 16 hex digits + b"}" after the prefix (redis_cluster.scope_tag)
STALE_MAX = 1 << 16  # keys remembered as stale on the server (a delete or a newer put it missed)
LABELS_KEY = b"__scope_labels__"  # after the prefix: the hash of scope labels (strata.store.labels), no object


class Watchdog:
    """Bounds whole calls, not single socket reads: a server that drips a reply a byte at a time
    keeps every read inside ``socket_timeout``. One thread per tier; past a call's deadline it
    runs ``on_expire`` (shut the pool's connections in use, so the blocked read fails)."""

    def __init__(self, on_expire: Callable[[], None]):
        self._on_expire = on_expire
        self._cond = threading.Condition()
        self._deadlines: dict[int, float] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False

    def arm(self, seconds: float) -> int:
        with self._cond:
            token = next(self._tokens)
            idle = not self._deadlines
            self._deadlines[token] = time.monotonic() + seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="strata-redis-watchdog", daemon=True)
                self._thread.start()
            elif idle:  # it sleeps without a deadline: give it this one (later calls' deadlines are later)
                self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._deadlines.pop(token, None)

    def _run(self) -> None:
        with self._cond:
            while not self._stop:
                now = time.monotonic()
                due = min(self._deadlines.values(), default=None)
                if due is None or due > now:
                    self._cond.wait(None if due is None else due - now)
                    continue
                for token in [t for t, d in self._deadlines.items() if d <= now]:
                    del self._deadlines[token]
                self._cond.release()
                try:
                    self._on_expire()
                except Exception:  # noqa: BLE001 - a watchdog must outlive what it watches
                    log.debug("redis watchdog: closing connections failed", exc_info=True)
                finally:
                    self._cond.acquire()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()


def _payload_offset(header_len: int) -> int:
    return -(-header_len // _ALIGN) * _ALIGN


def redact(url: str) -> str:
    """The URL with any password replaced by ``***``, for stats and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


_quiet = False


def _tensor_over(value: bytes, offset: int) -> torch.Tensor:
    """A uint8 tensor over ``value[offset:]`` without a copy. Torch warns, once per process, that
    the bytes are read-only: nothing else holds the reply, so the tensor may own them."""
    global _quiet
    if _quiet:
        return torch.frombuffer(value, dtype=torch.uint8, offset=offset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = torch.frombuffer(value, dtype=torch.uint8, offset=offset)
    _quiet = True
    return out


def _namespace(key: bytes) -> str:
    return key_namespace(key) or "?"


class RedisTier(Tier):
    kind = "redis"
    persistent = True
    remote = True

    def __init__(self, cfg, store_cfg):
        super().__init__(cfg, store_cfg)
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise StoreError(f"tier {cfg.name} (redis): the redis client is not installed; "
                             "allowed: pip install 'strata[redis]' (redis>=5)") from None
        self._down_errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._errors = (redis.RedisError, OSError)
        password = cfg.password or (os.environ.get(cfg.password_env) if cfg.password_env else None)
        timeout = cfg.timeout_ms / 1000
        self.cluster = cfg.cluster
        if self.cluster:
            from strata.store.tiers import redis_cluster

            self.client = redis_cluster.ClusterClient(cfg.url, cfg.nodes, password, timeout, cfg.max_connections)
            if redis_cluster.has_hash_tag(cfg.key_prefix.encode()):
                log.warning("tier %s: key_prefix %r holds a hash tag: every key falls in one slot, on one shard of "
                            "the cluster", cfg.name, cfg.key_prefix)
        else:
            kw = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                      max_connections=cfg.max_connections, timeout=timeout)
            if password:
                kw["password"] = password
            try:
                pool = redis.BlockingConnectionPool.from_url(cfg.url, **kw)
            except ValueError as e:
                raise StoreError(f"tier {cfg.name} (redis).url: {e}") from None
            self.client = redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        self.url = redact(cfg.url)
        self.prefix = cfg.key_prefix.encode()
        self._tagged = self.cluster and cfg.hash_tag == "scope"
        self._down_until = 0.0
        self._state = threading.Lock()
        self.dropped_writes = 0  # puts the server did not take (down, slow, full)
        self.skipped = 0  # calls answered at once while the server was marked down
        self.round_trips = 0  # calls sent to the server (a pipeline is one)
        self.server: dict = {}
        # Keys whose copy on the server is stale: a DEL it missed, or a newer version it did not take
        # (the old one would be served once the tiers above let the new one go). Read as misses and
        # deleted on the server at the next chance (``_purge``); a SET of the key clears it.
        self._stale: dict[bytes, None] = {}
        self._purge_lock = threading.Lock()  # a purge's DELs and SETs of stale keys never cross
        self.stale_overflow = 0  # stale keys forgotten because more than STALE_MAX piled up
        self._watchdog = Watchdog(lambda: self.client.connection_pool.disconnect(inuse_connections=True))
        self._configure()

    # -- talking to the server -----------------------------------------------------------------
    def _call(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` against the server, or OSError (marked down, refused, timed out, error reply)."""
        if time.monotonic() < self._down_until:
            self.skipped += 1
            raise OSError(f"redis {what}: server unreachable, retried after a back-off")
        self.round_trips += 1
        token = self._watchdog.arm(CALL_BOUND * self.cfg.timeout_ms / 1000)
        try:
            out = fn()
        except self._down_errors as e:
            self._mark_down(e)
            raise OSError(f"redis {what}: {e}") from None
        except self._errors as e:  # the server answered with an error (out of memory, ...)
            raise OSError(f"redis {what}: {e}") from None
        except Exception as e:  # replies the client cannot parse: whatever answers is no sane server
            self._mark_down(e)
            with contextlib.suppress(Exception):  # the stream may be out of step with the replies
                self.client.connection_pool.disconnect()
            raise OSError(f"redis {what}: unreadable reply ({type(e).__name__}: {e})") from None
        finally:
            self._watchdog.disarm(token)
        if self._down_until:
            with self._state:
                self._down_until = 0.0
            log.warning("tier %s: redis at %s answers again", self.name, self.url)
        return out

    def _mark_down(self, why: Exception) -> None:
        with self._state:
            was_up = self._down_until == 0.0
            self._down_until = time.monotonic() + BACKOFF_S
        if was_up:
            log.warning("tier %s: redis at %s unreachable (%s); reads miss and writes drop until it "
                        "answers again", self.name, self.url, why)

    def _configure(self) -> None:
        cfg = self.cfg
        for name, value in (("maxmemory", cfg.maxmemory), ("maxmemory-policy", cfg.maxmemory_policy)):
            if value is None:
                continue
            try:
                self._call(lambda: self.client.config_set(name, value), "CONFIG SET")
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

    def refresh(self) -> None:
        """Read the server's memory, policy, key count and hit rate back into ``self.server``
        (a cluster's: totals over its primaries, and per node its role, slots and memory)."""
        if self.cluster:
            try:
                self.server = self._call(self.client.report, "INFO")
            except OSError as e:
                self.server = {"connected": False, "cluster": True, "error": str(e)}
            return
        try:
            mem = self._call(lambda: self.client.info("memory"), "INFO")
            st = self._call(lambda: self.client.info("stats"), "INFO")
            keys = self._call(self.client.dbsize, "DBSIZE")
        except OSError as e:
            self.server = {"connected": False, "error": str(e)}
            return
        hits, misses = st.get("keyspace_hits", 0), st.get("keyspace_misses", 0)
        self.server = {
            "connected": True,
            "used_memory": mem.get("used_memory", 0),
            "maxmemory": mem.get("maxmemory", 0),
            "maxmemory_policy": mem.get("maxmemory_policy"),
            "keys": keys,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "evicted_keys": st.get("evicted_keys", 0),
        }

    # -- storage hooks: the server is the index --------------------------------------------------
    def stored_size(self, key: bytes, meta) -> int:
        return _payload_offset(header_size_for(key, meta)) + meta.nbytes

    def lookup(self, key: bytes) -> Entry | None:
        return None  # nothing is known here: ask the server (probe, exists_many)

    def probe(self, key: bytes) -> Entry:
        """An entry to read through; the read itself finds out whether the server has it."""
        return Entry(key, _namespace(key), None, 0, None)

    def exists_many(self, keys: list[bytes]) -> list[bool]:
        """Which keys the server holds: one round trip. All False (and an error counted) on a fault."""
        if not keys:
            return []
        self._purge()
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self._name(k))
        try:
            replies = self._call(lambda: pipe.execute(raise_on_error=False), "EXISTS")
        except OSError:
            self.counters.errors += 1
            return [False] * len(keys)
        if any(isinstance(n, Exception) for n in replies):  # a key's node did not answer: that key is not found
            self.counters.errors += 1
        return [isinstance(n, int) and n > 0 and k not in self._stale for k, n in zip(keys, replies)]

    def remove(self, key: bytes) -> bool:
        try:
            return bool(self._call(lambda: self.client.delete(self._name(key)), "DEL"))
        except OSError:
            self.counters.errors += 1
            self._mark_stale(key)  # the server still has it: never served, deleted when it answers
            return False

    # -- stale keys: what the server missed while it was unreachable ----------------------------
    def _mark_stale(self, key: bytes) -> None:
        with self._state:
            if key not in self._stale and len(self._stale) >= STALE_MAX:
                self._stale.pop(next(iter(self._stale)))
                self.stale_overflow += 1
            self._stale[key] = None

    def _purge(self) -> None:
        """DEL the stale keys on the server, if any and if it answers; those deleted are forgotten."""
        if not self._stale or time.monotonic() < self._down_until:
            return
        with self._purge_lock:
            keys = list(self._stale)
            for lo in range(0, len(keys), _SCAN_BATCH):  # round trips that each end within timeout_ms
                pipe = self.client.pipeline(transaction=False)
                for k in keys[lo : lo + _SCAN_BATCH]:
                    pipe.delete(self._name(k))
                try:
                    replies = self._call(lambda: pipe.execute(raise_on_error=False), "DEL")
                except OSError:
                    return
                with self._state:  # those a node did not delete (a cluster's node down) stay stale
                    for k, reply in zip(keys[lo : lo + _SCAN_BATCH], replies):
                        if isinstance(reply, int):
                            self._stale.pop(k, None)

    def _stale_miss(self, e: Entry) -> bool:
        """Whether ``e``'s key is stale on the server even after a purge was tried: a miss."""
        if e.key not in self._stale:
            return False
        self._purge()
        return e.key in self._stale

    def touch(self, e: Entry) -> None:
        pass  # recency is the server's business (maxmemory-policy)

    def _alloc(self, e: Entry) -> bool:
        e.loc = None
        return e.size <= MAX_VALUE

    def publish(self, e: Entry, count: bool = True) -> None:
        self._account(e, -1)  # the bytes are the server's now: only the traffic is counted here
        self.counters.puts += count

    def _free(self, e: Entry) -> None:
        if e.loc == "written":  # a put that lost to a newer one or a delete: take it back
            self.remove(e.key)

    def retire(self, e: Entry) -> None:
        self.remove(e.key)  # a corrupt value: never served again

    def write(self, e: Entry, data: torch.Tensor) -> bool:
        return self.write_many([(e, data)])[0]

    def write_many(self, pairs: list[tuple[Entry, torch.Tensor]]) -> list[bool]:
        """Pipelined SETs: up to ``BATCH`` values and ``BATCH_BYTES`` a round trip (a larger value
        alone). A value the server did not take is False, a dropped write counted."""
        out: list[bool] = []
        lo = 0
        while lo < len(pairs):
            hi, size = lo + 1, pairs[lo][0].size
            while hi < len(pairs) and hi - lo < BATCH and size + pairs[hi][0].size <= BATCH_BYTES:
                size += pairs[hi][0].size
                hi += 1
            pipe = self.client.pipeline(transaction=False)
            for e, data in pairs[lo:hi]:
                pipe.set(self._name(e.key), self._value(e, data))
            stale = any(e.key in self._stale for e, _ in pairs[lo:hi])
            with self._purge_lock if stale else contextlib.nullcontext():
                try:
                    replies = self._call(lambda: pipe.execute(raise_on_error=False), "SET")
                except OSError:
                    replies = [None] * (hi - lo)
                for (e, _), reply in zip(pairs[lo:hi], replies):
                    ok = reply is True
                    if ok:
                        e.loc = "written"
                        if stale:
                            with self._state:
                                self._stale.pop(e.key, None)  # the new version replaced the stale one
                    else:
                        self.dropped_writes += 1
                        self.counters.errors += 1
                        self._mark_stale(e.key)  # an older version there must not outlive this one
                    out.append(ok)
            lo = hi
        return out

    def _value(self, e: Entry, data: torch.Tensor) -> bytes:
        """One bytes object (header, padding, payload) built with one copy: the client sends bytes
        several times faster than a memoryview."""
        header = pack_header(e.key, e.meta)
        pad = bytes(_payload_offset(len(header)) - len(header))
        return b"".join((header, pad, flat_bytes(data).numpy().data if e.meta.nbytes else b""))

    def read(self, e: Entry) -> torch.Tensor:
        if self._stale_miss(e):
            raise NotStored
        return self._decode(e, self._call(lambda: self.client.get(self._name(e.key)), "GET"))

    def read_into(self, e: Entry, out: torch.Tensor) -> None:
        data = self.read(e)
        if out.numel() * out.element_size() != e.meta.nbytes:
            raise CorruptObject("stored size differs from the destination")
        if e.meta.nbytes:
            flat_bytes(out).copy_(flat_bytes(data))

    def read_many(self, entries: list[Entry]) -> list:
        """Pipelined GETs, ``BATCH`` keys a round trip: per entry its payload or the exception
        a single read would have raised."""
        out: list = []
        self._purge()
        for lo in range(0, len(entries), BATCH):
            part = entries[lo : lo + BATCH]
            pipe = self.client.pipeline(transaction=False)
            for e in part:
                pipe.get(self._name(e.key))
            try:
                values = self._call(lambda: pipe.execute(raise_on_error=False), "GET")
            except OSError as exc:
                out.extend([exc] * len(part))
                continue
            for e, value in zip(part, values):
                try:
                    if e.key in self._stale:  # the server missed a delete or a newer version
                        raise NotStored
                    if isinstance(value, Exception):  # an error reply for this key alone
                        raise OSError(f"redis GET: {value}")
                    out.append(self._decode(e, value))
                except (NotStored, CorruptObject, OSError) as exc:
                    out.append(exc)
        return out

    def _decode(self, e: Entry, value: bytes | None) -> torch.Tensor:
        """The payload of a value read for ``e``, checked, as a tensor of the stored dtype and
        shape that shares the reply's memory (no copy; the tensor owns the reply)."""
        if value is None:
            raise NotStored
        if not isinstance(value, bytes):
            raise CorruptObject(f"reply is a {type(value).__name__}, not a value")
        if len(value) < FIXED_HEADER_SIZE:
            raise CorruptObject("value cut short")
        n = header_size(value)
        key, meta = unpack_header(value[:n])
        if key != e.key:
            raise CorruptObject("value holds another key")
        offset = _payload_offset(n)
        if len(value) != offset + meta.nbytes:
            raise CorruptObject("payload length mismatch")
        payload = np.frombuffer(value, dtype=np.uint8, offset=offset)
        if checksum_buffer(payload) != meta.checksum:
            raise CorruptObject("payload checksum mismatch")
        e.meta = meta
        if not meta.nbytes:
            return torch.empty(meta.shape, dtype=meta.dtype)
        if payload.ctypes.data % meta.dtype.itemsize:  # not aligned for the dtype: copy
            return torch.from_numpy(payload.copy()).view(meta.dtype).view(meta.shape)
        return _tensor_over(value, offset).view(meta.dtype).view(meta.shape)

    # -- reporting -----------------------------------------------------------------------------
    def location(self) -> str:
        state = "connected" if self.server.get("connected") else "unreachable"
        if self.cluster:
            return f"{self.client.describe(self.server)}, {state}"
        return f"{self.url}, {state}"

    def _scan(self, pattern: bytes) -> Iterator[list[bytes]]:
        """Batches of the server's key names matching ``pattern``: SCAN to its end (on every
        primary of a cluster)."""
        if self.cluster:
            from strata.store.tiers.redis_cluster import scan_all

            yield from scan_all(self.client, self._call, pattern, _SCAN_BATCH)
            return
        cursor = 0
        while True:
            cursor, batch = self._call(lambda: self.client.scan(cursor, match=pattern, count=_SCAN_BATCH), "SCAN")
            yield batch
            if not cursor:
                return

    def contents(self) -> Iterator[tuple[bytes, str, int]]:
        """(key, namespace, stored bytes) of every value under this tier's prefix (SCAN: O(keys))."""
        pattern = self.prefix.replace(b"\\", b"\\\\").replace(b"*", b"\\*").replace(b"?", b"\\?") + b"*"
        skip = len(self.prefix) + (TAG_LEN if self._tagged else 0)
        try:
            for batch in self._scan(pattern):
                batch = [k for k in batch if k != self.prefix + LABELS_KEY]  # a hash: STRLEN would fail
                if batch:
                    pipe = self.client.pipeline(transaction=False)
                    for k in batch:
                        pipe.strlen(k)
                    for k, size in zip(batch, self._call(lambda: pipe.execute(raise_on_error=False), "STRLEN")):
                        if not isinstance(k, bytes) or not k.startswith(self.prefix):
                            continue  # not a key SCAN can have matched: a garbled reply
                        if not isinstance(size, int) or size <= 0:
                            continue  # gone since the SCAN (deleted, evicted, migrated), or its node is down
                        key = k[skip:]
                        yield key, _namespace(key), size
        except OSError as e:
            log.warning("tier %s: listing stopped early: %s", self.name, e)

    def stats(self) -> dict:
        """The base counters, and the server's. No ``bytes`` or ``objects``: Strata's own share of
        a server others may use is known only by a SCAN of every key (``contents``, as ``strata
        inspect`` runs it), too dear for a stats call, and the server's totals are not Strata's (a
        reader that wants them finds ``server_memory`` and ``server_keys``: INFO used_memory and
        DBSIZE, the whole server's)."""
        out = super().stats()
        del out["objects"], out["bytes"]
        out["server_memory"] = self.server.get("used_memory")
        out["server_keys"] = self.server.get("keys")
        if self.server.get("maxmemory"):
            out["capacity"] = self.server["maxmemory"]
        out.update(url=self.url, key_prefix=self.cfg.key_prefix, server=dict(self.server),
                   dropped_writes=self.dropped_writes, skipped_while_down=self.skipped,
                   round_trips=self.round_trips, stale_keys=len(self._stale), stale_overflow=self.stale_overflow)
        if self.cluster:  # what the cluster did to this tier's calls: redirections followed, nodes lost
            out.update(redirects=self.client.redirects, node_failures=self.client.node_failures,
                       map_refreshes=self.client.refreshes)
        return out

    def close(self) -> None:
        self._purge()  # last chance: a stale key left on the server would be served to the next process
        if self._stale:
            log.warning("tier %s: %d keys deleted or replaced while redis at %s was unreachable are still there; "
                        "the next process may read their old values", self.name, len(self._stale), self.url)
        self._watchdog.close()
        try:
            self.client.close()
            self.client.connection_pool.disconnect()
        except self._errors:
            pass
