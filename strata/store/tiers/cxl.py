"""The CXL tier: objects in one mapped region (a DAX device such as ``/dev/dax0.0``, or a
file, e.g. under ``/dev/shm``, where no CXL hardware exists), persistent and shared.

The region (``strata.store.tiers.cxl_region``: the file or device, its space, its layout) is a
superblock, a table of slots and the data area; an object is a record there, Strata's
checksummed header then the payload, and a slot ``(commit, offset, length, seq)`` naming it. A
put writes and flushes the record, then the slot's fields, then its commit word last (a hash of
the fields, so neither a torn slot nor a stale word looks committed), and flushes again. After a
crash only committed slots exist: an interrupted put is never readable and its bytes are free,
because the allocator is rebuilt from the committed slots on open. The newest ``seq`` of a key
wins.

Where CUDA is present (``pin: auto``, the default) the mapping is registered with CUDA
(``cudaHostRegister``), so copies to the GPU run from it at pinned speed, asynchronously;
a refusal is a warning and a ``cuda`` entry in stats, and copies stay pageable.

With ``numa_node`` the region's pages are bound to that node (``mbind`` through libnuma),
for CXL memory that the host shows as a CPU-less NUMA node; a missing node or libnuma is a
warning and a ``numa`` entry in stats, never a crash.

Processes share the region through a file lock: a writer holds it from reserving space until its
put is committed or aborted, and every change bumps the generation; a process that sees another
generation reads the slot table again before it looks anything up or allocates: it indexes the
slots the change log names since it last looked (where more changed than the log keeps, or an
entry names another generation than the one it stands for, those whose words differ from its
last copy of the table), so following another process costs what that process changed. A put
that finds the lock held by another process's put in flight does not wait for it under the
chain's lock (the process's reads would stall behind the other's write):
the reservation raises ``RegionBusy``, and the chain waits for the lock outside its own, then
reserves again. A process killed holding the lock leaves a mark that makes the next holder move
the generation past a log entry naming none (``RegionFile._taken``): whatever it committed or
cleared unlogged, every process then finds by comparing the table. Reads are zero-copy views
of the mapping under the chain's lease, checked against the payload checksum, so an object
another process freed and reused meanwhile is a miss, never wrong bytes. A lease also pins the object's record for every process
(``strata.store.tiers.pins``: an open file description lock on its byte range, which the kernel
drops when the process dies): another process may still delete or evict the object, but its
allocator never hands out pinned bytes, so a view leased in place keeps its bytes (the ``lease``
API and the static ring lease cxl objects in place). The pin is taken, then the slot is read
again: an object removed between the lookup and the pin is a miss. Where the file refuses such
locks (``pins`` in stats), a lease pins in this process only, so ``lease`` hands out no view of
the region (``stable_views``): it reads a checked copy, promoted to a tier above or private (the
static ring still leases in place there, ``lease_many(copies=False)``). Processes of Strata
versions before pins do not honour them. A delete or eviction of an object this process still
leases takes it out of the region at once (its slot cleared: gone for every process); its bytes
stay this process's until the last release. Over a tier below (a file tier the processes share
too), an object is written down only by the process that put it: its writes of a key are ordered
with each other, another process's would not be (an older version landing over a newer one, a
deleted object brought back). A put claims its object with a lock on byte ``OWNED_AT + seq`` of
the region file (an open file description lock, as a pin: gone with the process) until the
object is written below; then its slot's commit word takes its written-below form
(``WRITTEN_BELOW``) and the claim is let go. Another process never evicts an object a live
owner claims (``owned_elsewhere``: it evicts others, or refuses the put); one marked written
below it evicts without writing it again; one neither claimed nor marked (its owner died first)
it writes down itself. Where the file refuses such locks, every process writes down what it
evicts. Objects of namespaces this process never registered (another process's) are indexed and
evicted like any other, never cleared: only a slot whose record fails its header checksum or
size is stale.

A region of format version 1 (Strata before the change log and the marks) opens as it is and is
marked version 2 from then on, which older Strata refuses to open. An older process still on it
bumps generations without logging them (each entry names its generation, so such a gap is never
taken for another's slots: the table is compared instead), and neither claims nor marks objects:
processes sharing a region over a tier below run one version.

Damage found while syncing is cleared and counted in ``discarded`` (stats), with one warning per
open that found any: a record failing its header checksum or size, and a copy of another slot's
record (same key, same header: a slot names no key, so a key's record put or copied over
another's is seen as a second record of the key; the copy is never served under the slot's
key). A second record of a key with another header is an older version (left committed by a put
that died before clearing it, or retired while another process still read it): cleared, not
counted. A copy that lies elsewhere than the record it copies is also counted in ``twins``: the
region cannot tell it from the older version of the very same value (a KV chunk saved again) that
a put killed before clearing it leaves, so ``discarded - twins`` is damage no crash explains.

``capacity`` (at most the data area) bounds the bytes this process counts in the region: a put
beyond it evicts by policy or is refused, as in the cpu tier. Processes sharing a region each
count every object in it; one opened with a smaller capacity than the region holds evicts down
to it at open, as the file tier does.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import Iterator

import torch

from strata.config import parse_size
from strata.errors import ConfigError
from strata.keys import key_namespace, namespaces
from strata.store import numa
from strata.store.allocator import ExtentAllocator
from strata.store.codec import CorruptObject, checksum, header_size_for, pack_header
from strata.store.tiers.base import CopiesInFlight, Entry
from strata.store.tiers.memory import MemoryTier
from strata.store.tiers.cpu import contiguous_strides, pin_mode
from strata.store.tiers.cxl_region import ALIGN, MAGIC, OWNED_AT, PAYLOAD_ALIGN, SLOTS_AT, U64, RegionFile, round_up
from strata.store.tiers.pins import RangePins

log = logging.getLogger("strata.cxl")

_NOT_A_KEY = "?"  # the namespace of a checksummed record whose key bytes are no Strata key (kept, never cleared)
_SYNC_TRIES = 8  # reads of the slot table a sync makes while other processes keep changing it
_PINNED_TRIES = 16  # pinned ranges one allocation steps around before it gives up (evicts or refuses)


def _older_of_two(old: tuple[int, int, int, object], slot: int, off: int, seq: int, meta,
                  stale: list[int]) -> tuple[bool, int, int]:
    """Two committed records of one key: ``old`` (slot, offset, seq, header) met first, then the
    one in ``slot``. The older goes to ``stale`` (on a tie, which no put makes, the one met first).
    Whether the one met first is the newer; 1 where both carry the same header (payload checksum
    included: damage, a record put or copied over another's, not an older version, which holds
    another value) else 0; and 1 where such a pair lies in two places (a ``twin``: a copy, or the
    older version of the very same value a put that died before clearing it left, which the
    region cannot tell apart) else 0."""
    first_newer = old[2] > seq
    stale.append(slot if first_newer else old[0])
    same = int(old[3] == meta)
    return first_newer, same, same & int(old[1] != off)


def _region_path(value: object, where: str) -> str:
    """a DAX device (/dev/daxX.Y) or a file path (e.g. under /dev/shm) to map."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: got {value!r}; allowed: a DAX device (/dev/daxX.Y) or a file path "
                          "(e.g. under /dev/shm) to map")
    return os.path.expanduser(os.path.expandvars(value))


