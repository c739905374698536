"""Prometheus metrics of the serving core, on their own ``CollectorRegistry`` (``.registry``), so
several registries (tests, two servers in one process) never collide in the global one.

Names (all prefixed ``forgeline_serving_``)::

    request_seconds{model,version}         histogram  infer() wall time, admission to answer
    requests_total{model,version,result}   counter    result = ok | invalid | unavailable | error
    queue_wait_seconds{model}              histogram  enqueue -> the batch holding the request starts
    batch_size{model}                      histogram  rows per forward
    loads_total{model,result}              counter    result = ok | failed (a version loaded into the server)
    load_seconds{model}                    histogram  storage/tier -> checked, warmed module
    swaps_total{model,result}              counter    result = ok | failed (serving version replaced)
    swap_seconds{model}                    histogram  decision -> new version taking traffic
    evictions_total{model,reason}          counter    resident versions dropped: lru (to make room),
                                                      replaced (older than previous), unload
    tier_rejects_total{model}              counter    shm tier copies that did not match the manifest
    resident_bytes{model}                  gauge      weight bytes held by the model's resident versions
    resident_models                        gauge      models with at least one resident version
    queue_depth{model}                     gauge      requests waiting (for a load or in the batcher)
    version_info{model,version,role}       gauge      1 per resident version that serves (role = serving)
                                                      or is kept for rollback (role = previous)
    alias_reads_total{model,result}        counter    the watcher's reads of the production alias:
                                                      result = ok | failed (storage unreachable, alias damaged)
    alias_read_timestamp_seconds{model}    gauge      Unix time of the last read that succeeded: alert on
                                                      ``time() - it`` to catch a server blind to promotions

Per-model P50/P99 of the last requests is also kept in memory (:meth:`ServingMetrics.latency`),
for the model metadata: a histogram's quantiles need a Prometheus server to compute.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = "forgeline_serving"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_RECENT = 4096  # latencies kept per model for P50/P99


class ServingMetrics:
    """Every metric the registry records; pass one to several registries to aggregate them."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(f"{PREFIX}_request_seconds", "Inference request latency (admission to answer)",
                                         ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "Inference requests by result",
                                ["model", "version", "result"], registry=r)
        self.queue_wait_seconds = Histogram(f"{PREFIX}_queue_wait_seconds", "Time from enqueue to the batch starting",
                                            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Rows per forward pass", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.loads = Counter(f"{PREFIX}_loads", "Model versions loaded into the server", ["model", "result"], registry=r)
        self.load_seconds = Histogram(f"{PREFIX}_load_seconds", "Load + golden check + warm-up of a version", ["model"],
                                      buckets=LOAD_BUCKETS, registry=r)
        self.swaps = Counter(f"{PREFIX}_swaps", "Serving version replaced", ["model", "result"], registry=r)
        self.swap_seconds = Histogram(f"{PREFIX}_swap_seconds", "Decision to swap -> new version taking traffic",
                                      ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter(f"{PREFIX}_evictions", "Resident versions dropped (reason = lru | replaced | unload)",
                                 ["model", "reason"], registry=r)
        self.tier_rejects = Counter(f"{PREFIX}_tier_rejects", "shm tier copies that did not match the manifest",
                                    ["model"], registry=r)
        self.resident_bytes = Gauge(f"{PREFIX}_resident_bytes", "Weight bytes of the model's resident versions",
                                    ["model"], registry=r)
        self.resident_models = Gauge(f"{PREFIX}_resident_models", "Models with a resident version", registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting (for a load or in the batcher)",
                                 ["model"], registry=r)
        self.alias_reads = Counter(f"{PREFIX}_alias_reads", "Reads of the production alias by the watcher",
                                   ["model", "result"], registry=r)
        self.alias_read_time = Gauge(f"{PREFIX}_alias_read_timestamp_seconds",
                                     "Unix time of the watcher's last successful read of the production alias",
                                     ["model"], registry=r)
        self._version_sources: list[Callable[[], Iterable[tuple[str, str, str]]]] = []
        r.register(_VersionInfo(self._version_sources))
        self._recent: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    # helpers the registry calls ------------------------------------------------------------------
    def observe_request(self, model: str, version: str, seconds: float, result: str = "ok") -> None:
        self.requests.labels(model, version, result).inc()
        if result == "ok":
            self.request_seconds.labels(model, version).observe(seconds)
            with self._lock:
                self._recent.setdefault(model, deque(maxlen=_RECENT)).append(seconds)

    def track_versions(self, source: Callable[[], Iterable[tuple[str, str, str]]]) -> None:
        """Have ``version_info`` report what ``source()`` yields, ``(model, version, role)``, at
        every scrape: read from the registry's state then, so no swap, rollback or eviction path
        has to keep a gauge in step with it."""
        self._version_sources.append(source)

    def latency(self, model: str) -> dict[str, float] | None:
        """``{"p50_ms", "p99_ms", "count"}`` over the model's last requests (None before any)."""
        with self._lock:
            values = np.fromiter(self._recent.get(model, ()), dtype=np.float64)
        if values.size == 0:
            return None
        p50, p99 = np.percentile(values, (50, 99)) * 1e3
        return {"p50_ms": float(p50), "p99_ms": float(p99), "count": int(values.size)}

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0.0 when absent), e.g. ``value("loads_total", model="a", result="ok")``."""
        v = self.registry.get_sample_value(f"{PREFIX}_{name}", labels)
        return 0.0 if v is None else float(v)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric here."""
        return generate_latest(self.registry)


class _VersionInfo:
    """The ``version_info`` gauge, collected from the tracked sources at scrape time."""

    def __init__(self, sources: list):
        self._sources = sources

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}_version_info", "Resident versions that serve or are kept for rollback",
                                 labels=["model", "version", "role"])

    def describe(self):
        return [self._family()]

    def collect(self):
        fam = self._family()
        for source in list(self._sources):
            for model, version, role in source():
                fam.add_metric([model, version, role], 1.0)
        yield fam


__all__ = ["ServingMetrics", "PREFIX"]
