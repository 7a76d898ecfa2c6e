"""The file tier is shared by the processes of a host: opening it never destroys what another
process saved or is saving, a live store finds what another saved after it opened, and an
object another process removed is a plain miss.

Each child runs in a fresh interpreter, so its namespace registry (process-global) holds
only what the child itself registers, whatever other tests registered in this process.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import torch

import strata
from strata import Key
from strata.store.codec import checksum, describe


def file_only(path, capacity="16MiB") -> dict:
    return {"tiers": [{"kind": "file", "path": str(path), "capacity": capacity}]}


def cpu_and_file(path) -> dict:
    """A put is acknowledged once any tier took it: the file copy can be lost while put says True."""
    return {"tiers": [{"kind": "cpu", "capacity": "4MiB"}, {"kind": "file", "path": str(path), "capacity": "16MiB"}]}


def child(code: str, *args: object, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], text=True, **popen)


def run_child(code: str, *args: object, timeout: float = 120) -> str:
    """Run ``code`` in a fresh interpreter; its stdout. A failing child fails the test."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def object_files(path) -> list[str]:
    return sorted(p.name for p in (path / "objects").glob("*/*.obj"))


# -- objects of a namespace this process never registered ------------------------------------

EMBEDDING = torch.arange(48, dtype=torch.float16).reshape(6, 8) / 7 - 3

WRITE_EMBEDDING = """
    import json, sys, torch, strata
    from strata import Key
    strata.register_namespace("embeddings")
    value = torch.frombuffer(bytearray.fromhex(sys.argv[2]), dtype=torch.float16).reshape(6, 8)
    with strata.open_store(json.loads(sys.argv[1])) as store:
        assert store.put(Key("embeddings", "s", "doc-1"), value)
"""

OPEN_UNREGISTERED = """
    import json, sys, strata
    assert "embeddings" not in strata.namespaces()
    with strata.open_store(json.loads(sys.argv[1])) as store:
        print(json.dumps(store.stats()["tiers"]["file"]))
"""

READ_EMBEDDING = """
    import json, sys, strata
    from strata import Key
    strata.register_namespace("embeddings")
    with strata.open_store(json.loads(sys.argv[1])) as store:
        got = store.get(Key("embeddings", "s", "doc-1"))
    print(json.dumps(None if got is None else
                     {"dtype": str(got.dtype), "shape": list(got.shape), "hex": got.numpy().tobytes().hex()}))
"""


def test_opening_keeps_objects_of_namespaces_this_process_never_registered(tmp_path):
    cfg = json.dumps(file_only(tmp_path))
    run_child(WRITE_EMBEDDING, cfg, EMBEDDING.numpy().tobytes().hex())
    files = object_files(tmp_path)
    assert len(files) == 1

    stats = json.loads(run_child(OPEN_UNREGISTERED, cfg))
    assert object_files(tmp_path) == files, "opening the store deleted another namespace's object"
    assert stats["objects"] == 1 and stats["discarded"] == 0 and stats["foreign_namespaces"] == 1
    assert stats["namespaces"]["embeddings"]["objects"] == 1

    got = json.loads(run_child(READ_EMBEDDING, cfg))
    want = {"dtype": str(EMBEDDING.dtype), "shape": list(EMBEDDING.shape), "hex": EMBEDDING.numpy().tobytes().hex()}
    assert got == want


# -- a live store and another process's later objects ----------------------------------------

PUT_ONE = """
    import json, sys, torch, strata
    from strata import Key
    with strata.open_store(json.loads(sys.argv[1])) as store:
        assert store.put(Key("kv", "m", sys.argv[2]), torch.arange(int(sys.argv[3]), dtype=torch.int32))
"""


def test_a_live_store_finds_what_another_process_saved_after_it_opened(tmp_path):
    with strata.open_store(file_only(tmp_path)) as store:
        run_child(PUT_ONE, json.dumps(file_only(tmp_path)), "late", 300)
        k = Key("kv", "m", "late")
        assert store.contains(k)
        assert torch.equal(store.get(k), torch.arange(300, dtype=torch.int32))
        s = store.stats()["tiers"]["file"]
        assert s["objects"] == 1 and s["bytes"] > 1200 and s["hits"] == 1 and s["errors"] == 0
        assert not store.contains(Key("kv", "m", "never"))


