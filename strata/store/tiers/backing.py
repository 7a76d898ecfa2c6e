"""Backing tiers: objects in a store behind I/O that is its own index (Redis, a cluster, Mooncake ...).

A backing store is a narrow object (``Backend``): exists / get / put / delete of many raw names
in one round trip, a listing, a report, and a features record saying what it supports. It
knows nothing of Strata's keys, values, checksums or faults. ``BackingTier`` turns one into a
tier, and holds everything every such store needs, once:

- The value format: Strata's header (key, dtype, shape, payload checksum), padding to 16
  bytes, the payload: written whole by one put, so a reader sees all of it or none; a value
  that fails a check (another key's, cut short, flipped) is a miss, counted, and deleted. No
  pickle: the header is a fixed struct. A read aliases the value's bytes where it can.
- Batching: a step's keys go in round trips of at most ``features.max_batch`` names and
  ``features.max_batch_bytes`` bytes of values (a larger value alone).
- Faults never reach the caller. Every whole call is bounded by ``CALL_BOUND`` times
  ``timeout_ms`` (a watchdog asks the backend to ``interrupt()`` a call a server keeps alive by
  dripping its reply). An outage (``backend.down_errors``) or a reply the client cannot parse
  marks the store down for ``BACKOFF_S``, during which calls return at once as misses and
  dropped writes; the first call after it tries again, so a restarted server is picked up
  without restarting anything. An error reply (``backend.errors``) fails that call only.
- Stale names: a delete the store missed, or a newer version it did not take, would let the
  old value be served once the tiers above let the new one go. Such keys are remembered, read
  as misses, and deleted on the store at the next chance; a put of the key clears them.

The store is the index: this tier keeps none (another process may add an object and the store
may evict one at any moment), so ``lookup`` finds nothing and the chain asks ``exists_many``
and reads through ``probe``. Capacity and eviction are the store's own.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, TypeVar

import numpy as np
import torch

from strata.keys import key_namespace
from strata.store.codec import (CorruptObject, FIXED_HEADER_SIZE, checksum_buffer, flat_bytes, header_size,
                                header_size_for, pack_header, unpack_header)
from strata.store.inflight import KeysInFlight
from strata.store.tiers.base import CopiesInFlight, Entry, NotStored, Tier

log = logging.getLogger("strata.backing")
T = TypeVar("T")

BACKOFF_S = 1.0  # after a failed call, calls answer at once (as misses) for this long
CALL_BOUND = 4  # a whole call (a batch included) ends within this many timeout_ms
STALE_MAX = 1 << 16  # keys remembered as stale on the store (a delete or a newer put it missed)
PURGE_BATCH = 1000  # stale names deleted per round trip
ALIGN = 16  # the payload starts this far into a value: a tensor over it is aligned for any dtype
KEY_WAIT_S = 1.0  # a put that finds another of its key in flight waits this long, then reserves again
LABELS_KEY = b"__scope_labels__"  # after the prefix: where scope labels live (strata.store.labels), no object


@dataclass(frozen=True)
class Features:
    """What a backing store supports, for the tier and for humans (``strata inspect``)."""

    batching: bool = True  # many names in one round trip
    zero_copy_reads: bool = False  # get_many's values are buffers a payload tensor may alias
    prefetch: bool = True  # worth reading ahead of use into a memory tier above it
    persistent: bool = True  # values outlive this process
    shared: bool = True  # other processes (and hosts) read and write the same names
    max_value: int | None = None  # the largest value the store takes, bytes
    max_batch: int = 16  # names per round trip
    max_batch_bytes: int = 16 << 20  # bytes of values per round trip: each must go within timeout_ms
    # put_many takes each value as two parts, (header and padding as bytes, payload as a
    # memoryview), to store as one value: a store that copies into memory of its own anyway
    # (a reused send buffer) saves the joined copy ``encode_value`` makes into fresh memory.
    value_parts: bool = False


class Backend(Protocol):
    """The narrow interface of a backing store. Names are raw bytes (the tier's prefix is on
    them already); each ``*_many`` call is one round trip and returns one result per name, an
    Exception instance for a name that failed alone. A whole-store failure raises: one of
    ``down_errors`` for an outage, one of ``errors`` for an error reply."""

    features: Features
    down_errors: tuple[type[BaseException], ...]
    errors: tuple[type[BaseException], ...]

    def exists_many(self, names: list[bytes]) -> list: ...  # bool | Exception
    def get_many(self, names: list[bytes]) -> list: ...  # bytes | memoryview | None (not stored) | Exception
    def put_many(self, pairs: list[tuple[bytes, bytes]]) -> list: ...  # True | False | Exception
    def delete_many(self, names: list[bytes]) -> list: ...  # whether it was there (gone now either way) | Exception
    # Batches of (name, stored size) of every name under ``prefix``; each round trip through
    # ``call(fn, what)``, the tier's bounded call (which raises OSError on a fault).
    def scan(self, prefix: bytes, call: Callable) -> Iterator[list[tuple[bytes, int]]]: ...
    def report(self) -> dict: ...  # the store's own numbers: connected, used_memory, maxmemory, keys ...
    def describe(self, report: dict) -> str: ...  # where the bytes live, for humans
    def interrupt(self) -> None: ...  # make a call blocked in another thread fail now
    def reset(self) -> None: ...  # drop connections that may be out of step with their replies
    def close(self) -> None: ...


class Watchdog:
    """Bounds whole calls, not single socket reads: a server that drips a reply a byte at a time
    keeps every read inside a socket timeout. One thread per tier; past a call's deadline it
    runs ``on_expire`` (the backend's ``interrupt``, so the blocked read fails)."""

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
                self._thread = threading.Thread(target=self._run, name="strata-backing-watchdog", daemon=True)
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
                    log.debug("watchdog: interrupting the call failed", exc_info=True)
                finally:
                    self._cond.acquire()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()


# -- the value format -------------------------------------------------------------------------------
def payload_offset(header_len: int) -> int:
    return -(-header_len // ALIGN) * ALIGN


def encode_value(key: bytes, meta, data: torch.Tensor) -> bytes:
    """One bytes object (header, padding, payload) built with one copy: clients send bytes
    several times faster than a memoryview."""
    return b"".join(encode_parts(key, meta, data))


def encode_parts(key: bytes, meta, data: torch.Tensor) -> tuple[bytes, memoryview | bytes]:
    """The value of ``encode_value`` as (header and padding, payload), the payload without a copy
    (a view of ``data``'s memory: the caller keeps ``data`` alive while it is read)."""
    header = pack_header(key, meta)
    head = header + bytes(payload_offset(len(header)) - len(header))
    return head, (flat_bytes(data).numpy().data if meta.nbytes else b"")


_quiet = False


def _tensor_over(value, offset: int) -> torch.Tensor:
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


def decode_value(key: bytes, value) -> tuple[object, torch.Tensor]:
    """(meta, payload) of a value read for ``key``, checked; the payload a tensor of the stored
    dtype and shape sharing the value's memory where it is aligned (the tensor owns the reply).
    NotStored for None, CorruptObject for anything that is not ``key``'s intact value."""
    if value is None:
        raise NotStored
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise CorruptObject(f"reply is a {type(value).__name__}, not a value")
    if len(value) < FIXED_HEADER_SIZE:
        raise CorruptObject("value cut short")
    n = header_size(value)
    got, meta = unpack_header(bytes(value[:n]))
    if got != key:
        raise CorruptObject("value holds another key")
    offset = payload_offset(n)
    if len(value) != offset + meta.nbytes:
        raise CorruptObject("payload length mismatch")
    payload = np.frombuffer(value, dtype=np.uint8, offset=offset)
    if checksum_buffer(payload) != meta.checksum:
        raise CorruptObject("payload checksum mismatch")
    if not meta.nbytes:
        return meta, torch.empty(meta.shape, dtype=meta.dtype)
    if payload.ctypes.data % meta.dtype.itemsize:  # not aligned for the dtype: copy
        return meta, torch.from_numpy(payload.copy()).view(meta.dtype).view(meta.shape)
    return meta, _tensor_over(value, offset).view(meta.dtype).view(meta.shape)


def _namespace(key: bytes) -> str:
    return key_namespace(key) or "?"


class KeyBusy(CopiesInFlight):
    """A put of the key is in flight to the store: the chain waits for it outside its lock, then
    reserves again (for as long as it takes, up to a deadline: it always ends)."""

    counted = False


class _KeyWritten:
    """What ``KeyBusy`` waits for: no put of ``key`` in flight in ``tier`` (its value published, or
    taken back), waited for without the chain's lock, a second at a time (the chain reserves again
    after each, until its own deadline: a put that never ends stalls a write, never hangs it)."""

    def __init__(self, tier: "BackingTier", key: bytes):
        self.tier, self.key = tier, key

    def synchronize(self) -> None:
        with self.tier._state:
            self.tier._writing.wait_out(self.key, KEY_WAIT_S)


class BackingTier(Tier):
    """A tier over a ``Backend``. Subclasses build the backend and say how a key is named there
    (``_name``, ``_key_of``); everything else is here."""

    remote = True
    persistent = True

    def __init__(self, cfg, store_cfg, backend: Backend, prefix: bytes, timeout_ms: int):
        super().__init__(cfg, store_cfg)
        self.backend = backend
        self.features = backend.features
        self.prefix = prefix
        self.timeout_ms = timeout_ms
        self._down_until = 0.0
        self._state = threading.Lock()
        self.dropped_writes = 0  # puts the store did not take (down, slow, full)
        self.skipped = 0  # calls answered at once while the store was marked down
        self.round_trips = 0  # calls sent to the store (a batch is one)
        self.server: dict = {}
        self._stale: dict[bytes, None] = {}
        self._purge_lock = threading.Lock()  # a purge's deletes and puts of stale keys never cross
        self.stale_overflow = 0  # stale keys forgotten because more than STALE_MAX piled up
        self._watchdog = Watchdog(backend.interrupt)
        self._writes_done = threading.Condition(self._state)
        self._writing = KeysInFlight(self._writes_done)  # keys with a put reserved, not yet published or aborted

    @property
    def prefetchable(self) -> bool:
        return self.features.prefetch

    # -- naming -----------------------------------------------------------------------------
    def _name(self, key: bytes) -> bytes:
        """The store's name of Strata's ``key``."""
        return self.prefix + key

    def _key_of(self, name: bytes) -> bytes:
        """Strata's key of a name the listing found under the prefix."""
        return name[len(self.prefix):]

    # -- talking to the store ---------------------------------------------------------------
    def _call(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` against the store, or OSError (marked down, refused, timed out, error reply)."""
        if time.monotonic() < self._down_until:
            self.skipped += 1
            raise OSError(f"{self.kind} {what}: store unreachable, retried after a back-off")
        self.round_trips += 1
        token = self._watchdog.arm(CALL_BOUND * self.timeout_ms / 1000)
        try:
            out = fn()
        except self.backend.down_errors as e:
            self._mark_down(e)
            raise OSError(f"{self.kind} {what}: {e}") from None
        except self.backend.errors as e:  # the store answered with an error (out of memory, ...)
            raise OSError(f"{self.kind} {what}: {e}") from None
        except Exception as e:  # replies the client cannot parse: whatever answers is no sane server
            self._mark_down(e)
            with contextlib.suppress(Exception):  # the stream may be out of step with the replies
                self.backend.reset()
            raise OSError(f"{self.kind} {what}: unreadable reply ({type(e).__name__}: {e})") from None
        finally:
            self._watchdog.disarm(token)
        if self._down_until:
            with self._state:
                self._down_until = 0.0
            log.warning("tier %s: %s answers again", self.name, self.location_of_store())
        return out

    def _mark_down(self, why: Exception) -> None:
        with self._state:
            was_up = self._down_until == 0.0
            self._down_until = time.monotonic() + BACKOFF_S
        if was_up:
            log.warning("tier %s: %s unreachable (%s); reads miss and writes drop until it answers again",
                        self.name, self.location_of_store(), why)

    def location_of_store(self) -> str:
        return self.backend.describe(self.server)

    def refresh(self) -> None:
        """Read the store's own numbers back into ``self.server``."""
        try:
            self.server = self._call(self.backend.report, "report")
        except OSError as e:
            self.server = {"connected": False, "error": str(e), **getattr(self.backend, "tags", {})}

    # -- the store is the index ---------------------------------------------------------------
    def stored_size(self, key: bytes, meta) -> int:
        return payload_offset(header_size_for(key, meta)) + meta.nbytes

    def lookup(self, key: bytes) -> Entry | None:
        return None  # nothing is known here: ask the store (probe, exists_many)

    def holds(self, e: Entry) -> bool:
        return True  # a value the store acknowledged is the store's to keep (or to evict: its business)

    def probe(self, key: bytes) -> Entry:
        """An entry to read through; the read itself finds out whether the store has it."""
        return Entry(key, _namespace(key), None, 0, None)

    def exists_many(self, keys: list[bytes]) -> list[bool]:
        """Which keys the store holds: one round trip. All False (and an error counted) on a fault."""
        if not keys:
            return []
        self._purge()
        names = [self._name(k) for k in keys]
        try:
            replies = self._call(lambda: self.backend.exists_many(names), "exists")
        except OSError:
            self.counters.errors += 1
            return [False] * len(keys)
        if any(isinstance(r, Exception) for r in replies):  # a key's node did not answer: not found
            self.counters.errors += 1
        return [r is True and k not in self._stale for k, r in zip(keys, replies)]

    def remove(self, key: bytes) -> bool:
        """Delete ``key`` on the store; whether it was there. A put of the key this process has in
        flight lands on the store before the chain publishes it, so the delete waits for it first
        (else the put's value would outlive the delete). On a fault the key is remembered as
        stale: the store may still have it, never served, deleted when it answers."""
        with self._state:
            self._writing.wait_out(key)
        try:
            reply = self._call(lambda: self.backend.delete_many([self._name(key)]), "delete")[0]
        except OSError as e:
            reply = e
        if isinstance(reply, Exception):
            self.counters.errors += 1
            self._mark_stale(key)
            return False
        return bool(reply)

    # -- stale keys: what the store missed while it was unreachable ------------------------------
    def _mark_stale(self, key: bytes) -> None:
        with self._state:
            if key not in self._stale and len(self._stale) >= STALE_MAX:
                self._stale.pop(next(iter(self._stale)))
                self.stale_overflow += 1
            self._stale[key] = None

    def _purge(self) -> None:
        """Delete the stale keys on the store, if any and if it answers; those deleted are forgotten."""
        if not self._stale or time.monotonic() < self._down_until:
            return
        with self._purge_lock:
            keys = list(self._stale)
            for lo in range(0, len(keys), PURGE_BATCH):  # round trips that each end within timeout_ms
                part = keys[lo : lo + PURGE_BATCH]
                try:
                    replies = self._call(lambda: self.backend.delete_many([self._name(k) for k in part]), "delete")
                except OSError:
                    return
                with self._state:  # those a node did not delete (a cluster's node down) stay stale
                    for k, reply in zip(part, replies):
                        if not isinstance(reply, Exception):
                            self._stale.pop(k, None)

    def _stale_miss(self, e: Entry) -> bool:
        """Whether ``e``'s key is stale on the store even after a purge was tried: a miss."""
        if e.key not in self._stale:
            return False
        self._purge()
        return e.key in self._stale

    # -- writing: the bytes are the store's --------------------------------------------------
    def reserve(self, key: bytes, ns: str, meta, evict) -> Entry | None:
        """An entry for a put, or None where the value is over the store's ``max_value``: no room
        is kept here (capacity and eviction are the store's). Counted as a put in flight, which
        a delete of its key waits for (``remove``). Where a put of the key is in flight already
        (the flusher's, a demotion's), ``KeyBusy``: the store holds one value a key, so two writes
        of it must not cross (the one that loses its guard takes its value back, which would take
        the other's); the chain waits for it outside its lock and reserves again."""
        size = self.stored_size(key, meta)
        limit = self.features.max_value
        if limit is not None and size > limit:
            return None
        with self._state:
            if key in self._writing:
                raise KeyBusy([_KeyWritten(self, key)])
            self._writing.begin(key)
        return Entry(key, ns, meta, size, None)  # loc: the value's name on the store once written

    def _written(self, key: bytes) -> None:
        """A reserved put of ``key`` is published or aborted: a delete need not wait for it any more."""
        with self._state:
            self._writing.end(key)

    def publish(self, e: Entry, count: bool = True) -> None:
        self.counters.puts += count
        self._written(e.key)

    def abort(self, e: Entry) -> None:
        self._written(e.key)
        if e.loc is not None:  # a put that lost to a newer one or a delete: take it back
            self._drop(e.key)

    def retire(self, e: Entry) -> None:
        self._drop(e.key)  # a corrupt value: never served again

    def _drop(self, key: bytes) -> None:
        """Delete ``key`` on the store for the chain, which holds its lock (no round trip under it): a
        miss from now on (stale), deleted once the lock is let go, before the store call returns."""
        self._mark_stale(key)
        self.after_unlock(lambda: self._purge_dropped(key))

    def _purge_dropped(self, key: bytes) -> None:
        """``_drop``'s delete, without the chain lock; where the store does not take it (as ``remove``)
        an error is counted and the key stays stale: a miss, deleted when the store answers."""
        self._purge()
        if key in self._stale:
            self.counters.errors += 1

    # -- bytes ------------------------------------------------------------------------------
    def _batches(self, sizes: list[int]) -> Iterator[tuple[int, int]]:
        """[lo, hi) ranges of at most ``max_batch`` items and ``max_batch_bytes`` (a larger item alone)."""
        f = self.features
        lo = 0
        while lo < len(sizes):
            hi, size = lo + 1, sizes[lo]
            while hi < len(sizes) and hi - lo < f.max_batch and size + sizes[hi] <= f.max_batch_bytes:
                size += sizes[hi]
                hi += 1
            yield lo, hi
            lo = hi

    def write_many(self, pairs: list[tuple[Entry, torch.Tensor]]) -> list[bool]:
        """Batched puts. A value the store did not take is False, a dropped write counted, and
        the key marked stale (an older version there must not outlive this one)."""
        out: list[bool] = []
        for lo, hi in self._batches([e.size for e, _ in pairs]):
            part = pairs[lo:hi]
            encode = encode_parts if self.features.value_parts else encode_value
            values = [(self._name(e.key), encode(e.key, e.meta, data)) for e, data in part]
            stale = any(e.key in self._stale for e, _ in part)
            with self._purge_lock if stale else contextlib.nullcontext():
                try:
                    replies = self._call(lambda: self.backend.put_many(values), "put")
                except OSError:
                    replies = [None] * len(part)
                for (e, _), reply in zip(part, replies):
                    ok = reply is True
                    if ok:
                        e.loc = self._name(e.key)
                        if stale:
                            with self._state:
                                self._stale.pop(e.key, None)  # the new version replaced the stale one
                    else:
                        self.dropped_writes += 1
                        self.counters.errors += 1
                        self._mark_stale(e.key)
                    out.append(ok)
        return out

    def read_into(self, e: Entry, out: torch.Tensor) -> None:
        data = self.read(e)
        if out.numel() * out.element_size() != e.meta.nbytes:
            raise CorruptObject("stored size differs from the destination")
        if e.meta.nbytes:
            flat_bytes(out).copy_(flat_bytes(data))

    def read_many(self, entries: list[Entry]) -> list:
        """Batched gets, ``max_batch`` keys a round trip: per entry its payload or the exception
        a single read would have raised (NotStored, CorruptObject, OSError)."""
        out: list = []
        self._purge()
        for lo, hi in self._batches([1] * len(entries)):
            part = entries[lo:hi]
            names = [self._name(e.key) for e in part]
            try:
                values = self._call(lambda: self.backend.get_many(names), "get")
            except OSError as exc:
                out.extend([exc] * len(part))
                continue
            for e, value in zip(part, values):
                try:
                    if e.key in self._stale:  # the store missed a delete or a newer version
                        raise NotStored
                    if isinstance(value, Exception):  # an error reply for this key alone
                        raise OSError(f"{self.kind} get: {value}")
                    e.meta, data = decode_value(e.key, value)
                    out.append(data)
                except (NotStored, CorruptObject, OSError) as exc:
                    out.append(exc)
        return out

    # -- reporting --------------------------------------------------------------------------------
    def location(self) -> str:
        state = "connected" if self.server.get("connected") else "unreachable"
        return f"{self.location_of_store()}, {state}"

    def contents(self) -> Iterator[tuple[bytes, str, int]]:
        """(key, namespace, stored bytes) of every value under this tier's prefix (a listing: O(keys))."""
        labels = self.prefix + LABELS_KEY
        try:
            for batch in self.backend.scan(self.prefix, self._call):
                for name, size in batch:
                    if name == labels or not isinstance(name, bytes) or not name.startswith(self.prefix):
                        continue  # not an object, or not a name the listing can have matched
                    if not isinstance(size, int) or size <= 0:
                        continue  # gone since it was listed, or its node is down
                    key = self._key_of(name)
                    yield key, _namespace(key), size
        except OSError as e:
            log.warning("tier %s: listing stopped early: %s", self.name, e)

    def stats(self) -> dict:
        """The base counters, and the store's. No ``bytes`` or ``objects``: Strata's own share of
        a store others may use is known only by listing every key (``contents``, as ``strata
        inspect`` runs it), too dear for a stats call, and the store's totals are not Strata's (a
        reader that wants them finds ``server_memory`` and ``server_keys``, the whole store's)."""
        out = super().stats()
        out["server_memory"] = self.server.get("used_memory")
        out["server_keys"] = self.server.get("keys")
        if self.server.get("maxmemory"):
            out["capacity"] = self.server["maxmemory"]
        out.update(server=dict(self.server), dropped_writes=self.dropped_writes, skipped_while_down=self.skipped,
                   round_trips=self.round_trips, stale_keys=len(self._stale), stale_overflow=self.stale_overflow,
                   features={k: v for k, v in vars(self.features).items()})
        return out

    def close(self) -> None:
        self._purge()  # last chance: a stale key left on the store would be served to the next process
        if self._stale:
            log.warning("tier %s: %d keys deleted or replaced while %s was unreachable are still there; the next "
                        "process may read their old values", self.name, len(self._stale), self.location_of_store())
        self._watchdog.close()
        with contextlib.suppress(*self.backend.errors, *self.backend.down_errors):
            self.backend.close()
