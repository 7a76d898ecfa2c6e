"""Mooncake Store as a backing store (``strata.store.tiers.backing``): the raw half of the tier.

Mooncake Store pools the memory of many hosts behind one master: each client contributes a
segment (``segment_bytes``) and keeps a registered local buffer (``buffer_bytes``) it copies
through; values live in whichever segment the master picks, ``replicas`` times. This object
knows nothing of Strata's keys or values: names are raw bytes, values bytes-like.

What the client (``mooncake-transfer-engine`` 0.3.13) does, and what follows here:

- Batches: ``batch_is_exist`` (1, 0, or a negative code per key), ``batch_get_buffer`` (a
  handle over the local buffer per key, None when not read), ``batch_upsert_from`` and
  ``batch_get_into`` (raw pointers, a code or a size per key), ``batch_remove``. A get is one
  ``batch_get_buffer``: the value is a memoryview over the handle, no copy (it holds that much
  of the local buffer until dropped). A value the local buffer cannot hold comes back None;
  those are read again into fresh memory (``batch_get_into``, tcp only: other transports need
  registered memory), after ``batch_is_exist`` tells "not stored" from "not read".
- Repeats: ``batch_get_buffer`` of a batch that names a key twice returns zeros (of the value's
  length) for the first of them; ``get_many`` asks for each name once.
- Overwrite: ``put`` of a name that exists keeps the old value and still returns 0; ``upsert``
  replaces it (even while a reader's lease holds it). Puts here are upserts. Over tcp the
  tier hands each value in two parts (header, payload: ``Features.value_parts``), copied once
  into a send buffer reused from put to put (``_SendBuffer``) and sent from there
  (``batch_upsert_from``); other transports copy
  through the local buffer (``upsert_batch``, one code for the whole batch: on a failure each
  name is retried alone to learn which failed).
- Deletes are ``batch_remove(force=True)``: without force a name read in the last
  ``default_kv_lease_ttl`` (10 s) cannot be removed (OBJECT_HAS_LEASE). Forcing may hand a
  reader in the middle of its transfer torn bytes, which Strata's checksum turns into a miss.
- Empty values: Mooncake refuses objects of 0 bytes (INVALID_PARAMS); such a put fails alone
  with a StoreError. Strata's values always carry a header, so it never sends one.
- Names: the client takes text, and the master's listing is one name a line, so a name is
  percent-encoded (bytes outside ``[A-Za-z0-9_.~/:=@+{}-]``); the listing is decoded back.
- Listing and numbers: the client lists nothing. The master's admin HTTP server
  (``--metrics_port``, 9003 by default; ``admin_url``) serves ``/get_all_keys``, ``/metrics``
  and ``/get_segments_detail``; sizes come from ``batch_get_replica_desc``.
- Faults: when the master dies, calls fail at once with RPC_FAIL (-900) for a moment, then
  each blocks about 4.5 s in the client's reconnect, with the GIL released; once the client's
  pings have failed ``health_check()`` says 2 and calls can be refused at once. Calls run on a
  few worker threads and the caller waits at most ``CALL_BOUND * timeout_ms``
  (``MooncakeTimeout``); a call left behind finishes in its worker. Every name of a batch
  failing with an outage code raises ``MooncakeUnavailable``; other codes are that name's
  ``MooncakeError``. The client reconnects and remounts its segment by itself when the master
  comes back (empty: the master keeps its index in memory).
- Set-up: ``setup()`` against an absent master blocks about 90 s holding the GIL, so the
  master's port and the metadata URL are probed first (``timeout_ms``); if either does not
  answer the backend is built anyway and each later call retries the set-up after
  ``SETUP_BACKOFF_S``, raising ``MooncakeUnavailable`` meanwhile.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Callable, Iterator
from urllib.error import HTTPError
from urllib.parse import quote_from_bytes, unquote_to_bytes
from urllib.request import urlopen

import numpy as np

from strata.config import parse_size, positive_int
from strata.errors import ConfigError, StoreError, allowed
from strata.store.tiers.backing import BackingTier, Features

log = logging.getLogger("strata.mooncake")

CALL_BOUND = 4  # a caller waits at most this many timeout_ms for one call (as backing.CALL_BOUND)
CLOSE_GRACE_S = 5.0  # close waits this much longer than a call: it waits for calls still blocked
SETUP_BACKOFF_S = 1.0  # a client not yet set up (master down at start) is tried again this often
WORKERS = 4  # threads the calls run on: a call stuck in the client holds one until the client gives up
BATCH = 16  # names per round trip
BATCH_BYTES = 64 << 20  # bytes of values per round trip (at most half the local buffer)
LIST_BATCH = 1000  # names whose sizes one listing round trip asks for
ADMIN_PORT = 9003  # mooncake_master --metrics_port default: its admin and metrics HTTP server
PROTOCOLS = ("tcp", "rdma", "nvlink", "nvlink_intra", "ascend", "barex", "ubshmem")  # the client's transports
_SAFE = "/:=@+{}"  # with letters, digits and _.-~: kept as they are in a name; the rest %XX

# The client's codes (mooncake-store/include/types.h, ErrorCode).
CODES = {
    -1: "INTERNAL_ERROR", -10: "BUFFER_OVERFLOW", -100: "SHARD_INDEX_OUT_OF_RANGE",
    -101: "SEGMENT_NOT_FOUND", -102: "SEGMENT_ALREADY_EXISTS", -103: "CLIENT_NOT_FOUND",
    -200: "NO_AVAILABLE_HANDLE (no space in any segment)", -300: "INVALID_VERSION", -400: "INVALID_KEY",
    -500: "WRITE_FAIL", -600: "INVALID_PARAMS", -601: "ILLEGAL_CLIENT", -700: "INVALID_WRITE",
    -701: "INVALID_READ", -702: "INVALID_REPLICA", -703: "REPLICA_IS_NOT_READY", -704: "OBJECT_NOT_FOUND",
    -705: "OBJECT_ALREADY_EXISTS", -706: "OBJECT_HAS_LEASE", -707: "LEASE_EXPIRED",
    -708: "OBJECT_HAS_REPLICATION_TASK", -709: "OBJECT_NO_REPLICATION_TASK", -710: "REPLICA_NOT_FOUND",
    -711: "REPLICA_ALREADY_EXISTS", -712: "REPLICA_IS_GONE", -800: "TRANSFER_FAIL", -900: "RPC_FAIL",
    -1000: "ETCD_OPERATION_ERROR", -1001: "ETCD_KEY_NOT_EXIST", -1002: "ETCD_TRANSACTION_FAIL",
    -1003: "ETCD_CTX_CANCELLED", -1010: "UNAVAILABLE_IN_CURRENT_STATUS", -1011: "UNAVAILABLE_IN_CURRENT_MODE",
}
NOT_FOUND = -704
OUTAGE = frozenset({-900, -1010})  # the master did not answer: when every name of a call gets one, it raises


class MooncakeError(RuntimeError):
    """One name's failure: the client's negative code, its meaning, and what was asked."""

    def __init__(self, code: int, what: str, name: bytes | None = None, detail: str = ""):
        self.code = code
        self.code_name = CODES.get(code, "unknown code")
        where = f" {name!r}" if name is not None else ""
        super().__init__(f"mooncake {what}{where}: {self.code_name} ({code}){': ' + detail if detail else ''}")


class MooncakeUnavailable(ConnectionError):
    """The whole store did not answer: master down, refused, not set up yet, interrupted."""


class MooncakeTimeout(MooncakeUnavailable, TimeoutError):
    """A call outlived ``CALL_BOUND * timeout_ms``; it goes on in its worker, unawaited."""


def _name_text(name: bytes) -> str:
    """The client's text for a raw name: reversible, no newline, comma or NUL."""
    return quote_from_bytes(name, safe=_SAFE)


