"""The KV connector's numbers as vLLM carries them: ``StrataKVStats`` (what one interval brought,
shipped from the workers to the front end with each step) and ``StrataPromMetrics`` (the series
on vLLM's /metrics). Kept apart from the connector's halves: vLLM's front end builds the metrics
without ever constructing a connector, and the worker only fills the stats."""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from strata import metrics

COUNTERS = ("chunks_loaded", "chunks_failed", "tokens_loaded", "bytes_loaded", "load_seconds",
            "chunks_saved", "tokens_saved", "bytes_saved", "save_seconds",
            "saves_dropped", "saves_rejected", "chunks_skipped")
# Timings observed one by one (Prometheus histograms): stats key -> the connector's counter it details.
TIMINGS = {"load_times": "load_seconds", "save_times": "save_seconds"}
MAX_TIMINGS = 1024  # observations kept between two reports; older ones are dropped, never memory grown


# What vLLM's front end has been told, per engine index, for strata.kv.vllm.engine_stats: the
# connector counters summed over every report and the newest store stats of each worker rank.
_observed: dict[int, dict] = {}


def record(data: dict, engine_idx: int) -> None:
    """Add one report (a step's ``StrataKVStats.data``, aggregated over the workers) to what this
    process has seen of engine ``engine_idx``."""
    seen = _observed.setdefault(engine_idx, {"connector": dict.fromkeys(COUNTERS, 0), "store": {}, "reports": 0})
    for key in COUNTERS:
        seen["connector"][key] += data.get(key) or 0
    if data.get("store"):
        seen["store"].update(data["store"])
    seen["reports"] += 1


def observed(engine_idx: int) -> dict | None:
    """A copy of what this process has seen of engine ``engine_idx`` (None: nothing yet)."""
    seen = _observed.get(engine_idx)
    if seen is None:
        return None
    return {"connector": dict(seen["connector"]), "store": dict(seen["store"]), "reports": seen["reports"]}


class StrataKVStats(KVConnectorStats):
    """What one interval brought: counter deltas (summed when aggregated across steps and workers),
    timings (concatenated) and, under ``store``, the latest ``StorageEngine.stats()`` of each worker
    rank (the newest replaces the older). Plain dicts, lists and numbers: vLLM ships them across
    processes."""

    def reset(self):
        self.data = dict.fromkeys(COUNTERS, 0)

    def aggregate(self, other: KVConnectorStats) -> "StrataKVStats":
        for k, v in (other.data or {}).items():
            if k in TIMINGS:  # new lists: vLLM may still hold the ones it was given
                self.data[k] = (list(self.data.get(k) or []) + list(v))[-MAX_TIMINGS:]
            elif k == "store":
                self.data[k] = {**(self.data.get(k) or {}), **v}
            else:
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        out = {k: self.data.get(k, 0) for k in COUNTERS}
        for way, moved in (("load", "bytes_loaded"), ("save", "bytes_saved")):
            secs = out[f"{way}_seconds"]
            out[f"{way}_GBps"] = round(out[moved] / secs / 1e9, 3) if secs > 0 else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in (*COUNTERS, *TIMINGS, "store"))


