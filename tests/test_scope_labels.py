"""Scope labels: the facts a scope hashes, kept beside the store (not as objects), so that
`strata inspect` names a scope by its model, dtype and layout instead of a hash alone."""

import json
import os
import uuid

import pytest
import torch

import strata
from strata import Key
from strata.cli import main
from strata.errors import StoreError
from strata.keys import make_scope
from strata.store.owners import Owner, this_host
from tiny_models import make

FACTS = {"model": "llama-1b", "dtype": "bfloat16", "layout": "nhd"}


def file_cfg(tmp_path, capacity="4MiB") -> dict:
    return {"tiers": [{"kind": "file", "path": str(tmp_path / "files"), "capacity": capacity}]}


def cxl_cfg(tmp_path) -> dict:
    return {"tiers": [{"kind": "cxl", "path": str(tmp_path / "region"), "size": "4MiB"}]}


def yaml_of(tmp_path, cfg: dict) -> str:
    lines = ["tiers:"]
    for t in cfg["tiers"]:
        lines += [f"  - kind: {t['kind']}"] + [f"    {k}: {v}" for k, v in t.items() if k != "kind"]
    path = tmp_path / "store.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def row_naming(out: str, text: str) -> str:
    rows = [line for line in out.splitlines() if text in line]
    assert len(rows) == 1, out
    return rows[0]


@pytest.mark.parametrize("kind", ["file", "cxl"])
def test_labels_survive_reopening_a_persistent_store(tmp_path, kind):
    cfg = file_cfg(tmp_path) if kind == "file" else cxl_cfg(tmp_path)
    scope = make_scope(**FACTS)
    with strata.open_store(cfg) as store:
        assert store.label_scope("kv", scope, FACTS) is True
        assert store.scope_labels() == {("kv", scope): FACTS}
    with strata.open_store(cfg, create=False) as store:
        assert store.scope_labels() == {("kv", scope): FACTS}
        assert list(store.scope_labels()[("kv", scope)]) == list(FACTS)  # the writer's order, kept


def test_a_newer_label_of_a_scope_replaces_the_older(tmp_path):
    scope = make_scope(**FACTS)
    with strata.open_store(file_cfg(tmp_path)) as store:
        store.label_scope("kv", scope, FACTS)
        store.label_scope("kv", scope, {"model": "llama-1b-v2"})
    with strata.open_store(file_cfg(tmp_path)) as store:
        assert store.scope_labels() == {("kv", scope): {"model": "llama-1b-v2"}}


def test_labels_are_no_objects_counted_or_charged(tmp_path):
    scope = make_scope(**FACTS)
    with strata.open_store(file_cfg(tmp_path, capacity="64KiB")) as store:
        for i in range(3):
            store.put(Key("kv", scope, f"c{i}"), torch.zeros(100))
        before = store.stats()["tiers"]["file"]
        assert store.label_scope("kv", scope, FACTS)
        after = store.stats()["tiers"]["file"]
        assert (after["objects"], after["bytes"]) == (before["objects"], before["bytes"]) == (3, before["bytes"])
        assert after["namespaces"] == before["namespaces"]
        assert len(store.keys()) == 3 and store.orphans() == []
    with strata.open_store(file_cfg(tmp_path, capacity="64KiB")) as store:  # nor recovered as objects
        assert store.stats()["tiers"]["file"]["objects"] == 3 and len(store.keys()) == 3
    with strata.open_store({"tiers": [{"kind": "cpu", "capacity": "1KiB"}]}) as store:  # memory only: uncharged
        for i in range(200):
            assert store.label_scope("kv", f"{scope}-{i}", FACTS)
        assert store.stats()["tiers"]["cpu"]["bytes"] == 0 and len(store.scope_labels()) == 200


def test_inspect_names_a_labelled_scope_by_its_facts(tmp_path, capsys):
    cfg = file_cfg(tmp_path)
    scope, plain = make_scope(**FACTS), make_scope(model="x")
    with strata.open_store(cfg) as store:
        for i in range(3):
            store.put(Key("kv", scope, f"c{i}"), torch.zeros(100))
        store.put(Key("kv", plain, "c0"), torch.zeros(10))  # no label: shown by its hash
        store.label_scope("kv", scope, FACTS)
    assert main(["inspect", yaml_of(tmp_path, cfg)]) == 0
    out = capsys.readouterr().out
    row = row_naming(out, "model=llama-1b")
    assert "dtype=bfloat16" in row and "layout=nhd" in row and scope[:8] in row
    assert row.split()[0] == "kv" and " 3 " in row
    assert plain in out
    assert out.splitlines()[0].startswith("file (file, ") and ": 4 objects," in out.splitlines()[0]