def _name_bytes(text: str) -> bytes:
    return unquote_to_bytes(text)


class _SendBuffer:
    """Memory that puts copy their values into before ``batch_upsert_from`` sends them, reused
    from put to put: a fresh block of tens of MiB is page-faulted on every write (a 32 MiB value
    joined into new ``bytes`` took 17.7 ms, the same copy into memory already touched 2.4 ms).
    One buffer, the largest batch's size, is kept while no call uses it; a put that finds it in
    use (another thread's, or a call given up on that is still in the client) takes a new one.
    It is given back by the worker once the client's call has ended, never by the caller."""

    def __init__(self):
        self._lock = threading.Lock()
        self._kept: np.ndarray | None = None

    def take(self, n: int) -> np.ndarray:
        with self._lock:
            buf, self._kept = self._kept, None
        return buf if buf is not None and buf.nbytes >= n else np.empty(max(n, 1), dtype=np.uint8)

    def give(self, buf: np.ndarray) -> None:
        with self._lock:
            if self._kept is None or self._kept.nbytes < buf.nbytes:
                self._kept = buf


def _nbytes(value) -> int:
    return sum(memoryview(p).nbytes for p in value) if isinstance(value, tuple) else memoryview(value).nbytes


def _as_array(value) -> np.ndarray:
    """A uint8 view of a bytes-like value (a copy only if it is not contiguous); a value in parts
    (``Features.value_parts``) joined."""
    if isinstance(value, tuple):
        return np.frombuffer(b"".join(value), dtype=np.uint8)
    try:
        return np.frombuffer(value, dtype=np.uint8)
    except (TypeError, ValueError):
        return np.frombuffer(bytes(memoryview(value)), dtype=np.uint8)


