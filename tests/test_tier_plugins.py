"""Third-party tiers by entry point (issue #19): the example plugin ``examples/strata-sqlite`` is
installed for real (pip, into a directory of its own) and used by name from YAML in a
subprocess that has that directory on its path, and it passes the conformance kit like the
built-in tiers. The config side: a plugin's own keys are checked with the errors built-in keys
get, and an unknown, broken or shadowing plugin says what is wrong instead of crashing."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "strata-sqlite"
TESTS = Path(__file__).resolve().parent


# -- installing plugins ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The example plugin, built and installed by pip (offline) into a --target directory."""
    root = tmp_path_factory.mktemp("plugin")
    src, site = root / "strata-sqlite", root / "site"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))  # no build
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"pip cannot build and install examples/strata-sqlite offline here: {proc.stderr[-600:]}")
    return site


@pytest.fixture(scope="module")
def odd_plugins(tmp_path_factory):
    """A distribution (metadata only) whose entry points are a broken plugin, one that names no
    Tier class, and one that takes a built-in kind's name."""
    site = tmp_path_factory.mktemp("odd-plugins")
    info = site / "odd_tiers-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: odd-tiers\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[strata.tiers]\nbroken = strata_no_such_module:Tier\n"
                                           "notatier = json:loads\nfile = strata_sqlite:SqliteTier\n")
    return site


def run_py(code: str, *paths: Path, cwd: Path, timeout: float = 240) -> str:
    """Run ``code`` in a new interpreter with ``paths`` (and this directory) on its path; its stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"the subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def last_json(out: str):
    return json.loads(out.strip().splitlines()[-1])


# -- the sqlite tier for the conformance kit (imported by the subprocess) -----------------------------


def sqlite_tier(workdir, capacity=None):
    return {"kind": "sqlite", "path": str(Path(workdir) / "tier.db"), "capacity": capacity or "16MiB",
            "timeout_ms": 250}


class SqliteRaw:
    """A key's newest row, read and written through a connection of its own, as another program would."""

    def __init__(self, tier):
        self.conn = sqlite3.connect(tier["path"], isolation_level=None, timeout=10)

    def _newest(self, key: bytes):
        rows = self.conn.execute("SELECT version, value FROM objects WHERE key = ? ORDER BY version DESC LIMIT 1",
                                 (key,)).fetchall()
        return rows[0] if rows else None

    def get(self, key):
        row = self._newest(key)
        return None if row is None else bytes(row[1])

    def set(self, key, value):
        self.conn.execute("UPDATE objects SET value = ? WHERE version = ?", (value, self._newest(key)[0]))

    def close(self):
        self.conn.close()


class _FailingConnection:
    """What a connection to a database on a failing disk does: every statement raises."""

    in_transaction = False

    def execute(self, *args, **kw):
        raise sqlite3.OperationalError("disk I/O error (injected)")

    executemany = execute


@contextlib.contextmanager
def sqlite_fault(tier, kind):
    """error: every statement the tier runs fails (sqlite3.OperationalError, as on a failing disk);
    timeout: another connection holds the database's write lock (BEGIN EXCLUSIVE), so the tier's
    writes wait their timeout_ms and fail ('database is locked')."""
    from strata_sqlite import tier as mod

    if kind == "error":
        real = mod.SqliteTier._conn
        mod.SqliteTier._conn = lambda self: _FailingConnection()
        try:
            yield
        finally:
            mod.SqliteTier._conn = real
    else:
        holder = sqlite3.connect(tier["path"], isolation_level=None, timeout=10)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()


KIT_RACE: dict[str, str] = {}  # none: the kit accepts the version before a write-back flush below


# -- the example plugin, installed ----------------------------------------------------------------------


