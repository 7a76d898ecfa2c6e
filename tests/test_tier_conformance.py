"""Every built-in tier passes the conformance kit (``strata.testing.check_tier``, issue #19): the
property test against a dict (alone and under a cpu tier in both write modes), damage through
the tier's own storage, injected faults, and capacity. One test per tier and check group, so a
failure names both."""

import contextlib
import errno
import hashlib
import os
import signal
import uuid
from pathlib import Path

import pytest

from strata.testing import check_tier

CHECKS = ("model", "damage", "faults", "capacity")


# -- cpu: memory only: no storage outside the process to damage, no I/O to fail -------------------


def cpu_tier(workdir, capacity=None):
    return {"kind": "cpu", "capacity": capacity or "1MiB", "pin": "never"}


# -- cxl: a region file; its records are reached through the slot table ------------------------------


def cxl_tier(workdir, capacity=None):
    tier = {"kind": "cxl", "path": str(Path(workdir) / "region"), "size": "8MiB", "pin": "never"}
    return {**tier, "capacity": capacity} if capacity else tier


class CxlRaw:
    """The committed record of a key in a region file (Strata's header, then the payload), found
    through the slot table as a second process would; written in place, at its own length only."""

    def __init__(self, tier):
        self.path = tier["path"]

    def _find(self, key: bytes) -> tuple[int, int] | None:
        from strata.store.codec import CorruptObject, unpack_header
        from strata.store.tiers import cxl_region as cxl

        with open(self.path, "rb") as f:
            region = f.read()
        _, _, _, _, nslots, _ = cxl.SUPER.unpack_from(region)
        best = None
        for i in range(nslots):
            commit, off, length, seq = cxl.SLOT.unpack_from(region, cxl.SLOTS_AT + i * cxl.SLOT.size)
            if commit == 0 or commit != cxl.commit_word(off, length, seq):
                continue
            try:
                got, _ = unpack_header(region[off: off + min(length, 1 << 16)])
            except CorruptObject:
                continue
            if got == key and (best is None or seq > best[2]):
                best = (off, length, seq)
        return None if best is None else best[:2]

    def get(self, key):
        at = self._find(key)
        if at is None:
            return None
        with open(self.path, "rb") as f:
            f.seek(at[0])
            return f.read(at[1])

    def set(self, key, value):
        off, length = self._find(key)
        if len(value) != length:
            raise NotImplementedError("a cxl record's length is fixed in its slot: a value of another length "
                                      "cannot be placed in it")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, value, off)
        finally:
            os.close(fd)


# -- file: one file per object, named by the key's digest ---------------------------------------------


def file_tier(workdir, capacity=None):
    return {"kind": "file", "path": str(Path(workdir) / "tier"), "capacity": capacity or "16MiB"}


class FileRaw:
    """A key's newest object file (``objects/<digest[:2]>/<digest>-<version>.obj``)."""

    def __init__(self, tier):
        self.objects = Path(tier["path"]) / "objects"

    def _path(self, key: bytes) -> Path | None:
        digest = hashlib.sha256(key).hexdigest()
        found = sorted((self.objects / digest[:2]).glob(f"{digest}-*.obj"))
        return found[-1] if found else None

    def get(self, key):
        path = self._path(key)
        return None if path is None else path.read_bytes()

    def set(self, key, value):
        self._path(key).write_bytes(value)


@contextlib.contextmanager
def file_fault(tier, kind):
    """Every file the file tier opens fails: EIO, or a timeout (as a network filesystem's)."""
    from strata.store.tiers import file as mod

    def failing_open(path, *args, **kw):
        if kind == "error":
            raise OSError(errno.EIO, "injected I/O error", str(path))
        raise TimeoutError(errno.ETIMEDOUT, "injected timeout", str(path))

    mod.open = failing_open  # shadows the builtin in that module only
    try:
        yield
    finally:
        del mod.open


# -- redis: a server of this module's own, so faults (stopped, hung) touch no other test -------------


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    from redis_server import RedisServer, need_redis

    need_redis()
    server = RedisServer(tmp_path_factory.mktemp("conformance-redis")).start()
    yield server
    server.stop()


