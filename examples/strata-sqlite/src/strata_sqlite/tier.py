"""A Strata tier in one local SQLite database file.

Layout: one table, ``objects(version INTEGER PRIMARY KEY, key BLOB, value BLOB)``. A value is
Strata's object header (``strata.store.codec.pack_header``: dtype, shape, key, payload
checksum, and a checksum of the header itself) followed by the payload, the same bytes the file
tier keeps in a file. Every put is a new row with a new ``version`` (the rowid), inserted in its
own transaction; the row of the version it replaces is deleted once the new one is published.
So a put that fails or is aborted never changes what a reader or a restart sees, and two puts
of one key racing never leave the index pointing at the other's bytes.

Open: the index is rebuilt from the table (oldest version first, so LRU order survives and the
newest version of a key wins). A row whose header fails its checksum, names another key than
its row, or whose length disagrees with the header is deleted and counted (``discarded``).
Read: the row of the entry's version is fetched and checked (header, key, length, payload
checksum); any mismatch is ``CorruptObject``, which the chain turns into a miss, a
``checksum_failures`` count and the entry dropped. SQLite errors are ``OSError`` to the
chain: a miss or a refused put and an ``errors`` count, never an exception into a read.

Threads: one connection per thread (``check_same_thread=False`` only so ``close`` can close
them all). The chain reads and writes payloads outside its lock from several threads (callers
and the write-back flusher); with WAL, a reader on its own connection never waits for a
writer, which one shared connection behind a lock would make it do. Writers queue on SQLite's
own write lock, each waiting at most ``timeout_ms``.

Deletes (a key deleted, evicted, or replaced by a newer version) run once the chain's lock is
let go (``after_unlock``), and never wait for SQLite's write lock: a delete that cannot run at
once (another thread is committing, or the database fails) is kept and retried inside the next
write's transaction and at close. Until then the row is unreachable in this process; only a crash
before it runs brings a deleted key back at the next open.

One process at a time: the tier holds an exclusive ``flock`` on ``<path>.lock`` while open,
and a second opener (another process, or another store in this one) is refused, naming the
path and the holder's pid. Use the file tier to share a store between processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import sqlite3
import threading
from pathlib import Path

import numpy as np
import torch

from strata.errors import ConfigError, StoreError
from strata.keys import key_namespace
from strata.store.codec import (CorruptObject, FIXED_HEADER_SIZE, checksum, flat_bytes, header_size,
                                header_size_for, pack_header, unpack_header)
from strata.store.tiers import RegionAbsent
from strata.store.tiers.base import Entry
from strata.store.tiers.memory import MemoryTier

log = logging.getLogger("strata_sqlite")

FORMAT = 1  # PRAGMA user_version of a database this tier made
MAX_VALUE = 1_000_000_000  # SQLite's default SQLITE_MAX_LENGTH: a larger row cannot be stored
_HEAD_PROBE = 4096  # bytes of a row read at open to find its header (a longer header is read whole)
_SCHEMA = ("CREATE TABLE IF NOT EXISTS objects (version INTEGER PRIMARY KEY, key BLOB NOT NULL, value BLOB NOT NULL)",
           "CREATE INDEX IF NOT EXISTS objects_key ON objects (key)")


def _path(value: object, where: str) -> str:
    """The database file: a non-empty string; ``~`` and ``$VARS`` are expanded."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: got {value!r}; allowed: the path of a SQLite database file (created if missing)")
    return os.path.expanduser(os.path.expandvars(value))


def _positive_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: got {value!r}; allowed: an integer >= 1")
    return value


class SqliteAbsent(RegionAbsent):
    """Opened with ``create=False`` (``strata stats``, ``inspect``, ``gc``) and no database file
    exists: nothing was created."""