def test_get_into_and_a_batch_of_contains_see_the_other_stores_objects(tmp_path):
    with strata.open_store(file_only(tmp_path)) as a, strata.open_store(file_only(tmp_path)) as b:
        keys = [Key("kv", "m", str(i)) for i in range(40)]
        for i, k in enumerate(keys[:30]):
            assert a.put(k, torch.full((64,), i, dtype=torch.int64))
        assert b.contains_many(keys + keys[:3]) == [True] * 30 + [False] * 10 + [True] * 3
        out = torch.empty(64, dtype=torch.int64)
        assert b.get_into(keys[7], out) and torch.equal(out, torch.full((64,), 7))
        assert b.stats()["tiers"]["file"]["objects"] == 30


def test_an_object_another_store_deleted_is_a_plain_miss(tmp_path):
    with strata.open_store(file_only(tmp_path)) as a, strata.open_store(file_only(tmp_path)) as b:
        k = Key("kv", "m", "x")
        assert a.put(k, torch.ones(100))
        assert torch.equal(b.get(k), torch.ones(100))
        assert a.delete(k)
        assert not b.contains(k)
        assert b.get(k) is None
        s = b.stats()["tiers"]["file"]
        assert s["errors"] == 0 and s["checksum_failures"] == 0 and s["objects"] == 0 and s["bytes"] == 0


def test_a_newer_version_saved_elsewhere_replaces_the_vanished_one(tmp_path):
    with strata.open_store(file_only(tmp_path)) as a, strata.open_store(file_only(tmp_path)) as b:
        k = Key("kv", "m", "x")
        assert a.put(k, torch.ones(100))
        assert torch.equal(b.get(k), torch.ones(100))
        assert a.put(k, torch.full((10, 3), 2.0))  # a's old version (b's file) is gone now
        assert torch.equal(b.get(k), torch.full((10, 3), 2.0))
        s = b.stats()["tiers"]["file"]
        assert s["errors"] == 0 and s["objects"] == 1 and s["misses"] == 0


def test_a_file_removed_between_lookup_and_read_is_a_plain_miss(tmp_path, monkeypatch):
    from strata.store.tiers.file import FileTier

    real_read_into = FileTier.read_into

    def removed_first(self, e, out):  # another process deletes the file just as the read starts
        e.loc.unlink()
        return real_read_into(self, e, out)

    with strata.open_store(file_only(tmp_path)) as a, strata.open_store(file_only(tmp_path)) as b:
        k = Key("kv", "m", "x")
        assert a.put(k, torch.ones(100))
        assert b.contains(k)
        monkeypatch.setattr(FileTier, "read_into", removed_first)
        assert b.get(k) is None
        monkeypatch.setattr(FileTier, "read_into", real_read_into)
        s = b.stats()["tiers"]["file"]
        assert s["misses"] == 1 and s["errors"] == 0 and s["objects"] == 0 and s["bytes"] == 0
        assert a.put(k, torch.full((100,), 3.0))
        assert torch.equal(b.get(k), torch.full((100,), 3.0))


def test_the_newest_of_two_processes_versions_is_found(tmp_path):
    stores = [strata.open_store(file_only(tmp_path)) for _ in range(3)]
    try:
        k = Key("kv", "m", "x")
        assert stores[0].put(k, torch.ones(10)) and stores[1].put(k, torch.full((10,), 2.0))
        assert len(object_files(tmp_path)) == 2  # neither writer knew of the other's version
        assert torch.equal(stores[2].get(k), torch.full((10,), 2.0))
    finally:
        for store in stores:
            store.close()


