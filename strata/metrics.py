"""Strata's figures for Prometheus and for files: the store's tiers, namespaces and write-back queue,
weight offload, and (declared here, observed inside vLLM by ``strata.kv.vllm``) the KV connector.

Outside vLLM::

    server = strata.metrics.start_http_server(9400, store=store, handle=handle)  # GET :9400/metrics
    text = strata.metrics.exposition(store.stats(), handle.stats())            # `strata stats --prometheus`
    strata.metrics.FileExporter("stats.jsonl", store=store, interval=10).start()

Inside vLLM the connector's series carry vLLM's labels (``model_name``, ``engine``) and appear on
vLLM's own ``/metrics``. Every series has one name wherever it is exported (``strata_*``), so one
dashboard (docs/grafana/strata-dashboard.json) reads both. Nothing is exported under ``vllm:``:
that prefix is vLLM's, and Strata is not part of vLLM (LMCache likewise keeps ``lmcache:``).

The figures are read from ``stats()`` dicts when scraped, so a scrape costs one ``stats()`` call and
nothing is counted twice. prometheus-client (the ``metrics`` extra; vLLM brings it) is imported
only by what needs it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger("strata.metrics")

GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"

# name -> (type, help, labels). Counter names are given without "_total" (the exposition adds it).
STORE_SERIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "strata_tier_capacity_bytes": (GAUGE, "Bytes a tier may hold.", ("tier", "kind")),
    "strata_tier_used_bytes": (GAUGE, "Bytes a tier holds now, all namespaces.", ("tier", "kind")),
    "strata_tier_free_bytes": (GAUGE, "Bytes a tier can still allocate.", ("tier", "kind")),
    "strata_tier_bytes": (GAUGE, "Bytes a tier holds for a namespace.", ("tier", "kind", "namespace")),
    "strata_tier_objects": (GAUGE, "Objects a tier holds for a namespace.", ("tier", "kind", "namespace")),
    "strata_tier_hits": (COUNTER, "Reads a tier served.", ("tier", "kind")),
    "strata_tier_misses": (COUNTER, "Reads a tier could not serve.", ("tier", "kind")),
    "strata_tier_puts": (COUNTER, "Objects written to a tier.", ("tier", "kind")),
    "strata_tier_evictions": (COUNTER, "Objects evicted from a tier.", ("tier", "kind")),
    "strata_tier_rejected": (COUNTER, "Writes a tier refused (full of what it may not evict).", ("tier", "kind")),
    "strata_tier_errors": (COUNTER, "Tier failures turned into misses.", ("tier", "kind")),
    "strata_tier_checksum_failures": (COUNTER, "Reads whose bytes failed their checksum (served as misses).",
                                      ("tier", "kind")),
    "strata_tier_promotions": (COUNTER, "Objects copied up to a faster tier on a read.", ("tier", "kind")),
    "strata_namespace_hits": (COUNTER, "Reads the store served, by namespace.", ("namespace",)),
    "strata_namespace_misses": (COUNTER, "Reads no tier could serve, by namespace.", ("namespace",)),
    "strata_namespace_puts": (COUNTER, "Objects stored, by namespace.", ("namespace",)),
    "strata_namespace_rejected": (COUNTER, "Writes no tier took, by namespace.", ("namespace",)),
    "strata_namespace_bytes_read": (COUNTER, "Bytes of the reads served, by namespace.", ("namespace",)),
    "strata_namespace_bytes_written": (COUNTER, "Bytes of the objects stored, by namespace.", ("namespace",)),
    "strata_namespace_hit_ratio": (GAUGE, "hits / (hits + misses) since the store opened, by namespace.",
                                   ("namespace",)),
    "strata_writeback_queue_depth": (GAUGE, "Objects waiting to be written back to a lower tier.", ()),
    "strata_writeback_pending_bytes": (GAUGE, "Bytes waiting to be written back to a lower tier.", ()),
    "strata_writeback_flushed": (COUNTER, "Objects written back.", ()),
    "strata_writeback_failed": (COUNTER, "Write-backs that failed.", ()),
    "strata_writeback_writer_waits": (COUNTER, "Writes that waited for room in the write-back queue.", ()),
    "strata_writeback_dropped_dirty": (COUNTER, "Dirty objects dropped before their write-back.", ()),
}

OFFLOAD_SERIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "strata_offload_offloaded_blocks": (GAUGE, "Blocks streamed from the store.", ()),
    "strata_offload_resident_blocks": (GAUGE, "Blocks kept on the device.", ()),
    "strata_offload_offloaded_bytes": (GAUGE, "Bytes of the streamed blocks.", ()),
    "strata_offload_resident_bytes": (GAUGE, "Bytes kept on the device (blocks and the rest of the model).", ()),
    "strata_offload_ring_bytes": (GAUGE, "Bytes of the device ring the blocks stream through.", ()),
    "strata_offload_pinned_bytes": (GAUGE, "Pinned host bytes of the store's CPU tiers.", ()),
    "strata_offload_forwards": (COUNTER, "Forwards run with streamed weights.", ()),
    "strata_offload_copies": (COUNTER, "Block copies into the ring.", ()),
    "strata_offload_bytes_streamed": (COUNTER, "Bytes copied into the ring.", ()),
    "strata_offload_copy_seconds": (COUNTER, "Time spent copying blocks.", ()),
    "strata_offload_exposed_wait_seconds": (COUNTER, "Copy time the forward waited for (not hidden).", ()),
    "strata_offload_hidden_copy_seconds": (COUNTER, "Copy time hidden behind compute.", ()),
    "strata_offload_block_wait_seconds": (COUNTER, "Time the forward waited for a block.", ("block",)),
}

# The KV connector's series inside vLLM (strata.kv.vllm observes them; vLLM adds model_name, engine).
KV_COUNTERS: dict[str, str] = {  # StrataConnector counter -> help
    "chunks_loaded": "KV chunks loaded from the store into vLLM's cache.",
    "tokens_loaded": "Prompt tokens whose KV was loaded from the store.",
    "bytes_loaded": "Bytes of KV loaded from the store.",
    "chunks_failed": "KV chunks that failed to load (vLLM recomputed them).",
    "chunks_saved": "KV chunks saved to the store.",
    "tokens_saved": "Prompt tokens whose KV was saved to the store.",
    "bytes_saved": "Bytes of KV saved to the store.",
    "saves_dropped": "KV saves dropped because the saver's queue was full.",
    "saves_rejected": "KV saves the store refused (full, or a chunk larger than every tier).",
    "chunks_skipped": "KV chunks not saved because their blocks were not all allocated.",
}
KV_HISTOGRAMS: dict[str, str] = {  # StrataConnector timing -> help
    "load_seconds": "Time of one step's KV loads (all its chunks).",
    "save_seconds": "Time of one KV chunk's save to the store.",
}
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
KV_SERIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    **{f"strata_kv_{k}": (COUNTER, doc, ()) for k, doc in KV_COUNTERS.items()},
    **{f"strata_kv_{k}": (HISTOGRAM, doc, ()) for k, doc in KV_HISTOGRAMS.items()},
}


@dataclass(frozen=True)
class Sample:
    name: str  # a key of STORE_SERIES or OFFLOAD_SERIES
    labels: tuple[str, ...]  # values, in the order of the series' labels
    value: float


def store_samples(stats: dict) -> Iterator[Sample]:
    """The figures of a ``StorageEngine.stats()`` dict, as samples of STORE_SERIES."""
    for name, t in (stats.get("tiers") or {}).items():
        tk = (str(name), str(t.get("kind", "")))
        for field, series in (("capacity", "capacity_bytes"), ("bytes", "used_bytes"), ("free_bytes", "free_bytes")):
            if field in t:
                yield Sample(f"strata_tier_{series}", tk, float(t[field]))
        for ns, c in (t.get("namespaces") or {}).items():
            yield Sample("strata_tier_bytes", tk + (str(ns),), float(c.get("bytes", 0)))
            yield Sample("strata_tier_objects", tk + (str(ns),), float(c.get("objects", 0)))
        for field in ("hits", "misses", "puts", "evictions", "rejected", "errors", "checksum_failures", "promotions"):
            if field in t:
                yield Sample(f"strata_tier_{field}", tk, float(t[field]))
    for ns, c in (stats.get("namespaces") or {}).items():
        for field, series in (("hits", "hits"), ("misses", "misses"), ("puts", "puts"), ("put_rejected", "rejected"),
                              ("bytes_read", "bytes_read"), ("bytes_written", "bytes_written")):
            yield Sample(f"strata_namespace_{series}", (str(ns),), float(c.get(field, 0)))
        asked = c.get("hits", 0) + c.get("misses", 0)
        yield Sample("strata_namespace_hit_ratio", (str(ns),), c.get("hits", 0) / asked if asked else 0.0)
    wb = stats.get("writeback") or {}
    for field in ("queue_depth", "pending_bytes", "flushed", "failed", "writer_waits", "dropped_dirty"):
        if field in wb:
            yield Sample(f"strata_writeback_{field}", (), float(wb[field]))


def offload_samples(stats: dict) -> Iterator[Sample]:
    """The figures of an ``OffloadHandle.stats()`` dict, as samples of OFFLOAD_SERIES."""
    for name, (_, _, labels) in OFFLOAD_SERIES.items():
        field = name[len("strata_offload_"):]
        if not labels and isinstance(stats.get(field), (int, float)):
            yield Sample(name, (), float(stats[field]))
    for block, secs in (stats.get("wait_seconds_by_block") or {}).items():
        yield Sample("strata_offload_block_wait_seconds", (str(block),), float(secs))


def samples(stats: dict | None, handle_stats: dict | None = None) -> list[Sample]:
    out = list(store_samples(stats)) if stats else []
    if handle_stats:
        out += offload_samples(handle_stats)
    return out


def _prometheus():
    try:
        import prometheus_client
    except ImportError as e:  # the metrics extra is optional
        raise ImportError("strata.metrics: prometheus-client is not installed; allowed: "
                          "pip install 'strata[metrics]'") from e
    return prometheus_client


class StatsCollector:
    """A prometheus-client collector that reads ``store.stats()`` and ``handle.stats()`` (or fixed
    dicts) on every scrape: the figures are the engine's own, never a copy that could drift."""

    def __init__(self, store=None, handle=None, *, stats: dict | None = None, handle_stats: dict | None = None):
        self.store, self.handle = store, handle
        self._stats, self._handle_stats = stats, handle_stats

    def _read(self) -> tuple[dict | None, dict | None]:
        stats = self.store.stats() if self.store is not None else self._stats
        handle = self.handle.stats() if self.handle is not None else self._handle_stats
        return stats, handle

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, Any] = {}
        for s in samples(*self._read()):
            kind, doc, labels = {**STORE_SERIES, **OFFLOAD_SERIES}[s.name]
            fam = families.get(s.name)
            if fam is None:
                cls = CounterMetricFamily if kind == COUNTER else GaugeMetricFamily
                fam = families[s.name] = cls(s.name, doc, labels=list(labels))
            fam.add_metric(list(s.labels), s.value)
        yield from families.values()


