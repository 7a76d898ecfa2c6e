"""Fault injection over the store: what it loses, what it corrupts, what crashes it.

    python benchmarks/reliability.py [--quick] [--dir DIR]

Scenarios (each a function returning one row, see ``row``):

- ``enospc``: a 2 MiB tmpfs (mounted here, needs root) under a file tier of 64 MiB, filled by puts
  until the filesystem is full, then emptied a little; and a cxl region larger than the
  filesystem, opened in a child process (a ConfigError, never SIGBUS).
- ``eio``: EIO, short writes, short reads and flipped bytes injected at the file tier's I/O
  seam (``open`` in ``strata.store.tiers.file``) at seeded random moments.
- ``eio_at_open``: the same faults while a store opens (recovers) an existing file tier.
- ``read_only``: a file tier whose ``objects`` directory, then whole directory, becomes a
  read-only bind mount under a live store; then reopened read-only.
- ``sigkill_file`` / ``sigkill_cxl``: a writer process SIGKILLed at random moments, cycle
  after cycle; after each kill a fresh process opens the tier and reads every key.
- ``concurrent_file_N`` / ``concurrent_cxl_N``: N processes putting and reading one tier at
  once, each its own key range plus a shared one.
- ``redis_garbage``: a cpu + redis store over a fake Redis server (``benchmarks/fake_redis.py``)
  answering garbage, then well-formed RESP that holds no Strata value.

Every value is self-describing (``value_of``): its first bytes name its key, version and length,
and the rest is derived from them, so a read is checked exactly (``identify``) without knowing
which version to expect; the version is then checked against what was written. Child processes
fork from a forkserver that imported torch and strata once, so a cycle costs milliseconds, not
an interpreter start. Children register the namespace ``rel`` themselves; the process that checks
a tier after a crash opens it before registering it (as ``strata stats`` would), so a tier that
drops objects of namespaces the opener does not know shows up as lost objects.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import strata  # noqa: E402
from strata import Key  # noqa: E402

NS = "rel"  # the namespace of every object here; see the module docstring for who registers it
SCOPE = "fault"
FIELDS = ("scenario", "operations", "acknowledged_lost", "wrong_bytes", "crashes", "errors_counted")
_MAX_PROBLEMS = 20


class Unavailable(RuntimeError):
    """A scenario cannot run on this machine (no root to mount, no bind mounts): skip it, saying why."""


# -- values -------------------------------------------------------------------------------------


def value_of(name: str, version: str, length: int):
    """The value put as ``version`` of ``name``: bytes, a float32 vector or a 2-row int16 matrix (chosen
    by the version), whose first bytes are ``RV1|name|version|length|`` and the rest derived from them."""
    head = f"RV1|{name}|{version}|{length}|".encode()
    seed = int.from_bytes(hashlib.blake2b(head, digest_size=8).digest(), "little")
    raw = head + np.random.default_rng(seed).bytes(max(0, length - len(head)))
    kind = seed % 3
    if kind == 0:
        return raw
    raw += bytes(-len(raw) % 4)
    t = torch.frombuffer(bytearray(raw), dtype=torch.float32 if kind == 1 else torch.int16)
    return t.clone() if kind == 1 else t.reshape(2, -1).clone()


def raw_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return value.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def same(a, b) -> bool:
    """Equal type, dtype, shape and bytes (NaN payloads included: compared as bytes)."""
    if isinstance(a, bytes) or isinstance(b, bytes):
        return isinstance(a, bytes) and isinstance(b, bytes) and a == b
    return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)


def identify(name: str, got) -> str | None:
    """The version ``got`` is, if it is exactly a value put under ``name``; None for any other bytes
    (torn, another key's, garbage)."""
    try:
        parts = raw_bytes(got).split(b"|", 4)
        if len(parts) < 5 or parts[0] != b"RV1" or parts[1].decode() != name:
            return None
        version, length = parts[2].decode(), int(parts[3])
    except (ValueError, UnicodeDecodeError, TypeError, AttributeError):
        return None
    return version if same(got, value_of(name, version, length)) else None


def key(name: str) -> Key:
    return Key(NS, SCOPE, name)


def use_namespace() -> None:
    strata.register_namespace(NS)


# -- results ------------------------------------------------------------------------------------


def row(scenario: str, **counts) -> dict:
    """One scenario's result: the six FIELDS, ``seconds``, and up to 20 ``problems`` (what was lost,
    what was wrong, in words) for a failing test to show."""
    out = {"scenario": scenario, "operations": 0, "acknowledged_lost": 0, "wrong_bytes": 0, "crashes": 0,
           "errors_counted": 0, "seconds": 0.0, "problems": []}
    out.update(counts)
    return out


class Tally:
    """Counts and the first problems of one scenario."""

    def __init__(self, scenario: str):
        self.scenario, self.t0 = scenario, time.monotonic()
        self.ops = self.errors = 0
        self.counts = {"acknowledged_lost": 0, "wrong_bytes": 0, "crashes": 0}
        self.problems: list[str] = []

    def problem(self, what: str, text: str) -> None:
        """Count one ``what`` (acknowledged_lost, wrong_bytes, crashes, or errors: a fault that should
        have been counted and was not) and keep ``text`` among the first problems."""
        if what == "errors":
            self.counts["uncounted_errors"] = self.counts.get("uncounted_errors", 0) + 1
        else:
            self.counts[what] += 1
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(f"{what}: {text}")

    def result(self, **extra) -> dict:
        counts = dict(self.counts)
        uncounted = counts.pop("uncounted_errors", 0)
        return row(self.scenario, operations=self.ops, errors_counted=self.errors, uncounted_errors=uncounted,
                   seconds=round(time.monotonic() - self.t0, 2), problems=self.problems, **counts, **extra)


def tier_of(store, kind: str):
    return next(t for t in store.tiers if t.kind == kind)


def fault_counters(stats: dict) -> int:
    """Faults a tier counted: I/O errors and checksum failures."""
    return stats.get("errors", 0) + stats.get("checksum_failures", 0)


# -- mounts (root only) ---------------------------------------------------------------------------


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


def _umount(path: Path) -> None:
    if _run("umount", str(path)).returncode != 0:  # still busy (a failed test's open file): detach it
        _run("umount", "-l", str(path))


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m"):
    """A tmpfs of ``size`` mounted at ``path`` for the block, unmounted whatever happens."""
    path.mkdir(parents=True, exist_ok=True)
    got = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if got.returncode != 0:
        raise Unavailable(f"cannot mount a {size} tmpfs at {path} (needs root): {got.stderr.strip()}")
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` as a read-only bind mount of itself for the block (root ignores permission bits, so
    chmod proves nothing); unmounted whatever happens."""
    got = _run("mount", "--bind", str(path), str(path))
    if got.returncode != 0:
        raise Unavailable(f"cannot bind-mount {path} (needs root): {got.stderr.strip()}")
    try:
        got = _run("mount", "-o", "remount,ro,bind", str(path))
        if got.returncode != 0:
            raise Unavailable(f"cannot remount {path} read-only: {got.stderr.strip()}")
        try:
            (path / ".probe").touch()
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
        else:
            (path / ".probe").unlink()
            raise Unavailable(f"{path} stayed writable after a read-only remount")
        yield path
    finally:
        _umount(path)


# -- child processes ------------------------------------------------------------------------------

_ctx = None


def context():
    """A forkserver that imported torch and numpy once: children fork from it (milliseconds) and never
    inherit a parent's OpenMP or lock state. Each child imports strata itself (50 ms), after taking the
    parent's ``sys.path`` (the forkserver itself imports from the default one, which may find another
    copy of strata), so it runs the parent's code with a fresh namespace registry."""
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(["torch", "numpy", "yaml", "xxhash"])
    return _ctx


def _child(fn_name: str, args: tuple) -> None:
    torch.set_num_threads(1)
    fn = globals()[fn_name]
    fn(*args)


def start(fn, *args, **kw):
    """Start ``fn(*args)`` (a function of this module) in a child process."""
    p = context().Process(target=_child, args=(fn.__name__, args), daemon=True, **kw)
    p.start()
    return p


def finish(p, timeout: float = 120) -> int:
    """Join ``p`` (killed after ``timeout`` seconds as a safety bound); its exit code."""
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
    return p.exitcode


class AppendLog:
    """A line log that survives SIGKILL: one ``write`` system call per line, so a line is either
    whole in the file or absent."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def line(self, *parts: object) -> None:
        os.write(self.fd, (" ".join(map(str, parts)) + "\n").encode())


def read_log(path: str | Path) -> list[list[str]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [ln.split() for ln in text.splitlines(keepends=True) if ln.endswith("\n") and ln.strip()]


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _verifier(cfg: dict, names: list[str], out: str) -> None:
    """A fresh process: open the store (this namespace not yet registered), then read every name:
    its version, None (a miss) or "WRONG" (bytes that are no value ever put under it)."""
    store = strata.open_store(cfg)
    try:
        use_namespace()
        seen = {}
        for name in names:
            got = store.get(key(name))
            seen[name] = None if got is None else (identify(name, got) or "WRONG")
        stats = {t.name: t.stats() for t in store.tiers}
        tmp = [str(p) for t in store.tiers if t.kind == "file" for p in (Path(t.cfg.path) / "tmp").glob("*")]
    finally:
        store.close()
    _write_json(out, {"seen": seen, "stats": stats, "tmp_left": tmp})


def verify(cfg: dict, names: list[str], work: Path) -> dict | None:
    """What a fresh process reads under ``names`` (see ``_verifier``); None if it crashed."""
    out = work / f"verify-{time.monotonic_ns()}.json"
    p = start(_verifier, cfg, names, str(out))
    code = finish(p)
    if code != 0 or not out.exists():
        return None
    return json.loads(out.read_text())


def file_cfg(path: Path, capacity: str = "64MiB") -> dict:
    return {"tiers": [{"kind": "file", "path": str(path), "capacity": capacity}]}


def cxl_cfg(path: Path, size: str = "8MiB") -> dict:
    return {"tiers": [{"kind": "cxl", "path": str(path), "size": size}]}


# -- (a) ENOSPC -------------------------------------------------------------------------------------


def _open_cxl_region(path: str, size: str, out: str) -> None:
    """Open a cxl region of ``size`` and fill it; record whether the open was refused with a ConfigError."""
    use_namespace()
    try:
        store = strata.open_store({"tiers": [{"kind": "cxl", "path": path, "size": size}]})
    except strata.ConfigError as e:
        _write_json(out, {"refused": str(e)})
        return
    for i in range(64):  # past what the filesystem holds: without reserved space this is SIGBUS
        store.put(key(f"c{i}"), torch.zeros(1 << 16))
    store.close()
    _write_json(out, {"refused": None})


def enospc(work: Path, puts: int = 120, size: int = 64 << 10, seed: int = 1) -> dict:
    """Puts into a file tier (64 MiB) on a 2 MiB tmpfs under a cpu tier that holds everything: no put
    raises, every acknowledged put reads back, every object the file tier lists reads back whole, and
    the tier takes puts again once space is freed. A file-only store on the full filesystem: puts are
    refused (False), and every one acknowledged survives a reopen. A cxl region of 8 MiB there: a
    ConfigError at open in a child (never SIGBUS)."""
    t = Tally("enospc")
    rng = random.Random(seed)
    use_namespace()
    with tmpfs(work / "enospc", "2m") as mnt:
        _enospc_cxl(t, mnt, work)
        (mnt / "region").unlink(missing_ok=True)  # what a killed opener left: the file tier gets the whole fs
        _enospc_file(t, mnt / "tier", puts, size, rng)
    return t.result()


def _enospc_cxl(t: Tally, mnt: Path, work: Path) -> None:
    out = work / "enospc-cxl.json"
    code = finish(start(_open_cxl_region, str(mnt / "region"), "8MiB", str(out)))
    t.ops += 1
    if code != 0:
        sig = f" ({signal.Signals(-code).name})" if code < 0 else ""
        t.problem("crashes", f"opening an 8 MiB cxl region on a 2 MiB tmpfs: exit code {code}{sig}")
    elif not json.loads(out.read_text())["refused"]:
        t.problem("crashes", "an 8 MiB cxl region on a 2 MiB tmpfs was opened instead of refused")
    else:
        t.errors += 1  # the refusal: a ConfigError naming the size


def _enospc_file(t: Tally, root: Path, puts: int, size: int, rng: random.Random) -> None:
    cfg = {"tiers": [{"kind": "cpu", "capacity": "256MiB"}, {"kind": "file", "path": str(root), "capacity": "64MiB"}]}
    acked: dict[str, str] = {}  # name -> version of the last put that returned True
    tried: set[tuple[str, str]] = set()  # (name, version) of every put
    with strata.open_store(cfg) as store:
        ft = tier_of(store, "file")
        for i in range(puts):
            name = f"k{rng.randrange(puts * 3 // 4)}"
            _put(t, store, name, str(i), rng.randint(size // 2, size), acked, tried)
        if not ft.counters.errors:
            t.problem("crashes", f"{puts} puts of up to {size} bytes never filled the 2 MiB filesystem")
        _check_acked(t, store, acked, "after the filesystem filled")
        _check_listed(t, store, "file", tried)
        # free room: the tier must take puts again
        freed = list(ft.index)[: len(ft.index) // 2]
        for k in freed:
            store.delete(Key.decode(k))
            acked.pop(Key.decode(k).name, None)
        before = ft.counters.puts
        for i in range(puts, puts + 4):
            _put(t, store, f"again{i}", str(i), size // 4, acked, tried)
        if freed and ft.counters.puts == before:
            t.problem("acknowledged_lost", "after deletes freed space the file tier took no put")
        _check_acked(t, store, acked, "after space was freed")
        t.errors += fault_counters(ft.stats())
    # a file-only store on the (again) full filesystem: refused, never raised; acknowledged is durable
    file_only = file_cfg(root)
    durable: dict[str, str] = {}
    with strata.open_store(file_only) as store:
        for name, ver in _names_in(store, "file"):
            durable[name] = ver
        for i in range(puts + 4, puts + 4 + puts // 2):
            _put(t, store, f"f{i}", str(i), size, durable, tried)
        t.errors += fault_counters(tier_of(store, "file").stats())
    left = list((root / "tmp").iterdir())
    if left:
        t.problem("errors", f"{len(left)} temporary files left in {root / 'tmp'} by failed puts")
    with strata.open_store(file_only) as store:
        _check_acked(t, store, durable, "after reopening the full file tier")


def _put(t: Tally, store, name: str, version: str, length: int, acked: dict, tried: set) -> bool:
    """One put; an exception is a crash. True puts become the name's expected version."""
    t.ops += 1
    tried.add((name, version))
    try:
        ok = store.put(key(name), value_of(name, version, length))
    except Exception as e:  # noqa: BLE001 - any exception out of put is what this counts
        t.problem("crashes", f"put {name} v{version} raised {type(e).__name__}: {e}")
        return False
    if ok:
        acked[name] = version
    return ok


def _get(t: Tally, store, name: str, **kw):
    """One get: the version read, None on a miss, "WRONG" for other bytes, "RAISED" for an exception."""
    t.ops += 1
    try:
        got = store.get(key(name), **kw)
    except Exception as e:  # noqa: BLE001
        t.problem("crashes", f"get {name} raised {type(e).__name__}: {e}")
        return "RAISED"
    return None if got is None else (identify(name, got) or "WRONG")


def _check_acked(t: Tally, store, acked: dict, when: str) -> None:
    for name, ver in acked.items():
        got = _get(t, store, name)
        if got == "WRONG":
            t.problem("wrong_bytes", f"{name} {when}: bytes of no version")
        elif got != ver and got != "RAISED":
            t.problem("acknowledged_lost", f"{name} {when}: acknowledged v{ver}, read {got!r}")


def _names_in(store, kind: str):
    """(name, version) of every object tier ``kind`` lists, read from that tier alone."""
    tier = tier_of(store, kind)
    for k in list(tier.index):
        name = Key.decode(k).name
        got = store.get(key(name), mode="exact", tier=tier.name)
        ver = None if got is None else identify(name, got)
        if ver is not None:
            yield name, ver


def _check_listed(t: Tally, store, kind: str, tried: set) -> None:
    """Every object tier ``kind`` lists reads back from it whole, as a version put under its key."""
    tier = tier_of(store, kind)
    for k in list(tier.index):
        name = Key.decode(k).name
        got = _get(t, store, name, mode="exact", tier=tier.name)
        if got == "WRONG":
            t.problem("wrong_bytes", f"{name} listed by the {kind} tier reads back as bytes of no version")
        elif got is None:
            t.problem("acknowledged_lost", f"{name} listed by the {kind} tier does not read back")
        elif got != "RAISED" and (name, got) not in tried:
            t.problem("wrong_bytes", f"{name} listed by the {kind} tier holds v{got}, which was never put")


# -- (b) EIO, short reads and writes at the file tier's I/O seam --------------------------------------


class Faults:
    """Seeded fault decisions. ``rate`` is the chance that one I/O call fails; ``kinds`` which faults:
    eio (the call raises EIO), short_write (a prefix is written and the count returned), short_write_eio
    (a prefix is written, then EIO: what a buffered file does when the disk fills), short_read (a
    prefix is read and the count returned), flip (a read returns one byte changed), open_eio."""

    ALL = ("eio", "short_write", "short_write_eio", "short_read", "flip", "open_eio")

    def __init__(self, seed: int, rate: float, kinds=ALL):
        self.rng, self.rate, self.kinds = random.Random(seed), rate, tuple(kinds)
        self.on = True
        self.injected: dict[str, int] = {}

    def pick(self, allowed: tuple[str, ...]) -> str | None:
        choices = [k for k in self.kinds if k in allowed]
        if not self.on or not choices or self.rng.random() >= self.rate:
            return None
        k = self.rng.choice(choices)
        self.injected[k] = self.injected.get(k, 0) + 1
        return k


def _eio(what: str) -> OSError:
    return OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected: {what})")


class FaultyFile:
    """A file object whose write, read and readinto fail as ``Faults`` decides."""

    def __init__(self, f, faults: Faults):
        self._f, self._faults = f, faults

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False

    def __iter__(self):
        return iter(self._f)

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        fault = self._faults.pick(("eio", "short_write", "short_write_eio"))
        if fault == "eio":
            raise _eio("write")
        if fault in ("short_write", "short_write_eio") and len(mv) > 1:
            n = self._faults.rng.randrange(1, len(mv))
            self._f.write(mv[:n])
            if fault == "short_write_eio":
                raise _eio("write after a partial write")
            return n
        return self._f.write(b)

    def read(self, n: int = -1) -> bytes:
        fault = self._faults.pick(("eio", "short_read", "flip"))
        if fault == "eio":
            raise _eio("read")
        data = self._f.read(n)
        if fault == "short_read" and len(data) > 1:
            return data[: self._faults.rng.randrange(1, len(data))]
        if fault == "flip" and data:
            i = self._faults.rng.randrange(len(data))
            data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]
        return data

    def readinto(self, buf) -> int:
        fault = self._faults.pick(("eio", "short_read", "flip"))
        if fault == "eio":
            raise _eio("readinto")
        mv = memoryview(buf).cast("B")
        if fault == "short_read" and len(mv) > 1:
            return self._f.readinto(mv[: self._faults.rng.randrange(1, len(mv))])
        n = self._f.readinto(mv)
        if fault == "flip" and n:
            i = self._faults.rng.randrange(n)
            mv[i] ^= 0x5A
        return n


@contextlib.contextmanager
def faulty_open(faults: Faults):
    """``open`` in ``strata.store.tiers.file`` replaced by one whose files fail as ``faults`` decides;
    restored afterwards (a test may use pytest's monkeypatch the same way)."""
    import builtins

    from strata.store.tiers import file as mod

    missing = object()
    before = mod.__dict__.get("open", missing)
    real = builtins.open

    def fake(path, mode="r", *args, **kw):
        if faults.pick(("open_eio",)):
            raise _eio(f"open {path}")
        return FaultyFile(real(path, mode, *args, **kw), faults)

    mod.open = fake
    try:
        yield faults
    finally:
        if before is missing:
            del mod.open
        else:
            mod.open = before


def eio(work: Path, ops: int = 600, keys: int = 40, rate: float = 0.15, seed: int = 2,
        kinds: tuple[str, ...] = Faults.ALL) -> dict:
    """A file-only store under injected faults. Phase 1, write faults only: every put returns a bool,
    and with the faults off every acknowledged put reads back exactly (acknowledged == durable).
    Phase 2, read and write faults, puts and gets mixed: every get returns the last acknowledged
    version or None (a fault is a miss), never an exception or other bytes. Phase 3, faults off:
    every object the tier lists reads back whole. Faults counted in the tier's stats."""
    t = Tally("eio")
    use_namespace()
    rng = random.Random(seed)
    cfg = file_cfg(work / "eio")
    acked: dict[str, str] = {}
    tried: set[tuple[str, str]] = set()  # (name, version) of every put
    injected: dict[str, int] = {}
    with strata.open_store(cfg) as store:
        ft = tier_of(store, "file")
        wfaults = Faults(seed, rate, [k for k in kinds if k in ("eio", "short_write", "short_write_eio", "open_eio")])
        with faulty_open(wfaults):
            for i in range(ops // 2):
                _put(t, store, f"k{rng.randrange(keys)}", str(i), rng.randint(16, 20_000), acked, tried)
        _check_acked(t, store, acked, "written under write faults, read without faults")
        faults = Faults(seed + 1, rate, kinds)
        with faulty_open(faults):
            for i in range(ops // 2, ops):
                name = f"k{rng.randrange(keys)}"
                if rng.random() < 0.4:
                    _put(t, store, name, str(i), rng.randint(16, 20_000), acked, tried)
                    continue
                got = _get(t, store, name)
                if got == "WRONG":
                    t.problem("wrong_bytes", f"{name}: bytes of no version under faults")
                elif got not in (None, "RAISED") and got != acked.get(name):
                    t.problem("wrong_bytes", f"{name}: read v{got} under faults, last acknowledged "
                                             f"v{acked.get(name)}")
        _check_listed(t, store, "file", tried)
        t.errors += fault_counters(ft.stats())
        for f in (wfaults, faults):
            for k, n in f.injected.items():
                injected[k] = injected.get(k, 0) + n
    if not injected:
        t.problem("crashes", "no fault was injected: the file tier no longer opens files through "
                             "strata.store.tiers.file.open, so this scenario tests nothing")
    return t.result(injected=injected)


def eio_at_open(work: Path, objects: int = 60, rate: float = 0.3, seed: int = 3,
                kinds: tuple[str, ...] = ("eio", "open_eio")) -> dict:
    """A file tier with ``objects`` acknowledged objects is opened (recovered) while its reads fail
    (EIO, short reads): opening must not raise, and once the faults stop a reopened store still
    reads every object back. A transient read error while scanning is no evidence that an object
    is corrupt, so it must not delete it."""
    t = Tally("eio_at_open")
    use_namespace()
    rng = random.Random(seed)
    cfg = file_cfg(work / "eio-open")
    acked: dict[str, str] = {}
    tried: set[tuple[str, str]] = set()  # (name, version) of every put
    with strata.open_store(cfg) as store:
        for i in range(objects):
            _put(t, store, f"k{i}", str(i), rng.randint(16, 20_000), acked, tried)
    faults = Faults(seed, rate, kinds)
    with faulty_open(faults):
        for _ in range(3):
            t.ops += 1
            try:
                with strata.open_store(cfg) as store:
                    s = tier_of(store, "file").stats()
                    t.errors += fault_counters(s) + s.get("discarded", 0)
            except Exception as e:  # noqa: BLE001
                t.problem("crashes", f"opening under read faults raised {type(e).__name__}: {e}")
    with strata.open_store(cfg) as store:
        _check_acked(t, store, acked, "after opens under read faults")
        t.errors += fault_counters(tier_of(store, "file").stats())
    return t.result(injected=dict(faults.injected))


# -- (c) read-only directory ------------------------------------------------------------------------


def readonly(work: Path, puts: int = 60, seed: int = 4) -> dict:
    """A live cpu+file store whose file tier's ``objects`` directory, then whole directory, turns into
    a read-only bind mount: puts return True (the cpu copy serves), never raise; every acknowledged
    put reads back; deletes do not raise; objects written before still read from the file tier.
    Reopened read-only, it opens and serves what it holds, and refuses puts."""
    t = Tally("read_only")
    use_namespace()
    rng = random.Random(seed)
    root = work / "ro" / "tier"
    cfg = {"tiers": [{"kind": "cpu", "capacity": "256MiB"}, {"kind": "file", "path": str(root), "capacity": "64MiB"}]}
    acked: dict[str, str] = {}
    tried: set[tuple[str, str]] = set()  # (name, version) of every put
    with strata.open_store(cfg) as store:
        ft = tier_of(store, "file")
        for i in range(puts // 3):
            _put(t, store, f"old{i}", str(i), rng.randint(16, 20_000), acked, tried)
        for phase, target in (("objects", root / "objects"), ("root", root)):
            errors = ft.counters.errors
            with read_only(target):
                for i in range(puts // 3):
                    name = f"{phase}{i}" if i % 2 else f"old{i}"  # new keys and overwrites
                    if not _put(t, store, name, f"{phase}.{i}", rng.randint(16, 20_000), acked, tried):
                        t.problem("acknowledged_lost", f"put {name} returned False with a cpu tier to take it")
                _check_acked(t, store, acked, f"with the {phase} directory read-only")
                _check_listed(t, store, "file", tried)
                victim = f"old{puts // 3 - 1}"
                t.ops += 1
                try:
                    store.delete(key(victim))
                    acked.pop(victim, None)
                except Exception as e:  # noqa: BLE001
                    t.problem("crashes", f"delete {victim} raised {type(e).__name__}: {e}")
            if ft.counters.errors == errors:
                t.problem("errors", f"no error counted while the {phase} directory was read-only")
        t.errors += fault_counters(ft.stats())
    with read_only(root):
        t.ops += 1
        try:
            store = strata.open_store(file_cfg(root))
        except Exception as e:  # noqa: BLE001
            t.problem("crashes", f"opening a read-only file tier raised {type(e).__name__}: {e}")
        else:
            with store:
                _check_listed(t, store, "file", tried)
                t.ops += 1
                try:
                    if store.put(key("late"), b"x" * 100):
                        t.problem("wrong_bytes", "a put into a read-only file-only store returned True")
                except Exception as e:  # noqa: BLE001
                    t.problem("crashes", f"put into a read-only file-only store raised {type(e).__name__}: {e}")
                t.errors += fault_counters(tier_of(store, "file").stats())
    return t.result()


# -- (d) SIGKILL of a writer ---------------------------------------------------------------------------


def _kill_writer(cfg: dict, log: str, names: list[str], first: int, seed: int, sizes: tuple, ready) -> None:
    """Put (and sometimes delete) forever, logging each op before it starts and after it returns."""
    use_namespace()
    store = strata.open_store(cfg)
    out = AppendLog(log)
    rng = random.Random(seed)
    ready.set()
    v = first
    while True:
        name = rng.choice(names)
        if rng.random() < 0.1:
            out.line("S", name, "-")
            store.delete(key(name))
            out.line("d", name, "-")
            continue
        length = rng.randint(*sizes)
        out.line("s", name, v, length)
        ok = store.put(key(name), value_of(name, str(v), length))
        out.line("a" if ok else "f", name, v)
        v += 1


class Model:
    """Per key: the state a reader must see (the last acknowledged version, or None once deleted or
    never put) and every version ever started."""

    def __init__(self):
        self.latest: dict[str, str | None] = {}
        self.started: dict[str, set[str]] = {}

    def replay(self, lines: list[list[str]]) -> tuple[str, str | None] | None:
        """Apply a writer's log; the op it was killed in, if any: (name, version or None for a delete)."""
        pending = None
        for ln in lines:
            op, name, ver = ln[0], ln[1], ln[2]
            if op == "s":
                self.started.setdefault(name, set()).add(ver)
                pending = (name, ver)
            elif op == "S":
                pending = (name, None)
            elif op == "a":
                self.latest[name], pending = ver, None
            elif op == "d":
                self.latest[name], pending = None, None
            elif op == "f":
                pending = None
        return pending

    def check(self, t: Tally, name: str, seen, pending, when: str) -> None:
        """``seen`` (a version, None, or "WRONG") against the model; the model then follows it."""
        want = self.latest.get(name)
        allowed = {want} | ({pending[1]} if pending and pending[0] == name else set())
        if seen == "WRONG":
            t.problem("wrong_bytes", f"{name} {when}: bytes of no version")
        elif seen in allowed:
            self.latest[name] = seen
            return
        elif seen is None:
            t.problem("acknowledged_lost", f"{name} {when}: acknowledged v{want} is gone")
        elif seen in self.started.get(name, ()):
            what = f"acknowledged v{want} lost to older" if want is not None else "deleted, came back as"
            t.problem("acknowledged_lost" if want is not None else "wrong_bytes", f"{name} {when}: {what} v{seen}")
        else:
            t.problem("wrong_bytes", f"{name} {when}: v{seen} was never put")
        self.latest[name] = None if seen == "WRONG" else seen


def sigkill(work: Path, kind: str = "file", cycles: int = 20, keys: int = 24, seed: int = 5,
            max_wait: float = 0.35) -> dict:
    """A writer process on one tier (``file`` or ``cxl``, nothing above it, so an acknowledged put is
    durable) SIGKILLed at a random moment, ``cycles`` times. After each kill a fresh process opens the
    tier and reads every key: it must read the last acknowledged version (or the one in flight at the
    kill), never a lost one, never other bytes."""
    t = Tally(f"sigkill_{kind}")
    rng = random.Random(seed)
    base = work / f"sigkill-{kind}"
    base.mkdir(parents=True, exist_ok=True)
    cfg = file_cfg(base / "tier") if kind == "file" else cxl_cfg(base / "region", "8MiB")
    names = [f"k{i}" for i in range(keys)]
    model, first = Model(), 0
    mid_op = 0  # kills that landed inside a put or delete
    sizes = (64, 96 << 10) if kind == "file" else (64, 48 << 10)
    for cycle in range(cycles):
        log = base / f"writer-{cycle}.log"
        ready = context().Event()
        p = start(_kill_writer, cfg, str(log), names, first, rng.randrange(1 << 30), sizes, ready)
        if not ready.wait(120):
            t.problem("crashes", f"cycle {cycle}: the writer never opened the store (exit code {p.exitcode})")
            finish(p, 0)
            continue
        time.sleep(rng.uniform(0.0, max_wait))  # the random moment of the kill
        p.kill()
        code = finish(p)
        if p.exitcode != -signal.SIGKILL:
            t.problem("crashes", f"cycle {cycle}: the writer died before the kill (exit code {code})")
        lines = read_log(log)
        pending = model.replay(lines)
        mid_op += pending is not None
        t.ops += sum(ln[0] in "ad" for ln in lines)
        first = max([first] + [int(ln[2]) + 1 for ln in lines if ln[0] == "s"])
        got = verify(cfg, names, base)
        if got is None:
            t.problem("crashes", f"cycle {cycle}: the fresh opener crashed")
            continue
        t.ops += len(names)
        for name in names:
            model.check(t, name, got["seen"][name], pending, f"after kill {cycle}")
        t.errors += sum(fault_counters(s) for s in got["stats"].values())
        if cycle == cycles - 1 and got["tmp_left"]:
            t.problem("errors", f"{len(got['tmp_left'])} temporary files of dead writers left after a reopen")
    return t.result(kills_mid_op=mid_op)


# -- (e) several processes on one tier --------------------------------------------------------------


def _mix_worker(cfg: dict, me: int, own: list[str], shared: list[str], ops: int, seed: int, log: str,
                out: str, go) -> None:
    """Puts and gets over this worker's own keys and the shared ones. A read of an own key must be its
    last acknowledged version (nobody else writes it); a read of a shared key must be a whole value of
    that key (which writer's version, the parent checks against every writer's log)."""
    use_namespace()
    rng = random.Random(seed)
    res = {"ops": 0, "wrong": [], "lost": [], "shared_reads": [], "cross": 0, "errors": 0}
    with strata.open_store(cfg) as store:
        lg = AppendLog(log)
        mine: dict[str, str] = {}
        go.wait(60)  # every worker has opened the store: they run at once
        for i in range(ops):
            r = rng.random()
            name = rng.choice(own) if r < 0.6 else rng.choice(shared)
            res["ops"] += 1
            if r < 0.35 or 0.6 <= r < 0.75:
                ver = f"{me}.{i}"
                length = rng.randint(64, 24_000)
                lg.line("s", name, ver, length)
                ok = store.put(key(name), value_of(name, ver, length))
                lg.line("a" if ok else "f", name, ver)
                if ok and name in own:
                    mine[name] = ver
                continue
            got = store.get(key(name))
            seen = None if got is None else (identify(name, got) or "WRONG")
            if seen == "WRONG":
                res["wrong"].append(f"{name}: bytes of no version")
            elif name in own and seen != mine.get(name):
                (res["lost"] if seen is None or mine.get(name) is not None else res["wrong"]).append(
                    f"{name}: acknowledged v{mine.get(name)}, read v{seen}")
            elif name in shared and seen is not None:
                res["shared_reads"].append([name, seen])
                res["cross"] += not seen.startswith(f"{me}.")
        res["errors"] = sum(fault_counters(t.stats()) for t in store.tiers)
    _write_json(out, res)


def concurrent(work: Path, kind: str = "file", procs: int = 2, ops: int = 400, own: int = 12, shared: int = 6,
               seed: int = 6) -> dict:
    """``procs`` processes on one tier at once (see ``_mix_worker``); all must exit 0, and a fresh
    opener afterwards reads every own key's last acknowledged version and a whole, once-written value
    (or nothing, if none was acknowledged) under every shared key."""
    t = Tally(f"concurrent_{kind}_{procs}")
    rng = random.Random(seed)
    base = work / f"concurrent-{kind}-{procs}"
    base.mkdir(parents=True, exist_ok=True)
    cfg = file_cfg(base / "tier") if kind == "file" else cxl_cfg(base / "region", "16MiB")
    shared_names = [f"s{j}" for j in range(shared)]
    owns = [[f"p{w}-{j}" for j in range(own)] for w in range(procs)]
    go = context().Barrier(procs)
    ps = [start(_mix_worker, cfg, w, owns[w], shared_names, ops, rng.randrange(1 << 30), str(base / f"w{w}.log"),
                str(base / f"w{w}.json"), go) for w in range(procs)]
    codes = [finish(p, 600) for p in ps]
    model = Model()
    logs = [read_log(base / f"w{w}.log") for w in range(procs)]
    started: dict[str, set[str]] = {}
    for ln in (ln for lines in logs for ln in lines if ln[0] == "s"):
        started.setdefault(ln[1], set()).add(ln[2])
    cross = 0  # shared reads that returned another worker's version
    for w in range(procs):
        model.replay([ln for ln in logs[w] if ln[1] in owns[w]])
        if codes[w] != 0 or not (base / f"w{w}.json").exists():
            t.problem("crashes", f"worker {w} exited with {codes[w]}")
            continue
        res = json.loads((base / f"w{w}.json").read_text())
        t.ops += res["ops"]
        t.errors += res["errors"]
        cross += res["cross"]
        for p in res["wrong"]:
            t.problem("wrong_bytes", f"worker {w}: {p}")
        for p in res["lost"]:
            t.problem("acknowledged_lost", f"worker {w}: {p}")
        for name, ver in res["shared_reads"]:
            if ver not in started.get(name, ()):
                t.problem("wrong_bytes", f"worker {w}: {name} read v{ver}, which no worker put")
    acked_shared = {ln[1] for lines in logs for ln in lines if ln[0] == "a" and ln[1] in shared_names}
    all_names = [n for o in owns for n in o] + shared_names
    got = verify(cfg, all_names, base)
    if got is None:
        t.problem("crashes", "the fresh opener crashed")
        return t.result()
    t.ops += len(all_names)
    t.errors += sum(fault_counters(s) for s in got["stats"].values())
    for name in all_names[: -shared or None]:
        model.check(t, name, got["seen"][name], None, "after all workers exited")
    for name in shared_names:
        seen = got["seen"][name]
        if seen == "WRONG" or (seen is not None and seen not in started.get(name, ())):
            t.problem("wrong_bytes", f"{name} after all workers exited: read {seen!r}")
        elif seen is None and name in acked_shared:
            t.problem("acknowledged_lost", f"{name} after all workers exited: acknowledged by some worker, gone")
    return t.result(cross_process_reads=cross)


# -- (f) a Redis server that answers garbage ----------------------------------------------------------


def redis_garbage(work: Path, steps: int = 200, seed: int = 7) -> dict:
    """A cpu (32 KiB) + redis store over a fake server (``benchmarks/fake_redis.py``) that answers
    garbage (junk, RESP of the wrong shape, cut replies, closed connections, silence), then over
    one that answers well-formed RESP whose GETs hold no Strata value of the key asked for;
    ``steps`` random calls each (puts, gets, contains, get_many, lease_many, deletes), the redis
    tier's back-off off so every call reaches the server. Nothing the server says is durable, so
    "acknowledged lost" here counts what "wrong bytes" counts: reads that served bytes other than
    the last value put under that key (or an answer of the wrong shape). Crashes: an exception out
    of a store call, a call past ``fake_redis.CALL_BOUND_S``, a hang. ``work`` is unused (no files)."""
    try:
        import redis  # noqa: F401 - the redis tier's client; without it there is no redis tier
    except ImportError as e:
        raise Unavailable(f"the redis client package is not installed ({e})") from e
    import fake_redis

    t = Tally("redis_garbage")
    findings = fake_redis.Findings(record=t.problem)
    extra = {"redis_hits": 0, "slowest_call_s": 0.0}
    with fake_redis.every_call_asks_the_server(), _quiet("strata.chain", "strata.redis"):
        for answer in (fake_redis.garbage, fake_redis.wellformed):
            server = fake_redis.FakeRedis(answer, seed)
            try:
                seen, stats = fake_redis.exercise(server, seed, steps, findings)
            finally:
                server.stop()
            _redis_garbage_counts(t, answer.__name__, server, seen, stats, extra)
    t.counts["acknowledged_lost"] = t.counts["wrong_bytes"]
    return t.result(**extra)


@contextlib.contextmanager
def _quiet(*loggers: str):
    """``loggers`` at ERROR for the block: the store warns once per fault of the redis tier,
    thousands of lines here, and the row already counts them (errors counted)."""
    logs = [logging.getLogger(name) for name in loggers]
    before = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, before):
            log.setLevel(level)


def _redis_garbage_counts(t: Tally, answerer: str, server, seen: dict | None, stats: dict | None,
                          extra: dict) -> None:
    """One server's run into the row: calls made, faults the redis tier counted, and a problem where
    the run proved nothing (the server never answered) or a fault went uncounted."""
    if seen is None or stats is None:
        return  # the run crashed before it finished: already a crash in the row
    t.ops += seen["calls"]
    t.errors += fault_counters(stats)
    extra["redis_hits"] += stats.get("hits", 0)
    extra["slowest_call_s"] = max(extra["slowest_call_s"], round(seen["slowest_s"], 2))
    if not server.replies:
        t.problem("crashes", f"the {answerer} server never answered: this run tested nothing")
    counted = stats.get("errors", 0) if answerer == "garbage" else stats.get("checksum_failures", 0)
    if not counted:
        what = "errors" if answerer == "garbage" else "checksum failures"
        t.problem("errors", f"the redis tier counted no {what} against the {answerer} server")


# -- all of them --------------------------------------------------------------------------------------


def scenarios(quick: bool) -> list[tuple[str, object]]:
    """(name, call(work)) of every scenario, at CI sizes (quick) or larger ones."""
    s = 1 if quick else 5
    out = [
        ("enospc", lambda w: enospc(w, puts=120 if quick else 400)),
        ("eio", lambda w: eio(w, ops=600 * s)),
        ("eio_at_open", lambda w: eio_at_open(w, objects=60 * s)),
        ("read_only", lambda w: readonly(w, puts=60 * s)),
        ("sigkill_file", lambda w: sigkill(w, "file", cycles=20 * s)),
        ("sigkill_cxl", lambda w: sigkill(w, "cxl", cycles=20 * s)),
    ]
    for kind in ("file", "cxl"):
        for n in (2, 4):
            out.append((f"concurrent_{kind}_{n}", lambda w, k=kind, n=n: concurrent(w, k, n, ops=400 * s)))
    out.append(("redis_garbage", lambda w: redis_garbage(w, steps=200 * s)))
    return out


def table(rows: list[dict]) -> str:
    head = "| scenario | operations | acknowledged lost | wrong bytes | crashes | errors counted | seconds |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['scenario']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['scenario']} | {r['operations']} | {r['acknowledged_lost']} | {r['wrong_bytes']} | "
                     f"{r['crashes']} | {r['errors_counted']} | {r['seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the sizes the tests use")
    ap.add_argument("--dir", help="work directory (default: a new temporary one)")
    ap.add_argument("--only", help="comma-separated scenario names")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, run in scenarios(args.quick):
            if only and name not in only:
                continue
            work = Path(tmp) / name
            work.mkdir()
            try:
                r = run(work)
            except Unavailable as e:
                r = row(name, skipped=str(e))
            except Exception:  # noqa: BLE001 - a scenario that blows up is a crash row, and the rest still run
                r = row(name, crashes=1, problems=[traceback.format_exc()])
            rows.append(r)
            print(f"{name}: done in {r['seconds']} s", file=sys.stderr, flush=True)
            for p in r["problems"]:
                print(f"  {p}", file=sys.stderr)
    print(table(rows))
    return 1 if any(r["acknowledged_lost"] or r["wrong_bytes"] or r["crashes"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
