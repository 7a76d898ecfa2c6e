"""A fake Redis server that answers garbage, and a workload that checks a store in front of it.

Used by tests/test_redis_garbage.py (each finding fails the test where it happened) and by the
``redis_garbage`` scenario of benchmarks/reliability.py (each finding is counted in a row). No
pytest here: a benchmark imports it.

``FakeRedis`` (one thread, one selector, on 127.0.0.1) answers every command as an answerer
decides: ``garbage`` sends bytes that are not RESP, RESP that does not fit the command, replies
cut short, closed connections or silence; ``wellformed`` sends valid RESP whose GET answers are
not Strata values of the key asked for. ``exercise`` opens a store (a small CPU tier, then the
redis tier) over such a server and runs ``run_workload``: the store must never raise, never
return bytes it was not given for that key, and never hang (every call returns within
``CALL_BOUND_S``, set far above ``TIMEOUT_MS``).
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import socket
import sys
import threading
import time
import traceback
import uuid
from typing import Callable, NamedTuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import strata  # noqa: E402
from strata import Key  # noqa: E402
from strata.store.codec import checksum, describe, pack_header  # noqa: E402

TIMEOUT_MS = 100
CALL_BOUND_S = 5.0  # far above the few timeouts one call may spend; a hang is orders beyond it
CLOSE = object()  # an answer: close the connection without (more of) a reply


class Drip(NamedTuple):
    """An answer sent one byte every ``interval_s``: each byte comes within the client's socket
    timeout, the whole reply far beyond it."""

    data: bytes
    interval_s: float


class FakeRedis:
    """A TCP server on an ephemeral port of 127.0.0.1 that answers each command with
    ``answer(command, rng)``: bytes to send, a ``Drip``, ``CLOSE`` (end the connection), or
    ``None`` (say nothing more on this connection). One thread, ended by ``stop()``."""

    def __init__(self, answer, seed: int):
        self.answer = answer
        self.rng = random.Random(seed)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.connections = 0
        self.replies = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-redis", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.01):
                    if key.fileobj is self.listener:
                        self._accept(sel)
                    else:
                        self._read(sel, key.fileobj, key.data)
                self._drip(sel)
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()

    def _accept(self, sel) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.connections += 1
        sel.register(conn, selectors.EVENT_READ, data={"buf": b"", "mute": False})

    def _read(self, sel, conn, state) -> None:
        try:
            chunk = conn.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            state["buf"] += chunk
            reply, close = b"", False
            for cmd in _commands(state):
                answer = self.answer(cmd, self.rng)
                if answer is None:  # silence from here on: the client's timeout ends its wait
                    state["mute"] = True
                if answer is CLOSE:
                    close = True
                    break
                if isinstance(answer, Drip):  # after what is already due; nothing more on this connection
                    state["drip"] = {"data": answer.data, "interval_s": answer.interval_s, "at": time.monotonic()}
                    state["mute"] = True
                    continue
                if not state.get("mute"):
                    reply += answer
            if reply:
                try:
                    conn.setblocking(True)
                    conn.settimeout(1.0)
                    conn.sendall(reply)
                    conn.setblocking(False)
                    self.replies += 1
                except OSError:
                    close = True
            if not close:
                return
        sel.unregister(conn)
        conn.close()

    def _drip(self, sel) -> None:
        """The next byte of each dripping answer that is due."""
        now = time.monotonic()
        for key in list(sel.get_map().values()):
            drip = key.data.get("drip") if key.data else None
            if not drip or drip["at"] > now:
                continue
            try:
                key.fileobj.send(drip["data"][:1])
            except OSError:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                continue
            drip["data"], drip["at"] = drip["data"][1:], now + drip["interval_s"]
            if not drip["data"]:
                key.data["drip"] = None

    def stop(self) -> None:
        """End the server thread and close the listener; a thread that will not end is an error
        (a test or benchmark would otherwise leave a server running behind it)."""
        self._stop.set()
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("the fake server did not stop")
        self.listener.close()


def _commands(state) -> list[list[bytes]]:
    """Complete RESP commands (arrays of bulk strings) off the front of the buffer."""
    buf, out = state["buf"], []
    while True:
        try:
            pos, cmd = 0, []
            end = buf.index(b"\r\n", pos)
            if buf[:1] != b"*":
                raise ValueError("inline command")
            n, pos = int(buf[1:end]), end + 2
            for _ in range(n):
                end = buf.index(b"\r\n", pos)
                size = int(buf[pos + 1 : end])
                if len(buf) < end + 2 + size + 2:
                    raise IndexError("incomplete")
                cmd.append(buf[end + 2 : end + 2 + size])
                pos = end + 2 + size + 2
        except (ValueError, IndexError):
            state["buf"] = buf
            return out
        out.append(cmd)
        buf = buf[pos:]


@contextlib.contextmanager
def every_call_asks_the_server():
    """No back-off after a fault (``BACKOFF_S`` of the backing tiers at 0) for the block, restored
    afterwards: every call meets the server's answers, none is skipped as a miss."""
    from strata.store.tiers import backing as redis_tier

    before = redis_tier.BACKOFF_S
    redis_tier.BACKOFF_S = 0.0
    try:
        yield
    finally:
        redis_tier.BACKOFF_S = before