def test_a_corrupt_file_found_in_the_directory_is_dropped_not_served(tmp_path):
    with strata.open_store(file_only(tmp_path)) as a, strata.open_store(file_only(tmp_path)) as b:
        k = Key("kv", "m", "x")
        assert a.put(k, torch.ones(100))
        (f,) = (tmp_path / "objects").glob("*/*.obj")
        data = bytearray(f.read_bytes())
        data[20] ^= 0x01  # inside the fixed header
        f.write_bytes(bytes(data))
        assert not b.contains(k) and b.get(k) is None
        assert b.stats()["tiers"]["file"]["discarded"] == 1 and object_files(tmp_path) == []


def test_a_delete_here_is_not_undone_by_finding_the_file_a_reader_still_holds(tmp_path):
    with strata.open_store(file_only(tmp_path)) as store:
        k = Key("kv", "m", "x")
        assert store.put(k, torch.ones(100))
        tier = store.tiers[0]
        with store.chain.lock:
            e = tier.lookup(k.encoded)
            tier.lease(e)  # a read in progress
        assert store.delete(k)
        assert tier.discover([k.encoded]) == [None]
        assert not store.contains(k) and store.get(k) is None
        store.chain.release(tier, e)
        assert object_files(tmp_path) == [] and tier.used == 0


def test_a_put_in_flight_here_is_not_adopted_from_the_directory(tmp_path):
    with strata.open_store(file_only(tmp_path)) as store:
        tier, k, data = store.tiers[0], Key("kv", "m", "x"), torch.ones(100)
        meta, _ = describe(data)
        meta = meta.with_checksum(checksum(data))
        with store.chain.lock:
            e = tier.reserve(k.encoded, "kv", meta, lambda t, victim: True)
        assert tier.write(e, data)  # the file is in place, the entry not yet published
        assert tier.discover([k.encoded]) == [None] and not store.contains(k)
        with store.chain.lock:
            tier.publish(e)
        assert torch.equal(store.get(k), data) and tier.used == e.size and len(object_files(tmp_path)) == 1


# -- temporary files of puts in flight ---------------------------------------------------------

PAUSED_WRITER = """
    import json, os, sys, torch, strata
    from strata import Key
    real_replace, paused = os.replace, []

    def replace(src, dst):  # hold the first put between writing its temporary file and renaming it
        if str(src).endswith(".tmp") and not paused:
            paused.append(src)
            print("paused", flush=True)
            sys.stdin.readline()
        return real_replace(src, dst)

    os.replace = replace
    with strata.open_store(json.loads(sys.argv[1])) as store:
        ok = store.put(Key("kv", "m", "in-flight"), torch.arange(256, dtype=torch.int64))
    print("acked" if ok else "rejected", flush=True)
"""

OPEN_AND_CLOSE = """
    import json, sys, strata
    strata.open_store(json.loads(sys.argv[1])).close()
"""

READ_KEYS = """
    import json, sys, strata
    from strata import Key
    out = {}
    with strata.open_store(json.loads(sys.argv[1])) as store:
        for name in json.loads(sys.argv[2]):
            got = store.get(Key("kv", "m", name))
            out[name] = None if got is None else got.tolist()
    print(json.dumps(out))
"""