def exposition(stats: dict, handle_stats: dict | None = None) -> str:
    """Prometheus text exposition of a ``StorageEngine.stats()`` dict (and of an
    ``OffloadHandle.stats()`` dict): what ``strata stats --prometheus`` prints."""
    pc = _prometheus()
    registry = pc.CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats=stats, handle_stats=handle_stats))
    return pc.generate_latest(registry).decode("utf-8")


@dataclass
class MetricsServer:
    """What ``start_http_server`` started: ``url`` answers GET /metrics until ``close()``."""

    port: int
    addr: str
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def start_http_server(port: int, *, store=None, handle=None, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve the store's (and an offload handle's) figures on ``http://addr:port/metrics``, read
    on each scrape, from a thread of this process. ``port=0`` takes a free port (see ``.port``).
    ``addr`` is loopback by default: pass ``"0.0.0.0"`` for a Prometheus on another machine.
    The registry is Strata's own, so nothing else of the process is exported by accident."""
    if store is None and handle is None:
        raise ValueError("start_http_server: store and handle are both None; allowed: a StorageEngine "
                         "(store=) and/or an OffloadHandle (handle=)")
    pc = _prometheus()
    registry = pc.CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(store=store, handle=handle))
    server, thread = pc.start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server.server_address[1], addr, server, thread)