def test_inspect_of_a_cxl_store_reads_its_labels(tmp_path, capsys):
    cfg = cxl_cfg(tmp_path)
    scope = make_scope(**FACTS)
    with strata.open_store(cfg) as store:
        store.put(Key("kv", scope, "c0"), torch.zeros(100))
        store.label_scope("kv", scope, FACTS)
    assert main(["inspect", yaml_of(tmp_path, cfg)]) == 0
    out = capsys.readouterr().out
    assert "dtype=bfloat16" in row_naming(out, "model=llama-1b")


@pytest.mark.parametrize("kind", ["file", "cxl"])
def test_inspect_of_a_store_without_labels_works_and_creates_nothing(tmp_path, capsys, kind):
    cfg = file_cfg(tmp_path) if kind == "file" else cxl_cfg(tmp_path)
    scope = make_scope(model="unlabelled")
    with strata.open_store(cfg) as store:
        store.put(Key("kv", scope, "c0"), torch.zeros(10))
    before = sorted(p.name for p in tmp_path.iterdir())
    files_before = sorted(p.name for p in (tmp_path / "files").iterdir()) if kind == "file" else []
    assert main(["inspect", yaml_of(tmp_path, cfg)]) == 0
    assert scope in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["store.yaml"])
    if kind == "file":
        assert sorted(p.name for p in (tmp_path / "files").iterdir()) == files_before


@pytest.mark.parametrize("namespace, scope, facts, field", [
    ("kv", "s", ["model", "x"], "facts"),
    ("kv", "s", {}, "facts"),
    ("kv", "s", {"blocks": 32}, "facts['blocks']"),
    ("kv", "s", {"model": "x\ny"}, "facts['model']"),
    ("kv", "s", {"model": "x" * 1000}, "facts['model']"),
    ("kv", "s", {"bad key": "x"}, "facts key 'bad key'"),
    ("kv", "s", {f"k{i}": "v" for i in range(100)}, "facts"),
    ("nope", "s", FACTS, "namespace"),
    ("kv", "", FACTS, "scope"),
    ("kv", 7, FACTS, "scope"),
])
def test_bad_labels_are_refused_naming_the_field(tmp_path, namespace, scope, facts, field):
    with strata.open_store(file_cfg(tmp_path)) as store:
        with pytest.raises(StoreError) as refused:
            store.label_scope(namespace, scope, facts)
        assert str(refused.value).startswith(f"{field}: "), str(refused.value)
        assert "allowed" in str(refused.value)
        assert store.scope_labels() == {}
    assert not (tmp_path / "files" / "labels").exists() or not list((tmp_path / "files" / "labels").iterdir())


def test_a_closed_store_refuses_labels(tmp_path):
    store = strata.open_store(file_cfg(tmp_path))
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.label_scope("kv", "s", FACTS)
    with pytest.raises(StoreError, match="closed"):
        store.scope_labels()


def test_unreadable_sidecar_entries_are_skipped_never_raised(tmp_path, capsys):
    cfg = file_cfg(tmp_path)
    scope = make_scope(**FACTS)
    with strata.open_store(cfg) as store:
        store.put(Key("kv", scope, "c0"), torch.zeros(10))
        store.label_scope("kv", scope, FACTS)
    labels = tmp_path / "files" / "labels"
    (labels / "garbage.json").write_bytes(b"\x80not json")
    (labels / "huge.json").write_text(json.dumps({"namespace": "kv", "scope": "s", "facts": {"a": "b" * 100_000}}))
    (labels / "pickle.json").write_bytes(b"\x80\x04\x95")
    (labels / "wrong.json").write_text(json.dumps({"namespace": "kv", "scope": "s", "facts": {"a": 1}}))
    with strata.open_store(cfg) as store:
        assert store.scope_labels() == {("kv", scope): FACTS}
    assert main(["inspect", yaml_of(tmp_path, cfg)]) == 0
    assert "model=llama-1b" in capsys.readouterr().out


def test_a_sidecar_that_cannot_be_written_degrades_to_false(tmp_path, monkeypatch):
    from strata.store import labels

    def refuse(*_):
        raise OSError(28, "No space left on device")

    with strata.open_store(file_cfg(tmp_path)) as store:
        monkeypatch.setattr(labels.os, "replace", refuse)
        assert store.label_scope("kv", "s", FACTS) is False  # no exception into the caller
        monkeypatch.undo()
        assert store.scope_labels() == {("kv", "s"): FACTS}  # this process still knows it
        assert store.label_scope("kv", "s", FACTS) is True  # tried again, not taken as already written
    with strata.open_store(file_cfg(tmp_path)) as store:
        assert store.scope_labels() == {("kv", "s"): FACTS}