def test_the_example_plugin_is_used_by_name_from_yaml(plugin_site, tmp_path):
    """``kind: sqlite`` with its own keys, from a YAML file: put, reopen, read from the sqlite tier.
    strata_sqlite is imported only once a config names it, and a second store on the same
    database is refused, naming it. Four threads putting and reading at once (a connection each)
    lose nothing, and the key they all overwrite holds one of their values whole."""
    db = tmp_path / "db" / "tier.db"
    (tmp_path / "store.yaml").write_text(textwrap.dedent(f"""\
        tiers:
          - kind: cpu
            capacity: 64KiB
            write: back
            pin: never
          - kind: sqlite
            name: disk
            path: {db}
            capacity: 8MiB
            timeout_ms: 500
            synchronous: full
        """))
    out = run_py("""
        import json, sys
        import torch
        import strata
        from strata import Key
        from strata.errors import StoreError

        strata.load_config("cpu")
        lazy = "strata_sqlite" not in sys.modules
        cfg = strata.load_config("store.yaml")
        disk = cfg.tiers[1]
        values = {Key("kv", "s", str(i)): torch.full((1024,), float(i)) for i in range(40)}  # 160 KiB: evicts
        with strata.open_store("store.yaml") as store:
            assert all(store.put(k, v) for k, v in values.items())
            store.flush()
            try:
                strata.open_store("store.yaml")
                second = None
            except StoreError as e:
                second = str(e)
        with strata.open_store("store.yaml") as store:
            ok = all(torch.equal(store.get(k, mode="exact", tier="disk"), v) for k, v in values.items())
            stats = store.stats()["tiers"]["disk"]

        # Threads: each puts its own keys and overwrites one shared key, straight into the sqlite tier.
        import threading
        alone = {"tiers": [{"kind": "sqlite", "path": "threads.db", "capacity": "64MiB"}]}
        shared, errors = Key("kv", "t", "shared"), []
        def work(t, store):
            try:
                for i in range(30):
                    assert store.put(Key("kv", "t", f"{t}-{i}"), torch.full((512,), t * 100.0 + i))
                    store.put(shared, torch.full((512,), float(t)))  # False when another thread's put replaced it
                    got = store.get(Key("kv", "t", f"{t}-{i}"))
                    assert got is not None and torch.equal(got, torch.full((512,), t * 100.0 + i)), (t, i)
            except BaseException as e:
                errors.append(repr(e))
        with strata.open_store(alone) as store:
            threads = [threading.Thread(target=work, args=(t, store)) for t in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            alive = [th.name for th in threads if th.is_alive()]
        with strata.open_store(alone) as store:
            kept = all(torch.equal(store.get(Key("kv", "t", f"{t}-{i}")), torch.full((512,), t * 100.0 + i))
                       for t in range(4) for i in range(30))
            last = store.get(shared)
            threaded = dict(errors=errors, alive=alive, kept=kept, objects=store.stats()["tiers"]["sqlite"]["objects"],
                            shared_ok=last is not None and float(last[0]) in (0.0, 1.0, 2.0, 3.0)
                            and torch.equal(last, torch.full((512,), float(last[0]))))
        print(json.dumps(dict(lazy=lazy, options=dict(disk.options), kind=disk.kind, ok=ok, second=second,
                              stats={k: stats[k] for k in ("kind", "objects", "recovered", "path")},
                              cls=type(store.tiers[0]).__module__, threaded=threaded)))
        """, plugin_site, cwd=tmp_path)
    got = last_json(out)
    assert got["threaded"] == {"errors": [], "alive": [], "kept": True, "objects": 121, "shared_ok": True}
    assert got["lazy"], "strata imported strata_sqlite before any config named kind: sqlite"
    assert got["options"] == {"path": str(db), "timeout_ms": 500, "synchronous": "full"}
    assert got["kind"] == "sqlite" and got["cls"] == "strata_sqlite.tier"
    assert got["ok"], "a value put into the sqlite tier was not read back from it after a reopen"
    assert got["stats"] == {"kind": "sqlite", "objects": 40, "recovered": 40, "path": str(db)}
    assert got["second"] and str(db) in got["second"] and "one process at a time" in got["second"]