class FileExporter:
    """Appends one JSON line of stats to ``path`` per ``write()``, or every ``interval`` seconds
    from a thread between ``start()`` and ``stop()``: ``{"time", "store", "offload"}``.

    Bounded: when the file would pass ``max_bytes`` it is moved to ``path + ".1"`` (replacing the
    previous one) and a new file begins, so at most about twice ``max_bytes`` stay on disk. A failing
    write (disk full, store closed) is logged and counted in ``errors``, never raised from the thread.
    """

    def __init__(self, path: "str | os.PathLike", *, store=None, handle=None, interval: float = 10.0,
                 max_bytes: int = 64 << 20):
        if store is None and handle is None:
            raise ValueError("FileExporter: store and handle are both None; allowed: a StorageEngine "
                             "(store=) and/or an OffloadHandle (handle=)")
        if not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval <= 0:
            raise ValueError(f"FileExporter.interval: got {interval!r}; allowed: seconds > 0")
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise ValueError(f"FileExporter.max_bytes: got {max_bytes!r}; allowed: an integer > 0")
        self.path = os.fspath(path)
        self.store, self.handle = store, handle
        self.interval, self.max_bytes = float(interval), max_bytes
        self.lines = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> dict:
        out: dict[str, Any] = {"time": time.time()}
        if self.store is not None:
            out["store"] = self.store.stats()
        if self.handle is not None:
            out["offload"] = self.handle.stats()
        return out

    def write(self) -> dict:
        """Append one line now (and return what it holds); raises on failure, unlike the thread."""
        line = json.dumps(self.record(), default=str, sort_keys=True) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            try:
                size = os.path.getsize(self.path)
            except FileNotFoundError:
                size = 0
            if size and size + len(data) > self.max_bytes:
                os.replace(self.path, self.path + ".1")
            with open(self.path, "ab") as f:
                f.write(data)
            self.lines += 1
        return json.loads(line)

    def start(self) -> "FileExporter":
        if self._thread is not None:
            raise RuntimeError("FileExporter.start: already started; call stop() first")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="strata-file-exporter", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            try:
                self.write()
            except Exception:  # never kill the thread: the next interval tries again
                self.errors += 1
                if self.errors == 1:
                    log.exception("strata: FileExporter could not write %s", self.path)
            if self._stop.wait(self.interval):
                return

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread (after the line it may be writing) and wait for it."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"FileExporter.stop: the thread did not stop within {timeout} s")
        self._thread = None

    def __enter__(self) -> "FileExporter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
