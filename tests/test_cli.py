"""The strata command: stats, presets, demo, and clear errors."""

import json
import subprocess
import sys

import torch

import strata
from strata import Key
from strata.cli import main


def test_stats_shows_what_a_persistent_store_holds(tmp_path, capsys):
    cfg = tmp_path / "store.yaml"
    cfg.write_text(f"tiers:\n  - kind: file\n    path: {tmp_path / 'files'}\n    capacity: 1MiB\n")
    with strata.open_store(str(cfg)) as store:
        store.put(Key("kv", "m", "a"), torch.zeros(100))
        store.put(Key("param", "m", "w"), torch.zeros(10))
    assert main(["stats", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "file" in out and "kv" in out and "param" in out
    assert main(["stats", "--config", str(cfg), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["tiers"]["file"]["objects"] == 2


def test_inspect_summarises_a_cxl_region_by_namespace_and_scope(tmp_path, capsys):
    cfg = tmp_path / "store.yaml"
    cfg.write_text(f"tiers:\n  - kind: cxl\n    path: {tmp_path / 'region'}\n    size: 4MiB\n")
    with strata.open_store(str(cfg)) as store:
        for i in range(3):
            store.put(Key("kv", "llama-1b", f"c{i}"), torch.zeros(1000))
        store.put(Key("param", "qwen", "w"), torch.zeros(10))
    assert main(["inspect", str(cfg)]) == 0  # another process's view: a fresh open of the region
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cxl (cxl, ") and "4 objects" in out[0] and "fragmentation" in out[0]
    rows = {tuple(line.split()[:3]) for line in out[2:]}
    assert ("kv", "llama-1b", "3") in rows and ("param", "qwen", "1") in rows


def test_bad_config_is_a_one_line_error_and_exit_code_2(capsys):
    assert main(["stats", "--config", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("strata: error: config: got 'no-such-preset'")


def test_presets_and_demo_run_as_installed_commands():
    out = subprocess.run([sys.executable, "-m", "strata.cli", "presets"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == strata.presets()
    demo = subprocess.run([sys.executable, "-m", "strata.cli", "demo"], capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "identical to the model without Strata" in demo.stdout
    # the vLLM half: weights streamed and KV reused from one engine, the warm round from the store
    assert "warm outputs: identical to the cold round | weights and KV in one StorageEngine: True" in demo.stdout
    assert "0/2208 prompt tokens" in demo.stdout and "2048/2208 prompt tokens" in demo.stdout
