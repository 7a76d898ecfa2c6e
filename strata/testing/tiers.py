"""The tier conformance kit: ``check_tier`` runs what every tier must do, through the store's
public operations only (``put``, ``put_many``, ``get``, ``get_into``, ``get_many``, ``contains``,
``contains_many``, ``delete``, ``lease``, ``prefetch``, ``keys``, ``flush``, ``stats``), never
the ``Tier`` class's internals, so it holds a redesign of the tier interface (issue #19) to
the behaviour users rely on.

A tier is described the way users describe it: by the config mapping of one tier, the YAML
dict (``{"kind": "file", "path": ..., "capacity": ...}``). The kit builds its own stores
around it: the tier alone, and the tier under a small cpu tier in both write modes
(``write: through`` and ``write: back`` on the cpu tier). What it checks:

- ``model``: a stateful property test (hypothesis) of random operations against a dict; a
  persistent tier is also closed and reopened at random moments and must keep everything.
  Every operation's answer must equal the dict's; ``stats()`` must report each tier's bytes
  within its capacity; alone, each read counts exactly one hit or one miss.
- ``damage`` (needs ``raw``): a stored value's bytes are changed under the store, through the
  tier's own storage: a flipped payload byte, a flipped header byte, a value cut short, another
  key's value, garbage. A read must return the right bytes or a miss, never other bytes; a
  miss must raise a fault counter, and the damaged value must not be listed or served again.
  A persistent tier is also damaged while closed.
- ``faults`` (needs ``fault``): the tier's I/O fails (``error``) or hangs past its bound
  (``timeout``). No operation raises or exceeds ``call_bound_s``; reads are misses or the right
  bytes (and under a cpu tier, what the cpu tier holds is served); the fault is counted; once
  the fault ends the tier works again, and never serves a value older than the newest put.
- ``capacity`` (needs ``capacity``): puts beyond the capacity evict (``evict: drop``) or are
  refused (``evict: never``); ``stats()`` bytes never exceed it; a put that returned True is
  readable right after, and under ``evict: never`` for ever; a delete gives the room back;
  a value larger than the tier is refused.

A check that fails raises AssertionError naming the tier, the check, the mode and the
property; the hypothesis steps that reproduce a ``model`` failure follow in the message.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Mapping, Protocol, Sequence

import torch

CHECKS = ("model", "damage", "faults", "capacity")
MODES = ("alone", "through", "back")  # the tier alone; under a cpu tier with write: through / back
DAMAGES = ("flip-payload", "flip-header", "cut", "foreign-key", "garbage")
READERS = ("get", "get_into", "get_many")
FAULTS = ("error", "timeout")
CAPACITY = ("evict", "refuse", "too-big")
# Every check by name: a failure names it, and ``checks`` / ``exclude`` select by name or prefix.
ALL_CHECKS = ([f"model/{m}" for m in MODES] + [f"model/{m}/oversize" for m in MODES[1:]]
              + [f"damage/{d}/{r}" for d in DAMAGES for r in (*READERS, "closed")]
              + [f"faults/{f}/{m}" for f in FAULTS for m in MODES]
              + [f"capacity/{c}" for c in CAPACITY])
FAULT_COUNTERS = ("checksum_failures", "errors", "discarded")  # stats fields that count faults
REQUIRED_STATS = ("kind", "capacity", "hits", "misses", "puts", "evictions", "rejected", "checksum_failures", "errors")
TOP = "conformance-cpu"  # the name of the cpu tier the kit puts above the tier under test
SCOPE = "conformance"


def _matches(check: str, pattern: str) -> bool:
    return check == pattern or check.startswith(pattern + "/")


class RawStorage(Protocol):
    """The tier's stored bytes of one key as the tier keeps them (header and payload), reached
    without the store: a file's contents, a Redis value, a record of a mapped region."""

    def get(self, key: bytes) -> bytes | None:
        """The stored bytes of the encoded ``key`` (the newest version), or None."""

    def set(self, key: bytes, value: bytes) -> None:
        """Replace the stored bytes of ``key`` by ``value`` in place. Raise NotImplementedError
        for a value the storage cannot hold (e.g. another length); that damage is skipped."""


MakeTier = Callable[..., Mapping]  # make_tier(workdir: Path[, capacity=int]) -> one tier's config
Raw = Callable[[Mapping], RawStorage]  # raw(tier_config) -> RawStorage
Fault = Callable[[Mapping, str], ContextManager]  # fault(tier_config, "error" | "timeout") -> context


@dataclass
class TierReport:
    """What ``check_tier`` ran: the checks that passed, those skipped (and why), seconds per group."""

    name: str
    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"check_tier({self.name}): {len(self.passed)} passed, {len(self.skipped)} skipped"]
        lines += [f"  {group}: {s:.1f}s" for group, s in self.seconds.items()]
        lines += [f"  skipped {c}: {why}" for c, why in self.skipped.items()]
        return "\n".join(lines)