def redis_kit(server):
    from redis_server import PrefixedRaw

    def redis_tier(workdir, capacity=None):
        return {"kind": "redis", "url": server.url, "key_prefix": f"conf-{uuid.uuid4().hex}:",
                "timeout_ms": 1000}  # generous: a loaded machine must not look like a fault

    def raw(tier):
        return PrefixedRaw(server.client(), tier)

    @contextlib.contextmanager
    def redis_fault(tier, kind):
        """error: the server is killed (and started again, empty, after); timeout: it hangs (SIGSTOP)."""
        if kind == "error":
            server.stop()
            try:
                yield
            finally:
                server.start()
        else:
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                yield
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)

    return dict(make_tier=redis_tier, persistent=True, raw=raw, fault=redis_fault)


KITS = {
    "cpu": lambda: dict(make_tier=cpu_tier, capacity=64 << 10),
    "cxl": lambda: dict(make_tier=cxl_tier, persistent=True, raw=CxlRaw, capacity=256 << 10),
    "file": lambda: dict(make_tier=file_tier, persistent=True, raw=FileRaw, fault=file_fault, capacity=256 << 10),
}

def kit_of(tier, request):
    return redis_kit(request.getfixturevalue("own_redis")) if tier == "redis" else KITS[tier]()


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("tier", ["cpu", "cxl", "file", "redis"])
def test_builtin_tier_conforms(tier, check, request, tmp_path):
    report = check_tier(**kit_of(tier, request), name=tier, checks=[check], workdir=tmp_path)
    assert report.passed or check in report.skipped, str(report)  # cpu: nothing to damage, no I/O to fail
    print(report)


def test_write_back_above_redis_a_demotion_and_the_flusher_never_both_write_one_value(own_redis, monkeypatch):
    """cpu (4 KiB, write: back) over redis. The flusher is held writing ``pre`` (so ``pre`` stays
    leased); ``k2``'s put evicts ``k0``, which this thread starts demoting to redis, held until the
    flusher has taken ``k0`` in its next batch. Before the fix the flusher wrote ``k0`` too, and its
    write, landing after the demotion had published ``k0`` in redis and evicted it from the cpu tier,
    was aborted, which DELs the key: the value ``put(k0)`` acknowledged was gone. Now the flusher
    waits for the demotion and leaves ``k0`` to it."""
    import threading

    import torch

    import strata
    from strata import Key
    from strata.store import chain as chain_module
    from strata.store.tiers import redis as redis_module

    pre_taken, first_held, k0_taken, demoted = (threading.Event() for _ in range(4))
    flusher_batches, timeouts = [], []
    real_write, real_flush = redis_module.RedisTier.write_many, chain_module.TierChain._flush_from
    keys = [Key("kv", "race", n) for n in ("pre", "k0", "k1", "k2")]

    def flush(self, i, entries):
        flusher_batches.append(len(entries))
        pre_taken.set()
        if any(e.key == keys[1].encoded for e in entries):
            k0_taken.set()
        return real_flush(self, i, entries)

    def write(self, pairs):
        if threading.current_thread().name == "strata-writeback":
            if len(flusher_batches) == 1 and not first_held.wait(10):
                timeouts.append("the writer's demotion never started")
            if any(e.key == keys[1].encoded for e, _ in pairs) and not demoted.wait(10):
                timeouts.append("the flusher wrote k0 while the demotion held it")
        else:  # this thread's demotion of k0
            first_held.set()
            if not k0_taken.wait(10):
                timeouts.append("the flusher never took k0")
        return real_write(self, pairs)

    monkeypatch.setattr(redis_module.RedisTier, "write_many", write)
    monkeypatch.setattr(chain_module.TierChain, "_flush_from", flush)
    cfg = {"tiers": [{"kind": "cpu", "capacity": "4KiB", "write": "back", "pin": "never"},
                     {"kind": "redis", "url": own_redis.url, "key_prefix": f"race-{uuid.uuid4().hex}:"}],
           "writeback": {"max_pending": 64}}
    values = [torch.full((320,), float(i)) for i in range(4)]  # 1280 bytes: three fill the cpu tier
    with strata.open_store(cfg) as store:
        assert store.put(keys[0], values[0])
        assert pre_taken.wait(10), "the flusher never took pre"  # alone in its first batch
        for k, v in zip(keys[1:], values[1:]):
            assert store.put(k, v)
        demoted.set()  # put(k2) has returned: its demotion of k0 is over
        store.flush()
        assert not timeouts, timeouts
        assert flusher_batches[:2] == [1, 2], f"the interleaving was not the one described: {flusher_batches}"
        for k, v in zip(keys, values):
            got = store.get(k)
            assert got is not None and torch.equal(got, v), f"{k}: acknowledged, then lost"


# -- the kit itself: a tier that breaks a property must fail it, naming it -----------------------------