class SqliteTier(MemoryTier):
    kind = "sqlite"
    persistent = True

    # The keys this tier takes beside the common ones (kind, name, capacity, policy, write, verify):
    # checked by strata.config into cfg.options. See strata.store.tiers.registry.
    config_keys = {
        "path": _path,  # the database file
        "timeout_ms": _positive_int,  # the longest a write waits for SQLite's write lock (default 1000)
        "synchronous": ("off", "normal", "full"),  # PRAGMA synchronous (default normal: WAL survives a crash
                                                   # of the process; full: also a power loss)
    }
    config_required = ("path", "capacity")

    def __init__(self, cfg, store_cfg, create: bool = True):
        super().__init__(cfg, store_cfg)
        opts = cfg.options
        self.path = Path(opts["path"])
        self.timeout_ms = opts.get("timeout_ms", 1000)
        self.synchronous = opts.get("synchronous", "normal")
        self.recovered = 0
        self.discarded = 0
        self._closed = False
        self._local = threading.local()
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        self._doomed: list[int] = []  # versions whose rows must go: deletes not yet done
        self._doomed_lock = threading.Lock()
        self._scanning = False
        if not create and not self.path.is_file():
            exc = SqliteAbsent(f"tiers[{self.name}].path: {str(self.path)!r} does not exist and the tier was opened "
                               "with create=False, so nothing was created; allowed: the database of an existing "
                               "sqlite tier (open the store normally once to create it)")
            exc.tier, exc.path, exc.why = self.name, str(self.path), "does not exist"
            raise exc
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._take_lock()
        try:
            self._open_database()
            self._scan()
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------------------------
    def _take_lock(self):
        """The exclusive lock on ``<path>.lock`` for this tier's life, or StoreError naming the holder."""
        lock_path = f"{self.path}.lock"
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            mine = " (this process: close the other store first)" if holder == str(os.getpid()) else ""
            raise StoreError(f"tiers[{self.name}].path: {str(self.path)!r} is open in another store, process "
                             f"{holder}{mine} (lock file {lock_path}); allowed: one process at a time per sqlite "
                             "tier (a file tier is shared by the processes of a host)") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        return f

    def _open_database(self) -> None:
        try:
            conn = self._conn()
            version = conn.execute("PRAGMA user_version").fetchall()[0][0]
            if version not in (0, FORMAT):
                raise StoreError(f"tiers[{self.name}].path: {str(self.path)!r} holds format {version}; allowed: "
                                 f"format {FORMAT} (another version of strata-sqlite made it)")
            conn.execute("PRAGMA journal_mode = WAL").fetchall()
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {FORMAT}")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"tiers[{self.name}].path: cannot use {str(self.path)!r} as a SQLite database ({e}); "
                             "allowed: a SQLite database this tier made, or a path where none exists") from None

    def _scan(self) -> None:
        """Index every whole row, oldest first; drop damaged rows (counted) and older versions."""
        conn = self._conn()
        rows = conn.execute("SELECT version, key, length(value), substr(value, 1, ?) FROM objects ORDER BY version",
                            (_HEAD_PROBE,)).fetchall()
        self._scanning = True
        try:
            for version, key, length, head in rows:
                ok = isinstance(key, bytes) and isinstance(head, bytes)  # a TEXT or NULL cell is no Strata row
                entry = self._entry_of(conn, version, key, length, head) if ok else None
                if entry is None:
                    self.discarded += 1
                    self._doom(version)
                    continue
                self._account(entry, +1)
                self.publish(entry, count=False)  # retires (dooms) an older version of the key
                self.recovered += 1
        finally:
            self._scanning = False
        self._versions = itertools.count((rows[-1][0] + 1) if rows else 1)
        while self.used > self.capacity and self._evict_one(self._eviction_order(), lambda t, e: True, set()):
            pass  # the capacity shrank since the last run
        self._purge(wait=True)

    def _entry_of(self, conn, version: int, key: bytes, length: int, head: bytes) -> Entry | None:
        """The entry a row holds, or None if it is damaged (bad header, another key, wrong length)."""
        try:
            size = header_size(head[:FIXED_HEADER_SIZE])
            if size > len(head):
                head = bytes(conn.execute("SELECT substr(value, 1, ?) FROM objects WHERE version = ?",
                                          (size, version)).fetchall()[0][0])
            got, meta = unpack_header(head[:size])
        except CorruptObject:
            return None
        ns = key_namespace(key)
        if got != key or length != size + meta.nbytes or ns is None:
            return None
        return Entry(key, ns, meta, length, version)

    # -- connections -----------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (made on first use)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise sqlite3.ProgrammingError("the sqlite tier is closed")
            conn = sqlite3.connect(self.path, timeout=self.timeout_ms / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            with self._conns_lock:
                for thread, old in [c for c in self._conns if not c[0].is_alive()]:  # threads that ended
                    self._conns.remove((thread, old))
                    with contextlib.suppress(sqlite3.Error):
                        old.close()
                self._conns.append((threading.current_thread(), conn))
            self._local.conn = conn
        return conn

    # -- storage hooks (see strata.store.tiers.memory.MemoryTier) ------------------------------
    def stored_size(self, key: bytes, meta) -> int:
        return header_size_for(key, meta) + meta.nbytes

    def reserve(self, key, ns, meta, evict):
        if self.stored_size(key, meta) > MAX_VALUE:
            return None  # SQLite cannot hold the row: refused before anything is evicted for it
        return super().reserve(key, ns, meta, evict)

    def _alloc(self, e: Entry) -> bool:
        if self.used + e.size > self.capacity:
            return False
        e.loc = next(self._versions)  # the row this put will be: a new one, never another put's
        return True

    def _free(self, e: Entry) -> None:
        """The entry is unreachable: its row goes (now, or at the next write if SQLite is busy)."""
        self._doom(e.loc)
        if not self._scanning:  # the DELETE runs once the chain's lock is let go, never under it
            self.after_unlock(lambda: self._purge(wait=False))

    def write(self, e: Entry, data: torch.Tensor) -> bool:
        """Insert the row of ``e``'s version in one transaction (with deletes still owed): all or nothing."""
        head = pack_header(e.key, e.meta)
        value = bytearray(len(head) + e.meta.nbytes)
        value[: len(head)] = head
        if e.meta.nbytes:
            value[len(head):] = memoryview(flat_bytes(data).cpu().numpy()).cast("B")
        doomed = self._take_doomed()
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")  # waits for the write lock at most timeout_ms
            try:
                if doomed:
                    conn.executemany("DELETE FROM objects WHERE version = ?", [(v,) for v in doomed])
                conn.execute("INSERT OR REPLACE INTO objects (version, key, value) VALUES (?, ?, ?)",
                             (e.loc, e.key, value))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._doom(*doomed)
            self.counters.errors += 1
            log.warning("tier %s: write failed, put refused (%s)", self.name, exc)
            return False
        return True

    def read_into(self, e: Entry, out: torch.Tensor) -> None:
        try:
            rows = self._conn().execute("SELECT value FROM objects WHERE version = ?", (e.loc,)).fetchall()
        except sqlite3.Error as exc:
            raise OSError(errno.EIO, f"sqlite: {exc}", str(self.path)) from None
        if not rows:
            raise CorruptObject("row missing")  # removed behind the store's back: dropped, counted
        value = rows[0][0]
        if not isinstance(value, bytes):
            raise CorruptObject(f"row holds a {type(value).__name__}, not a blob")
        size = header_size(value[:FIXED_HEADER_SIZE])
        key, meta = unpack_header(value[:size])
        if key != e.key or meta.nbytes != e.meta.nbytes or meta.checksum != e.meta.checksum:
            raise CorruptObject("row holds another object")
        if len(value) != size + meta.nbytes:
            raise CorruptObject("payload length mismatch")
        if meta.nbytes:
            flat_bytes(out).numpy()[:] = np.frombuffer(value, dtype=np.uint8, offset=size)
        if checksum(out) != meta.checksum:
            raise CorruptObject("payload checksum mismatch")

    # -- deletes owed ------------------------------------------------------------------------------
    def _doom(self, *versions: int) -> None:
        with self._doomed_lock:
            self._doomed.extend(versions)

    def _take_doomed(self) -> list[int]:
        with self._doomed_lock:
            doomed, self._doomed = self._doomed, []
        return doomed

    def _purge(self, wait: bool) -> None:
        """Delete the rows owed; ``wait=False`` gives up at once where SQLite's write lock is taken
        (they stay owed). A failure other than a busy database is counted as an error."""
        doomed = self._take_doomed()
        if not doomed:
            return
        try:
            conn = self._conn()
            if not wait:
                conn.execute("PRAGMA busy_timeout = 0")
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("DELETE FROM objects WHERE version = ?", [(v,) for v in doomed])
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if not wait:
                    conn.execute(f"PRAGMA busy_timeout = {self.timeout_ms}")
        except sqlite3.Error as exc:
            self._doom(*doomed)
            if "locked" not in str(exc) and "busy" not in str(exc):
                self.counters.errors += 1
                log.warning("tier %s: %d deletes failed, retried at the next write (%s)", self.name, len(doomed), exc)

    # -- reporting and closing ---------------------------------------------------------------------
    def stats_extra(self) -> dict:
        return {"path": str(self.path), "recovered": self.recovered, "discarded": self.discarded,
                "deletes_owed": len(self._doomed)}

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(sqlite3.Error):
            self._purge(wait=True)
        if self._doomed:
            log.warning("tier %s: %d deletes could not be done before closing; those keys come back at the next "
                        "open", self.name, len(self._doomed))
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for _, conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()
        lock = getattr(self, "_lock_file", None)
        if lock is not None:
            self._lock_file = None
            lock.close()  # lets the flock go