def test_the_example_plugin_passes_the_conformance_kit(plugin_site, tmp_path):
    """check_tier on the installed sqlite tier: the model (alone, under a cpu tier writing through
    and back, with restarts), damage through the table's bytes (open and closed), faults (SQLite
    failing, and its write lock held past the tier's timeout), capacity. Nothing skipped."""
    out = run_py(f"""
        import json
        from strata.testing import check_tier
        from test_tier_plugins import SqliteRaw, sqlite_fault, sqlite_tier

        report = check_tier(sqlite_tier, name="sqlite", persistent=True, raw=SqliteRaw, fault=sqlite_fault,
                            capacity=256 << 10, exclude={KIT_RACE!r}, workdir=".")
        print(report)
        print(json.dumps(dict(passed=report.passed, skipped=report.skipped)))
        """, plugin_site, cwd=tmp_path, timeout=400)
    got = last_json(out)
    assert got["skipped"] == {c: f"excluded: {why}" for c, why in KIT_RACE.items()}, got["skipped"]
    from strata.testing.tiers import ALL_CHECKS

    assert sorted(got["passed"]) == sorted(set(ALL_CHECKS) - set(KIT_RACE)), out


def test_plugin_config_errors_name_what_is_allowed(plugin_site, odd_plugins, tmp_path):
    """A misspelt plugin key gets a did-you-mean over the plugin's keys; a missing required one
    is named; an unknown kind lists the installed plugin kinds; a plugin that fails to import, or
    names no Tier class, is a ConfigError naming its entry point, and importing strata with it
    installed is fine; a plugin named like a built-in kind is ignored with a warning."""
    out = run_py("""
        import json, warnings
        import strata
        from strata import ConfigError

        def error(tier):
            try:
                strata.load_config({"tiers": [tier]})
            except ConfigError as e:
                return str(e)
            return None

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = dict(
                typo=error({"kind": "sqlite", "path": "x.db", "capacity": "1MiB", "timout_ms": 5}),
                bad_value=error({"kind": "sqlite", "path": "x.db", "capacity": "1MiB", "timeout_ms": 0}),
                missing=error({"kind": "sqlite", "capacity": "1MiB"}),
                unknown=error({"kind": "sqlit", "capacity": "1MiB"}),
                broken=error({"kind": "broken", "capacity": "1MiB"}),
                notatier=error({"kind": "notatier", "capacity": "1MiB"}),
                file_kind=strata.load_config({"tiers": [{"kind": "file", "path": "d", "capacity": "1MiB"}]}).tiers[0].kind,
            )
            with strata.open_store({"tiers": [{"kind": "file", "path": "d", "capacity": "1MiB"}]}) as store:
                got["file_class"] = type(store.tiers[0]).__name__
        got["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        print(json.dumps(got))
        """, plugin_site, odd_plugins, cwd=tmp_path)
    got = last_json(out)
    assert "unknown key tiers[0]: got 'timout_ms'; allowed: capacity, kind, name, path, policy, synchronous, " \
           "timeout_ms, verify, write (did you mean 'timeout_ms'?) (the keys of tier plugin 'sqlite'" in got["typo"]
    assert got["bad_value"] == "tiers[0].timeout_ms: got 0; allowed: an integer >= 1"
    assert got["missing"].startswith("tiers[0].path: missing; allowed: The database file") and \
        "required by tier plugin 'sqlite'" in got["missing"]
    assert got["unknown"].startswith("tiers[0].kind: got 'sqlit'; allowed: broken, cpu, cxl, file, mooncake, notatier, ranges, "
                                     "redis, sqlite (did you mean 'sqlite'?); tier plugins installed: broken, "
                                     "notatier, sqlite")
    assert "tier plugin 'broken' cannot be used: entry point strata.tiers: broken = strata_no_such_module:Tier, " \
           "from odd-tiers 0.1: loading it raised ModuleNotFoundError: No module named 'strata_no_such_module'" \
           in got["broken"]
    assert "entry point strata.tiers: notatier = json:loads" in got["notatier"] and \
        "allowed: a subclass of strata.store.tiers.base.Tier" in got["notatier"]
    assert (got["file_kind"], got["file_class"]) == ("file", "FileTier")
    assert any("strata.tiers: file = strata_sqlite:SqliteTier" in w and "built-in" in w for w in got["warnings"]), \
        got["warnings"]