def test_the_kit_fails_a_tier_that_serves_damaged_bytes(tmp_path, monkeypatch):
    """A cpu tier whose reads skip verification and damage the bytes: the model check must catch it."""
    from strata.store.tiers import cpu

    real = cpu.CpuTier.read

    def lying_read(self, e):
        out = real(self, e)
        if out.numel():
            out.view(-1).view(__import__("torch").uint8)[0] ^= 1
        return out

    monkeypatch.setattr(cpu.CpuTier, "read", lying_read)
    with pytest.raises(AssertionError, match=r"check_tier\(cpu\): model/alone: .*other bytes than were put"):
        check_tier(cpu_tier, checks=["model/alone"], examples=20, workdir=tmp_path)


def test_the_kit_fails_a_tier_that_serves_damaged_bytes_from_its_storage(tmp_path, monkeypatch):
    """A file tier whose reads trust the file's length and skip every check."""
    import torch

    from strata.store.codec import flat_bytes
    from strata.store.tiers import file

    def unchecked(self, e, out):
        data = Path(e.loc).read_bytes()
        if e.meta.nbytes:
            flat_bytes(out).copy_(torch.frombuffer(bytearray(data[-e.meta.nbytes:]), dtype=torch.uint8))

    monkeypatch.setattr(file.FileTier, "read_into", unchecked)
    with pytest.raises(AssertionError, match=r"damage/flip-payload/get: a read of a damaged value returned other"):
        check_tier(file_tier, raw=FileRaw, checks=["damage/flip-payload/get"], workdir=tmp_path)


def test_the_kit_fails_a_tier_whose_damage_goes_unnoticed(tmp_path):
    """A raw storage whose damage never lands proves nothing: the kit says so instead of passing."""
    class Blind(FileRaw):
        def set(self, key, value):
            pass

    with pytest.raises(AssertionError, match=r"damage/flip-payload/get: .*did not reach the storage"):
        check_tier(file_tier, raw=Blind, checks=["damage"], workdir=tmp_path)


def test_the_kit_fails_a_tier_that_raises_into_a_caller(tmp_path):
    """A fault the tier does not turn into a miss (here not an OSError) reaches the caller."""
    @contextlib.contextmanager
    def crash(tier, kind):
        from strata.store.tiers import file as mod

        def broken_open(*args, **kw):
            raise RuntimeError("injected: not an I/O error")

        mod.open = broken_open
        try:
            yield
        finally:
            del mod.open

    with pytest.raises(AssertionError, match=r"faults/error/alone: put .* raised RuntimeError"):
        check_tier(file_tier, fault=crash, checks=["faults/error/alone"], workdir=tmp_path)


def test_the_kit_fails_a_tier_that_holds_more_than_its_capacity(tmp_path, monkeypatch):
    """A file tier that forgets its capacity when it allocates."""
    from strata.store.tiers import file

    real = file.FileTier._alloc

    def unbounded(self, e):
        capacity, self.capacity = self.capacity, 1 << 62
        try:
            return real(self, e)
        finally:
            self.capacity = capacity

    monkeypatch.setattr(file.FileTier, "_alloc", unbounded)
    with pytest.raises(AssertionError, match=r"capacity/evict: stats\(\) bytes \d+ outside"):
        check_tier(file_tier, capacity=64 << 10, checks=["capacity/evict"], workdir=tmp_path)


def test_checks_are_named_and_misspelt_ones_refused(tmp_path):
    report = check_tier(cpu_tier, checks=["model/alone", "capacity"], exclude={"capacity/refuse": "a reason"},
                        capacity=64 << 10, examples=2, workdir=tmp_path)
    assert report.passed == ["model/alone", "capacity/evict", "capacity/too-big"]
    assert report.skipped == {"capacity/refuse": "excluded: a reason"}
    with pytest.raises(ValueError, match="checks/exclude: got \\['modle'\\]; allowed: .*model/alone"):
        check_tier(cpu_tier, checks=["modle"])


def test_a_fault_kind_the_hook_cannot_make_is_skipped_and_said(tmp_path):
    @contextlib.contextmanager
    def errors_only(tier, kind):
        if kind != "error":
            raise NotImplementedError("this storage cannot hang")
        with file_fault(tier, kind):
            yield

    report = check_tier(file_tier, fault=errors_only, checks=["faults"], workdir=tmp_path)
    assert report.passed == ["faults/error/alone", "faults/error/through", "faults/error/back"]
    assert report.skipped == {f"faults/timeout/{m}": "this storage cannot hang" for m in ("alone", "through", "back")}
