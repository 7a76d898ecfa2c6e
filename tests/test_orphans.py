"""Objects owned by a process: a killed offloader's weights are orphans that gc drops; a live
owner's, another host's and undecidable ones never are; a put no tier keeps says False."""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import strata
from strata import Key
from strata.cli import main
from strata.store.owners import Owner, is_alive, owned_scope, owner_of
from tiny_models import make

TESTS = Path(__file__).parent
LAYERS = 4  # llama blocks of 144.5 KiB each, 578 KiB in all


def file_store(tmp_path, capacity="8MiB", cpu=None, evict="lower"):
    tiers = [{"kind": "file", "path": str(tmp_path / "files"), "capacity": capacity}]
    if cpu:
        tiers.insert(0, {"kind": "cpu", "capacity": cpu})
    return {"tiers": tiers, "namespaces": {"param": {"evict": evict}}}


def write_yaml(tmp_path, cfg) -> str:
    lines = ["tiers:"]
    for t in cfg["tiers"]:
        lines.append(f"  - kind: {t['kind']}")
        lines += [f"    {k}: {v}" for k, v in t.items() if k != "kind"]
    lines += ["namespaces:", "  param:", f"    evict: {cfg['namespaces']['param']['evict']}"]
    path = tmp_path / "store.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def offload_then_get_killed(config: str) -> int:
    """A process that offloads a tiny model into the store of ``config``, says "ready" and is
    SIGKILLed (no atexit, no detach); its pid."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import strata
        from tiny_models import make
        store = strata.open_store({config!r})
        handle = strata.offload(make("llama", layers={LAYERS}), store=store, device="cpu", progress=False)
        store.flush()
        print("ready", flush=True)
        sys.stdin.read()  # until killed
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "ready", f"the offloading process did not get ready (exit {p.poll()})"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
        p.stdin.close()
    assert p.returncode == -signal.SIGKILL
    return p.pid


def test_owned_scope_round_trips_and_names_this_live_process():
    scope = owned_scope("model=a:b")  # ':' in the fingerprint is fine
    owner = owner_of(scope)
    assert owner is not None and owner.pid == os.getpid() and owner.fingerprint == "model=a:b"
    assert owner.scope == scope and owned_scope("model=a:b") == scope  # stable within a process
    assert is_alive(owner) is True
    for plain in ("llama-1b", "pid:", "pid:h:12x:5:fp", "pid:h:12:5", "0123456789abcdef"):
        assert owner_of(plain) is None


def test_a_reused_pid_is_dead_and_an_exited_one_too():
    me = owner_of(owned_scope("fp"))
    if me.start == "0":
        pytest.skip("no /proc here: a reused pid cannot be told apart")
    assert is_alive(dataclasses.replace(me, start=str(int(me.start) + 1))) is False
    assert is_alive(dataclasses.replace(me, pid=dead_pid())) is False


def test_an_owner_on_another_host_is_never_dead():
    me = owner_of(owned_scope("fp"))
    assert is_alive(dataclasses.replace(me, host="elsewhere", pid=dead_pid())) is None
    assert is_alive(Owner("elsewhere", dead_pid(), "1", "fp")) is None


def test_orphans_are_keys_of_dead_owners_only(tmp_path):
    me = owner_of(owned_scope("fp"))
    dead = dataclasses.replace(me, pid=dead_pid())
    keys = {
        "dead": Key("param", dead.scope, "w"),
        "live": Key("param", me.scope, "w"),
        "other_host": Key("param", Owner("elsewhere", dead.pid, "1", "fp").scope, "w"),
        "plain": Key("param", "llama-1b", "w"),
        "kv_dead": Key("kv", dataclasses.replace(dead, fingerprint="kv").scope, "c0"),
    }
    if me.start != "0":  # our own pid, another start time: a process before us had this pid
        keys["reused"] = Key("param", dataclasses.replace(me, start=str(int(me.start) - 1)).scope, "w")
    with strata.open_store(file_store(tmp_path)) as store:
        for k in keys.values():
            assert store.put(k, torch.zeros(8))
        dead_keys = {keys["dead"], keys["kv_dead"], keys.get("reused", keys["dead"])}
        assert set(store.orphans()) == dead_keys
        assert store.gc() == len(dead_keys)
        assert store.orphans() == [] and store.gc() == 0
        assert set(store.keys()) == {keys["live"], keys["other_host"], keys["plain"]}


def test_a_killed_offloader_leaves_orphans_that_inspect_shows_and_gc_drops(tmp_path, capsys):
    cfg = file_store(tmp_path, capacity="640KiB", cpu="200KiB")  # the file tier is barely over the weights
    config = write_yaml(tmp_path, cfg)
    pid = offload_then_get_killed(config)
    kv = Key("kv", "llama", "chunk")
    with strata.open_store(config) as store:
        orphans = store.orphans()
        assert len(orphans) == LAYERS and {owner_of(k.scope).pid for k in orphans} == {pid}
        assert set(orphans) == set(store.keys("param"))
        # the orphans fill the last tier and may not be evicted from it: KV never persists
        assert store.put(kv, torch.zeros(25_000)) is True  # the cpu tier keeps it ...
        assert not store.contains(kv, mode="exact", tier="file")  # ... but the file tier refused it
        store.delete(kv)

    assert main(["inspect", config]) == 0
    out = capsys.readouterr().out
    assert f"orphan: pid {pid} dead" in out
    assert f"strata gc {config} drops {LAYERS} orphaned objects" in out

    assert main(["gc", config]) == 0
    assert capsys.readouterr().out.startswith(f"dropped {LAYERS} orphaned objects (")
    with strata.open_store(config) as store:
        assert store.orphans() == [] and store.keys("param") == []
        assert store.put(kv, torch.zeros(25_000)) and store.contains(kv, mode="exact", tier="file")
    assert main(["inspect", config]) == 0
    out = capsys.readouterr().out
    assert "orphan" not in out and "strata gc" not in out


@pytest.mark.parametrize("static", [False, True], ids=["hook", "static"])
def test_a_process_that_exits_with_a_store_left_open_flushes_it_and_leaves_no_orphans(tmp_path, static):
    # Before: a store left open at exit was never closed: what write-back still held in memory never
    # reached the file tier (of 500 acknowledged puts a few dozen did), and an offloaded model's blocks
    # stayed there as orphans of the exited process.
    cfg = {"tiers": [{"kind": "cpu", "capacity": "64MiB", "write": "back"},
                     {"kind": "file", "path": str(tmp_path / "files"), "capacity": "256MiB"}]}
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        import strata
        from tiny_models import make
        store = strata.open_store({cfg!r})
        model = make("llama", layers={LAYERS})
        handle = strata.offload(model, store=store, device="cpu", progress=False, static={static})
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        scope = strata.make_scope(test="exit")
        for i in range(500):
            assert store.put(strata.Key("kv", scope, f"chunk-{{i}}"), torch.full((2048,), float(i)))
        print("exiting", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "exiting", done.stderr
    assert "its weights are restored" not in done.stderr  # nothing to restore into at exit: dropped
    with strata.open_store({"tiers": cfg["tiers"][1:]}) as store:
        assert store.keys("param") == [] and store.orphans() == []
        scope = strata.make_scope(test="exit")
        got = [store.get(Key("kv", scope, f"chunk-{i}")) for i in range(500)]
        assert sum(g is not None for g in got) == 500
        assert all(torch.equal(g, torch.full((2048,), float(i))) for i, g in enumerate(got))


@pytest.mark.parametrize("write", ["back", "through"])
def test_a_store_dropped_without_close_still_gets_its_writes_down(tmp_path, write):
    # Before: a store opened in a function and dropped there (no close, no reference left) was collected
    # with its write-back queue: at exit 129 of 300 acknowledged puts had reached the file tier.
    cfg = {"tiers": [{"kind": "cpu", "capacity": "64MiB", "write": write},
                     {"kind": "file", "path": str(tmp_path / "files"), "capacity": "256MiB"}]}
    code = textwrap.dedent(f"""
        import gc, weakref, torch, strata
        def save():
            store = strata.open_store({cfg!r})
            for i in range(300):
                assert store.put(strata.Key("kv", "s", f"chunk-{{i}}"), torch.full((2048,), float(i)))
            return weakref.ref(store)
        ref = save()
        gc.collect()
        assert ref() is None
        print("dropped", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "dropped", done.stderr
    with strata.open_store({"tiers": cfg["tiers"][1:]}) as store:
        got = [store.get(Key("kv", "s", f"chunk-{i}")) for i in range(300)]
        assert all(g is not None and torch.equal(g, torch.full((2048,), float(i))) for i, g in enumerate(got))


def test_a_live_offloader_owns_its_blocks(tmp_path):
    cfg = file_store(tmp_path)
    model = make("llama", layers=LAYERS)
    with strata.open_store(cfg) as store:
        handle = strata.offload(model, store=store, device="cpu", progress=False)
        scopes = {k.scope for k in handle.keys.values()}
        assert len(scopes) == 1 and owner_of(scopes.pop()).pid == os.getpid()
        with strata.open_store(cfg) as other:  # another opener sees the objects, owned by a live process
            assert len(other.keys("param")) == LAYERS
            assert other.orphans() == [] and other.gc() == 0
        assert store.orphans() == [] and store.gc() == 0
        handle.detach()
        assert store.keys("param") == []


@pytest.mark.parametrize("evict", ["lower", "never"])
def test_a_put_no_tier_keeps_returns_false(tmp_path, evict):
    """The only tier is full of weights it may not evict (nothing below to demote them to)."""
    with strata.open_store(file_store(tmp_path, capacity="640KiB", evict=evict)) as store:
        handle = strata.offload(make("llama", layers=LAYERS), store=store, device="cpu", progress=False)
        kv = Key("kv", "llama", "chunk")
        assert store.put(kv, torch.zeros(25_000)) is False
        assert store.get(kv) is None and not store.contains(kv)
        assert store.stats()["namespaces"]["kv"]["put_rejected"] == 1
        handle.detach()
        assert store.put(kv, torch.zeros(25_000)) is True and store.contains(kv)


def test_the_vllm_loader_drops_orphans_before_offloading(tmp_path, caplog):
    pytest.importorskip("vllm")
    from strata.integrations import vllm_loader

    config = write_yaml(tmp_path, file_store(tmp_path))
    offload_then_get_killed(config)
    vllm_loader.log.propagate = True  # the loader's log has its own stderr handler; caplog listens at the root
    try:
        with strata.open_store(config) as store, caplog.at_level("INFO", logger="strata.vllm"):
            live = Key("param", owned_scope("live"), "w")
            store.put(live, torch.zeros(8))
            vllm_loader._drop_orphans(store)
            assert store.keys("param") == [live]
            assert f"dropped {LAYERS} orphaned objects" in caplog.text
    finally:
        vllm_loader.log.propagate = False