class StrataPromMetrics(KVConnectorPromMetrics):
    """The connector's series on vLLM's /metrics (``strata.metrics``: KV_SERIES, STORE_SERIES), with
    vLLM's labels (model_name, engine) first. vLLM's front end calls ``observe`` with the stats of
    each step, aggregated over the workers: KV counters grow by their deltas, timings fill the
    histograms, and the store's own stats (totals, sent by the worker) set the gauges and move the
    store counters by what they grew since the last report."""

    _built: "list[Any]" = []  # the metrics of the last build, unregistered when vLLM builds again

    def __init__(self, vllm_config, metric_types, labelnames: list[str], per_engine_labelvalues: dict[int, list]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._forget_previous_build()
        self._kv: dict[tuple[int, str], Any] = {}
        self._families: dict[str, Any] = {}
        for key in COUNTERS:
            if key in metrics.KV_COUNTERS:
                family = self._make(f"strata_kv_{key}", metrics.COUNTER, metrics.KV_COUNTERS[key], ())
                for idx, values in per_engine_labelvalues.items():
                    self._kv[(idx, key)] = family.labels(*values)
        for timing, key in TIMINGS.items():
            family = self._make(f"strata_kv_{key}", metrics.HISTOGRAM, metrics.KV_HISTOGRAMS[key], ())
            for idx, values in per_engine_labelvalues.items():
                self._kv[(idx, timing)] = family.labels(*values)
        for name, (kind, doc, extra) in metrics.STORE_SERIES.items():
            self._families[name] = self._make(name, kind, doc, extra)
        self._bound: dict[tuple, Any] = {}
        self._last: dict[tuple, float] = {}  # (engine, series, labels) -> store counter value last seen
        self._ranks: dict[int, dict[str, list[metrics.Sample]]] = {}

    def _make(self, name: str, kind: str, doc: str, extra: tuple[str, ...]):
        labels = list(self._labelnames) + list(extra)
        if kind == metrics.COUNTER:
            m = self._counter_cls(name=name, documentation=doc, labelnames=labels)
        elif kind == metrics.HISTOGRAM:
            m = self._histogram_cls(name=name, documentation=doc, labelnames=labels, buckets=metrics.TIME_BUCKETS)
        else:
            m = self._gauge_cls(name=name, documentation=doc, labelnames=labels, multiprocess_mode="mostrecent")
        StrataPromMetrics._built.append(m)
        return m

    @staticmethod
    def _forget_previous_build() -> None:
        """vLLM unregisters only its own ``vllm:`` metrics before it builds them again (a second
        engine in one process): do the same for the ``strata_*`` ones this class registered."""
        from prometheus_client import REGISTRY

        for m in StrataPromMetrics._built:
            try:
                REGISTRY.unregister(m)
            except (KeyError, ValueError):  # not in the default registry (another one, or Ray's)
                pass
        StrataPromMetrics._built = []

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        data = transfer_stats_data or {}
        record(data, engine_idx)
        for key in COUNTERS:
            if (engine_idx, key) in self._kv and data.get(key):
                self._kv[(engine_idx, key)].inc(data[key])
        for timing in TIMINGS:
            for secs in data.get(timing) or ():
                self._kv[(engine_idx, timing)].observe(secs)
        if data.get("store"):
            ranks = self._ranks.setdefault(engine_idx, {})
            ranks.update({rank: metrics.samples(stats) for rank, stats in data["store"].items()})
            self._observe_store(engine_idx, ranks)

    def _observe_store(self, engine_idx: int, ranks: dict[str, list]) -> None:
        totals: dict[tuple[str, tuple], float] = {}
        for rank_samples in ranks.values():  # each rank's store holds its own shard of the KV
            for s in rank_samples:
                if s.name in metrics.STORE_SERIES and s.name != "strata_namespace_hit_ratio":
                    totals[(s.name, s.labels)] = totals.get((s.name, s.labels), 0.0) + s.value
        for (name, labels), value in totals.items():
            bound = self._bind(engine_idx, name, labels)
            if metrics.STORE_SERIES[name][0] == metrics.COUNTER:
                seen = self._last.get((engine_idx, name, labels), 0.0)
                if value > seen:
                    bound.inc(value - seen)
                self._last[(engine_idx, name, labels)] = value
            else:
                bound.set(value)
        for (name, labels), hits in totals.items():
            if name == "strata_namespace_hits":
                asked = hits + totals.get(("strata_namespace_misses", labels), 0.0)
                self._bind(engine_idx, "strata_namespace_hit_ratio", labels).set(hits / asked if asked else 0.0)

    def _bind(self, engine_idx: int, name: str, labels: tuple):
        key = (engine_idx, name, labels)
        if key not in self._bound:
            self._bound[key] = self._families[name].labels(*self.per_engine_labelvalues[engine_idx], *labels)
        return self._bound[key]
