"""The file tier: one file per object in a directory on local storage, shared by the
processes of the host.

A put writes header and payload to a temporary file and renames it into place, so
a reader or a restart sees the whole object or none of it. Each file name carries
a version suffix, so replacing an object never unlinks the new file. On open the
directory is scanned: a file with a bad header, a short payload, or a stale
version is removed; an object of a namespace this process never registered is kept
(another process's) and counted in ``foreign_namespaces``. A whole object under a name
that is not its key's digest (another key's file copied or renamed over it) is counted in
``discarded``, indexed under no key, and left in place, as a directory probe leaves it: its
bytes are intact, and whether the name or the content is the wrong one cannot be told, so
it is not deleted (a delete of the key it is named for removes it). Every read checks the
header's key and the payload checksum; a mismatch is a miss, counted, and the file is
dropped.

Sharing with live processes: the index holds what this process wrote or found. A read or
lookup that misses it has the chain ``discover`` the key in the directory (one listing of
the key's shard, outside the chain's lock) and ``adopt`` the newest version there, so a
live store sees what another saved after it opened. An indexed file another process
removed (evicted, deleted, replaced) is a plain miss, not an I/O error: the entry is
retired and the read looks in the directory once more for a newer version. A delete
removes every version of the key in the directory. Temporary files
carry their writer's pid; opening removes only those of writers no longer alive.

Capacity across processes is approximate: each process counts the objects it has indexed
(its own and those it adopted), not what others hold, and evicts only those.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections import defaultdict
from pathlib import Path

import torch

from strata.errors import ConfigError
from strata.keys import key_namespace, namespaces
from strata.store.codec import CorruptObject, FIXED_HEADER_SIZE, checksum, flat_bytes, header_size, header_size_for, pack_header, unpack_header
from strata.store.tiers.base import Entry, NotStored
from strata.store.tiers.memory import MemoryTier
from strata.store.tiers.cxl_region import RegionAbsent

_SUFFIX = ".obj"
_TMP_SUFFIX = ".tmp"
_LEGACY_TMP_AGE_S = 60  # a temporary file named without a pid (older versions): older is an interrupted put


class DirectoryAbsent(RegionAbsent):
    """A FileTier opened with ``create=False`` found no tier directory: nothing was created. A
    RegionAbsent, so callers that look at stores (the ``strata`` command) treat both alike."""


class Vanished(FileNotFoundError, NotStored):
    """An indexed object's file is gone (another process removed it): a plain miss to a read,
    and still an OSError to code that only knows I/O faults."""


def _directory(value: object, where: str) -> str:
    """a directory path (it is created if missing)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: got {value!r}; allowed: a directory path (it is created if missing)")
    return os.path.expanduser(os.path.expandvars(value))


def _read_header(path: Path) -> tuple[bytes, object, int]:
    """(key bytes, meta, file size) of an object file; CorruptObject on a bad header or a
    payload of the wrong length, OSError (FileNotFoundError: removed meanwhile) on I/O."""
    with open(path, "rb") as f:
        head = f.read(FIXED_HEADER_SIZE)
        head += f.read(header_size(head) - len(head))
        key, meta = unpack_header(head)
        size = os.fstat(f.fileno()).st_size
    if size != len(head) + meta.nbytes:
        raise CorruptObject("payload truncated")
    return key, meta, size


def _named_for(path: Path, key: bytes) -> bool:
    """Whether an object file's name (``<digest[:2]>/<digest>-<version>.obj``) is that of ``key``:
    the key in its header, where ``discover``, ``remove`` and recovery all look for it."""
    digest = hashlib.sha256(key).hexdigest()
    return path.name.partition("-")[0] == digest and path.parent.name == digest[:2]


def _write_all(f, buf) -> None:
    """Write all of ``buf`` or raise OSError: a short write never leaves a truncated object."""
    view, done = memoryview(buf), 0
    while done < len(view):
        n = f.write(view[done:])
        if not n:
            raise OSError(f"short write: {done} of {len(view)} bytes")
        done += n