def test_strata_never_imports_the_example():
    """The example is a plugin like any other: nothing in strata names it."""
    named = [p for p in (ROOT / "strata").rglob("*.py") if "strata_sqlite" in p.read_text()]
    assert not named, named


# -- option specs, without installing anything -------------------------------------------------------


def _even(value, where):
    """An even integer."""
    if not isinstance(value, int) or value % 2:
        raise ValueError("allowed: an even integer")
    return value


from strata.store.tiers.cpu import CpuTier  # noqa: E402  (a real tier for the toy plugin to be)


class ToyTier(CpuTier):
    """A cpu tier under another name, declaring one key of each spec kind."""

    kind = "toy"
    config_keys = {"flag": bool, "count": int, "ratio": float, "label": str, "mode": ("a", "b"), "even": _even}
    config_required = ("capacity", "mode")


@pytest.fixture
def toy_plugin(monkeypatch):
    from strata.store.tiers import registry

    ep = metadata.EntryPoint(name="toy", value=f"{__name__}:ToyTier", group=registry.GROUP)
    monkeypatch.setattr(registry, "_entry_points", functools.lru_cache(maxsize=None)(lambda: {"toy": ep}))
    registry._loaded.clear()
    yield
    registry._loaded.clear()


def test_plugin_option_specs(toy_plugin):
    import torch

    import strata
    from strata import ConfigError, Key

    def tier(**kw):
        return {"tiers": [{"kind": "toy", "capacity": "1MiB", "mode": "a", "pin": "never", **kw}]}

    with pytest.raises(ConfigError, match=r"unknown key tiers\[0\]: got 'pin'"):
        strata.load_config(tier())
    ok = strata.load_config({"tiers": [{"kind": "toy", "capacity": "1MiB", "mode": "b", "flag": True, "count": -3,
                                        "ratio": 2, "label": "x", "even": 4, "write": "back"}]}).tiers[0]
    assert (ok.kind, ok.write, ok.verify) == ("toy", "back", False)
    assert ok.options == {"mode": "b", "flag": True, "count": -3, "ratio": 2.0, "label": "x", "even": 4}
    with pytest.raises((TypeError, AttributeError)):
        ok.options["mode"] = "a"
    base = {"kind": "toy", "capacity": "1MiB", "mode": "a"}
    for key, value, message in [("flag", "yes", r"tiers\[0\].flag: got 'yes'; allowed: true, false"),
                                ("count", True, r"tiers\[0\].count: got True; allowed: an integer"),
                                ("ratio", "1", r"tiers\[0\].ratio: got '1'; allowed: a number"),
                                ("label", 3, r"tiers\[0\].label: got 3; allowed: a str"),
                                ("mode", "c", r"tiers\[0\].mode: got 'c'; allowed: a, b"),
                                ("even", 3, r"tiers\[0\].even: got 3; allowed: an even integer")]:
        with pytest.raises(ConfigError, match=message):
            strata.load_config({"tiers": [{**base, key: value}]})
    with pytest.raises(ConfigError, match=r"tiers\[0\].mode: missing; allowed: a, b \(required by tier plugin 'toy'\)"):
        strata.load_config({"tiers": [{"kind": "toy", "capacity": "1MiB"}]})
    with pytest.raises(ConfigError, match=r"tiers\[0\].capacity: missing"):
        strata.load_config({"tiers": [{"kind": "toy", "mode": "a"}]})
    with strata.open_store({"tiers": [{**base, "policy": "s3fifo"}]}) as store:  # built by entry point
        assert type(store.tiers[0]) is ToyTier and store.put(Key("kv", "s", "k"), torch.ones(3))
        assert torch.equal(store.get(Key("kv", "s", "k")), torch.ones(3))