def _host_port(field: str, addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StoreError(f"mooncake.{field}: got {addr!r}; allowed: 'host:port' (the master's rpc port)")
    return host.strip("[]"), int(port)


def _import_store():
    try:
        from mooncake import store
    except ImportError as e:  # the package, or Debian's libibverbs1 it links against
        hint = " and Debian's libibverbs1 (apt-get install libibverbs1)" if "ibverbs" in str(e) else ""
        raise StoreError(f"mooncake: the Mooncake client does not import ({e}); allowed: "
                         f"pip install 'strata[mooncake]'{hint}") from None
    return store


class _Workers:
    """Daemon threads running client calls: one left blocked in the client (a dead master holds
    a call about 4.5 s) must hold up neither interpreter exit nor anyone joining threads."""

    def __init__(self, n: int, name: str):
        self._queue: SimpleQueue = SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(n)]
        self._started = False
        self._lock = threading.Lock()

    def submit(self, fn: Callable, *args) -> Future:
        with self._lock:
            if not self._started:
                for t in self._threads:
                    t.start()
                self._started = True
        fut: Future = Future()
        self._queue.put((fut, fn, args))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            del item
            if fut.set_running_or_notify_cancel():  # else cancelled while queued: its caller gave up
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                    fut.set_exception(e)
            # An idle worker must hold nothing of its last call: a result over the client's local
            # buffer (batch_get_buffer's handles) would keep that much of it taken, and the next
            # get would find no room and fall back to a read in several round trips.
            del fut, fn, args

    def shutdown(self) -> None:
        """Each idle thread ends; one blocked in the client ends once the client lets it go."""
        for _ in self._threads:
            self._queue.put(None)


class _Wait:
    """A caller waiting for its call: set when the call ends or ``interrupt()`` gives up on it."""

    __slots__ = ("event", "interrupted")

    def __init__(self):
        self.event = threading.Event()
        self.interrupted = False


