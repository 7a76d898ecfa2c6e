"""The strata command as a new user meets it: --version, bare help, quiet pipes, readable sizes,
Redis bytes that are Strata's, scopes named by their facts, preset YAML, looking that creates
nothing, and the two commands other modules provide (stats --prometheus, plot)."""

import json
import subprocess
import sys
import types
import uuid
from importlib import resources

import pytest
import torch

import strata
from strata import Key
from strata.cli import main
from strata.config import UNBOUNDED, format_size

SCOPE_LABEL = "__scope__"  # the name of the object holding a scope's facts (strata.report.SCOPE_LABEL)


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"strata {strata.__version__}"


def test_bare_strata_prints_help_not_an_error(capsys):
    assert main([]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("usage: strata") and "stats" in out.out and "presets" in out.out
    assert "error" not in out.err


def test_a_closed_pipe_ends_the_command_quietly():
    # the reader is gone before the command writes a byte: `strata stats | head -0`
    proc = subprocess.Popen([sys.executable, "-m", "strata.cli", "stats"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_unbounded_capacity_is_named_not_printed_as_tebibytes(tmp_path, capsys):
    assert format_size(UNBOUNDED) == "unbounded"
    assert format_size(3 << 40) == "3.0 TiB"  # a real size stays a size
    cfg = tmp_path / "store.yaml"  # a ranges tier (like redis without maxmemory) has no capacity of its own
    cfg.write_text("tiers:\n  - kind: cpu\n    capacity: 1MiB\n  - kind: ranges\n")
    assert main(["stats", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "unbounded" in out and "TiB" not in out


def test_redis_bytes_are_stratas_and_the_servers_memory_is_named_apart(redis_url, capsys):
    import redis

    prefix = f"t-{uuid.uuid4().hex}:"
    cfg = {"tiers": [{"kind": "redis", "url": redis_url, "key_prefix": prefix}]}
    other = f"not-strata-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(redis_url)
    client.set(other, b"x" * (2 << 20))  # another application's 2 MiB in the same server
    try:
        with strata.open_store(cfg) as store:
            store.put(Key("kv", "m", "a"), torch.zeros(10))
            tier = store.stats()["tiers"]["redis"]
            assert tier["server_memory"] >= 2 << 20 and tier["server_keys"] >= 2
            assert tier.get("bytes") != tier["server_memory"]  # never the whole server's memory as Strata's
            assert tier.get("bytes") is None or tier["bytes"] < 1 << 20
            assert tier.get("objects") is None or tier["objects"] == 1
            text = strata.cli.format_stats(store.stats())
        assert "server" in text and format_size(tier["server_memory"]) in text
        used_col = text.splitlines()[1].split()[2]
        assert used_col != format_size(tier["server_memory"]).split()[0]
    finally:
        client.delete(other)
        client.close()


def test_inspect_names_scopes_by_their_facts(tmp_path, capsys):
    cfg = tmp_path / "store.yaml"
    cfg.write_text(f"tiers:\n  - kind: file\n    path: {tmp_path / 'files'}\n    capacity: 4MiB\n")
    facts = {"model": "llama-1b", "dtype": "bfloat16", "layout": "nhd"}
    scope = strata.keys.make_scope(**facts)
    with strata.open_store(str(cfg)) as store:
        store.put(Key("kv", scope, SCOPE_LABEL), json.dumps(facts).encode())
        for i in range(3):
            store.put(Key("kv", scope, f"c{i}"), torch.zeros(100))
        store.put(Key("kv", strata.keys.make_scope(model="x"), "c0"), torch.zeros(10))  # no label: the hash
    assert main(["inspect", str(cfg)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "llama-1b" in line)
    assert "model=llama-1b" in row and "dtype=bfloat16" in row and "layout=nhd" in row
    assert row.split()[:1] == ["kv"] and " 3 " in row  # the label itself is not counted as an object
    assert strata.keys.make_scope(model="x") in out


def test_presets_show_prints_a_presets_yaml(capsys):
    assert main(["presets", "--show", "cpu_file"]) == 0
    shipped = resources.files("strata.configs").joinpath("cpu_file.yaml").read_text()
    assert capsys.readouterr().out == shipped
    assert main(["presets", "--show", "nope"]) == 2
    assert capsys.readouterr().err.startswith("strata: error: presets --show: got 'nope'; allowed: ")


@pytest.mark.parametrize("cmd", [["stats", "--config"], ["inspect"], ["gc"]])
def test_looking_at_a_file_tier_config_creates_nothing(tmp_path, capsys, cmd):
    where = tmp_path / "not-yet" / "file-tier"
    cfg = tmp_path / "store.yaml"
    cfg.write_text("tiers:\n  - kind: cpu\n    capacity: 1MiB\n"
                   f"  - kind: file\n    path: {where}\n    capacity: 1MiB\n")
    assert main(cmd + [str(cfg)]) == 0
    assert not (tmp_path / "not-yet").exists()
    assert "nothing is stored there yet" in capsys.readouterr().out


def test_a_file_tier_opened_without_create_refuses_a_missing_directory(tmp_path):
    from strata.config_load import load_config
    from strata.store.tiers import RegionAbsent, build_tier

    store_cfg = load_config({"tiers": [{"kind": "file", "path": str(tmp_path / "missing"), "capacity": "1MiB"}]})
    with pytest.raises(RegionAbsent, match="missing"):
        build_tier(store_cfg.tiers[0], store_cfg, create=False)
    assert not (tmp_path / "missing").exists()
    with strata.open_store(store_cfg) as store:  # opening normally creates it
        store.put(Key("kv", "m", "a"), torch.zeros(10))
    tier = build_tier(store_cfg.tiers[0], store_cfg, create=False)  # and then it opens without create
    assert len(list(tier.contents())) == 1
    tier.close()


def test_stats_prometheus_prints_the_metrics_exposition(monkeypatch, capsys):
    seen = []
    stub = types.ModuleType("strata.metrics")
    stub.exposition = lambda stats: seen.append(stats) or "strata_tier_hits_total{tier=\"cpu\"} 0\n"
    monkeypatch.setitem(sys.modules, "strata.metrics", stub)
    assert main(["stats", "--prometheus"]) == 0
    assert capsys.readouterr().out == "strata_tier_hits_total{tier=\"cpu\"} 0\n"
    assert set(seen[0]) >= {"tiers", "namespaces", "writeback"}


def test_plot_draws_a_trace_through_the_timeline_module(tmp_path, monkeypatch, capsys):
    calls = []
    stub = types.ModuleType("strata.timeline")
    stub.plot = lambda trace, out: calls.append((str(trace), str(out)))
    monkeypatch.setitem(sys.modules, "strata.timeline", stub)
    trace = tmp_path / "run.trace.json"
    trace.write_text("[]")
    assert main(["plot", str(trace), "-o", str(tmp_path / "t.png")]) == 0
    assert calls == [(str(trace), str(tmp_path / "t.png"))]
    assert str(tmp_path / "t.png") in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "absent.json"), "-o", str(tmp_path / "u.png")]) == 2
    assert "absent.json" in capsys.readouterr().err and len(calls) == 1