class _Failed(AssertionError):
    pass


def check_tier(make_tier: MakeTier, *, name: str | None = None, persistent: bool = False,
               raw: Raw | None = None, fault: Fault | None = None, capacity: int | None = None,
               checks: Sequence[str] = CHECKS, exclude: Mapping[str, str] | None = None,
               examples: int = 25, steps: int = 50, workdir: str | Path | None = None,
               call_bound_s: float = 5.0) -> TierReport:
    """Run the conformance checks against the tier ``make_tier`` describes; a TierReport, or
    AssertionError naming the check and the property that failed.

    ``make_tier(workdir)`` returns one tier's config mapping for a store whose files live in
    ``workdir`` (a new empty directory for every store the kit opens; deleted after). It must
    hold at least 1 MiB, and set no ``write`` mode (the kit's cpu tier above it does). A tier
    whose storage outlives the directory (a server) must use a new namespace there per call
    (e.g. a Redis ``key_prefix`` with a uuid). ``make_tier(workdir, capacity=n)`` (asked only
    when ``capacity`` is given) returns it with a capacity of ``n`` bytes.

    ``persistent``: what the tier stores outlives its store (checked by closing and reopening).
    ``raw(config)``: the tier's storage without the store (``RawStorage``), for ``damage``.
    ``fault(config, kind)``: a context manager inside which the tier's I/O fails (``"error"``)
    or hangs past the tier's own time bound (``"timeout"``); NotImplementedError skips a kind.
    ``capacity``: the bytes the ``capacity`` check asks for (None skips it: unbounded tiers).
    ``checks``: the checks to run, by name or prefix (``ALL_CHECKS``: ``"damage"``,
    ``"model/back"``, ``"damage/cut/get"``); ``exclude``: name or prefix -> why, skipped (a
    known failure, run on its own elsewhere). ``examples`` / ``steps``: hypothesis examples per
    mode, operations per example. ``call_bound_s``: the longest one store call may take while a
    fault is injected.
    """
    checks = [checks] if isinstance(checks, str) else list(checks)
    exclude = dict(exclude or {})
    unknown = [c for c in [*checks, *exclude] if not any(_matches(k, c) for k in ALL_CHECKS)]
    if unknown:
        raise ValueError(f"checks/exclude: got {unknown}; allowed: names or prefixes of {', '.join(ALL_CHECKS)}")
    kit = _Kit(make_tier, name, persistent, Path(workdir) if workdir else None, checks, exclude)
    report = kit.report
    groups = {"model": lambda: kit.model(examples, steps, report),
              "damage": lambda: kit.damage(raw, report),
              "faults": lambda: kit.faults(fault, call_bound_s, report),
              "capacity": lambda: kit.capacity(capacity, report)}
    for group, run in groups.items():
        if any(_matches(c, group) and any(_matches(c, p) for p in checks) for c in ALL_CHECKS):
            t0 = time.perf_counter()
            run()
            report.seconds[group] = time.perf_counter() - t0
    return report


# -- values, keys, comparisons --------------------------------------------------------------------

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool)


def make_value(kind: int, seed: int, dims: tuple[int, ...]) -> "torch.Tensor | bytes":
    """A tensor of ``DTYPES[kind]`` and shape ``dims``, or (kind == len(DTYPES)) bytes, from a seed."""
    g = torch.Generator().manual_seed(seed)
    if kind == len(DTYPES):
        return bytes(torch.randint(0, 256, (sum(dims) * 7,), generator=g, dtype=torch.uint8).tolist())
    raw = torch.randint(-1000, 1000, dims, generator=g)
    return raw.to(DTYPES[kind]) if DTYPES[kind] != torch.bool else raw > 0


def same(a, b) -> bool:
    """Equal values: the same bytes, or tensors of the same dtype, shape and elements."""
    if isinstance(a, bytes) or isinstance(b, bytes):
        return a == b
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(a, b)


def _nbytes(v) -> int:
    return len(v) if isinstance(v, bytes) else v.numel() * v.element_size()


def _flat(v) -> bytes:
    """A value's bytes, whatever its kind (a leased view or a tensor read back as bytes)."""
    if isinstance(v, bytes):
        return v
    return v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b""


def _key(name: str, ns: str = "kv"):
    from strata import Key

    return Key(ns, SCOPE, name)


def _describe(v) -> str:
    if v is None:
        return "a miss"
    if isinstance(v, bytes):
        return f"{len(v)} bytes"
    return f"{v.dtype} {tuple(v.shape)}"


def _mismatch(got, want) -> str:
    """How a read differs from what was put, for a failure message."""
    if got is not None and want is not None and _describe(got) == _describe(want):
        return f"other bytes than were put ({_describe(want)})"
    return f"{_describe(got)}, expected {_describe(want)}"


