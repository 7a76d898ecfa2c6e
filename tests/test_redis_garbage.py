"""A Redis server that answers garbage: the redis tier degrades to misses and counters.

A small fake server on 127.0.0.1 (one thread, one selector, stopped at the end) answers
every command with bytes that are not RESP, RESP that does not fit the command, replies cut
short, closed connections or silence; or, in the second form, well-formed RESP whose GET
answers are not Strata values. A store in front of it (a CPU tier, then the redis tier)
must never raise, never return bytes it was not given for that key, and never hang: every
call returns within a bound set by ``timeout_ms``.
"""

from __future__ import annotations

import random
import selectors
import socket
import threading
import time
import traceback
import uuid
from typing import NamedTuple

import pytest
import torch

import strata
from strata import Key
from strata.store.codec import checksum, describe, pack_header

pytest.importorskip("redis")

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
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the fake server did not stop"
        self.listener.close()


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


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _strata_value(key: Key, value: torch.Tensor) -> bytes:
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
def _same(got, want) -> bool:
    return want is not None and got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def run_workload(store, seed: int, steps: int) -> dict:
    """Random puts, gets, contains, get_many, lease_many and deletes; every read is checked against
    what was put (the CPU tier's copy) and every call is timed."""
    rng = random.Random(seed)
    keys = [Key("kv", "garbage", f"k{i}") for i in range(24)]
    last: dict[Key, torch.Tensor] = {}
    seen = {"calls": 0, "local_hits": 0, "slowest_s": 0.0}

    def timed(what, fn):
        t0 = time.monotonic()
        out = fn()
        took = time.monotonic() - t0
        seen["calls"] += 1
        seen["slowest_s"] = max(seen["slowest_s"], took)
        assert took < CALL_BOUND_S, f"{what} took {took:.1f} s"
        return out

    def check(k, got):
        assert got is None or _same(got, last.get(k)), f"{k}: bytes that were never put under it"
        seen["local_hits"] += got is not None

    for step in range(steps):
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
            assert timed("contains", lambda: store.contains(k)) in (True, False)
        elif op < 0.7:
            ks = rng.sample(keys, rng.randrange(1, 20))
            got = timed("contains_many", lambda: store.contains_many(ks))
            assert len(got) == len(ks) and all(g in (True, False) for g in got)
        elif op < 0.82:
            ks = rng.sample(keys, rng.randrange(1, 20))
            got = timed("get_many", lambda: store.get_many(ks))
            assert len(got) == len(ks)
            for kk, g in zip(ks, got):
                check(kk, g)
        elif op < 0.94:
            ks = rng.sample(keys, rng.randrange(1, 20))
            with timed("lease_many", lambda: store.lease_many(ks)) as views:
                assert len(views) == len(ks)
                for kk, view in zip(ks, views):
                    check(kk, view)
        else:
            timed("delete", lambda: store.delete(k))
            last.pop(k, None)
    timed("stats", store.stats)
    return seen


def exercise(server: FakeRedis, seed: int, steps: int = 200) -> tuple[dict, dict]:
    """Open a store over ``server`` and run the workload in a thread with a deadline; what went
    wrong (an exception with where it was raised, or a hang) fails the caller's test."""
    cfg = {"tiers": [{"kind": "cpu", "capacity": "32KiB"},  # small: most reads go on to the server
                     {"kind": "redis", "url": server.url, "timeout_ms": TIMEOUT_MS,
                      "key_prefix": f"t-{uuid.uuid4().hex}:"}]}
    result: dict = {}

    def run():
        try:
            with strata.open_store(cfg) as store:
                result["seen"] = run_workload(store, seed, steps)
                result["redis"] = store.stats()["tiers"]["redis"]
        except BaseException as e:  # noqa: BLE001 - the exception and its origin go to the report
            result["error"] = "".join(traceback.format_exception(e))

    worker = threading.Thread(target=run, name="garbage-workload", daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the store hung on a server answering garbage"
    assert "error" not in result, result.get("error")
    return result["seen"], result["redis"]


@pytest.fixture
def every_call_asks_the_server(monkeypatch):
    """No back-off after a fault: every call meets the garbage, not a skip."""
    from strata.store.tiers import redis as redis_tier

    monkeypatch.setattr(redis_tier, "BACKOFF_S", 0.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_server_answering_garbage_is_misses_and_errors_never_an_exception(every_call_asks_the_server, seed):
    server = FakeRedis(garbage, seed)
    try:
        seen, redis = exercise(server, seed)
    finally:
        server.stop()
    assert server.replies > 0 and seen["calls"] > 200
    assert redis["hits"] == 0  # nothing the server said was ever served
    assert redis["errors"] > 0 and redis["misses"] > 0  # the garbage was met, and counted


@pytest.mark.parametrize("seed", [1, 2])
def test_a_server_answering_well_formed_resp_that_holds_no_strata_value_is_misses(every_call_asks_the_server, seed):
    server = FakeRedis(wellformed, seed)
    try:
        seen, redis = exercise(server, seed)
    finally:
        server.stop()
    assert server.replies > 0
    assert redis["hits"] == 0 and redis["misses"] > 0
    assert redis["checksum_failures"] > 0  # values read, checked, refused (and deleted)


def test_the_fake_server_speaks_enough_resp_for_a_real_client():
    """The second server is a fair test only if a real client can talk to it."""
    import redis

    server = FakeRedis(wellformed, 0)
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        assert client.set("x", b"1") is True and client.dbsize() in (0, 1)
        got = client.get("x")
        assert got is None or isinstance(got, bytes)
        client.close()
    finally:
        server.stop()


def test_a_server_that_drips_a_reply_cannot_hold_a_call_past_its_bound():
    """``timeout_ms`` bounds each call, not each socket read: a reply that comes one byte at a
    time, every byte well inside the timeout, must not hold a read for (here) half a minute."""
    timeout_ms = 500  # a byte every 25 ms: 20 times inside it, so a busy machine cannot end the drip early

    def dripping(cmd, rng):
        if cmd[:1] == [b"GET"]:
            return Drip(b"$1200\r\n" + bytes(1200) + b"\r\n", timeout_ms / 20_000)
        return wellformed(cmd, rng)

    server = FakeRedis(dripping, 0)
    cfg = {"tiers": [{"kind": "redis", "url": server.url, "timeout_ms": timeout_ms, "key_prefix": "drip:"}]}
    got: dict = {}
    try:
        with strata.open_store(cfg) as store:
            reader = threading.Thread(target=lambda: got.setdefault("value", store.get(Key("kv", "drip", "a"))),
                                      daemon=True)
            t0 = time.monotonic()
            reader.start()
            reader.join(CALL_BOUND_S)  # ten times timeout_ms
            took = time.monotonic() - t0
            held = reader.is_alive()
            server.stop()  # ends the drip: a reader still waiting gets a closed connection
            reader.join(10)
    finally:
        server.stop()
    assert not held, f"a get was held {took:.1f} s by a server dripping its reply (timeout_ms={timeout_ms})"
    assert got == {"value": None}
