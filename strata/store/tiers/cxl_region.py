"""The CXL tier's region: the file or DAX device it maps, the space it needs, and the layout of
its bytes (``strata.store.tiers.cxl`` keeps the objects in it).

Layout: a superblock (magic, geometry, a generation counter, the last put sequence number handed
out, a log of the slots the last ``LOG_LEN`` generations changed), a table of slots, then the
data area. An object is a record in the data area, Strata's checksummed header then the payload
(aligned), and a slot ``(commit, offset, length, seq)`` naming it, committed when its first word
is ``commit_word`` of the other three (``WRITTEN_BELOW`` flipped in it: the object's owner wrote
it to the tiers below).

A region file's space is reserved when it is opened (``posix_fallocate``): a sparse file on a
filesystem that cannot back it (a small tmpfs) would otherwise kill the process with SIGBUS at the
first write past what the filesystem holds. A region that does not fit is a ConfigError at open,
and so is one in RAM (/dev/shm) larger than the memory the host has available.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
import struct

import torch
import xxhash

from strata.config import format_size
from strata.errors import ConfigError, StoreError
from strata.store import memfs
from strata.store.codec import CorruptObject, header_size_for, unpack_header

MAGIC = b"STRATCXL"
VERSION = 2  # 2: the change log and the written-below marks; a region of version 1 is taken and marked 2
READS = (1, VERSION)  # versions of a region this code opens (their layout is the same)
SUPER = struct.Struct("<8sIIQQQ")  # magic, version, slot size, region size, slots, data start
GEN_AT = 64  # the generation counter: its own 8 bytes
SEQ_AT = 72  # the last put sequence number handed out
HELD_AT = 80  # 1 while a process holds the region lock (its changes logged by the time it lets go)
LOG_AT = 2048  # the change log: the slot each of the last ``LOG_LEN`` generations changed, at gen % LOG_LEN
LOG_LEN = 256
LOG_TAG = 0x7FFFFFFF  # a log entry is ``(gen & LOG_TAG) << 32 | slot``: an entry names its generation
LOG_SLOT = 0xFFFFFFFF  # the slot's bits of a log entry
SLOT = struct.Struct("<QQQQ")  # commit, offset, length, seq
SLOTS_AT = 4096
ALIGN = 256  # records start here; payloads at a 64-byte boundary after the header
PAYLOAD_ALIGN = 64
BYTES_PER_SLOT = 64 << 10  # one slot per 64 KiB of region (at least 256 slots)
WRITTEN_BELOW = 2  # flipped in a slot's commit word: its owner wrote the object to the tiers below
U64 = 0xFFFFFFFFFFFFFFFF  # the slot table is read as signed words: a commit word's unsigned value
OWNED_AT = 1 << 62  # the byte ``OWNED_AT + seq`` of the region file: locked by the process that put ``seq``
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}  # the filesystem cannot reserve
_RAM_HEADROOM = 512 << 20  # RAM a region file in memory leaves to everything else, at least


class RegionAbsent(StoreError):
    """A CxlTier opened with ``create=False`` found no region at its path: nothing was created,
    so looking at a store (``strata stats``) never makes a region as a side effect."""


def commit_word(offset: int, length: int, seq: int) -> int:
    """A committed slot's first word (never 0); with ``WRITTEN_BELOW`` flipped, the same object
    marked written to the tiers below."""
    return xxhash.xxh3_64_intdigest(struct.pack("<QQQ", offset, length, seq)) | 1


def round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class RegionFile:
    """A region's descriptor (``fd``) and its shared mapping (``map``) of ``size`` bytes, a file's
    space backed first; its lock, its counters, its change log and its slots. ``create=False``
    opens an existing region only (``RegionAbsent`` where the path is missing or a file holding no
    region; nothing is created). ``name`` is the tier's, for errors. Every change of the counters,
    the log or a slot is made under the region lock."""

    def __init__(self, path: str, name: str, size: int, create: bool):
        self.path, self.name = path, name
        self.fd, self.created = self._open_path(create)
        self.is_file = stat.S_ISREG(os.fstat(self.fd).st_mode)
        if self.is_file:
            if not create and os.pread(self.fd, len(MAGIC), 0) != MAGIC:
                os.close(self.fd)
                raise self.absent("holds no Strata region")
            self._reserve(size, self.created)
            if os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._locks = 0  # holds of the region lock by this process's threads (puts in flight)
        self.dead_holders = 0  # times the lock was taken after a process died holding it

    def absent(self, why: str) -> RegionAbsent:
        exc = RegionAbsent(f"tiers[{self.name}].path: {self.path!r} {why} and the tier was opened with "
                           "create=False, so nothing was created; allowed: the path of an existing region (open "
                           "the store normally once to create it)")
        exc.tier, exc.path, exc.why = self.name, self.path, why
        return exc

    # -- the layout ----------------------------------------------------------------------------
    def format(self, size: int) -> None:
        """Write an empty region of ``size`` bytes: a slot per ``BYTES_PER_SLOT``, at least 256."""
        nslots = max(256, size // BYTES_PER_SLOT)
        data_start = round_up(SLOTS_AT + nslots * SLOT.size, ALIGN)
        if data_start + ALIGN > size:
            raise ConfigError(f"tiers[{self.name}].size: got {size} bytes; allowed: at least {data_start + ALIGN}")
        self.map[SLOTS_AT:data_start] = bytes(data_start - SLOTS_AT)
        self.map[:SLOTS_AT] = bytes(SLOTS_AT)
        self.map[: SUPER.size] = SUPER.pack(b"\0" * 8, VERSION, SLOT.size, size, nslots, data_start)
        self.map.flush()
        self.map[:8] = MAGIC  # the region is valid only once formatted whole
        self.map.flush()

    def geometry(self, size: int) -> tuple[int, int, int]:
        """``(slots, data start, data bytes)`` of the region the superblock describes (kept as
        ``nslots``, ``data_start``, ``data_size``); one of another format, or larger than the
        ``size`` mapped, is refused. A region of format version 1 is stamped ``VERSION`` (from then
        on an older Strata refuses it: it ignores the log and the marks)."""
        magic, version, slot_size, rsize, nslots, data_start = SUPER.unpack_from(self.map)
        if magic != MAGIC or version not in READS or slot_size != SLOT.size or rsize > size:
            raise ConfigError(f"tiers[{self.name}].path: {self.path!r} holds a region of another format or size "
                              f"(version {version}, {rsize} bytes); set reset: true to wipe it")
        if version != VERSION:
            struct.pack_into("<I", self.map, 8, VERSION)
            self.flush(8, 4)
        self.nslots, self.data_start, self.data_size = nslots, data_start, rsize - data_start
        return nslots, data_start, rsize - data_start

    # -- the region lock: one process at a time, whose threads share its hold ------------------
    @contextlib.contextmanager
    def lock(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def acquire(self) -> None:
        if self._locks == 0:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self._taken()
        self._locks += 1

    def try_acquire(self) -> bool:
        """``acquire`` where no other process holds the lock; False (not held) where one does."""
        if self._locks == 0:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            self._taken()
        self._locks += 1
        return True

    def release(self) -> None:
        self._locks -= 1
        if self._locks == 0:
            if self._ours():
                struct.pack_into("<Q", self.map, HELD_AT, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _taken(self) -> None:
        """The lock just taken. A holder logs each change of a slot before it lets go, so where the
        last one died holding it (the kernel let go for it, its mark still set), it may have
        committed or cleared a slot that no generation names: nobody following the log would ever
        see that put or delete, and a process that took a cleared record's bytes for its own would
        then leave a committed slot naming another's bytes. One more generation, whose log entry
        names another, makes every process compare the slot table whole at its next look."""
        if not self._ours():  # not (yet) a region of this format: nothing is written to it
            return
        if struct.unpack_from("<Q", self.map, HELD_AT)[0]:
            gen = self.gen()
            struct.pack_into("<Q", self.map, LOG_AT + (gen + 1) % LOG_LEN * 8, (gen + 2 & LOG_TAG) << 32)
            struct.pack_into("<Q", self.map, GEN_AT, gen + 1)
            self.dead_holders += 1
        struct.pack_into("<Q", self.map, HELD_AT, 1)

    def _ours(self) -> bool:
        """Whether the mapping holds a region of a format this code reads (a file opened to be
        formatted, or refused as another's, is left as it is)."""
        magic, version = struct.unpack_from("<8sI", self.map)
        return magic == MAGIC and version in READS

    @property
    def held(self) -> bool:
        """Whether this process holds the region lock (then no other process changes the region)."""
        return self._locks > 0

    # -- the counters and the change log -------------------------------------------------------
    def gen(self) -> int:
        """The generation: how many changes the region has seen."""
        return struct.unpack_from("<Q", self.map, GEN_AT)[0]

    def bump(self, slots: list[int]) -> int:
        """Record changes of ``slots``: a generation each, its slot written to the change log
        before the counter moves past it; the generation before."""
        gen = self.gen()
        for n, slot in enumerate(slots, 1):
            struct.pack_into("<Q", self.map, LOG_AT + (gen + n) % LOG_LEN * 8, (gen + n & LOG_TAG) << 32 | slot)
        struct.pack_into("<Q", self.map, GEN_AT, gen + len(slots))
        return gen

    def logged(self, first: int, gen: int) -> list[int] | None:
        """The slots changed in generations ``first`` to ``gen``, from the change log; None where it
        no longer holds them all (more changes than it keeps, an entry overwritten by a later
        generation while read, or a generation bumped by a process that writes no log: each shows
        as an entry naming another generation)."""
        if not 0 <= gen - first < LOG_LEN:
            return None
        log = torch.frombuffer(self.map, dtype=torch.int64, count=LOG_LEN, offset=LOG_AT).tolist()
        slots = []
        for g in range(first, gen + 1):
            entry = log[g % LOG_LEN]
            if entry >> 32 != g & LOG_TAG or not 0 <= entry & LOG_SLOT < self.nslots:
                return None
            slots.append(entry & LOG_SLOT)
        return slots

    def next_seq(self) -> int:
        """A put's sequence number: one more than the last handed out by any process."""
        seq = struct.unpack_from("<Q", self.map, SEQ_AT)[0] + 1
        struct.pack_into("<Q", self.map, SEQ_AT, seq)
        return seq

    # -- slots and records ---------------------------------------------------------------------
    def table(self) -> torch.Tensor:
        """The slot table, live (a view of the mapping): a row of four signed words per slot."""
        live = torch.frombuffer(self.map, dtype=torch.int64, count=self.nslots * 4, offset=SLOTS_AT)
        return live.view(self.nslots, 4)

    def committed(self, commit: int, off: int, length: int, seq: int) -> tuple[int, int, int] | None:
        """``(offset, length, seq)`` of a slot's words, or None unless they are committed (the
        commit word matches the fields: not cleared, not torn) and name bytes of the data area."""
        word = commit_word(off, length, seq)
        if commit != word and commit != word ^ WRITTEN_BELOW:
            return None
        if off < self.data_start or off + length > self.data_start + self.data_size:
            return None
        return off, length, seq

    def read_slot(self, i: int) -> tuple[int, int, int] | None:
        return self.committed(*SLOT.unpack_from(self.map, SLOTS_AT + i * SLOT.size))

    def write_slot(self, i: int, off: int, length: int, seq: int) -> None:
        """Commit slot ``i`` to name the record at ``off``: its fields, then its commit word, each flushed."""
        at = SLOTS_AT + i * SLOT.size
        SLOT.pack_into(self.map, at, 0, off, length, seq)
        self.flush(at, SLOT.size)
        struct.pack_into("<Q", self.map, at, commit_word(off, length, seq))  # the commit: last
        self.flush(at, SLOT.size)

    def uncommit(self, i: int) -> int:
        """Clear slot ``i``'s commit word (other processes see it at once); where it lies, for the
        caller to flush."""
        at = SLOTS_AT + i * SLOT.size
        struct.pack_into("<Q", self.map, at, 0)
        return at

    def marked_below(self, i: int, off: int, length: int, seq: int) -> bool:
        """Whether slot ``i`` names that record, marked written to the tiers below."""
        commit = struct.unpack_from("<Q", self.map, SLOTS_AT + i * SLOT.size)[0]
        return commit == commit_word(off, length, seq) ^ WRITTEN_BELOW

    def mark_below(self, i: int, off: int, length: int, seq: int) -> None:
        """Mark slot ``i`` written to the tiers below, where it still names that record. Not
        flushed: a mark a crash of the host loses is a write down made again, never a loss."""
        if self.read_slot(i) == (off, length, seq):
            struct.pack_into("<Q", self.map, SLOTS_AT + i * SLOT.size, commit_word(off, length, seq) ^ WRITTEN_BELOW)

    def record(self, commit: int, off: int, length: int, seq: int) -> tuple | None:
        """``(offset, length, seq, key, meta)`` of a committed slot's record (key and meta None
        where the header is damaged), or None where the slot is not committed after all (a torn
        or cleared slot: its commit word does not match its fields) or points outside the data."""
        if self.committed(commit, off, length, seq) is None:
            return None
        try:
            key, meta = unpack_header(self.map[off : off + min(length, 1 << 16)])
        except CorruptObject:
            return off, length, seq, None, None
        if round_up(header_size_for(key, meta), PAYLOAD_ALIGN) + meta.nbytes != length:
            return off, length, seq, None, None
        return off, length, seq, key, meta

    def flush(self, at: int, n: int) -> None:
        """Write bytes ``at`` to ``at + n`` of the mapping through to the file or device."""
        start = at - at % mmap.PAGESIZE
        self.map.flush(start, round_up(at + n - start, mmap.PAGESIZE))

    # -- opening: the path, and the space a region file needs --------------------------------------
    def _open_path(self, create: bool) -> tuple[int, bool]:
        """The region's descriptor, and whether this open created the file (so a refusal removes it)."""
        try:
            if create:
                try:
                    return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), True
                except FileExistsError:
                    pass
            return os.open(self.path, os.O_RDWR), False
        except FileNotFoundError as e:
            if not create:
                raise self.absent("does not exist") from e
            raise self._cannot_open(e) from e
        except OSError as e:
            raise self._cannot_open(e) from e

    def _cannot_open(self, e: OSError) -> ConfigError:
        return ConfigError(f"tiers[{self.name}].path: cannot open {self.path!r} ({e.strerror}); allowed: a DAX "
                           "device or a file path in a writable directory")

    def _reserve(self, size: int, created: bool) -> None:
        """Back every byte of a region file before it is mapped: a write to a page the filesystem
        cannot back raises SIGBUS, which kills the process instead of failing a put. Already
        allocated blocks cost nothing to reserve again. On refusal the file is as it was (removed
        if this open created it) and the error says what fits."""
        st = os.fstat(self.fd)
        missing = max(0, size - st.st_blocks * 512)
        if missing:
            self._check_ram(size, missing, created, st.st_size)
        why = None
        try:
            os.posix_fallocate(self.fd, 0, size)
        except AttributeError:  # a platform without posix_fallocate: check the free space instead
            why = self._free_space_short(missing)
        except OSError as e:
            why = self._free_space_short(missing) if e.errno in _NO_FALLOCATE else e.strerror
        if why is None:
            return
        self._leave_as_it_was(created, st.st_size)
        free = self._free_bytes()
        held = 0 if created else st.st_blocks * 512
        raise ConfigError(
            f"tiers[{self.name}].size: got {format_size(size)} ({size} bytes) for {self.path!r}, but its filesystem "
            f"cannot back it ({why}; {format_size(free)} free there); allowed: a size that fits in "
            f"{format_size(free + held)}, or a path on a larger filesystem or a DAX device")

    def _leave_as_it_was(self, created: bool, old_size: int) -> None:
        """A refused reservation: the file closed as it was before the open (removed if the open
        created it; cut back to ``old_size`` if posix_fallocate grew it before it failed)."""
        if not created and os.fstat(self.fd).st_size > old_size:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, old_size)
        os.close(self.fd)
        if created:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _check_ram(self, size: int, missing: int, created: bool, old_size: int) -> None:
        """A region file on a filesystem in RAM (/dev/shm) takes ``missing`` bytes of memory once
        reserved; more than the host has available would bring the out-of-memory killer, not an
        error (a tmpfs may be sized above the free RAM). So that is refused here, naming what fits."""
        fs = memfs.ram_backed(self.path)
        ram = memfs.available_ram() if fs else None
        if ram is None or missing <= ram - _RAM_HEADROOM:
            return
        self._leave_as_it_was(created, old_size)
        fits = max(0, ram - _RAM_HEADROOM) + (size - missing)
        raise ConfigError(
            f"tiers[{self.name}].size: got {format_size(size)} ({size} bytes) for {self.path!r}, a file in memory "
            f"({fs}): reserving it takes {format_size(missing)} more of RAM and the host has {format_size(ram)} "
            f"available; allowed: at most {format_size(fits)} there (leaving {format_size(_RAM_HEADROOM)}), or a "
            "DAX device or a path on disk")

    def _free_bytes(self) -> int:
        st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        return st.f_bavail * st.f_frsize

    def _free_space_short(self, missing: int) -> str | None:
        """Where the filesystem cannot reserve space: why ``missing`` bytes do not fit, or None if they do."""
        free = self._free_bytes()
        if free >= missing:
            return None
        return f"{format_size(missing)} more needed"

    def close(self) -> None:
        """Flush and unmap the region (left to the OS at exit where a caller still holds a view of
        it) and close the descriptor, which lets go of every lock this process holds on it."""
        try:
            self.map.flush()
            self.map.close()
        except BufferError:
            pass
        os.close(self.fd)