def test_the_number_of_labels_is_bounded_dead_owners_first(tmp_path, monkeypatch):
    from strata.store import labels

    monkeypatch.setattr(labels, "MAX_LABELS", 3)
    dead = Owner(this_host(), 2**22 + 17, "1", "f").scope  # a pid above pid_max: no such process
    with strata.open_store(file_cfg(tmp_path)) as store:
        store.label_scope("param", dead, {"model": "dead"})
        for i in range(4):
            store.label_scope("kv", f"s{i}", {"model": f"m{i}"})
    with strata.open_store(file_cfg(tmp_path)) as store:
        assert store.scope_labels() == {("kv", "s1"): {"model": "m1"}, ("kv", "s2"): {"model": "m2"},
                                        ("kv", "s3"): {"model": "m3"}}
    assert len(list((tmp_path / "files" / "labels").glob("*.json"))) == 3


def test_offload_labels_its_scope_and_inspect_shows_it(tmp_path, capsys):
    cfg = file_cfg(tmp_path, capacity="8MiB")
    config = yaml_of(tmp_path, cfg)
    with strata.open_store(config) as store:
        handle = strata.offload(make("llama", layers=3), store=store, device="cpu", progress=False)
        scope = next(iter(handle.keys.values())).scope
        facts = store.scope_labels()[("param", scope)]
        assert facts == {"model": "LlamaForCausalLM", "dtype": "float32", "block_path": "model.layers",
                         "blocks": "3", "pid": str(os.getpid())}
        assert main(["inspect", config]) == 0
        row = row_naming(capsys.readouterr().out, "model=LlamaForCausalLM")
        assert "block_path=model.layers" in row and f"pid={os.getpid()}" in row and " 3 " in row
        assert f"pid {os.getpid()} alive" in row
        handle.detach()


def test_kv_facts_describe_the_scope_and_are_a_valid_label(tmp_path):
    from strata.kv.chunks import kv_facts, kv_scope

    kw = dict(model="/models/" + "deep/" * 100 + "TinyLlama-1.1B", dtype="torch.bfloat16",
              layout=(tuple(f"model.layers.{i}.self_attn" for i in range(22)),
                      (("FullAttentionSpec", 4, 64, "torch.bfloat16"),), "auto"),
              block_size=16, chunk_size=256, tp_size=2, tp_rank=1, version="0.33.0")
    facts = kv_facts(**kw)
    assert facts["model"].endswith("TinyLlama-1.1B") and facts["dtype"] == "torch.bfloat16"
    assert facts["layers"] == "22" and "FullAttentionSpec" in facts["layout"] and "64" in facts["layout"]
    assert facts["block_size"] == "16" and facts["chunk_size"] == "256" and facts["tp"] == "1/2"
    assert facts["vllm"] == "0.33.0"
    with strata.open_store(file_cfg(tmp_path)) as store:
        scope = kv_scope(**kw)
        assert store.label_scope("kv", scope, facts) is True
        assert store.scope_labels()[("kv", scope)] == facts
    other = kv_facts(**{**kw, "layout": "something else"})  # any layout a caller hashes: its text, clipped
    assert other["layout"] == "something else"


def test_labels_in_redis_persist_and_are_not_listed_as_objects(redis_url, capsys, tmp_path):
    prefix = f"t-{uuid.uuid4().hex}:"
    cfg = {"tiers": [{"kind": "redis", "url": redis_url, "key_prefix": prefix}]}
    scope = make_scope(**FACTS)
    with strata.open_store(cfg) as store:
        store.put(Key("kv", scope, "c0"), torch.zeros(10))
        assert store.label_scope("kv", scope, FACTS) is True
        assert len(store.keys()) == 1
    with strata.open_store(cfg) as store:
        assert store.scope_labels() == {("kv", scope): FACTS}
        assert [n for _, n, _ in store.tiers[0].contents()] == ["kv"]  # the label hash is no object
    config = tmp_path / "store.yaml"
    config.write_text(f"tiers:\n  - kind: redis\n    url: {redis_url}\n    key_prefix: '{prefix}'\n")
    assert main(["inspect", str(config)]) == 0
    out = capsys.readouterr().out
    assert "dtype=bfloat16" in row_naming(out, "model=llama-1b") and ": 1 objects," in out
