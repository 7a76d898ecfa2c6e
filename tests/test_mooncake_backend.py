"""The Mooncake backing store against a real mooncake_master: batches, names, overwrite,
sharing between processes, listing, and a master killed, paused, or absent at start."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest

from strata.errors import StoreError
from mooncake_server import MooncakeMaster, need_mooncake

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    need_mooncake()
    m = MooncakeMaster(tmp_path_factory.mktemp("mooncake")).start()
    yield m
    m.stop()


@pytest.fixture
def fresh_master(tmp_path):
    """A master of the test's own: killed, paused or restarted without disturbing the others."""
    need_mooncake()
    m = MooncakeMaster(tmp_path)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def backend(master):
    b = master.backend(buffer_bytes=16 << 20)  # 32 MiB values do not fit: read into fresh memory
    yield b
    b.close()


def prefix() -> bytes:
    return f"t-{uuid.uuid4().hex}/".encode()


def blob(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def eventually(fn, limit_s: float = 30):
    """``fn()`` until it returns something true; the limit is a safety bound, not a wait."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            got = fn()
        except ConnectionError:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {limit_s}s")
        time.sleep(0.05)


# -- no server needed ----------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, says", [
    ("master", "no-port", "mooncake.master"), ("protocol", "tpc", "did you mean 'tcp'"),
    ("segment_bytes", -1, "mooncake.segment_bytes"), ("buffer_bytes", 1000, "mooncake.buffer_bytes"),
    ("replicas", 0, "mooncake.replicas"), ("metadata_url", "", "mooncake.metadata_url")])
def test_a_bad_field_is_named(field, value, says):
    from strata.store.tiers.mooncake import MooncakeBackend

    args = dict(master="127.0.0.1:1", metadata_url="http://127.0.0.1:1/metadata", segment_bytes=0,
                buffer_bytes=16 << 20)
    args[field] = value
    with pytest.raises(StoreError, match=says):
        MooncakeBackend(**args)


def test_a_missing_client_says_how_to_install_it(monkeypatch):
    from strata.store.tiers.mooncake import MooncakeBackend

    monkeypatch.setitem(sys.modules, "mooncake", None)
    monkeypatch.setitem(sys.modules, "mooncake.store", None)
    with pytest.raises(StoreError, match=r"pip install 'strata\[mooncake\]'"):
        MooncakeBackend(master="127.0.0.1:1", metadata_url="http://127.0.0.1:1/metadata", segment_bytes=0,
                        buffer_bytes=16 << 20)


# -- one master ----------------------------------------------------------------------------------
def test_values_round_trip_in_batches(backend):
    p = prefix()
    sizes = [1, 17, 4096, 1 << 20, 3 << 20, 32 << 20]
    pairs = [(p + b"v%d" % i, blob(n, i)) for i, n in enumerate(sizes)]
    assert backend.put_many(pairs) == [True] * len(pairs)
    names = [n for n, _ in pairs] + [p + b"missing"]
    assert backend.exists_many(names) == [True] * len(pairs) + [False]
    got = backend.get_many(names)
    assert got[-1] is None
    for (_, want), value in zip(pairs, got):
        assert isinstance(value, memoryview) and value.nbytes == len(want) and value == want
    assert backend.delete_many(names) == [True] * len(pairs) + [False]
    assert backend.exists_many(names) == [False] * len(names)
    assert backend.get_many(names) == [None] * len(names)


def test_an_empty_value_is_refused_alone(backend):
    p = prefix()
    got = backend.put_many([(p + b"empty", b""), (p + b"one", b"1")])
    assert isinstance(got[0], StoreError) and "0 bytes" in str(got[0]) and got[1] is True
    assert backend.get_many([p + b"empty", p + b"one"]) == [None, b"1"]


def test_a_value_no_segment_can_hold_fails_alone(backend):
    from strata.store.tiers.mooncake import MooncakeError

    p = prefix()
    huge = np.zeros(1 << 30, dtype=np.uint8)  # more than the module's segments hold (pages never touched)
    got = backend.put_many([(p + b"small", b"s"), (p + b"huge", huge)])
    assert got[0] is True and isinstance(got[1], MooncakeError) and got[1].code < 0
    assert backend.exists_many([p + b"small", p + b"huge"]) == [True, False]


def test_a_put_replaces_the_value_even_while_a_reader_holds_its_lease(backend):
    p = prefix()
    name = p + b"k"
    assert backend.put_many([(name, b"old" * 10)]) == [True]
    assert backend.get_many([name]) == [b"old" * 10]  # the read took a lease on it
    assert backend.put_many([(name, b"new")]) == [True]
    assert backend.get_many([name]) == [b"new"]
    assert backend.delete_many([name]) == [True]  # forced: the lease would refuse it for 10 s
    assert backend.get_many([name]) == [None]


def test_the_clients_own_put_keeps_an_existing_value(backend):
    """Why put_many upserts: Mooncake's put of a stored name answers 0 and keeps the old bytes."""
    from strata.store.tiers.mooncake import _name_text

    name = prefix() + b"k"
    assert backend.put_many([(name, b"first")]) == [True]
    assert backend._client.put(_name_text(name), b"second") == 0
    assert backend.get_many([name]) == [b"first"]


def test_any_bytes_make_a_name_and_the_listing_gives_them_back(backend):
    p = prefix()
    names = [p + b"plain", p + b"\x00\n,%\xff\xe9 x", p + "é/ü".encode()]
    assert backend.put_many([(n, b"x" * (i + 1)) for i, n in enumerate(names)]) == [True] * 3
    other = prefix() + b"elsewhere"
    assert backend.put_many([(other, b"y")]) == [True]
    listed = [pair for batch in backend.scan(p) for pair in batch]
    assert sorted(listed) == sorted((n, i + 1) for i, n in enumerate(names))
    assert backend.get_many(names) == [b"x", b"xx", b"xxx"]


def test_report_and_describe_show_the_master_segments_and_memory(master, backend):
    p = prefix()
    assert backend.put_many([(p + b"a", blob(1 << 20, 1))]) == [True]
    r = backend.report()
    assert r["connected"] and r["master"] == master.master and r["segments"] >= 1
    assert r["keys"] >= 1 and r["used_memory"] >= 1 << 20 and r["maxmemory"] >= backend.segment_bytes
    assert f"mooncake master {master.master} (tcp), {r['segments']} segment" in backend.describe(r)


def test_a_listing_needs_the_admin_server(master):
    b = master.backend(admin_url="")
    try:
        with pytest.raises(NotImplementedError, match="admin_url"):
            next(b.scan(b"x"))
        assert "admin_url" in b.report() and "keys" not in b.report()
    finally:
        b.close()


CHILD = textwrap.dedent("""
    import sys
    from mooncake.store import MooncakeDistributedStore
    master, metadata_url, tag = sys.argv[1:4]
    s = MooncakeDistributedStore()
    assert s.setup("127.0.0.1", metadata_url, 64 << 20, 16 << 20, "tcp", "", master) == 0
    print(s.upsert("child/" + tag, bytes(range(256)) * 4096), flush=True)
    print(s.get(sys.stdin.readline().strip()).hex(), flush=True)
    sys.stdin.readline()
    s.close()
""")


def test_a_second_process_shares_the_values(fresh_master):
    """A plain Mooncake client in another process (ASCII names are the same text on both sides).
    The parent contributes no segment: what either writes lives in the child's memory."""
    m = fresh_master.start()
    tag = uuid.uuid4().hex
    child = subprocess.Popen([sys.executable, "-c", CHILD, m.master, m.metadata_url, tag],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             cwd=REPO)
    b = m.backend(segment_bytes=0)
    try:
        assert child.stdout.readline().strip() == "0"
        got = b.get_many([b"child/" + tag.encode()])[0]
        assert got == bytes(range(256)) * 4096
        assert b.put_many([(b"parent/" + tag.encode(), b"from the parent")]) == [True]
        child.stdin.write(f"parent/{tag}\n")
        child.stdin.flush()
        assert bytes.fromhex(child.stdout.readline().strip()) == b"from the parent"
        assert b.report()["segments"] == 1  # the child's
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(timeout=30)
        b.close()
    assert child.returncode == 0


# -- faults ------------------------------------------------------------------------------------
def _fails_promptly(call, bound_s: float) -> None:
    """``call()`` raises ConnectionError or returns a list of exceptions, within ``bound_s``."""
    t0 = time.monotonic()
    try:
        got = call()
    except ConnectionError:
        pass
    else:
        assert got and all(isinstance(x, Exception) for x in got), got
    assert time.monotonic() - t0 < bound_s


def test_a_killed_master_fails_calls_promptly_and_a_restarted_one_serves_again(fresh_master):
    m = fresh_master.start()
    b = m.backend(timeout_ms=250)  # a caller waits at most 4 x 250 ms
    try:
        name = prefix() + b"k"
        assert b.put_many([(name, b"before")]) == [True]
        m.stop()
        for call in [lambda: b.exists_many([name]), lambda: b.get_many([name]), lambda: b.put_many([(name, b"x")]),
                     lambda: b.delete_many([name]), lambda: b.get_many([name]), lambda: b.exists_many([name])]:
            _fails_promptly(call, 1.0 + 0.5)
        with pytest.raises(ConnectionError):
            b.report()
        m.start()  # empty: the master kept its index in memory; the client remounts its segment itself
        eventually(lambda: b.put_many([(name, b"after")]) == [True])
        assert b.get_many([name]) == [b"after"] and b.report()["segments"] == 1
    finally:
        b.close()


def test_a_master_down_at_start_is_set_up_once_it_answers(fresh_master):
    m = fresh_master  # not started
    t0 = time.monotonic()
    b = m.backend(timeout_ms=200)
    try:
        assert time.monotonic() - t0 < 2  # the client's own set-up would block for about 90 s
        with pytest.raises(ConnectionError):
            b.exists_many([b"k"])
        m.start()
        assert eventually(lambda: b.exists_many([b"k"]) == [False])
        assert b.put_many([(b"k", b"v")]) == [True] and b.get_many([b"k"]) == [b"v"]
    finally:
        b.close()


def test_a_hung_master_times_out_and_interrupt_frees_a_waiting_caller(fresh_master):
    m = fresh_master.start()
    quick = m.backend(timeout_ms=200, segment_bytes=16 << 20)
    slow = m.backend(timeout_ms=30_000, segment_bytes=16 << 20)  # would wait 120 s
    try:
        assert quick.put_many([(b"k", b"v")]) == [True]
        m.pause()
        _fails_promptly(lambda: quick.get_many([b"k"]), 0.8 + 0.5)
        _fails_promptly(lambda: quick.exists_many([b"k"]), 0.5)  # at once: the first is still blocked

        caught: list[BaseException] = []

        def reader():
            try:
                slow.get_many([b"k"])
            except BaseException as e:  # noqa: BLE001 - the test looks at it
                caught.append(e)

        t = threading.Thread(target=reader)
        t.start()
        eventually(lambda: slow._pending, 10)  # the reader waits on its call
        t0 = time.monotonic()
        slow.interrupt()
        t.join(5)
        assert not t.is_alive() and time.monotonic() - t0 < 5
        assert len(caught) == 1 and isinstance(caught[0], ConnectionError), caught
        m.resume()
        assert eventually(lambda: quick.get_many([b"k"]) == [b"v"])
    finally:
        m.resume()
        quick.close()
        slow.close()


def test_an_idle_worker_holds_nothing_of_the_last_read(master):
    """A get's result is a view over the client's local buffer; a worker thread that kept its last
    call's result alive held that much of the buffer, and the next large get found no room (a
    fallback of several round trips). After the caller drops a read, the buffer is free again."""
    from mooncake_server import StoreServer

    with StoreServer(master, 64 << 20):
        b = master.backend(segment_bytes=0, buffer_bytes=16 << 20)
        try:
            name = prefix() + b"v"
            assert b.put_many([(name, bytes(10 << 20))]) == [True]
            for _ in range(8):  # whichever of the workers ran the last one
                assert len(b.get_many([name])[0]) == 10 << 20  # the result dropped at once
                got = b._run("get", lambda c: c.batch_get_buffer([name.decode()]))
                assert got[0] is not None, "the local buffer is still held by a finished call"
                del got
        finally:
            b.close()


def test_the_send_buffer_is_reused_only_once_the_call_that_took_it_has_given_it_back():
    """Puts copy their values into one kept buffer: a second put while the first's call is still in
    the client (a call given up on may be) must get other memory, or it would overwrite bytes
    still being sent; once given back, the largest buffer is kept for the next put."""
    from strata.store.tiers.mooncake import _SendBuffer

    send = _SendBuffer()
    first = send.take(100)
    second = send.take(50)  # the first is still in use
    assert second is not first and first.nbytes >= 100 and second.nbytes >= 50
    send.give(first)
    again = send.take(80)
    assert again is first  # given back: reused
    send.give(second)
    send.give(again)  # both back: the larger is kept
    assert send.take(100) is first
    assert send.take(10) is not first  # taken, not given back yet


def test_a_name_asked_twice_in_one_get_many_reads_its_value_both_times(backend):
    """The client's batch_get_buffer returns zeros for the first of two handles of one key (seen
    as 'bad header magic' misses in the conformance kit's batch reads); get_many asks once."""
    name = f"dup-{uuid.uuid4().hex}".encode()
    assert backend.put_many([(name, b"A" * 100)]) == [True]
    got = backend.get_many([b"absent-" + name, name, name])
    assert got[0] is None and bytes(got[1]) == bytes(got[2]) == b"A" * 100