# -- the kit ----------------------------------------------------------------------------------------


class _Kit:
    def __init__(self, make_tier: MakeTier, name: str | None, persistent: bool, workdir: Path | None,
                 checks: Sequence[str], exclude: Mapping[str, str]):
        self.make_tier, self.persistent, self.workdir = make_tier, persistent, workdir
        self.checks, self.exclude = checks, exclude
        with self._fresh() as (probe, _):  # the tier's name, as stats() reports it
            self.tier = probe.get("name") or probe["kind"]
        self.label = name or self.tier
        self.report = TierReport(self.label)
        if self.tier == TOP:
            raise ValueError(f"make_tier: the tier name {TOP!r} is the kit's own cpu tier; allowed: any other")

    def wanted(self, check: str) -> bool:
        """Whether to run ``check``: selected by ``checks`` and not excluded (an exclusion is
        reported as skipped, with its reason)."""
        if not any(_matches(check, c) for c in self.checks):
            return False
        why = next((w for c, w in self.exclude.items() if _matches(check, c)), None)
        if why is not None:
            self.report.skipped[check] = f"excluded: {why}"
        return why is None

    def _config_of(self, capacity: int | None, workdir: Path) -> dict:
        cfg = self.make_tier(workdir) if capacity is None else self.make_tier(workdir, capacity=capacity)
        if not isinstance(cfg, Mapping) or "kind" not in cfg:
            raise ValueError(f"make_tier: got {cfg!r}; allowed: one tier's config mapping, e.g. "
                             "{'kind': 'file', 'path': str(workdir), 'capacity': '16MiB'}")
        if "write" in cfg:
            raise ValueError("make_tier: the tier sets 'write'; allowed: no write mode (the kit's cpu tier above "
                             "it sets write: through or back)")
        return dict(cfg)

    def fail(self, check: str, what: str) -> _Failed:
        return _Failed(f"check_tier({self.label}): {check}: {what}")

    @contextlib.contextmanager
    def _fresh(self, capacity: int | None = None) -> Iterator[tuple[dict, Path]]:
        """A new empty directory and the tier's config for a store in it; the directory goes after."""
        with tempfile.TemporaryDirectory(prefix="strata-tier-", dir=self.workdir) as d:
            yield self._config_of(capacity, Path(d)), Path(d)

    def store_config(self, tier: Mapping, mode: str, top: str = "4KiB", namespaces: Mapping | None = None) -> dict:
        """A store of the tier alone, or under the kit's cpu tier (``top`` bytes) writing ``mode``."""
        tiers = [dict(tier)]
        if mode != "alone":
            tiers.insert(0, {"kind": "cpu", "name": TOP, "capacity": top, "write": mode, "pin": "never"})
        cfg: dict = {"tiers": tiers, "writeback": {"max_pending": 3}}
        if namespaces:
            cfg["namespaces"] = dict(namespaces)
        return cfg

    def stats(self, store) -> dict:
        return store.stats()["tiers"][self.tier]

    def fault_count(self, store) -> int:
        s = self.stats(store)
        return sum(int(s.get(c) or 0) for c in FAULT_COUNTERS)

    # -- model ------------------------------------------------------------------------------------
    def model(self, examples: int, steps: int, report: TierReport) -> None:
        from hypothesis import HealthCheck, Phase, settings
        from hypothesis.stateful import run_state_machine_as_test

        cfg = settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                       suppress_health_check=list(HealthCheck), print_blob=False,
                       report_multiple_bugs=False, phases=[p for p in Phase if p.name != "explain"])
        for mode in MODES:
            check = f"model/{mode}"
            if not self.wanted(check):
                continue
            try:
                run_state_machine_as_test(_machine(self, mode), settings=cfg)
            except _Failed:
                raise
            except AssertionError as e:
                notes = "\n".join(getattr(e, "__notes__", []))
                raise self.fail(check, f"{e}\n{notes}".rstrip()) from e
            except Exception as e:  # an operation raised: a tier must degrade, never raise
                notes = "\n".join(getattr(e, "__notes__", []))
                raise self.fail(check, f"an operation raised {type(e).__name__}: {e}\n{notes}".rstrip()) from e
            report.passed.append(check)
        for mode in MODES[1:]:
            if self.wanted(f"model/{mode}/oversize"):
                self._oversize(f"model/{mode}/oversize", mode)
                report.passed.append(f"model/{mode}/oversize")

    def _oversize(self, check: str, mode: str) -> None:
        """Under a cpu tier too small for a value, the tier below takes it: a put of a key's new
        version larger than the cpu tier, or smaller after a larger one, is what every read
        returns at once, after a flush and (persistent) after a restart. (The random model keeps
        its values within the cpu tier: this is where it meets one that is not.)"""
        import strata

        k, small, big = _key("oversize"), torch.arange(4, dtype=torch.float32), torch.arange(3000.0)  # 12 KB
        with self._fresh() as (tier, _):
            cfg = self.store_config(tier, mode)
            with strata.open_store(cfg) as store:
                for step, v in (("a small value", small), ("a value larger than the cpu tier", big),
                                ("a small value again", small + 1)):
                    if store.put(k, v) is not True:
                        raise self.fail(check, f"put of {step} ({_nbytes(v)} bytes) refused; the tier below has room")
                    for when in ("at once", "after a flush"):
                        if when != "at once":
                            store.flush()
                        got = store.get(k)
                        if not same(got, v):
                            raise self.fail(check, f"put of {step} returned True, then get {when}: {_mismatch(got, v)}")
                    got = store.get(k, mode="exact", tier=self.tier)
                    if not same(got, v):
                        raise self.fail(check, f"put of {step}, flush, then get from tier {self.tier}: "
                                               f"{_mismatch(got, v)}")
                last = small + 1
            if self.persistent:
                with strata.open_store(cfg) as store:
                    got = store.get(k)
                    if not same(got, last):
                        raise self.fail(check, f"after a restart, get: {_mismatch(got, last)}")

    # -- damage -----------------------------------------------------------------------------------
    def damage(self, raw: Raw | None, report: TierReport) -> None:
        if raw is None:
            report.skipped["damage"] = "no raw access to the tier's storage given (raw=None)"
            return
        for how in DAMAGES:
            for reader in (*READERS, "closed"):
                check = f"damage/{how}/{reader}"
                if not self.wanted(check):
                    continue
                if reader == "closed" and not self.persistent:
                    report.skipped[check] = "not persistent: nothing to damage while the store is closed"
                else:
                    self._damage_one(check, raw, how, reader, report)

    def _damage_one(self, check: str, raw: Raw, how: str, reader: str, report: TierReport) -> None:
        """Damage ``a``'s stored bytes (with the store open, or ``closed`` and reopened after),
        then read it with ``reader``: the right bytes or a counted miss, and dropped."""
        import strata

        closed = reader == "closed"
        reader = "get" if closed else reader
        a, b = _key("a"), _key("b")  # encodings of one length: b's value fits where a's was
        va = torch.arange(512, dtype=torch.float32)
        vb = va + 1000
        with self._fresh() as (tier, _):
            cfg = self.store_config(tier, "alone")
            store = strata.open_store(cfg)
            try:
                if not (store.put(a, va) and store.put(b, vb)):
                    raise self.fail(check, "a put into an empty tier was refused")
                store.flush()
                if closed:
                    store.close()
                storage = raw(tier)
                try:
                    blob, other = storage.get(a.encoded), storage.get(b.encoded)
                    if blob is None or other is None:
                        raise self.fail(check, "raw.get found nothing under a key the store just took")
                    try:
                        storage.set(a.encoded, _damaged(blob, other, how))
                    except NotImplementedError as e:
                        report.skipped[check] = str(e) or "the raw storage cannot hold this damage"
                        return
                finally:
                    getattr(storage, "close", lambda: None)()
                if closed:
                    store = strata.open_store(cfg)
                before = 0 if closed else self.fault_count(store)
                got = _read(store, a, va, reader)
                self._judge_damage(check, store, how, got, va, before)
                again = store.get(a)
                if not (again is None or same(again, va)):
                    raise self.fail(check, "a second read of the damaged key returned other bytes "
                                           f"({_describe(again)})")
                if got is None and (again is not None or store.contains(a)):
                    raise self.fail(check, "a value found damaged is still listed or served (contains or a "
                                           "second get): it must be dropped")
                if not same(store.get(b), vb):
                    raise self.fail(check, "damaging one key's value lost or changed another key's")
            finally:
                store.close()
        report.passed.append(check)

    def _judge_damage(self, check: str, store, how: str, got, va, before: int) -> None:
        if not (got is None or same(got, va)):
            raise self.fail(check, f"a read of a damaged value returned other bytes ({_describe(got)}): "
                                   "allowed: the right bytes or a miss")
        if got is None:
            if self.fault_count(store) <= before:
                raise self.fail(check, f"a damaged value was a miss, but no fault counter "
                                       f"({', '.join(FAULT_COUNTERS)}) in stats() rose")
        elif how != "flip-header":  # a header byte may be padding or re-read never; payload bytes never
            raise self.fail(check, "a read returned the original value although its only stored bytes were "
                                   "damaged (the damage did not reach the storage: check raw.set)")

    # -- faults -----------------------------------------------------------------------------------
    def faults(self, fault: Fault | None, bound: float, report: TierReport) -> None:
        if fault is None:
            report.skipped["faults"] = "no fault injection given (fault=None)"
            return
        for kind in FAULTS:
            for mode in MODES:
                check = f"faults/{kind}/{mode}"
                if not self.wanted(check):
                    continue
                with self._fresh() as (tier, _):
                    try:
                        skipped = _FaultRun(self, check, tier, mode, bound).run(fault(tier, kind))
                    except NotImplementedError as e:
                        skipped = str(e) or f"fault kind {kind!r} not supported"
                if skipped:
                    report.skipped[check] = skipped
                else:
                    report.passed.append(check)

    # -- capacity ---------------------------------------------------------------------------------
    def capacity(self, capacity: int | None, report: TierReport) -> None:
        if capacity is None:
            report.skipped["capacity"] = "no capacity given (capacity=None: the tier is unbounded)"
            return
        runs = {"evict": self._capacity_evicts, "refuse": self._capacity_refuses, "too-big": self._capacity_too_big}
        for what, run in runs.items():
            if self.wanted(f"capacity/{what}"):
                run(capacity)
                report.passed.append(f"capacity/{what}")

    def _bounded(self, check: str, store, capacity: int) -> None:
        s = self.stats(store)
        if "bytes" in s and not 0 <= s["bytes"] <= min(capacity, s["capacity"]):
            raise self.fail(check, f"stats() bytes {s['bytes']} outside 0..capacity ({capacity} asked, "
                                   f"{s['capacity']} reported)")

    def _capacity_evicts(self, capacity: int) -> None:
        """``evict: drop`` (kv): three capacities' worth of puts; each acknowledged one readable at
        once, never more than the capacity held, every key its newest acknowledged value or a miss."""
        import strata

        check = "capacity/evict"
        size = max(64, capacity // 12) // 4 * 4
        with self._fresh(capacity) as (tier, _), strata.open_store(self.store_config(tier, "alone")) as store:
            latest: dict = {}  # key -> the values a read may return (the newest acknowledged; older after a refusal)
            acked = 0
            for i in range(3 * capacity // size):
                k = _key(f"k{i % 16}")
                v = torch.full((size // 4,), float(i))
                ok = store.put(k, v)
                if ok is True:
                    acked += 1
                    got = store.get(k)
                    if not same(got, v):
                        raise self.fail(check, f"put #{i} returned True, but a read right after returned "
                                               f"{_describe(got)}")
                    latest[k] = [v]
                elif ok is False:
                    latest.setdefault(k, []).append(None)
                else:
                    raise self.fail(check, f"put returned {ok!r}; allowed: True or False")
                self._bounded(check, store, capacity)
            for k, allowed_values in latest.items():
                got = store.get(k)
                if got is not None and not any(a is not None and same(got, a) for a in allowed_values):
                    raise self.fail(check, f"{k} returned a value that is not its newest acknowledged one")
            s = self.stats(store)
            if acked == 0:
                raise self.fail(check, "every put was refused: a tier with room must take values smaller than it")
            if s["evictions"] + s["rejected"] == 0:
                raise self.fail(check, f"{3 * capacity // size} puts of {size} bytes into {capacity} bytes, but "
                                       "stats() counts no evictions and no rejected puts")

    def _capacity_refuses(self, capacity: int) -> None:
        """``evict: never``: puts beyond the capacity are refused, every acknowledged value stays
        readable, and deleting them gives the room back."""
        import strata

        check = "capacity/refuse"
        size = max(64, capacity // 8) // 4 * 4
        ns = {"param": {"evict": "never"}}
        with self._fresh(capacity) as (tier, _), \
                strata.open_store(self.store_config(tier, "alone", namespaces=ns)) as store:
            acked: dict = {}
            refused = 0
            for i in range(2 * capacity // size):
                k, v = _key(f"p{i}", "param"), torch.full((size // 4,), float(i))
                if store.put(k, v):
                    acked[k] = v
                else:
                    refused += 1
                self._bounded(check, store, capacity)
            if not refused:
                raise self.fail(check, f"{2 * capacity // size} puts of {size} bytes that may not be evicted all "
                                       f"returned True in a tier of {capacity} bytes")
            if not acked:
                raise self.fail(check, "every put was refused: a tier with room must take values smaller than it")
            for k, v in acked.items():
                got = store.get(k)
                if not same(got, v):
                    raise self.fail(check, f"{k}: acknowledged under evict: never, then read back as "
                                           f"{_describe(got)} (lost)")
            for k in acked:
                store.delete(k)
            k, v = _key("after-delete", "param"), torch.full((size // 4,), -1.0)
            if not store.put(k, v) or not same(store.get(k), v):
                raise self.fail(check, "after every value was deleted, a put that fits was refused or lost: "
                                       "deletes must give the room back")

    def _capacity_too_big(self, capacity: int) -> None:
        """A value larger than the tier is refused (False or StoreError), and nothing exceeds it."""
        import strata
        from strata.errors import StoreError

        check = "capacity/too-big"
        with self._fresh(capacity) as (tier, _), strata.open_store(self.store_config(tier, "alone")) as store:
            for n in (capacity + 4, capacity - 4):
                v = torch.zeros(n // 4, dtype=torch.float32)
                try:
                    ok = store.put(_key(f"big{n}"), v)
                except StoreError:
                    ok = False
                if ok and n > capacity:
                    raise self.fail(check, f"a value of {n} bytes was taken by a tier of {capacity} bytes")
                if ok and not same(store.get(_key(f"big{n}")), v):
                    raise self.fail(check, f"a {n}-byte put returned True but reads back otherwise")
                self._bounded(check, store, capacity)


def _damaged(blob: bytes, other: bytes, how: str) -> bytes:
    """The stored bytes ``blob`` damaged as ``how`` says (``other``: another key's stored bytes)."""
    if how == "flip-payload":  # the last byte: every layout ends with the payload
        return blob[:-1] + bytes([blob[-1] ^ 0x40])
    if how == "flip-header":
        return bytes([blob[0] ^ 0x01]) + blob[1:]
    if how == "cut":
        return blob[:-8]
    if how == "foreign-key":
        return other
    return (b"not a strata value " * (len(blob) // 19 + 1))[: len(blob)]


def _read(store, key, want, reader: str):
    """Read ``key`` with ``reader``: the value (as ``get`` would return it) or None on a miss."""
    if reader == "get":
        return store.get(key)
    if reader == "get_many":
        return store.get_many([key])[0]
    out = torch.empty_like(want) if not isinstance(want, bytes) else torch.empty(len(want), dtype=torch.uint8)
    if not store.get_into(key, out):
        return None
    return bytes(out.tolist()) if isinstance(want, bytes) else out


# -- model: the state machine -------------------------------------------------------------------------


def _machine(kit: _Kit, mode: str):
    """A RuleBasedStateMachine class for ``kit``'s tier in ``mode``, with a dict as the model."""
    import strata
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

    keys = st.builds(lambda ns, scope, name: strata.Key(ns, scope, name), st.sampled_from(["kv", "param"]),
                     st.sampled_from(["s1", "s2"]), st.sampled_from("abcde"))
    values = st.builds(make_value, st.integers(0, len(DTYPES)), st.integers(0, 2**31),
                       st.lists(st.integers(0, 8), min_size=0, max_size=3).map(tuple))
    tier = kit.tier

    class TierModel(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self._dir = tempfile.TemporaryDirectory(prefix="strata-tier-", dir=kit.workdir)
            self.cfg = kit.store_config(kit._config_of(None, Path(self._dir.name)), mode)
            self.store = strata.open_store(self.cfg)
            self.model: dict = {}

        def teardown(self):
            try:
                self.store.close()
            finally:
                self._dir.cleanup()

        def _counted(self, k, read):
            """``read()``, and alone: exactly one hit (a value) or one miss (None) counted."""
            if mode != "alone":
                return read()
            before = kit.stats(self.store)
            got = read()
            after = kit.stats(self.store)
            hit = k in self.model
            want = (before["hits"] + hit, before["misses"] + (not hit))
            assert (after["hits"], after["misses"]) == want, (
                f"{'a hit' if hit else 'a miss'} counted hits/misses {before['hits']}/{before['misses']} -> "
                f"{after['hits']}/{after['misses']}; expected {want[0]}/{want[1]}")
            return got

        @rule(k=keys, v=values)
        def put(self, k, v):
            assert self.store.put(k, v) is True, f"put {k} ({_describe(v)}) into a store with room: refused"
            self.model[k] = v

        @precondition(lambda self: self.model)
        @rule(data=st.data(), v=values)
        def overwrite(self, data, v):
            k = data.draw(st.sampled_from(sorted(self.model, key=lambda k: k.encoded)), label="k")
            assert self.store.put(k, v) is True, f"put {k} ({_describe(v)}) over its old value: refused"
            self.model[k] = v

        @rule(items=st.lists(st.tuples(keys, values), min_size=1, max_size=3))
        def put_many(self, items):
            assert self.store.put_many(items) == [True] * len(items), "put_many into a store with room: refused"
            self.model.update(items)

        @rule(k=keys)
        def get(self, k):
            got = self._counted(k, lambda: self.store.get(k))
            assert same(got, self.model.get(k)), f"get {k}: {_mismatch(got, self.model.get(k))}"

        @rule(k=keys, as_bytes=st.booleans())
        def get_into(self, k, as_bytes):
            want = self.model.get(k)
            if want is None:
                ok = self._counted(k, lambda: self.store.get_into(k, torch.empty(1)))
                assert ok is False, f"get_into {k}: returned {ok!r} for a key never put or deleted"
                return
            if isinstance(want, bytes) or as_bytes:
                out = torch.full((_nbytes(want),), 7, dtype=torch.uint8)
            else:
                out = torch.empty_like(want)
            ok = self._counted(k, lambda: self.store.get_into(k, out))
            assert ok is True, f"get_into {k}: a miss, expected {_describe(want)}"
            assert _flat(out) == _flat(want), f"get_into {k}: other bytes than were put"

        @rule(k=keys)
        def get_from_tier(self, k):
            self.store.flush()
            got = self.store.get(k, mode="exact", tier=tier)
            assert same(got, self.model.get(k)), (
                f"flush, then get {k} from tier {tier} alone: {_mismatch(got, self.model.get(k))}")

        @rule(k=keys)
        def delete(self, k):
            found = self.store.delete(k)
            assert found == (k in self.model), f"delete {k}: returned {found}, expected {k in self.model}"
            self.model.pop(k, None)
            assert not self.store.contains(k), f"delete {k}: still contained"
            assert self.store.get(k) is None, f"delete {k}: still served"

        @rule(k=keys)
        def contains(self, k):
            assert self.store.contains(k) == (k in self.model), f"contains {k}: expected {k in self.model}"

        @rule(ks=st.lists(keys, min_size=1, max_size=4))
        def batch(self, ks):
            got = self.store.contains_many(ks)
            assert got == [k in self.model for k in ks], f"contains_many {ks}: {got}"
            for value, k in zip(self.store.get_many(ks), ks):
                assert same(value, self.model.get(k)), f"get_many: {k}: {_mismatch(value, self.model.get(k))}"

        @rule(k=keys)
        def lease(self, k):
            with self.store.lease(k) as view:
                want = self.model.get(k)
                assert (view is None) == (want is None), f"lease {k}: {_describe(view)}, expected {_describe(want)}"
                if view is not None:
                    assert _flat(view) == _flat(want), f"lease {k}: other bytes than were put"

        @rule(ks=st.lists(keys, min_size=1, max_size=4))
        def prefetch(self, ks):
            n = self.store.prefetch(ks)
            assert 0 <= n <= len(ks), f"prefetch of {len(ks)} keys returned {n}"
            for k in ks:
                got = self.store.get(k)
                assert same(got, self.model.get(k)), f"get {k} after prefetch: {_mismatch(got, self.model.get(k))}"

        @rule()
        def keys_listed(self):
            listed = set(self.store.keys())
            assert listed == set(self.model), (
                f"keys(): {len(listed)} listed; missing {set(self.model) - listed}, extra {listed - set(self.model)}")

        @precondition(lambda self: kit.persistent)
        @rule()
        def restart(self):
            self.store.close()
            self.store = strata.open_store(self.cfg)

        @invariant()
        def stats_bounded(self):
            for tname, s in self.store.stats()["tiers"].items():
                if tname == tier:
                    missing = [f for f in REQUIRED_STATS if f not in s]
                    assert not missing, f"stats() of tier {tier} lacks {missing}"
                if "bytes" in s:
                    assert 0 <= s["bytes"] <= s["capacity"], f"tier {tname}: stats bytes {s['bytes']} outside " \
                                                             f"0..{s['capacity']}"

    TierModel.__name__ = f"TierModel_{mode}"
    return TierModel


# -- faults ------------------------------------------------------------------------------------------


class _FaultRun:
    """One fault injected into one store: what must hold during it, and after."""

    def __init__(self, kit: _Kit, check: str, tier: dict, mode: str, bound: float):
        self.kit, self.check, self.mode, self.bound = kit, check, mode, bound
        self.tier = kit.tier
        self.cfg = kit.store_config(tier, mode, top="4MiB")  # the cpu tier above holds every value here
        self.undeleted = False

    def call(self, what: str, fn: Callable):
        """``fn()``: never raising, within the bound."""
        t0 = time.monotonic()
        try:
            out = fn()
        except Exception as e:
            raise self.kit.fail(self.check, f"{what} raised {type(e).__name__}: {e} (a failing tier must degrade "
                                            "to misses and counters)") from e
        took = time.monotonic() - t0
        if took > self.bound:
            raise self.kit.fail(self.check, f"{what} took {took:.1f}s; allowed: at most {self.bound}s while the tier "
                                            "fails (a tier bounds its own calls)")
        return out

    def expect(self, what: str, got, allowed_values: list, must_hit: bool) -> None:
        if got is None and not must_hit:
            return
        if not any(a is not None and same(got, a) for a in allowed_values):
            raise self.kit.fail(self.check, f"{what}: {_describe(got)}, not the newest acknowledged value"
                                            f"{'' if must_hit else ' or a miss'}")

    def run(self, ctx: ContextManager) -> str | None:
        """Inject the fault ``ctx`` makes into a store and judge it: None, or why it was skipped
        (the hook raised NotImplementedError when entered)."""
        import strata

        values = {_key(f"f{i}"): torch.full((256,), float(i)) for i in range(6)}
        fresh = {_key(f"n{i}"): torch.full((256,), 100.0 + i) for i in range(3)}
        chain = self.mode != "alone"
        with strata.open_store(self.cfg) as store:
            for k, v in values.items():
                if not store.put(k, v):
                    raise self.kit.fail(self.check, "a put before any fault was refused")
            store.flush()
            before = self.kit.fault_count(store)
            versions = {k: [v] for k, v in values.items()}  # what a read of each key may return
            doomed = next(iter(values))
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(ctx)
                except NotImplementedError as e:
                    return str(e) or "fault kind not supported"
                self.during(store, values, fresh, versions, doomed, chain)
                counted = self.kit.fault_count(store) - before
            if counted <= 0:
                raise self.kit.fail(self.check, f"the fault was never counted: no fault counter "
                                                f"({', '.join(FAULT_COUNTERS)}) in stats() rose")
            self.after(store, versions, doomed)
        return None

    def during(self, store, values: dict, fresh: dict, versions: dict, doomed, chain: bool) -> None:
        c = self.call
        for k, v in fresh.items():
            ok = c(f"put {k}", lambda: store.put(k, v))
            if chain and ok is not True:
                raise self.kit.fail(self.check, f"put {k}: refused although the cpu tier above had room")
            if ok:
                versions[k] = [v]
        newer = next(iter(list(values)[1:]))  # a new version of a stored key: its old one must not resurface
        v2 = torch.full((256,), -5.0)
        if c(f"put {newer} (a new version)", lambda: store.put(newer, v2)):
            versions[newer] = [v2]
        elif chain:
            raise self.kit.fail(self.check, f"put {newer}: refused although the cpu tier above had room")
        for k, allowed_values in versions.items():
            self.expect(f"get {k}", c(f"get {k}", lambda: store.get(k)), allowed_values, chain)
            out = torch.empty(256)
            ok = c(f"get_into {k}", lambda: store.get_into(k, out))
            self.expect(f"get_into {k}", out if ok else None, allowed_values, chain)
        keys = list(versions)
        for k, got in zip(keys, c("get_many", lambda: store.get_many(keys))):
            self.expect(f"get_many: {k}", got, versions[k], chain)
        have = c("contains_many", lambda: store.contains_many(keys))
        if not all(isinstance(h, bool) for h in have) or (chain and not all(have)):
            raise self.kit.fail(self.check, f"contains_many during the fault: {have}")
        for k in keys[:3]:
            # write-back: until the flusher (held up by the fault, maybe) reaches the tier, it may
            # still hold the version before the newest; any other value is wrong
            older = [values[k]] if self.mode == "back" and k in values else []
            self.expect(f"get {k} from tier {self.tier}", c("get (exact)", lambda: store.get(k, mode="exact",
                                                                                          tier=self.tier)),
                        versions[k] + older, False)
        if c(f"delete {doomed}", lambda: store.delete(doomed)):
            versions[doomed] = [None]  # the store said it is gone: it must stay gone
        else:
            self.undeleted = True  # the store said the delete failed: the old value may stay
        c("flush", store.flush)
        c("stats", store.stats)

    def after(self, store, versions: dict, doomed) -> None:
        """The fault is over: the tier takes and serves a put again (within a deadline, for tiers
        that back off), and never serves a value older than the newest put, nor a deleted one,
        before or (persistent tiers) after a restart."""
        import strata

        k, v = _key("after"), torch.full((256,), 42.0)
        deadline = time.monotonic() + 15
        while True:
            if store.put(k, v) and same(store.get(k, mode="exact", tier=self.tier), v):
                break
            if time.monotonic() > deadline:
                raise self.kit.fail(self.check, "15s after the fault ended the tier still does not take and "
                                                "serve a put")
            time.sleep(0.05)  # polling a tier's back-off, bounded by the deadline above
        store.flush()
        problems: list[str] = []
        self.judge(store, "", versions, doomed, problems)
        if self.kit.persistent:  # what the tier kept through the fault is what a restart serves
            store.close()
            with strata.open_store(self.cfg) as again:
                self.judge(again, "after a restart, ", versions, doomed, problems)
        if problems:
            raise self.kit.fail(self.check, "after the fault: " + "; ".join(problems))

    def judge(self, store, when: str, versions: dict, doomed, problems: list[str]) -> None:
        """Each key's reads are a miss or its newest acknowledged value; a key deleted (True) is gone."""
        for key, allowed_values in versions.items():
            for where, got in (("get", store.get(key)), (f"get from tier {self.tier}",
                                                         store.get(key, mode="exact", tier=self.tier))):
                if key == doomed and got is not None and not self.undeleted:
                    problems.append(f"{when}{where} {key}: deleted during the fault (delete returned True), "
                                    "served again")
                elif got is not None and not any(a is not None and same(got, a) for a in allowed_values):
                    problems.append(f"{when}{where} {key}: a value older than the newest acknowledged put")