# -- answers ----------------------------------------------------------------------------------
_JUNK = [
    b"hello\r\n", b"\r\n", b"\x00\xff\xfe garbage", b"GARBAGE", b"?\r\n",
    b":notanint\r\n", b":\r\n", b":1e9\r\n", b"$abc\r\nxyz\r\n", b"$-5\r\n", b"$\r\n", b"$3\r\nabcdef\r\n",
    b"$10\r\nshort", b"$1000000000\r\n", b"*abc\r\n", b"*-7\r\n", b"*3\r\n:1\r\n", b"*2\r\n$1\r\nx\r\n:q\r\n",
    b"-ERR garbage\r\n", b"-\r\n", b"-MOVED 1 2\r\n", b"-LOADING\r\n", b"-NOAUTH x\r\n",
    b"+OK\r\n", b"+OK\r\n+OK\r\n:1\r\n", b":1\r\n", b"$-1\r\n", b"*-1\r\n", b"$3\r\n\xff\xfe\xfd\r\n",
    b"+\xff\xfe\r\n", b"%1\r\n+a\r\n+b\r\n", b"_\r\n", b",3.14\r\n", b"#t\r\n", b"(123456789012345678901\r\n",
    b"=5\r\ntxt:x\r\n", b"~1\r\n:1\r\n", b">2\r\n+a\r\n+b\r\n", b"|1\r\n+a\r\n+b\r\n", b"!3\r\nerr\r\n",
    b"*2\r\n$1\r\n0\r\n*1\r\n:5\r\n", b"$12\r\n\xff\xfeused_memory\r\n", b"$17\r\nused_memory:abc\r\n\r\n",
]


HELLO_OK = b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n$7\r\nversion\r\n$5\r\n7.0.0\r\n"


def garbage(cmd, rng):
    """Anything but a sensible answer: junk, RESP of the wrong shape, a reply cut off by a close,
    silence (the client's timeout ends the wait). The handshake (HELLO) mostly succeeds, so the
    commands behind it meet the garbage too."""
    if cmd[:1] == [b"HELLO"] and rng.random() < 0.8:
        return HELLO_OK
    roll = rng.random()
    if roll < 0.04:
        return None
    if roll < 0.1:
        return CLOSE
    if roll < 0.22:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    reply = b"".join(rng.choice(_JUNK) for _ in range(rng.randrange(1, 4)))
    if rng.random() < 0.1:
        return reply[: rng.randrange(len(reply))] or CLOSE  # cut short
    return reply


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _strata_value(key: Key, value: torch.Tensor) -> bytes:
    """``value`` as the redis tier stores it under ``key``: header, padding to 16 bytes, data."""
    meta, data = describe(value)
    meta = meta.with_checksum(checksum(data))
    head = pack_header(key.encoded, meta)
    return head + bytes(-len(head) % 16) + data.numpy().tobytes()


_OTHER = _strata_value(Key("kv", "garbage", "not-the-one-you-asked-for"), torch.arange(16.0))


def wellformed(cmd, rng):
    """Valid RESP for every command; what a GET answers is never a Strata value of the key asked
    for: random bytes, a cut or flipped Strata value, another key's value, or nil."""
    name = cmd[0].upper() if cmd else b""
    if name == b"HELLO":
        return HELLO_OK
    if name == b"GET":
        roll = rng.random()
        if roll < 0.15:
            return b"_\r\n"  # nil (RESP3)
        if roll < 0.45:
            return _bulk(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))))
        if roll < 0.6:
            return _bulk(b"STRO\x01" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200))))
        if roll < 0.75:
            return _bulk(_OTHER)  # a valid value, of another key
        if roll < 0.9:
            return _bulk(_OTHER[: rng.randrange(len(_OTHER))])
        flipped = bytearray(_OTHER)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return _bulk(bytes(flipped))
    if name in (b"EXISTS", b"DEL", b"DBSIZE"):
        return b":%d\r\n" % rng.randrange(2)
    if name == b"INFO":
        return _bulk(b"# Memory\r\nused_memory:%d\r\nmaxmemory:0\r\nmaxmemory_policy:allkeys-lru\r\n"
                     % rng.randrange(1 << 20))
    if name == b"SCAN":
        return b"*2\r\n$1\r\n0\r\n*0\r\n"
    return b"+OK\r\n"  # SET, CONFIG SET, CLIENT SETINFO, SELECT, PING, ...


# -- the workload -------------------------------------------------------------------------------
class Findings:
    """Where the workload's findings go. Without ``record`` (a test) the first finding raises
    AssertionError, and an exception out of a store call propagates, so the test fails where it
    happened. With ``record(what, text)`` (a benchmark row; ``what`` is "wrong_bytes" or
    "crashes") each finding, and each exception out of a store call, is recorded and the
    workload goes on, so one row counts them all."""

    def __init__(self, record: Callable[[str, str], None] | None = None):
        self.record = record

    @property
    def strict(self) -> bool:
        return self.record is None

    def add(self, what: str, text: str) -> None:
        if self.record is None:
            raise AssertionError(text)
        self.record(what, text)

    def check(self, ok: bool, what: str, text: str) -> None:
        if not ok:
            self.add(what, text)


