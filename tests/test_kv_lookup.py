"""The scheduler's cross-process lookup: a worker's store answers over a Unix socket."""

import multiprocessing as mp
import os
import socket
import struct

import torch

from strata import Key, open_store
from strata.kv.lookup import LookupClient, LookupServer, local_server, socket_path


def _serve(path, ready, stop):
    with open_store({"tiers": [{"kind": "cpu", "capacity": "1MiB"}]}) as store:
        store.put(Key("kv", "m", "a"), torch.zeros(8))
        server = LookupServer(store, path)
        ready.set()
        stop.wait(60)
        server.close()


def test_another_process_sees_what_the_worker_store_holds_and_survives_its_death(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    path = str(tmp_path / "lookup.sock")
    client = LookupClient(path, timeout_s=2.0)
    keys = [Key("kv", "m", "a"), Key("kv", "m", "b")]
    assert client.contains_many(keys) is None  # no server yet: the caller falls back
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    worker = ctx.Process(target=_serve, args=(path, ready, stop))
    worker.start()
    try:
        assert ready.wait(60)
        client._retry_at = 0.0
        assert client.contains_many(keys) == [True, False]
        assert client.contains_many([]) == []
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    finally:
        stop.set()
        worker.join(30)
    assert not worker.is_alive() and worker.exitcode == 0  # it stopped when told, cleanly
    assert not os.path.exists(path)
    assert client.contains_many(keys) is None and client.errors == 1  # dead server: a miss, not a crash


def test_bytes_that_are_no_key_close_the_connection_and_the_server_goes_on(tmp_path):
    path = str(tmp_path / "l.sock")
    with open_store({"tiers": [{"kind": "cpu", "capacity": "1MiB"}]}) as store:
        store.put(Key("kv", "m", "a"), torch.zeros(8))
        server = LookupServer(store, path)
        try:
            assert local_server(path) is server
            for junk in (struct.pack(">II", 1, 5) + b"hello", struct.pack(">I", 1 << 20)):
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(5)
                    s.connect(path)
                    s.sendall(junk)
                    assert s.recv(10) == b""  # dropped
            assert LookupClient(path).contains_many([Key("kv", "m", "a")]) == [True]
        finally:
            server.close()
    assert local_server(path) is None


def test_the_socket_is_named_by_the_engine_id():
    assert socket_path("e1") == socket_path("e1") != socket_path("e2")
