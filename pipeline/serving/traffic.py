"""Serving traffic flows back: the model server samples requests and lands them as batches.

    sampler = TrafficSampler(store, TrafficConfig(rate=0.05, window_s=300), registry=prometheus_registry)
    sampler.start()
    sampler.offer("digits", "v3", x, y, latency_s=0.004, spec={"mean": [0.3], "std": [0.4]})  # never blocks
    sampler.close()                                                                # flushes open windows

Each row of a request is taken with probability ``rate``. Taken rows wait in a bounded buffer
(``buffer`` requests) that one background thread drains into an open *window* per model; a window
closes when ``window_s`` seconds have passed since its first sample or it holds ``window_samples``
samples, and is then written as a landed batch, in the layout ingestion reads
(docs/ingestion.md)::

    incoming/serving-<model>-<UTC opened>-<id>/shards/traffic-000000.tar   <key>.png .npy .json (no .cls)
    incoming/serving-<model>-<UTC opened>-<id>/predictions.parquet         one row per sample
    incoming/serving-<model>-<UTC opened>-<id>/_READY                      written last (JSON summary)

Per sample, the shard holds:

* ``.png``: the model input turned back into an 8-bit image: ``x * std + mean`` (the version's
  preprocessing spec, per channel, on the 0..1 scale), times 255, rounded and clipped. This is what
  ingestion validates and what image drift reads, as for landed data. It is not exact: sub-level
  precision and values outside 0..255 are lost (``.json`` records how many pixels were clipped and
  the largest rounding error, in input units);
* ``.npy``: the exact float32 input tensor (C, H, W) as the model received it; prediction drift
  feeds it to the production model without preprocessing again (the PNG is already cropped, and
  resizing it again would not give the same input);
* ``.json``: model, version, time, latency, prediction, confidence, the normalisation inverse.

No ``.cls``: traffic is unlabeled. Ingestion publishes it as unlabeled and training never uses it
(:func:`pipeline.dataset.collect`). ``predictions.parquet`` (:func:`pipeline.ingest.predictions_schema`)
holds what was answered: class (argmax), confidence (max softmax), model, version, latency, time.

Guarantees: every object is written with storage's atomic writes and ``_READY`` last, so a window
is either complete or invisible to the landing sensor; a crash loses at most the open windows (in
memory) and at worst leaves a folder without ``_READY`` (never ingested). A slow, hanging or failing
storage never slows or fails a request: :meth:`TrafficSampler.offer` only copies the taken rows and
puts them in the buffer without waiting; when the buffer is full they are dropped and counted.

Prometheus (on the registry given, the server's ``/metrics``)::

    forgeline_traffic_samples_total{model}          rows taken into the buffer
    forgeline_traffic_dropped_total{model,reason}   rows lost: buffer_full | write_failed | not_an_image |
                                                    not_finite | shutdown
    forgeline_traffic_windows_total{model,result}   windows written: ok | failed
    forgeline_traffic_written_samples_total{model}  rows in windows written
    forgeline_traffic_buffered                      requests waiting for the writer

This module never imports dagster.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import re
import tarfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from pipeline.storage import Storage, join

log = logging.getLogger("forgeline.serving.traffic")

WINDOW_PREFIX = "serving"
READY_MARKER = "_READY"  # as pipeline.datagen.READY_MARKER (not imported: keeps the server's imports small)
SHARD_NAME = "traffic-000000.tar"
TABLE_NAME = "predictions.parquet"
_WINDOW = re.compile(r"serving-(?P<model>.+)-(?P<opened>\d{8}T\d{6}Z)-(?P<id>[0-9a-f]+-\d+)")
_STOP = object()


def window_model(batch: str) -> str | None:
    """The model whose traffic the batch ``batch`` is (``serving-<model>-<time>-<id>``), or None
    when it is not a window of serving traffic."""
    m = _WINDOW.fullmatch(batch or "")
    return m.group("model") if m else None


def is_window(batch: str) -> bool:
    return window_model(batch) is not None


@dataclass(frozen=True)
class TrafficConfig:
    rate: float = 0.0  # share of rows sampled, 0..1 (0: off)
    window_s: float = 300.0  # a window closes this long after its first sample...
    window_samples: int = 10_000  # ...or when it holds this many samples
    buffer: int = 1024  # requests waiting for the writer; past it, sampled rows are dropped
    incoming: str = "incoming"
    close_timeout_s: float = 10.0  # close(): how long the last windows may take to write
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"sample rate must be within 0..1, got {self.rate}")
        if not self.window_s > 0:
            raise ValueError(f"sample window must be > 0 s, got {self.window_s}")
        if self.window_samples < 1 or self.buffer < 1:
            raise ValueError(f"window_samples and buffer must be >= 1, got {self.window_samples}, {self.buffer}")


class TrafficMetrics:
    """The sampler's counters, once per Prometheus ``CollectorRegistry`` (several samplers on one
    registry share them)."""

    _by_registry: "weakref.WeakKeyDictionary[Any, TrafficMetrics]" = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge

        self.registry = registry
        self.samples = Counter("forgeline_traffic_samples", "Inference rows sampled into the traffic buffer",
                               ["model"], registry=registry)
        self.dropped = Counter("forgeline_traffic_dropped", "Sampled rows lost (buffer_full | write_failed | "
                               "not_an_image | not_finite | shutdown)", ["model", "reason"], registry=registry)
        self.windows = Counter("forgeline_traffic_windows", "Traffic windows written as landed batches",
                               ["model", "result"], registry=registry)
        self.written = Counter("forgeline_traffic_written_samples", "Sampled rows in windows written",
                               ["model"], registry=registry)
        self.buffered = Gauge("forgeline_traffic_buffered", "Requests waiting for the traffic writer",
                              registry=registry)

    @classmethod
    def on(cls, registry=None) -> "TrafficMetrics":
        from prometheus_client import CollectorRegistry

        registry = registry if registry is not None else CollectorRegistry()
        with cls._lock:
            m = cls._by_registry.get(registry)
            if m is None:
                m = cls._by_registry[registry] = cls(registry)
            return m

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(f"forgeline_traffic_{name}", labels)
        return 0.0 if v is None else float(v)


@dataclass
class _Taken:
    model: str
    version: str
    x: np.ndarray  # [n, C, H, W] float32 (a copy)
    y: np.ndarray  # [n, ...] outputs
    latency_s: float
    time: float  # unix time of the answer
    spec: dict | None


@dataclass
class _Window:
    model: str
    name: str
    opened: float  # time.monotonic() of its first sample
    opened_at: float  # unix time of its first sample
    rows: list[tuple[_Taken, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


def _normalisation(spec: dict | None, channels: int) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray((spec or {}).get("mean") or [0.0] * channels, dtype=np.float64)
    std = np.asarray((spec or {}).get("std") or [1.0] * channels, dtype=np.float64)
    if mean.shape != (channels,) or std.shape != (channels,):
        mean, std = np.resize(mean, channels), np.resize(std, channels)
    return mean, std


def to_image(x: np.ndarray, spec: dict | None) -> tuple[np.ndarray, dict]:
    """The 8-bit HWC image of one model input ``x`` (C, H, W) under the inverse of ``spec``'s
    normalisation (``x * std + mean`` on the 0..1 scale, times 255), and what the rounding cost."""
    c = x.shape[0]
    mean, std = _normalisation(spec, c)
    pixels = (x.astype(np.float64) * std[:, None, None] + mean[:, None, None]) * 255.0
    u8 = np.clip(np.rint(pixels), 0, 255)
    back = (u8 / 255.0 - mean[:, None, None]) / std[:, None, None]
    info = {"mean": mean.tolist(), "std": std.tolist(), "scale": 255.0,
            "clipped": int(np.count_nonzero((pixels < -0.5) | (pixels > 255.5))),
            "max_error": float(np.max(np.abs(back - x))) if x.size else 0.0}
    return u8.astype(np.uint8).transpose(1, 2, 0), info


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    im = Image.fromarray(img[:, :, 0], mode="L") if img.shape[2] == 1 else Image.fromarray(img, mode="RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _softmax(y: np.ndarray) -> np.ndarray:
    z = y.reshape(-1).astype(np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


def _utc(t: float, fmt: str = "%Y-%m-%dT%H:%M:%S.%fZ") -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime(fmt)


class TrafficSampler:
    """Samples inference rows and writes them as landed batches (see the module docstring)."""

    def __init__(self, store: Storage, config: TrafficConfig | None = None, *, registry=None,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.config = config or TrafficConfig()
        self.metrics = TrafficMetrics.on(registry)
        self._clock = clock
        self._rng = np.random.default_rng(self.config.seed)
        self._rng_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=self.config.buffer)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._windows: dict[str, _Window] = {}
        self._instance = os.urandom(3).hex()  # two servers never name a window alike
        self._seq = 0
        self.written: list[str] = []  # batch names of the windows written, oldest first

    @property
    def enabled(self) -> bool:
        return self.config.rate > 0

    # the request side (event loop): cheap, never blocks --------------------------------------------
    def offer(self, model: str, version: str, x: np.ndarray, y: np.ndarray, *, latency_s: float,
              spec: dict | None = None) -> int:
        """Sample the rows of one answered request; returns how many were taken. Never blocks,
        never raises for a full buffer (the rows are dropped and counted)."""
        if self._closed or not self.enabled:
            return 0
        n = len(x)
        if self.config.rate >= 1.0:
            take = np.arange(n)
        else:
            with self._rng_lock:
                take = np.flatnonzero(self._rng.random(n) < self.config.rate)
        if not take.size:
            return 0
        if x.ndim != 4 or x.shape[1] not in (1, 3):  # only images land as batches
            self.metrics.dropped.labels(model, "not_an_image").inc(take.size)
            return 0
        rows = x[take]  # a copy (fancy indexing): what the writer gets, gathered once
        if rows.dtype.kind == "f":  # a NaN or infinite pixel has no 8-bit value: not an image either
            finite = np.isfinite(rows).reshape(take.size, -1).all(axis=1)
            if not finite.all():
                self.metrics.dropped.labels(model, "not_finite").inc(int((~finite).sum()))
                take, rows = take[finite], rows[finite]
                if not take.size:
                    return 0
        item = _Taken(model, version, rows, np.asarray(y)[take], float(latency_s), time.time(), spec)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.metrics.dropped.labels(model, "buffer_full").inc(take.size)
            return 0
        self.metrics.samples.labels(model).inc(take.size)
        self.metrics.buffered.set(self._queue.qsize())
        return int(take.size)

    # lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None and self.enabled:
            self._thread = threading.Thread(target=self._run, name="forgeline-traffic", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop sampling, write the open windows, wait up to ``timeout_s`` (config default) for the
        writer. Returns False when it did not finish (a hanging storage: the thread is a daemon and
        what it holds is lost with the process, counted as ``shutdown``)."""
        self._closed = True
        t = self._thread
        if t is None:
            return True
        try:
            self._queue.put(_STOP, timeout=0.1)
        except queue.Full:
            pass  # the writer is stuck; it also checks _closed
        t.join(self.config.close_timeout_s if timeout_s is None else timeout_s)
        if t.is_alive():
            lost = 0
            for w in list(self._windows.values()):
                lost += len(w)
                self.metrics.dropped.labels(w.model, "shutdown").inc(len(w))
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Taken):
                    lost += len(item.x)
                    self.metrics.dropped.labels(item.model, "shutdown").inc(len(item.x))
            log.warning("traffic writer did not finish within the close timeout; %d sampled row(s) lost", lost)
            return False
        return True

    # the writer thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            wait = self._next_deadline()
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            self.metrics.buffered.set(self._queue.qsize())
            stop = item is _STOP or (item is None and self._closed)
            if isinstance(item, _Taken):
                self._add(item)
            if stop:
                while True:  # what was buffered before the stop still lands
                    try:
                        rest = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(rest, _Taken):
                        self._add(rest)
                for model in list(self._windows):
                    self._close_window(model)
                return
            now = time.monotonic()
            for model, w in list(self._windows.items()):
                if now - w.opened >= self.config.window_s:
                    self._close_window(model)

    def _next_deadline(self) -> float:
        if not self._windows:
            return 0.5
        now = time.monotonic()
        return max(0.0, min(w.opened + self.config.window_s - now for w in self._windows.values()))

    def _add(self, item: _Taken) -> None:
        for i in range(len(item.x)):
            w = self._windows.get(item.model)
            if w is None:
                w = self._windows[item.model] = self._open(item.model)
            w.rows.append((item, i))
            if len(w) >= self.config.window_samples:
                self._close_window(item.model)

    def _open(self, model: str) -> _Window:
        now = self._clock()
        self._seq += 1
        name = f"{WINDOW_PREFIX}-{model}-{_utc(now, '%Y%m%dT%H%M%SZ')}-{self._instance}-{self._seq}"
        return _Window(model, name, time.monotonic(), now)

    def _close_window(self, model: str) -> None:
        w = self._windows.pop(model, None)
        if w is None or not w.rows:
            return
        try:
            self.write_window(w)
        except Exception as e:  # noqa: BLE001 - storage down, full, refusing: count, keep serving
            self.metrics.windows.labels(model, "failed").inc()
            self.metrics.dropped.labels(model, "write_failed").inc(len(w))
            log.warning("traffic window %s (%d samples) not written: %s", w.name, len(w),
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return
        self.metrics.windows.labels(model, "ok").inc()
        self.metrics.written.labels(model).inc(len(w))
        self.written.append(w.name)

    def write_window(self, w: _Window) -> str:
        """Write one closed window: the shard, the table, then ``_READY`` (each atomically)."""
        import polars as pl

        prefix = join(self.config.incoming, w.name)
        rows, versions = [], set()
        now = int(time.time())
        with self.store.open_write(join(prefix, "shards", SHARD_NAME)) as out:
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for n, (item, i) in enumerate(w.rows):
                    key = f"{n:06d}"
                    x = item.x[i]
                    img, inverse = to_image(x, item.spec)
                    p = _softmax(item.y[i])
                    pred, conf = int(p.argmax()), float(p.max())
                    meta = {"model": item.model, "version": item.version, "time": _utc(item.time),
                            "latency_ms": item.latency_s * 1e3, "prediction": pred, "confidence": conf,
                            "normalization": inverse}
                    for ext, payload in (("png", _png(img)), ("npy", _npy(x)),
                                         ("json", json.dumps(meta).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime, info.mode = len(payload), now, 0o644
                        tar.addfile(info, io.BytesIO(payload))
                    rows.append({"id": n, "key": key, "model": item.model, "model_version": item.version,
                                 "prediction": pred, "confidence": min(1.0, max(0.0, conf)),
                                 "latency_ms": max(0.0, item.latency_s * 1e3),
                                 "time": datetime.fromtimestamp(item.time, timezone.utc)})
                    versions.add(item.version)
        from pipeline.ingest import predictions_schema

        buf = io.BytesIO()
        pl.DataFrame(rows, schema=predictions_schema()).write_parquet(buf, compression="zstd", statistics=True)
        self.store.write_atomic(join(prefix, TABLE_NAME), buf.getvalue())
        ready = {"source": "serving", "model": w.model, "versions": sorted(versions), "samples": len(rows),
                 "opened": _utc(w.opened_at), "closed": _utc(self._clock()), "rate": self.config.rate,
                 "labeled": False, "shards": [join(prefix, "shards", SHARD_NAME)], "table": join(prefix, TABLE_NAME)}
        self.store.write_atomic(join(prefix, READY_MARKER), json.dumps(ready, indent=1).encode())
        return w.name


__all__ = ["TrafficConfig", "TrafficMetrics", "TrafficSampler", "is_window", "to_image", "window_model",
           "WINDOW_PREFIX"]