def _same(got, want) -> bool:
    return (want is not None and isinstance(got, torch.Tensor) and got.dtype == want.dtype
            and got.shape == want.shape and torch.equal(got, want))


def run_workload(store, seed: int, steps: int, findings: Findings | None = None) -> dict:
    """Random puts, gets, contains, get_many, lease_many and deletes; every read is checked against
    what was put (the CPU tier's copy) and every call is timed. A read that serves bytes never put
    under its key, or an answer of the wrong shape, is "wrong_bytes"; a call that raises or runs
    past ``CALL_BOUND_S`` is "crashes" (see ``Findings`` for where they go)."""
    findings = findings or Findings()
    rng = random.Random(seed)
    keys = [Key("kv", "garbage", f"k{i}") for i in range(24)]
    last: dict[Key, torch.Tensor] = {}
    seen = {"calls": 0, "local_hits": 0, "slowest_s": 0.0}
    last_call = [None]  # the name of the last store call made: what an exception came out of

    def timed(what, fn):
        t0 = time.monotonic()
        seen["calls"] += 1
        last_call[0] = what
        out = fn()
        took = time.monotonic() - t0
        seen["slowest_s"] = max(seen["slowest_s"], took)
        findings.check(took < CALL_BOUND_S, "crashes", f"{what} took {took:.1f} s")
        return out

    def check(k, got):
        findings.check(got is None or _same(got, last.get(k)), "wrong_bytes",
                       f"{k}: bytes that were never put under it")
        seen["local_hits"] += got is not None

    def many(what, ks, got):
        findings.check(len(got) == len(ks), "wrong_bytes", f"{what} of {len(ks)} keys answered {len(got)}")

    def one(step):
        op = rng.random()
        k = rng.choice(keys)
        if op < 0.3:
            v = torch.full((rng.randrange(16, 2048),), float(step))
            if timed("put", lambda: store.put(k, v)):
                last[k] = v
            else:
                last.pop(k, None)
        elif op < 0.5:
            check(k, timed("get", lambda: store.get(k)))
        elif op < 0.6:
            got = timed("contains", lambda: store.contains(k))
            findings.check(got in (True, False), "wrong_bytes", f"contains {k} answered {got!r}")
        elif op < 0.7:
            ks = rng.sample(keys, rng.randrange(1, 20))
            got = timed("contains_many", lambda: store.contains_many(ks))
            many("contains_many", ks, got)
            findings.check(all(g in (True, False) for g in got), "wrong_bytes", f"contains_many answered {got!r}")
        elif op < 0.82:
            ks = rng.sample(keys, rng.randrange(1, 20))
            got = timed("get_many", lambda: store.get_many(ks))
            many("get_many", ks, got)
            for kk, g in zip(ks, got):
                check(kk, g)
        elif op < 0.94:
            ks = rng.sample(keys, rng.randrange(1, 20))
            with timed("lease_many", lambda: store.lease_many(ks)) as views:
                many("lease_many", ks, views)
                for kk, view in zip(ks, views):
                    check(kk, view)
        else:
            timed("delete", lambda: store.delete(k))
            last.pop(k, None)

    def guarded(what, fn):
        """``fn()``; with a recorder, an exception out of it is a crash and the workload goes on."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any exception out of a store call is what this counts
            if findings.strict:
                raise
            findings.add("crashes", f"{what} ({last_call[0]}) raised {type(e).__name__}: {e}")

    for step in range(steps):
        guarded(f"step {step}", lambda: one(step))
    guarded("the end", lambda: timed("stats", store.stats))
    return seen


def exercise(server: FakeRedis, seed: int, steps: int = 200,
             findings: Findings | None = None) -> tuple[dict | None, dict | None]:
    """Open a store over ``server`` and run the workload in a thread with a deadline; what went
    wrong (an exception with where it was raised, or a hang) is a crash finding: without a
    recorder it fails the caller's test. Returns the workload's ``seen`` and the redis tier's
    stats (None for what a crash kept from being taken)."""
    findings = findings or Findings()
    cfg = {"tiers": [{"kind": "cpu", "capacity": "32KiB"},  # small: most reads go on to the server
                     {"kind": "redis", "url": server.url, "timeout_ms": TIMEOUT_MS,
                      "key_prefix": f"t-{uuid.uuid4().hex}:"}]}
    result: dict = {}

    def run():
        try:
            with strata.open_store(cfg) as store:
                result["seen"] = run_workload(store, seed, steps, findings)
                result["redis"] = store.stats()["tiers"]["redis"]
        except BaseException as e:  # noqa: BLE001 - the exception and its origin go to the report
            result["error"] = "".join(traceback.format_exception(e))

    worker = threading.Thread(target=run, name="garbage-workload", daemon=True)
    worker.start()
    worker.join(120)
    findings.check(not worker.is_alive(), "crashes", "the store hung on a server answering garbage")
    findings.check("error" not in result, "crashes", result.get("error", ""))
    return result.get("seen"), result.get("redis")