def _region_size(value: object, where: str) -> int:
    """bytes of the region as an int or a string like '4GiB'."""
    size = parse_size(value, where)
    if size == 0:
        raise ConfigError(f"{where}: got {value!r}; allowed: more than 0 bytes")
    return size


def _numa_node(value: object, where: str) -> int | None:
    """an integer >= 0 (a NUMA node), or null."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{where}: got {value!r}; allowed: an integer >= 0")
    return value  # type: ignore[return-value]


class _RegionUnlocked:
    """What a put that found the region locked by another process waits for, outside the chain's
    lock (``synchronize``, as for a device copy): the lock let go, seen through a descriptor of its
    own, so the wait never takes over or drops a hold of this process's."""

    def __init__(self, path: str):
        self.path = path

    def synchronize(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # gone: the reservation that follows finds out
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # granted once no process holds it exclusively
        finally:
            os.close(fd)  # lets go of the shared hold too


class RegionBusy(CopiesInFlight):
    """Another process holds the region lock: the chain waits for it outside its lock, then retries,
    for as long as it takes (up to a deadline): a busy region is no reason to refuse a put."""

    counted = False


class CxlTier(MemoryTier):
    kind = "cxl"
    persistent = True
    stable_views = False  # unless the region takes cross-process pins (set per tier at open)
    # pin: register the mapping with CUDA when it is available ("auto"), always, or never;
    # reset: wipe the region's objects on open; numa_node: bind the region's pages to that node.
    config_keys = {"pin": pin_mode, "path": _region_path, "size": _region_size, "reset": bool,
                   "numa_node": _numa_node}
    defaults = {"pin": "auto", "reset": False, "numa_node": None}

    @classmethod
    def check_config(cls, values: dict, raw, where: str) -> dict:
        """The region's path and size are required (the path first, as a missing one always read
        ``path: got None``); capacity defaults to the size, the whole region; checksums are verified
        unless a config says ``verify: false``, which a cxl tier, unlike other persistent ones, takes."""
        if "path" not in values:
            _region_path(None, f"{where}.path")
        if "size" not in values:
            raise ConfigError(f"{where}.size: missing; allowed: bytes of the region as an int or a string like "
                              "'4GiB'")
        if "capacity" not in raw:
            values["capacity"] = values["size"]
        values["verify"] = raw.get("verify", True)
        return values

    def __init__(self, cfg, store_cfg, create: bool = True):
        """``create=False``: open an existing region only; RegionAbsent (creating, formatting and
        resetting nothing) where the path is missing or holds no Strata region."""
        super().__init__(cfg, store_cfg)
        self.path = cfg.path
        self.map = None
        size = cfg.size
        self.region = RegionFile(self.path, self.name, size, create)
        self.map = self.region.map
        created, is_file = self.region.created, self.region.is_file
        self._pins = RangePins(self.region.fd)
        self.stable_views = self._pins.supported  # a leased view is pinned for every process
        self._pin_spans: dict[Entry, tuple[int, int]] = {}  # leased entry -> the record range its pin covers
        # leased entries whose object left the region (deleted or evicted here, removed by another
        # process): (offset, bytes, _rebuilds then); the bytes stay this process's until the last release
        self._lingering: dict[Entry, tuple[int, int, int]] = {}
        self._rebuilds = 0  # how often the allocator was rebuilt from the slot table
        self.pins_passed_over = 0  # ranges puts stepped around: another process's leases pin them
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self.numa = None
        if cfg.numa_node is not None:  # CXL memory as a CPU-less NUMA node: place the region's pages there
            bound, why = numa.bind(self.bytes.data_ptr(), size, cfg.numa_node)
            self.numa = {"node": cfg.numa_node, "bound": bound, "reason": why}
            if not bound:
                log.warning("tier %s: %s; the region stays where the OS puts it", cfg.name, why)
        self.cuda = None
        if cfg.pin != "never":  # copies to the GPU straight from the mapping, at pinned speed
            self.pinned, why = self.seam.register_host(self.bytes.data_ptr(), size)
            self.cuda = {"registered": self.pinned, "reason": why}
            if not self.pinned and torch.cuda.is_available():
                log.warning("tier %s: %s", cfg.name, why)
        # slot -> (offset, seq, size, bytes kept for a lease) freed while another process held the lock
        self._unfreed: dict[int, tuple[int, int, int, bool]] = {}
        # seqs this process put that are not yet marked written below (each locked at ``OWNED_AT + seq``)
        self._owned: set[int] = set()
        self._unmarked: dict[int, tuple[int, int, int]] = {}  # slot -> (offset, size, seq) to mark when unlocked
        self.region_waits = 0  # puts, frees and marks that found another process's put holding the region lock
        self.discarded = 0  # records cleared as damaged (see the module docstring)
        self.twins = 0  # of those, copies of a record found elsewhere (or a dead put's same-value leftover)
        foreign = absent = False
        with self.region.lock():
            # decided under the lock: another opener may have formatted it
            if (cfg.reset and create) or self.map[:8] != MAGIC:
                foreign = not created and is_file and not cfg.reset and any(self.map[:SLOTS_AT])
                absent = not create and not foreign
                if not foreign and not absent:
                    self.region.format(size)
            if not foreign and not absent:
                self._open_super(size)
                self.recovered = self._sync(force=True)
        if foreign or absent:
            self.close()
        if absent:
            raise self.region.absent("holds no Strata region")
        if foreign:
            raise ConfigError(f"tiers[{cfg.name}].path: {self.path!r} holds something other than a Strata region; "
                              "allowed: a new or empty file, a DAX device, or reset: true to overwrite it")
        self.capacity = min(self.capacity, self.data_size)
        if self.discarded:
            log.warning("tier %s: %d records in %s failed their header checksum or size, or copied another "
                        "record, and were cleared at open (stats: discarded)", self.name, self.discarded, self.path)
        while self.used > self.capacity and self._evict_one(self._eviction_order(), lambda t, e: True, set()):
            pass  # the capacity shrank since the region was filled

    # -- region ----------------------------------------------------------------------------
    def _open_super(self, size: int) -> None:
        """The region's geometry, and an index that has not looked at it yet."""
        self.nslots, self.data_start, self.data_size = self.region.geometry(size)
        self.generation = -1
        self._slot_of: dict[bytes, tuple[int, int]] = {}  # key -> (slot, seq) of the entry indexed
        self._key_at: dict[int, bytes] = {}  # slot -> the key of the entry indexed there
        self._parsed: dict[int, tuple] = {}  # slot -> (its four words, its record) as the last sync parsed it
        self._table: torch.Tensor | None = None  # the slot table as the last sync read it
        self._recheck: set[int] = set()  # stale slots the next sync looks at again (to clear them)
        self._reserved: dict[int, tuple[int, int]] = {}  # slot -> (offset, size) of this process's puts

    def _bump(self, slots: list[int]) -> None:
        """Record changes of ``slots`` (region lock held): a generation each, its slot written to the
        change log before the counter moves past it. If another process changed the region since
        this one last read it, the next lookup re-reads it whole."""
        gen = self.region.bump(slots)
        self.generation = gen + len(slots) if gen == self.generation else -1

    def _clear_slot(self, i: int) -> None:
        """Uncommit a slot: other processes see it at once (shared mapping); its flush to the device,
        which only a crash of the host would miss, waits until the chain lets its lock go."""
        at = self.region.uncommit(i)
        self.after_unlock(lambda: self._flush_late(at, 8))

    def _flush_late(self, at: int, n: int) -> None:
        """A deferred ``region.flush``: none once the region is closed (closing flushed it whole); a
        fault is counted, never raised into the store call that freed the slot."""
        if self.map is None:
            return
        try:
            self.region.flush(at, n)
        except (OSError, ValueError):  # ValueError: unmapped meanwhile by a close in another thread
            self.counters.errors += 1

    # -- sharing: re-read the slot table when another process changed it -----------------------
    def _sync(self, force: bool = False) -> int:
        """Bring the index and the allocator up to the region (caller holds the chain lock); the
        number of objects newly indexed. Only a slot whose record fails its header checksum or size,
        or the older of two records of a key, is stale; objects of namespaces this process never
        registered are kept and indexed. Stale slots are cleared only under the region lock, and
        the damaged among them counted then (once: a cleared slot is never read again).

        Only the slots that changed are read, parsed and indexed, and the allocator takes and frees
        their extents (``_index_slots``): those the region's change log names for the generations
        since the last sync (``_logged``), or, where more changed than the log keeps, those whose
        words differ from the copy of the table the last sync read. So a sync after another
        process's put costs what that put changed, not a pass over every object. The first sync,
        and one after this process lost track (``generation`` -1, or a region without cross-process
        pins, where bytes a lease here kept may have been reused), index every slot and rebuild the
        allocator (``_index_all``).

        The slots are read without the region lock, so what they hold may be newer than the
        generation read first: a record put over the bytes of one whose removal came after that
        generation would be indexed while the removed one still is, and forgetting that one later
        would free the new record's bytes. A read during which the generation moved is made again
        (``_SYNC_TRIES`` times, then left to the next call); under the region lock nothing moves.

        A stale slot met without the region lock stays committed until a sync under it clears it,
        while its bytes are already free here (not indexed): the first sync under the lock looks at
        it again even where the generation did not move since, before a put allocates."""
        live = self.region.table()
        for _ in range(_SYNC_TRIES):
            gen = self.region.gen()
            current = gen == self.generation
            if current and not force and not (self._recheck and self.region.held):
                return 0
            whole = force or self._table is None or self.generation == -1 or not self._pins.supported
            logged = None if whole else [] if current else self._logged(gen)
            if logged is not None:  # the slots the change log names, and those to look at again
                slots = sorted(set(logged) | self._recheck)
                rows = live[slots]  # a copy: a torn slot fails its commit word
            else:
                table = live.clone()
            if self.region.held or self.region.gen() == gen:
                break
        else:
            return 0  # another process kept changing the region while it was read: looked at next time
        if logged is not None:
            self._table[slots] = rows
            added, stale, damaged, twins = self._index_slots(slots, rows.tolist())
        else:
            prev, self._table = self._table, table
            if whole:
                added, stale, damaged, twins = self._index_all(table)
                self._rebuild_allocator()
            else:
                changed = (table != prev).any(dim=1).nonzero().flatten().tolist()
                added, stale, damaged, twins = self._index_slots(changed, table[changed].tolist())
        self._recheck = set()
        self.generation = gen  # a change made meanwhile shows as a newer generation next time
        if stale and self.region.held:
            for i in stale:
                self._clear_slot(i)
            self._bump(stale)
            self.discarded += damaged
            self.twins += twins
        elif stale:  # looked at again by every sync until one holding the region lock clears them
            self._table[stale] = -1
            self._recheck = set(stale)
        return added

    def _logged(self, gen: int) -> list[int] | None:
        """The slots changed in the generations since this process's last look, up to ``gen``, from
        the change log; None where it no longer holds them all (``RegionFile.logged``): the slot
        table is then compared whole with the last copy."""
        return self.region.logged(self.generation + 1, gen)

    def _index_all(self, table: torch.Tensor) -> tuple[int, list[int], int, int]:
        """Index every committed record of ``table``: (objects added, stale slots, damaged among them,
        twins among those)."""
        found: dict[bytes, tuple[int, int, int, int, object]] = {}
        stale: list[int] = []
        damaged = twins = 0  # of the stale: failed header or size, or a copy of another record; twins of those
        for i, off, length, seq, key, meta in self._committed_records(table):
            if key is None:  # its header fails its checksum, or disagrees with the slot's length
                stale.append(i)
                damaged += 1
                continue
            old = found.get(key)
            if old is not None:
                first_newer, copy, twin = _older_of_two((old[0], old[1], old[3], old[4]), i, off, seq, meta, stale)
                damaged += copy
                twins += twin
                if first_newer:
                    continue
            found[key] = (i, off, length, seq, meta)
        for key in list(self.index):
            now = found.get(key)
            if now is None or (now[0], now[3]) != self._slot_of.get(key):
                self._forget(self.index[key])  # removed or replaced by another process
        new = [(key, rec) for key, rec in found.items() if key not in self.index]
        return self._index_new(new), stale, damaged, twins

    def _index_slots(self, changed: list[int], rows: list[list[int]]) -> tuple[int, list[int], int, int]:
        """``_index_all`` for the slots ``changed`` alone (``rows``: their four words now): an
        object indexed in one whose record left is forgotten (its bytes and slot freed, unless a
        lease here still reads the bytes); a record that came is indexed (its extent and slot
        taken) unless the index holds a newer one of its key. Where an extent to take is not
        wholly free here (a disagreement with the region that should not happen), the allocator
        is rebuilt. A slot that did not change after all is looked at and left as it is."""
        if not changed:
            return 0, [], 0, 0
        parsed = self._parsed
        for i, row in zip(changed, rows):  # what left first: its bytes may be a new record's
            e = self.index.get(self._key_at.get(i))
            if e is None or e.loc is None or e.loc[0] != i:
                continue  # nothing indexed there
            _, off, seq = e.loc
            if row[1:] != [off, e.size, seq] or self.region.committed(row[0] & U64, off, e.size, seq) is None:
                self._forget_freeing(e)  # else the same record (its mark flipped)
        stale: list[int] = []
        damaged = twins = 0
        new: dict[bytes, tuple[int, int, int, int, object]] = {}  # the newest record of each key that came
        for i, row in zip(changed, rows):
            if i in self._unfreed or i in self._reserved:  # this process's: retired, or a put in flight
                parsed.pop(i, None)
                continue
            rec = self.region.record(row[0] & U64, row[1], row[2], row[3])
            if rec is None:  # cleared, or torn
                parsed.pop(i, None)
                continue
            parsed[i] = (row, rec)
            off, length, seq, key, meta = rec
            if key is None:
                stale.append(i)
                damaged += 1
                continue
            cur = self._slot_of.get(key)
            if cur == (i, seq):
                continue  # indexed already: this process's put
            e, came = self.index.get(key), new.get(key)
            indexed = e is not None and cur is not None
            if indexed or came is not None:  # the record indexed, or another that came, of the key
                old = (cur[0], e.loc[1], cur[1], e.meta) if indexed else (came[0], came[1], came[3], came[4])
                first_newer, copy, twin = _older_of_two(old, i, off, seq, meta, stale)
                damaged += copy
                twins += twin
                if first_newer:
                    continue
                if indexed:
                    self._forget_freeing(e)
            new[key] = (i, off, length, seq, meta)
        added = self._index_new(list(new.items()))
        whole = True
        for i, off, length, _, _ in new.values():
            size = self.allocator.rounded(length)
            whole &= sum(n for _, n in self.allocator.take(off - self.data_start, size)) == size
            self._free_slots.discard(i)
        if not whole:
            self._rebuild_allocator()
        return added, stale, damaged, twins

    def _index_new(self, new: list) -> int:
        """Index records another process put (``(key, (slot, offset, length, seq, meta))``), oldest
        first so that eviction order follows put order."""
        for key, (i, off, length, seq, meta) in sorted(new, key=lambda kv: kv[1][3]):
            ns = key_namespace(key) or _NOT_A_KEY  # no registry: another process's namespaces stay
            e = Entry(key, ns, meta, length, (i, off, seq))
            e.view = self._view(off, key, meta)
            self._account(e, +1)
            self.publish(e, count=False)
            self._name(key, i, seq)
        return len(new)

    def _forget_freeing(self, e: Entry) -> None:
        """``_forget``, and give back the slot and (unless a lease here still reads them) the bytes
        the allocator held for ``e`` (``_index_slots``; ``_rebuild_allocator`` does it in bulk)."""
        slot, off, _ = e.loc
        leased = e.leases > 0
        self._forget(e)
        if not leased:
            self.allocator.free(off - self.data_start, self.allocator.rounded(e.size))
        self._free_slots.add(slot)

    def _committed_records(self, table: torch.Tensor) -> Iterator[tuple[int, int, int, int, bytes | None, object]]:
        """``(slot, offset, length, seq, key, meta)`` of every committed slot of ``table`` but this
        process's ``_unfreed`` and ``_reserved`` (a put in flight is indexed by its own publish),
        ``key`` None for a record whose header fails its checksum or its slot's length. A slot's
        header is parsed again only where the slot changed since the last scan (its four words
        differ)."""
        idx = (table[:, 0] != 0).nonzero().flatten()
        parsed: dict[int, tuple] = {}
        cache, unfreed, reserved = self._parsed, self._unfreed, self._reserved
        for i, row in zip(idx.tolist(), table[idx].tolist()):
            if i in unfreed or i in reserved:
                continue  # this process's: retired (cleared once the region lock is free), or a put in flight
            rec = cache.get(i)
            if rec is None or rec[0] != row:  # the commit word read signed: unsigned for the check
                rec = (row, self.region.record(row[0] & U64, row[1], row[2], row[3]))
            if rec[1] is not None:
                parsed[i] = rec
                yield (i, *rec[1])
        self._parsed = parsed

    def _name(self, key: bytes, slot: int, seq: int) -> None:
        """``key``'s entry is the record in ``slot`` with ``seq``."""
        self._slot_of[key] = (slot, seq)
        self._key_at[slot] = key

    def _unname(self, key: bytes, slot: int, seq: int) -> None:
        """``key``'s entry in ``slot`` with ``seq`` is no longer indexed."""
        if self._slot_of.get(key) == (slot, seq):
            del self._slot_of[key]
        if self._key_at.get(slot) == key:
            del self._key_at[slot]

    def _forget(self, e: Entry) -> None:
        """Another process removed or replaced this object: drop it here without touching the region
        (a lease here keeps its bytes from this process's puts until the last release)."""
        self._slot_of.pop(e.key, None)
        if e.loc is not None:
            self._unname(e.key, e.loc[0], e.loc[2])
            self._disown(e.loc[2])
            if e.leases:
                self._linger(e)
        e.loc = None
        self.retire(e)

    def _linger(self, e: Entry) -> None:
        self._lingering[e] = (e.loc[1], self.allocator.rounded(e.size), self._rebuilds)

    def _rebuild_allocator(self) -> None:
        """Free space and free slots: everything no committed object and no put in flight holds."""
        held = [(e.loc[0], e.loc[1], e.size) for e in self.index.values() if e.loc is not None]
        held += [(slot, off, size) for slot, (off, size) in self._reserved.items()]
        held += [(slot, off, size) for slot, (off, _, size, _) in self._unfreed.items()]
        held += [(None, off, size) for off, size, _ in self._lingering.values()]
        alloc = ExtentAllocator(self.data_size, alignment=ALIGN)
        alloc.take_all()
        cursor = 0
        for _, off, size in sorted(held, key=lambda h: h[1]):
            rel = off - self.data_start
            if rel > cursor:
                alloc.free(cursor, rel - cursor)
            cursor = max(cursor, rel + alloc.rounded(size))
        if cursor < alloc.capacity:
            alloc.free(cursor, alloc.capacity - cursor)
        self.allocator = alloc
        self._rebuilds += 1
        used = {slot for slot, _, _ in held}
        self._free_slots = set(range(self.nslots)) - used

    def _view(self, off: int, key: bytes, meta) -> torch.Tensor:
        start = off + round_up(header_size_for(key, meta), PAYLOAD_ALIGN)
        raw = self.bytes[start : start + meta.nbytes]
        if meta.nbytes == 0:
            return torch.empty(meta.shape, dtype=meta.dtype)
        return raw.view(meta.dtype).as_strided(meta.shape, contiguous_strides(meta.shape))

    def _catch_up(self) -> None:
        """``_sync`` for the calls that read the index without the chain lock (``exists_many``,
        ``contents``): taken only where another process changed the region since the last look."""
        if self.map is not None and self.region.gen() != self.generation:
            with self.chain_lock or contextlib.nullcontext():
                self._sync()

    # -- storage hooks (chain lock held for lookup/_alloc/_free) -----------------------------------
    def lookup(self, key: bytes) -> Entry | None:
        self._sync()
        return self.index.get(key)

    def exists_many(self, keys: list[bytes]) -> list[bool]:
        """From the index, brought up to date with the region first: what another process put
        or deleted since this one last looked counts."""
        self._catch_up()
        return super().exists_many(keys)

    def contents(self):
        self._catch_up()
        return super().contents()

    def stored_size(self, key: bytes, meta) -> int:
        return round_up(header_size_for(key, meta), PAYLOAD_ALIGN) + meta.nbytes

    def reserve(self, key: bytes, ns: str, meta, evict) -> Entry | None:
        """Room for a put under the region lock, held from here until ``publish`` or ``abort``:
        other processes must not take these bytes. Where another process's put holds the lock,
        RegionBusy: the chain waits for it outside its own lock and reserves again."""
        if not self.region.try_acquire():
            self.region_waits += 1
            raise RegionBusy([_RegionUnlocked(self.path)])
        try:
            self._free_unfreed()
            e = super().reserve(key, ns, meta, evict)
        except BaseException:
            self.region.release()
            raise
        if e is None:
            self.region.release()
        return e

    def _alloc(self, e: Entry) -> bool:
        """Room in the region (``reserve`` holds the region lock)."""
        self._sync()  # first: objects another process removed no longer count against the capacity
        size = self.allocator.rounded(e.size)
        fits = self.used + e.size <= self.capacity and self._free_slots
        rel = self._alloc_unpinned(size) if fits else None
        if rel is None:
            return False
        slot, off = self._free_slots.pop(), self.data_start + rel
        self._reserved[slot] = (off, e.size)
        seq = self.region.next_seq()
        e.loc = (slot, off, seq)
        if self.marks_below and self._pins.pin(OWNED_AT + seq, 1):  # this process's to write down
            self._owned.add(seq)
        e.view = self._view(off, e.key, e.meta)
        return True

    def _alloc_unpinned(self, size: int) -> int | None:
        """An extent of ``size`` free bytes that no other process pins (its lease of an object since
        deleted): a pinned range met is taken out of the free space while looking, given back after."""
        taken: list[tuple[int, int]] = []
        try:
            for _ in range(_PINNED_TRIES):
                rel = self.allocator.alloc(size)
                if rel is None or not self._pins.supported:
                    return rel
                pinned = self._pins.pinned_elsewhere(self.data_start + rel, size)
                if pinned is None:
                    return rel
                self.pins_passed_over += 1
                self.allocator.free(rel, size)
                start, length = pinned
                taken += self.allocator.take(start - self.data_start, length)
            return None
        finally:
            for rel, n in taken:
                self.allocator.free(rel, n)

    # -- leases: pinned for every process where the region takes pins ---------------------------
    def lease(self, e: Entry) -> bool:
        """The first lease of an entry in this process pins its record for every process; then the
        slot is read again, so an object another process removed before the pin is not leased."""
        if e.leases == 0 and self.stable_views and e.loc is not None:
            slot, off, seq = e.loc
            span = (off, self.allocator.rounded(e.size))
            if not self._pins.pin(*span):
                return False
            if self.region.read_slot(slot) != (off, e.size, seq):
                self._pins.unpin(*span)
                return False
            self._pin_spans[e] = span
        e.leases += 1
        return True

    def release(self, e: Entry) -> None:
        super().release(e)
        if e.leases == 0 and (rng := self._pin_spans.pop(e, None)) is not None:
            self._pins.unpin(*rng)

    def write(self, e: Entry, data: torch.Tensor) -> bool:
        slot, off, seq = e.loc
        head = pack_header(e.key, e.meta)
        self.map[off : off + len(head)] = head
        if e.meta.nbytes:
            e.view.copy_(data)
        self.region.flush(off, e.size)
        self.region.write_slot(slot, off, e.size, seq)
        return True

    def retire(self, e: Entry) -> None:
        """As for every tier; and an object leased here leaves the region at once (other processes
        and this one's next look at the slot table see it gone), its bytes kept until the last
        release."""
        leased = e.leases > 0 and not e.dead and e.loc is not None
        super().retire(e)
        if leased:
            self._linger(e)
            self._drop_record(e, keep_bytes=True)

    def publish(self, e: Entry, count: bool = True) -> None:
        super().publish(e, count)
        if count:  # a put of this process, committed in write(): visible now
            slot, _, seq = e.loc
            self._reserved.pop(slot, None)
            self._name(e.key, slot, seq)
            self._bump([slot])
            self.region.release()

    def abort(self, e: Entry) -> None:
        mine = e.loc is not None and e.loc[0] in self._reserved
        if mine:
            slot = e.loc[0]
            self._reserved.pop(slot)
            if self.region.read_slot(slot) is not None:  # written, then lost to a newer put of the same key
                self._clear_slot(slot)
                self._bump([slot])
        super().abort(e)  # frees the bytes (and the slot) through _free
        if mine:
            self.region.release()

    def _free(self, e: Entry) -> None:
        if e.loc is None:  # gone from the region already (removed, or retired while leased here)
            self._end_linger(e)
            return
        self._drop_record(e, keep_bytes=False)

    def _drop_record(self, e: Entry, keep_bytes: bool) -> None:
        """Take ``e``'s object out of the region: its slot cleared and given back, its bytes too
        unless ``keep_bytes`` (a lease here still reads them: ``_end_linger`` gives them back)."""
        slot, off, seq = e.loc
        self._unname(e.key, slot, seq)
        e.loc = None
        if not self.region.try_acquire():  # another process's put holds the region: no wait under the chain lock
            self.region_waits += 1
            self._unfreed[slot] = (off, seq, e.size, keep_bytes)
            self.after_unlock(self._free_when_unlocked)
            return
        try:
            self._clear_record(slot, off, seq, e.size, keep_bytes)
        finally:
            self.region.release()

    def _end_linger(self, e: Entry) -> None:
        """The last lease of an object that left the region went: its bytes come back. Without pins
        another process may have put an object over them since the allocator was last rebuilt
        (which then held both): the next look rebuilds it instead."""
        span = self._lingering.pop(e, None)
        if span is None or self.generation == -1:
            return
        off, size, rebuilds = span
        for slot, (at, seq, n, keep) in self._unfreed.items():
            if at == off and keep:  # its slot is not cleared yet (``_drop_record``): the bytes go back with it
                self._unfreed[slot] = (at, seq, n, False)
                return
        if self._pins.supported or rebuilds == self._rebuilds:
            self.allocator.free(off - self.data_start, size)
        else:
            self.generation = -1

    def _clear_record(self, slot: int, off: int, seq: int, size: int, keep_bytes: bool) -> None:
        """Clear a retired object's slot if it still names it, and take the slot and (unless
        ``keep_bytes``) its bytes back (region lock held). Where another process removed it first
        (and may have put another object in its slot or bytes since), nothing is taken back here:
        the next look rebuilds free space and slots from the region."""
        self._disown(seq)
        cur = self.region.read_slot(slot)
        if cur is None or cur[0] != off or cur[2] != seq:
            self.generation = -1
            return
        self._clear_slot(slot)
        self._bump([slot])
        if self.generation != -1:  # else the next sync rebuilds free space from the region
            if not keep_bytes:
                self.allocator.free(off - self.data_start, self.allocator.rounded(size))
            self._free_slots.add(slot)

    def _free_unfreed(self) -> None:
        """Clear what ``_free`` left, and mark what ``mark_written_below`` left, while another
        process held the region (region and chain locks held)."""
        while self._unfreed:
            slot, (off, seq, size, keep_bytes) = self._unfreed.popitem()
            self._clear_record(slot, off, seq, size, keep_bytes)
        while self._unmarked:
            slot, (off, size, seq) = self._unmarked.popitem()
            self._mark(slot, off, size, seq)

    def _free_when_unlocked(self) -> None:
        """``_free``'s and ``mark_written_below``'s region work where another process held the region
        lock: the thread that freed or marked waits for the lock without the chain's, then does it,
        before its store call returns (a put that takes the lock first does it then). Meanwhile a
        freed slot stays committed, its bytes held, and this process never indexes it again
        (``_sync`` skips it); an object to mark stays claimed by this process."""
        while (self._unfreed or self._unmarked) and self.map is not None:
            _RegionUnlocked(self.path).synchronize()
            with self.chain_lock or contextlib.nullcontext():
                if self.map is not None and self.region.try_acquire():
                    try:
                        self._free_unfreed()
                    finally:
                        self.region.release()

    # -- writes down: by the process that put the object, marked in its slot once done -------------
    @property
    def marks_below(self) -> bool:
        return self.writes_down and self._pins.supported

    def owned_elsewhere(self, e: Entry) -> bool:
        """Another process put ``e`` and holds its owner lock (``OWNED_AT + seq``, gone with the
        process): not yet written below by it. A process that died leaves none: what it did not
        write down, whoever evicts it does."""
        if not self.marks_below or e.loc is None or e.loc[2] in self._owned:
            return False
        return self._pins.pinned_elsewhere(OWNED_AT + e.loc[2], 1) is not None

    def written_below(self, e: Entry) -> bool:
        if e.loc is None or self.map is None:
            return False
        slot, off, seq = e.loc
        return self.region.marked_below(slot, off, e.size, seq)

    def mark_written_below(self, e: Entry) -> None:
        """Flip the slot's commit word to say so, then let the owner lock go (in that order: an
        unlocked, unmarked object reads as a dead process's, which another process writes down
        itself). Under the region lock, as every change of a slot; where another process's put
        holds it, once it is free, before the store call returns."""
        if e.loc is None or e.loc[2] not in self._owned:
            return
        slot, off, seq = e.loc
        if self.region.try_acquire():
            try:
                self._mark(slot, off, e.size, seq)
            finally:
                self.region.release()
        else:
            self.region_waits += 1
            self._unmarked[slot] = (off, e.size, seq)
            self.after_unlock(self._free_when_unlocked)

    def _mark(self, slot: int, off: int, size: int, seq: int) -> None:
        """``mark_written_below``'s region work (region lock held), where the slot still names the object."""
        self.region.mark_below(slot, off, size, seq)
        self._disown(seq)

    def _disown(self, seq: int) -> None:
        """Let go of the owner lock of ``seq``, if this process holds it."""
        if seq in self._owned:
            self._owned.discard(seq)
            self._pins.unpin(OWNED_AT + seq, 1)

    def read_into(self, e: Entry, out: torch.Tensor) -> None:
        out.copy_(e.view)
        if self.cfg.verify and checksum(out) != e.meta.checksum:
            raise CorruptObject("payload checksum mismatch (torn, or reused by another process)")

    def stats_extra(self) -> dict:
        free = self.allocator.free_bytes
        largest = self.allocator.largest_free()
        known = namespaces()
        out = {"path": self.path, "region_bytes": self.data_size, "recovered": self.recovered,
               "discarded": self.discarded, "twins": self.twins, "region_waits": self.region_waits,
               "dead_holders": self.region.dead_holders,
               "pins": self._pin_stats(), "unwritten_owned": len(self._owned),
               "fragmentation": round(1 - largest / free, 4) if free else 0.0,
               "foreign_namespaces": sum(e.ns not in known for e in list(self.index.values()))}
        if self.numa is not None:
            out["numa"] = dict(self.numa)
        if self.cuda is not None:
            out["cuda"] = dict(self.cuda)
        return out

    def _pin_stats(self) -> dict:
        """Leases pinned for every process: whether the region takes pins (why not, if not), how
        many this process holds, and how many extents its puts passed over for others' pins."""
        out = {"supported": self._pins.supported, "held": len(self._pin_spans), "passed_over": self.pins_passed_over}
        if not self._pins.supported:
            out["reason"] = self._pins.reason
        return out

    def close(self) -> None:
        if self.map is None:
            return
        if self._unfreed or self._unmarked:  # a retired object's slot not yet cleared: it must not come back
            with self.region.lock():
                self._free_unfreed()
        self.index.clear()
        self._pin_spans.clear()  # closing the descriptor takes the pins back
        self._lingering.clear()
        if self.pinned:
            self.seam.unregister_host(self.bytes.data_ptr())
            self.pinned = False
        self.bytes = None
        self.region.close()
        self.map = None