def _read_all(f, buf: memoryview) -> int:
    """Fill ``buf`` from ``f`` across short reads; the bytes read (fewer only at end of file)."""
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done:])
        if not n:
            break
        done += n
    return done


def _put_in_flight(path: Path, now: float) -> bool:
    """Whether a temporary file may still become an object: its name is ``<pid>-<uuid>.tmp`` and
    that process is alive, or it is a legacy ``<uuid>.tmp`` (no pid) younger than a minute. Any
    other name is no writer's: an interrupted put's leftover, or junk."""
    stem = path.name[: -len(_TMP_SUFFIX)] if path.name.endswith(_TMP_SUFFIX) else ""
    pid, sep, _ = stem.partition("-")
    if sep and pid.isdigit() and int(pid) > 0:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            return True
        except OSError:
            pass  # cannot tell: judged by age below
        else:
            return True
    elif not (len(stem) == 32 and all(c in "0123456789abcdef" for c in stem)):
        return False
    try:
        return now - path.stat().st_mtime < _LEGACY_TMP_AGE_S
    except OSError:
        return False


class FileTier(MemoryTier):
    kind = "file"
    persistent = True  # so verify is always on: checksums are checked on every read
    shared = True
    # fsync: each object's file is fsynced before it becomes visible.
    config_keys = {"path": _directory, "fsync": bool}
    config_required = ("capacity",)
    defaults = {"fsync": False}

    @classmethod
    def check_config(cls, values: dict, raw, where: str) -> dict:
        """A file tier needs its directory. Checked here, not by config_required, so a missing one
        reads as it always has: ``path: got None; allowed: a directory path``."""
        if "path" not in values:
            _directory(None, f"{where}.path")
        return values

    def __init__(self, cfg, store_cfg, create: bool = True):
        """``create=False``: open an existing directory only; DirectoryAbsent (creating nothing)
        where it is missing, so looking at a store (``strata stats``) never makes one."""
        super().__init__(cfg, store_cfg)
        self.root = Path(cfg.path)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        if create:
            self.objects.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
        elif not self.objects.is_dir():
            raise self._absent("does not exist" if not self.root.exists() else "holds no Strata file tier")
        self.recovered = 0
        self.discarded = 0
        self.foreign = 0  # objects recovered of namespaces this process had not registered
        self.adopted = 0  # objects found in the directory after open (another process saved them)
        self.vanished = 0  # indexed objects whose file another process removed
        # File names of this process that the index does not show: puts in flight, retired
        # objects a reader still leases, and freed objects not unlinked yet. A directory probe
        # must not adopt them.
        self._unlisted: set[str] = set()
        # File names a read found gone (set outside the chain lock, acted on under it in release).
        self._gone: set[str] = set()
        self._scan()

    # -- recovery ------------------------------------------------------------------------
    def _scan(self) -> None:
        self._remove_interrupted_puts()
        found: list[tuple[str, Path, bytes, object, int]] = []
        for path in self.objects.glob(f"*/*{_SUFFIX}"):
            try:
                key, meta, size = _read_header(path)
            except FileNotFoundError:
                continue  # another process removed it meanwhile
            except OSError:  # cannot read it now (EIO, permissions): left alone, never deleted for that
                self.counters.errors += 1
                continue
            except CorruptObject:
                self.discarded += 1
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
                continue
            if not _named_for(path, key):
                self.discarded += 1  # never indexed under its header's key: that key's own file may be newer
                continue
            found.append((path.name, path, key, meta, size))
        # Oldest first so LRU order survives a restart; the newest version of a key wins.
        found.sort(key=lambda item: item[0].rsplit("-", 1)[-1])
        known = namespaces()
        for _, path, key, meta, size in found:
            ns = key_namespace(key)  # no registry: other processes' namespaces are kept
            if ns is None:
                self.discarded += 1
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
                continue
            e = Entry(key, ns, meta, size, path)
            self._account(e, +1)
            self.publish(e, count=False)
            self.recovered += 1
        self.foreign = sum(n for ns, n in self.counters.ns_objects.items() if ns not in known)
        evicted = 0
        while self.used > self.capacity and self._evict_one(self._eviction_order(), lambda t, e: True, set()):
            evicted += 1  # capacity shrank since last run

    def _absent(self, why: str) -> "DirectoryAbsent":
        exc = DirectoryAbsent(f"tiers[{self.name}].path: {str(self.root)!r} {why} and the tier was opened with "
                              "create=False, so nothing was created; allowed: the directory of an existing file "
                              "tier (open the store normally once to create it)")
        exc.tier, exc.path, exc.why = self.name, str(self.root), why
        return exc

    def _remove_interrupted_puts(self) -> None:
        """Reclaim temporary files of puts that can no longer finish: their writer is dead (or,
        for names without a pid, they are old). Another live process's put in flight stays."""
        now = time.time()
        if not self.tmp.is_dir():  # opened with create=False: none made, so none to reclaim
            return
        for path in self.tmp.iterdir():
            if not _put_in_flight(path, now):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)

    # -- other processes' objects -----------------------------------------------------------
    def discover(self, keys: list[bytes]) -> list[tuple | None]:
        """Per key, the newest valid file of it in the directory, as ``(key, ns, meta, size, path)``
        for ``adopt``, or None. File I/O, so the chain calls it WITHOUT its lock, for keys its index
        missed; one listing per shard the keys fall in. Corrupt files found are removed."""
        found: list[tuple | None] = [None] * len(keys)
        wanted: dict[str, list[tuple[int, bytes, str]]] = defaultdict(list)
        for i, key in enumerate(keys):
            digest = hashlib.sha256(key).hexdigest()
            wanted[digest[:2]].append((i, key, digest))
        for shard, items in wanted.items():
            versions = self._list_shard(self.objects / shard)
            for i, key, digest in items:
                names = versions.get(digest)
                if names:
                    found[i] = self._newest(key, self.objects / shard, sorted(names, reverse=True))
        return found

    def adopt(self, found: tuple) -> Entry | None:
        """Index what ``discover`` found (caller holds the chain lock): the entry now indexed for
        its key, or None where the file is this process's own put in flight or a retired object."""
        key, ns, meta, size, path = found
        if key in self.index:  # this process put or adopted it meanwhile
            return self.index[key]
        if path.name in self._unlisted:
            return None
        e = Entry(key, ns, meta, size, path)
        self._account(e, +1)
        self.publish(e, count=False)
        self.adopted += 1
        return e

    def remove(self, key: bytes) -> bool:
        """Unlink every version of ``key`` in the directory (other processes' too), outside the chain
        lock, so a delete is not undone by the next lookup finding another process's copy. A put of
        this process still in flight is left to land (it is newer than the delete)."""
        digest = hashlib.sha256(key).hexdigest()
        removed = False
        for name in self._list_shard(self.objects / digest[:2]).get(digest, []):
            if name not in self._unlisted:
                try:
                    os.unlink(self.objects / digest[:2] / name)
                    removed = True
                except FileNotFoundError:
                    pass
                except OSError:  # a read-only or failing directory: the delete degrades, never raises
                    self.counters.errors += 1
        return removed

    def _list_shard(self, shard: Path) -> dict[str, list[str]]:
        """Object file names in a shard directory by key digest."""
        out: dict[str, list[str]] = defaultdict(list)
        try:
            names = os.listdir(shard)
        except FileNotFoundError:
            return out
        except OSError:
            self.counters.errors += 1
            return out
        for name in names:
            if name.endswith(_SUFFIX):
                out[name.partition("-")[0]].append(name)
        return out

    def _newest(self, key: bytes, shard: Path, names: list[str]) -> tuple | None:
        """The first (newest) of ``names`` that holds ``key`` whole; a corrupt one is removed."""
        ns = key_namespace(key)
        if ns is None:
            return None
        for name in names:
            if name in self._unlisted:
                continue  # this process's own put in flight, or an object it retired
            path = shard / name
            try:
                got, meta, size = _read_header(path)
            except FileNotFoundError:
                continue  # removed meanwhile
            except OSError:
                self.counters.errors += 1
                continue
            except CorruptObject:  # renamed into place whole, so never a put in flight: dropped
                self.discarded += 1
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
                continue
            if got == key:  # else a digest prefix clash or a renamed file: left alone
                return key, ns, meta, size, path
        return None

    def vanished_among(self, entries: list[Entry]) -> list[Entry]:
        return [e for e in entries if not os.path.exists(e.loc)]

    def forget(self, e: Entry) -> None:
        self.vanished += 1
        self.retire(e)

    # -- index hooks (caller holds the chain lock) -------------------------------------------
    def publish(self, e: Entry, count: bool = True) -> None:
        self._unlisted.discard(e.loc.name)
        super().publish(e, count)

    def retire(self, e: Entry) -> None:
        super().retire(e)
        if e.dead and e.leases:  # bytes still read here, freed on the last release
            self._unlisted.add(e.loc.name)

    def release(self, e: Entry) -> None:
        super().release(e)
        if e.loc.name in self._gone and not e.dead:
            self.forget(e)  # a read found the file gone: the next lookup probes the directory

    # -- storage hooks ---------------------------------------------------------------------
    def stored_size(self, key: bytes, meta) -> int:
        return header_size_for(key, meta) + meta.nbytes

    def _alloc(self, e: Entry) -> bool:
        if self.used + e.size > self.capacity:
            return False
        digest = hashlib.sha256(e.key).hexdigest()
        version = f"{time.time_ns():020d}{uuid.uuid4().hex[:8]}"
        e.loc = self.objects / digest[:2] / f"{digest}-{version}{_SUFFIX}"
        self._unlisted.add(e.loc.name)
        return True

    def _free(self, e: Entry) -> None:
        """The file goes once the chain lets its lock go (``after_unlock``); until then its name
        stays unlisted, so no directory probe adopts it. Names carry the version: the unlink can
        only ever take this version's file, never a newer put's."""
        path = e.loc
        self._gone.discard(path.name)
        self._unlisted.add(path.name)
        self.after_unlock(lambda: self._unlink(path))

    def _unlink(self, path: Path) -> None:
        """Remove a freed object's file (without the chain lock)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            self.counters.errors += 1
        finally:
            self._unlisted.discard(path.name)

    def write(self, e: Entry, data: torch.Tensor) -> bool:
        if e.meta.checksum is None:
            raise ValueError("file tier needs the payload checksum")  # the chain computes it
        head = pack_header(e.key, e.meta)
        tmp = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}{_TMP_SUFFIX}"  # the pid keeps it from other openers
        try:
            with open(tmp, "wb") as f:
                _write_all(f, head)
                if e.meta.nbytes:
                    _write_all(f, memoryview(flat_bytes(data).cpu().numpy()).cast("B"))
                if self.cfg.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            e.loc.parent.mkdir(exist_ok=True)
            os.replace(tmp, e.loc)
        except OSError:
            self.counters.errors += 1
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return False
        return True

    def read_into(self, e: Entry, out: torch.Tensor) -> None:
        try:
            f = open(e.loc, "rb")
        except FileNotFoundError as exc:
            self._gone.add(e.loc.name)  # retired under the lock when the read releases the entry
            raise Vanished(exc.errno, "removed by another process", str(e.loc)) from None
        with f:
            head = f.read(FIXED_HEADER_SIZE)
            head += f.read(header_size(head) - len(head))
            key, meta = unpack_header(head)
            if key != e.key or meta.nbytes != e.meta.nbytes or meta.checksum != e.meta.checksum:
                raise CorruptObject("file holds another object")
            if meta.nbytes:
                buf = memoryview(flat_bytes(out).numpy())
                if _read_all(f, buf) != meta.nbytes or f.read(1):
                    raise CorruptObject("payload length mismatch")
        if checksum(out) != meta.checksum:
            raise CorruptObject("payload checksum mismatch")

    def stats_extra(self) -> dict:
        return {"path": str(self.root), "recovered": self.recovered, "discarded": self.discarded,
                "foreign_namespaces": self.foreign, "adopted": self.adopted, "vanished": self.vanished}
