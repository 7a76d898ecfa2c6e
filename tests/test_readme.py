"""The README's runnable snippets run verbatim: the store API block is executed as written, and the
configuration block is a config that validates (its redis password comes from the environment)."""

import re
from pathlib import Path

import yaml

import strata

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_the_store_api_snippet_runs_as_written():
    (snippet,) = [b for b in blocks("python") if "strata.open_store()" in b]
    exec(compile(snippet, "README.md (store API)", "exec"), {})


def test_the_configuration_block_is_a_valid_config(monkeypatch):
    monkeypatch.setenv("STRATA_REDIS_PASSWORD", "secret")
    (text,) = blocks("yaml")
    cfg = strata.load_config(yaml.safe_load(text))
    assert [t.kind for t in cfg.tiers] == ["cpu", "file", "cxl", "redis"]


def test_the_observability_snippets_run_as_written(tmp_path, monkeypatch):
    import os
    import shutil
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    (timeline,) = [b for b in blocks("python") if "handle.recording()" in b]
    exec(compile(timeline, "README.md (timeline)", "exec"), {})
    assert (tmp_path / "trace.json").is_file()
    (plot,) = [b for b in blocks("bash") if b.startswith("strata plot")]
    (tmp_path / "docs").mkdir()
    strata_bin = shutil.which("strata") or os.path.join(os.path.dirname(sys.executable), "strata")
    env = dict(os.environ, PATH=os.path.dirname(strata_bin) + os.pathsep + os.environ.get("PATH", ""))
    subprocess.run(plot, shell=True, check=True, env=env, cwd=tmp_path)
    assert (tmp_path / "docs" / "timeline.png").stat().st_size > 1000
    (metrics,) = [b for b in blocks("python") if "start_http_server" in b]
    exec(compile(metrics, "README.md (metrics)", "exec"), {})