def test_opening_the_store_keeps_another_process_put_in_flight(tmp_path):
    cfg = json.dumps(cpu_and_file(tmp_path))
    writer = child(PAUSED_WRITER, cfg, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert writer.stdout.readline().strip() == "paused", writer.stderr.read()[-3000:]
        assert len(list((tmp_path / "tmp").iterdir())) == 1
        run_child(OPEN_AND_CLOSE, cfg)  # its scan runs while the writer's temporary file exists
        out, err = writer.communicate("go\n", timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, err[-3000:]
    assert out.strip() == "acked"
    got = json.loads(run_child(READ_KEYS, cfg, json.dumps(["in-flight"])))
    assert got == {"in-flight": list(range(256))}, "an acknowledged put was lost to another process's open"


MANY_WRITES = """
    import json, sys, torch, strata
    from strata import Key
    acked = []
    with strata.open_store(json.loads(sys.argv[1])) as store:
        for i in range(int(sys.argv[3])):
            name = f"{sys.argv[2]}-{i}"
            if store.put(Key("kv", "m", name), torch.full((128,), i, dtype=torch.int64)):
                acked.append(name)
    print(json.dumps(acked))
"""

OPEN_UNTIL_STOPPED = """
    import json, os, sys, strata
    cfg, stop = json.loads(sys.argv[1]), sys.argv[2]
    strata.open_store(cfg).close()
    print("opened", flush=True)
    while not os.path.exists(stop):
        strata.open_store(cfg).close()
"""


def test_every_acknowledged_put_survives_other_processes_opening_the_store(tmp_path):
    root, stop = tmp_path / "store", tmp_path / "stop"
    cfg = json.dumps(cpu_and_file(root))
    opener = child(OPEN_UNTIL_STOPPED, cfg, stop, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    writers = []
    try:
        assert opener.stdout.readline().strip() == "opened", opener.stderr.read()[-3000:]
        writers = [child(MANY_WRITES, cfg, f"w{w}", 50, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                   for w in range(3)]
        results = [w.communicate(timeout=300) for w in writers]
        stop.touch()
        _, opener_err = opener.communicate(timeout=120)
    finally:
        stop.touch()
        for p in [opener, *writers]:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert opener.returncode == 0, opener_err[-3000:]
    acked = []
    for w, (out, err) in zip(writers, results):
        assert w.returncode == 0, err[-3000:]
        acked += json.loads(out)
    assert len(acked) == 150
    got = json.loads(run_child(READ_KEYS, cfg, json.dumps(acked)))
    lost = [name for name in acked if got[name] != [int(name.rsplit("-", 1)[1])] * 128]
    assert not lost, f"{len(lost)} acknowledged puts lost: {lost[:5]}"


def test_opening_removes_only_temporary_files_of_dead_writers(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    names = {"dead": f"{dead.pid}-{'a' * 32}.tmp", "live": f"{os.getpid()}-{'b' * 32}.tmp",
             "legacy_young": f"{'c' * 32}.tmp", "legacy_old": f"{'d' * 32}.tmp", "junk": "half-a-put"}
    for name in names.values():
        (tmp / name).write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(tmp / names["legacy_old"], (old, old))
    strata.open_store(file_only(tmp_path)).close()
    assert sorted(p.name for p in tmp.iterdir()) == sorted([names["live"], names["legacy_young"]])


def test_another_keys_file_under_a_keys_name_is_counted_and_never_indexed(tmp_path):
    """b's object file copied over a's file name while closed. The old code indexed it under b (the
    key in its header) without checking the name, then dropped it as b's older version (or, when
    it was the newer file, unlinked b's own file and indexed the misnamed one): recovered said 2,
    nothing was counted. Now it is counted as discarded, indexed under no key, and left in place."""
    import hashlib

    a, b = Key("kv", "s", "a"), Key("kv", "s", "b")
    for first in (a, b):  # the misnamed file older, then newer, than b's own
        root = tmp_path / first.name
        with strata.open_store(file_only(root)) as store:
            for k in (a, b) if first is a else (b, a):
                assert store.put(k, torch.full((512,), float(k is b)))

        def file_of(k):
            digest = hashlib.sha256(k.encoded).hexdigest()
            (path,) = (root / "objects" / digest[:2]).glob(f"{digest}-*.obj")
            return path

        file_of(a).write_bytes(file_of(b).read_bytes())
        before = object_files(root)
        with strata.open_store(file_only(root)) as store:
            s = store.stats()["tiers"]["file"]
            assert (s["recovered"], s["discarded"], s["objects"]) == (1, 1, 1), first
            assert store.get(a) is None and not store.contains(a)
            assert torch.equal(store.get(b), torch.ones(512))
            assert object_files(root) == before  # neither b's own file nor the misnamed one removed
            assert store.put(a, torch.full((512,), 7.0)) and torch.equal(store.get(a), torch.full((512,), 7.0))