class MooncakeBackend:
    """A Mooncake Store client as Strata's narrow backing store (see the module docstring)."""

    down_errors = (ConnectionError, TimeoutError)
    errors = (MooncakeError,)
    tags: dict = {}

    def __init__(self, *, master: str, metadata_url: str, protocol: str = "tcp", device: str = "",
                 local_host: str = "127.0.0.1", segment_bytes: int, buffer_bytes: int, replicas: int = 1,
                 timeout_ms: int = 1000, admin_url: str | None = None):
        self._host, self._port = _host_port("master", master)
        if not isinstance(metadata_url, str) or not metadata_url:
            raise StoreError(f"mooncake.metadata_url: got {metadata_url!r}; allowed: the metadata server, e.g. "
                             "'http://host:8080/metadata' (mooncake_master --enable_http_metadata_server)")
        if protocol not in PROTOCOLS:
            raise StoreError(allowed("mooncake.protocol", protocol, PROTOCOLS))
        for field, value, low in (("segment_bytes", segment_bytes, 0), ("buffer_bytes", buffer_bytes, 1 << 20),
                                  ("replicas", replicas, 1), ("timeout_ms", timeout_ms, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StoreError(f"mooncake.{field}: got {value!r}; allowed: an integer >= {low}")
        self._mod = _import_store()
        self.master, self.metadata_url, self.protocol, self.device = master, metadata_url, protocol, device
        self.local_host, self.segment_bytes, self.buffer_bytes = local_host, segment_bytes, buffer_bytes
        self.replicas, self.timeout_ms = replicas, timeout_ms
        self.admin_url = (f"http://{self._host}:{ADMIN_PORT}" if admin_url is None else admin_url).rstrip("/")
        self._bound_s = CALL_BOUND * timeout_ms / 1000
        self._direct = protocol == "tcp"  # tcp reads and writes any memory; other transports registered memory only
        self.features = Features(batching=True, zero_copy_reads=True, prefetch=True, persistent=False, shared=True,
                                 max_value=None if self._direct else buffer_bytes // 2, max_batch=BATCH,
                                 max_batch_bytes=min(BATCH_BYTES, buffer_bytes // 2), value_parts=self._direct)
        self._send = _SendBuffer()  # tcp puts copy their values here (one copy either way: no join)
        self._config = self._mod.ReplicateConfig()
        self._config.replica_num = replicas
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()
        self._pending: set[_Wait] = set()
        self._stuck = 0  # calls given up on, still blocked in the client
        self._pool = _Workers(WORKERS, "strata-mooncake")
        self._client = None
        self._retry_at = 0.0
        self._closed = False
        try:
            self._setup(first=True)
        except MooncakeUnavailable as e:
            self._retry_at = time.monotonic() + SETUP_BACKOFF_S
            log.warning("mooncake: %s; set up at the first call after it answers", e)

    # -- set-up -------------------------------------------------------------------------------
    def _probe(self) -> None:
        """Whether the master's port and the metadata server answer, within timeout_ms: the
        client's set-up against an absent master blocks for minutes, holding the GIL."""
        t = self.timeout_ms / 1000
        try:
            socket.create_connection((self._host, self._port), timeout=t).close()
        except OSError as e:
            raise MooncakeUnavailable(f"mooncake master {self.master} unreachable: {e}") from None
        if self.metadata_url.startswith(("http://", "https://")):
            try:
                urlopen(self.metadata_url, timeout=t).close()
            except HTTPError:
                pass  # it answered (a GET without a key is a 4xx)
            except OSError as e:
                raise MooncakeUnavailable(f"mooncake metadata server {self.metadata_url} unreachable: {e}") from None

    def _setup(self, first: bool = False) -> None:
        self._probe()
        client = self._mod.MooncakeDistributedStore()
        rc = client.setup(self.local_host, self.metadata_url, self.segment_bytes, self.buffer_bytes, self.protocol,
                          self.device, self.master)
        if rc != 0:
            what = (f"mooncake: set-up failed ({rc}) with master {self.master!r}, metadata_url {self.metadata_url!r}, "
                    f"protocol {self.protocol!r}, device {self.device!r}, local_host {self.local_host!r}, "
                    f"segment_bytes {self.segment_bytes}, buffer_bytes {self.buffer_bytes}")
            if first:  # both answered the probe: most likely the configuration (or the host's memory)
                raise StoreError(what + "; see the client's log above for which")
            raise MooncakeUnavailable(what)
        self._client = client
        if not first:
            log.warning("mooncake: set up against master %s", self.master)

    def _ready(self):
        """The client, set up now if it was not (at most once per SETUP_BACKOFF_S)."""
        client = self._client
        if client is not None:
            return client
        with self._setup_lock:  # not self._lock: interrupt() must not wait for a set-up
            if self._closed:
                raise MooncakeUnavailable("mooncake: closed")
            if self._client is None:
                now = time.monotonic()
                if now < self._retry_at:
                    raise MooncakeUnavailable(f"mooncake master {self.master}: not set up yet (unreachable at the "
                                              f"last try; next in {self._retry_at - now:.1f}s)")
                self._retry_at = now + SETUP_BACKOFF_S
                self._setup()
            return self._client

    # -- calls ----------------------------------------------------------------------------------
    def _run(self, what: str, fn: Callable):
        """``fn(client)`` on a worker, awaited at most CALL_BOUND * timeout_ms or until interrupted.
        While a call given up on is still blocked in the client, others are refused at once: the
        client would block them the same way (about 4.5 s each on a dead master)."""
        client = self._ready()
        if client.health_check() == 2:  # its pings failed: the master is gone, do not wait for it
            raise MooncakeUnavailable(f"mooncake {what}: master {self.master} unreachable")
        wait = _Wait()
        with self._lock:
            if self._stuck:
                raise MooncakeUnavailable(f"mooncake {what}: master {self.master}: an earlier call is still "
                                          "unanswered")
            self._pending.add(wait)
        try:
            fut = self._pool.submit(fn, client)
            fut.add_done_callback(lambda _: wait.event.set())
            if not wait.event.wait(self._bound_s):
                self._abandon(fut)
                raise MooncakeTimeout(f"mooncake {what}: no answer from master {self.master} within "
                                      f"{self._bound_s:.3g}s")
            if wait.interrupted and not fut.done():
                self._abandon(fut)
                raise MooncakeUnavailable(f"mooncake {what}: interrupted")
            return fut.result()
        finally:
            with self._lock:
                self._pending.discard(wait)

    def _abandon(self, fut) -> None:
        """A call no one waits for: never sent if it has not started (a put landing later would
        surprise), else counted as stuck until the client lets it go."""
        if fut.cancel():
            return
        with self._lock:
            self._stuck += 1
        fut.add_done_callback(self._unstuck)

    def _unstuck(self, _fut) -> None:
        with self._lock:
            self._stuck -= 1

    def _outage(self, codes: list, what: str) -> None:
        """Raise when every name failed with an outage code: the master, not the names."""
        if codes and all(isinstance(c, int) and c in OUTAGE for c in codes):
            raise MooncakeUnavailable(f"mooncake {what}: master {self.master}: {CODES[codes[0]]} ({codes[0]})")

    # -- the backing store ----------------------------------------------------------------------
    def exists_many(self, names: list[bytes]) -> list:
        if not names:
            return []
        keys = [_name_text(n) for n in names]
        codes = self._run("exists", lambda c: c.batch_is_exist(keys))
        self._outage(codes, "exists")
        return [c == 1 if c in (0, 1) else MooncakeError(c, "exists", n) for n, c in zip(names, codes)]

    def get_many(self, names: list[bytes]) -> list:
        """bytes-like values (memoryviews over the client's local buffer, or over fresh memory
        for values it could not hold), None where not stored, MooncakeError where not read."""
        if not names:
            return []
        unique = list(dict.fromkeys(names))
        if len(unique) < len(names):  # batch_get_buffer gives a name asked twice zeros the first time
            got = dict(zip(unique, self.get_many(unique)))
            seen: set[bytes] = set()
            out = []
            for n in names:  # a repeat gets its own copy: the caller may write into what it is given
                v = got[n]
                out.append(memoryview(bytes(v)) if n in seen and isinstance(v, memoryview) else v)
                seen.add(n)
            return out
        keys = [_name_text(n) for n in names]
        handles = self._run("get", lambda c: c.batch_get_buffer(keys))
        out: list = [None if h is None else memoryview(h).cast("B") for h in handles]
        unread = [i for i, h in enumerate(handles) if h is None]
        if unread:
            self._read_rest(names, keys, unread, out)
        return out

    def _read_rest(self, names, keys, unread: list[int], out: list) -> None:
        """The names ``batch_get_buffer`` did not read: not stored (None), or read into fresh
        memory (tcp), or the reason they cannot be."""
        sub = [keys[i] for i in unread]
        codes = self._run("get", lambda c: c.batch_is_exist(sub))
        self._outage(codes, "get")
        present = []
        for i, code in zip(unread, codes):
            if code == 1:
                present.append(i)
            elif code != 0:
                out[i] = MooncakeError(code, "get", names[i])
        if not present:
            return
        if not self._direct:
            for i in present:
                out[i] = MooncakeError(-10, "get", names[i], f"not read into the local buffer (buffer_bytes "
                                       f"{self.buffer_bytes}: values alive hold it, or the value is larger)")
            return
        sizes = self._run("get", lambda c: [c.get_size(keys[i]) for i in present])
        bufs = {i: np.empty(s, dtype=np.uint8) for i, s in zip(present, sizes) if s > 0}
        for i, s in zip(present, sizes):
            if s <= 0:
                out[i] = None if s in (0, NOT_FOUND) else MooncakeError(s, "get", names[i])
        todo = list(bufs)
        if not todo:
            return
        got = self._run("get", lambda c: c.batch_get_into([keys[i] for i in todo],
                                                          [bufs[i].ctypes.data for i in todo],
                                                          [bufs[i].nbytes for i in todo]))
        self._outage(got, "get")
        for i, n in zip(todo, got):
            out[i] = (memoryview(bufs[i])[:n] if n >= 0 else None if n == NOT_FOUND
                      else MooncakeError(n, "get", names[i]))

    def put_many(self, pairs: list[tuple[bytes, object]]) -> list:
        """Upserts (a name stored already is replaced): True, or why not."""
        out: list = [None] * len(pairs)
        todo: list[int] = []
        sizes: list[int] = []
        for i, (name, value) in enumerate(pairs):
            n = _nbytes(value)
            limit = self.features.max_value
            if not n:
                out[i] = StoreError(f"mooncake put {name!r}: value of 0 bytes; allowed: at least 1 byte "
                                    "(Mooncake stores no empty objects)")
            elif limit is not None and n > limit:
                out[i] = StoreError(f"mooncake put {name!r}: value of {n} bytes; allowed: at most {limit} "
                                    f"(half of buffer_bytes over {self.protocol})")
            else:
                todo.append(i)
                sizes.append(n)
        if not todo:
            return out
        keys = [_name_text(pairs[i][0]) for i in todo]
        cfg = self._config
        if self._direct:  # tcp sends from any memory: the values copied into the reused send buffer
            buf = self._send.take(sum(sizes))
            at, ptrs = 0, []
            for i, n in zip(todo, sizes):
                for part in (pairs[i][1] if isinstance(pairs[i][1], tuple) else (pairs[i][1],)):
                    m = memoryview(part).nbytes
                    buf[at : at + m] = np.frombuffer(part, dtype=np.uint8, count=m)
                    at += m
                ptrs.append(buf.ctypes.data + at - n)

            def upsert(c):  # in the worker: the buffer goes back only once the client is done with it
                try:
                    return c.batch_upsert_from(keys, ptrs, sizes, cfg)
                finally:
                    self._send.give(buf)

            codes = self._run("put", upsert)
        else:
            arrays = [_as_array(pairs[i][1]) for i in todo]
            rc = self._run("put", lambda c: c.upsert_batch(keys, arrays, cfg))
            codes = [rc] * len(keys) if rc in OUTAGE or rc == 0 else \
                self._run("put", lambda c: [c.upsert(k, a, cfg) for k, a in zip(keys, arrays)])
        self._outage(codes, "put")
        for i, code in zip(todo, codes):
            out[i] = True if code == 0 else MooncakeError(code, "put", pairs[i][0])
        return out

    def delete_many(self, names: list[bytes]) -> list:
        """Whether each name was there (gone now either way): forced, past readers' leases."""
        if not names:
            return []
        keys = [_name_text(n) for n in names]
        codes = self._run("delete", lambda c: c.batch_remove(keys, True))
        self._outage(codes, "delete")
        return [c == 0 if c in (0, NOT_FOUND) else MooncakeError(c, "delete", n) for n, c in zip(names, codes)]

    def scan(self, prefix: bytes, call: Callable | None = None) -> Iterator[list[tuple[bytes, int]]]:
        """Batches of (name, stored size) under ``prefix``: the master's whole key list (admin
        HTTP), then sizes a batch at a time; a name gone since it was listed has size 0."""
        if not self.admin_url:
            raise NotImplementedError("mooncake: the client lists no keys; a listing needs the master's admin "
                                      "server (admin_url)")
        call = call or (lambda fn, what: fn())
        text = call(lambda: self._http("/get_all_keys"), "list")
        start = _name_text(prefix)
        keys = [k for k in text.split("\n") if k.startswith(start)]
        for lo in range(0, len(keys), LIST_BATCH):
            part = keys[lo : lo + LIST_BATCH]
            sizes = call(lambda: self._sizes(part), "sizes")
            yield [(_name_bytes(k), s) for k, s in zip(part, sizes)]

    def _sizes(self, keys: list[str]) -> list[int]:
        desc = self._run("sizes", lambda c: c.batch_get_replica_desc(keys))
        out = []
        for k in keys:
            size = 0
            for replica in desc.get(k, ()):
                if replica.is_memory_replica():
                    size = replica.get_memory_descriptor().buffer_descriptor.size
                    break
            out.append(size)
        if len(desc) < len(keys):  # an empty answer may be the master's failure: ask in a way that says so
            self._outage(self._run("sizes", lambda c: c.batch_is_exist([k for k in keys if k not in desc])), "sizes")
        return out

    def _http(self, path: str) -> str:
        url = self.admin_url + path
        try:
            with urlopen(url, timeout=self._bound_s) as r:
                return r.read().decode("utf-8", "surrogateescape")
        except OSError as e:
            raise MooncakeUnavailable(f"mooncake admin {url}: {e}") from None

    def report(self) -> dict:
        """The client's view and the master's numbers (admin HTTP): segments, used and total
        memory, keys, clients, evictions. Raises MooncakeUnavailable when the master is down."""
        client = self._ready()
        health = client.health_check()
        if health == 2:
            raise MooncakeUnavailable(f"mooncake report: master {self.master} unreachable")
        out = {"connected": health == 0, "master": self.master, "metadata_url": self.metadata_url,
               "protocol": self.protocol, "local_segment": client.get_hostname(),
               "segment_bytes": self.segment_bytes, "buffer_bytes": self.buffer_bytes, "replicas": self.replicas,
               "admin_url": self.admin_url or None}
        if not self.admin_url:
            return out
        try:
            metrics = _prometheus(self._http("/metrics"))
            detail = json.loads(self._http("/get_segments_detail"))
        except (MooncakeUnavailable, ValueError) as e:
            self._probe()  # the master itself down: raise; only its admin server missing: report without it
            out["admin"] = f"unreachable: {e}"
            return out
        segments = detail.get("segments", [])
        out.update(used_memory=metrics.get("master_allocated_bytes"),
                   maxmemory=metrics.get("master_total_capacity_bytes"), keys=metrics.get("master_key_count"), clients=metrics.get("master_active_clients"),
                   evicted_keys=metrics.get("master_evicted_key_count"),
                   segments=detail.get("total_segments", len(segments)),
                   segment_detail=[{"name": s.get("segment_name"), "used": s.get("allocator_used_bytes"),
                                    "capacity": s.get("allocator_capacity_bytes"), "status": s.get("status")}
                                   for s in segments])
        return out

    def describe(self, report: dict | None = None) -> str:
        n = (report or {}).get("segments")
        tail = f", {n} segment{'s' * (n != 1)}" if isinstance(n, int) else ""
        return f"mooncake master {self.master} ({self.protocol}){tail}"

    def interrupt(self) -> None:
        """Give up on every call waiting now: its caller gets MooncakeUnavailable at once (the
        client call itself runs on in its worker until the client gives up)."""
        with self._lock:
            for wait in self._pending:
                wait.interrupted = True
                wait.event.set()

    def reset(self) -> None:
        pass  # no stream to resynchronise: every call is the client's own request and reply

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client, self._client = self._client, None
        self.interrupt()
        if client is not None:  # unmounts this process's segment: its values are gone from the store
            fut = self._pool.submit(client.close)
            try:
                fut.result(timeout=self._bound_s + CLOSE_GRACE_S)  # behind calls still blocked in the client
            except Exception as e:  # noqa: BLE001 - closing must not raise; the segment times out at the master
                log.warning("mooncake: close did not finish (%r); the master drops the segment when it times out", e)
        self._pool.shutdown()


def _prometheus(text: str) -> dict[str, int]:
    """Unlabelled integer samples of a Prometheus text page."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            try:
                out[name] = int(float(value))
            except ValueError:
                continue
    return out



# -- the tier ------------------------------------------------------------------------------------------
def _master(value: object, where: str) -> str:
    """'host:port' of the mooncake master's rpc port, e.g. '10.0.0.1:50051'"""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: got {value!r}; allowed: 'host:port' of the mooncake master's rpc port")
    try:
        _host_port("master", value)
    except StoreError:
        raise ConfigError(f"{where}: got {value!r}; allowed: 'host:port' of the mooncake master's rpc port, "
                          "e.g. '10.0.0.1:50051'") from None
    return value


def _metadata_url(value: object, where: str) -> str:
    """the metadata server's URL, e.g. 'http://10.0.0.1:8080/metadata' (mooncake_master --enable_http_metadata_server)"""
    if not isinstance(value, str) or not value.startswith(("http://", "https://", "etcd://", "redis://")) \
            and value != "P2PHANDSHAKE":
        raise ConfigError(f"{where}: got {value!r}; allowed: {_metadata_url.__doc__}, an etcd:// or redis:// "
                          "metadata address, or P2PHANDSHAKE")
    return value


class MooncakeTier(BackingTier):
    """Kind ``mooncake``: Strata's values in a Mooncake Store, through ``MooncakeBackend``. The
    store is the index and holds its own capacity and eviction; this process contributes
    ``segment`` bytes of its memory to the pool (0: none, as a pure client of store servers) and
    copies through a local buffer of ``buffer`` bytes. What a process contributes leaves the pool
    when it closes, so values outlive a process only in the segments of others."""

    kind = "mooncake"
    config_keys = {
        "master": _master,
        "metadata_url": _metadata_url,
        "protocol": PROTOCOLS,
        "device": str,  # rdma: the NIC(s) to use, e.g. "mlx5_0"; "" lets the client pick
        "local_host": str,  # the address other hosts reach this process's segment at
        "segment": parse_size,
        "buffer": parse_size,
        "replicas": positive_int,
        "timeout_ms": positive_int,
        "admin_url": str,  # the master's admin HTTP server (metrics, listing); "" turns listing off
        "key_prefix": str,
    }
    config_required = ("master", "metadata_url")
    defaults = {"protocol": "tcp", "device": "", "local_host": "127.0.0.1", "segment": 1 << 30,
                "buffer": 256 << 20, "replicas": 1, "timeout_ms": 1000, "admin_url": None, "key_prefix": "strata:"}

    def __init__(self, cfg, store_cfg):
        o = {**self.defaults, **cfg.options}
        backend = MooncakeBackend(master=o["master"], metadata_url=o["metadata_url"], protocol=o["protocol"],
                                  device=o["device"], local_host=o["local_host"], segment_bytes=o["segment"],
                                  buffer_bytes=o["buffer"], replicas=o["replicas"], timeout_ms=o["timeout_ms"],
                                  admin_url=o["admin_url"])
        super().__init__(cfg, store_cfg, backend, o["key_prefix"].encode(), o["timeout_ms"])
        self.key_prefix = o["key_prefix"]
        self.refresh()

    def stats(self) -> dict:
        out = super().stats()
        out.update(master=self.backend.master, key_prefix=self.key_prefix)
        return out
