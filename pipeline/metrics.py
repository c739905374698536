"""Per-item latencies: recorded where the work happens, summarized as P50/P95/P99.

Each stage times its unit of work (a shard validated, a batch delivered, an optimizer step, a
shard written, a file copied, ...) and keeps the seconds in its result object; the assets turn
them into numeric metadata with :func:`summary`, always under the same names::

    summary([0.010, 0.012, 0.030], "shard_latency")
    # {"shard_latency_p50_ms": 12.0, "shard_latency_p95_ms": 28.2, "shard_latency_p99_ms": 29.64,
    #  "shard_latency_max_ms": 30.0, "shard_latency_count": 3}

:class:`Latencies` is the recorder for work done on several threads at once. The same module
reads them back from a model server's Prometheus text (:func:`served_summary`, the one parser of
``forgeline serve status`` and the rollout) and draws per-epoch curves as SVG for Markdown metadata.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np

PERCENTILES = (50, 95, 99)
SERVING_PREFIX = "forgeline_serving"  # the model server's Prometheus metric names

T = TypeVar("T")


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units, as people read sizes: ``512 B``, ``110.3 KiB``, ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def summary(seconds: Iterable[float], prefix: str) -> dict[str, float | int]:
    """``<prefix>_p50_ms``, ``_p95_ms``, ``_p99_ms``, ``_max_ms`` (floats, milliseconds) and
    ``<prefix>_count`` of latencies given in seconds; ``{}`` when there are none."""
    values = np.fromiter(seconds, dtype=np.float64)
    if values.size == 0:
        return {}
    ms = np.percentile(values, PERCENTILES) * 1e3
    out: dict[str, float | int] = {f"{prefix}_p{q}_ms": float(v) for q, v in zip(PERCENTILES, ms)}
    out[f"{prefix}_max_ms"] = float(values.max() * 1e3)
    out[f"{prefix}_count"] = int(values.size)
    return out


class Latencies:
    """Seconds per item, appended from any thread."""

    def __init__(self, seconds: Iterable[float] = ()) -> None:
        self._lock = threading.Lock()
        self._values = [float(s) for s in seconds]

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(float(seconds))

    @contextmanager
    def time(self) -> Iterator[None]:
        """Times the block (also when it raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(time.perf_counter() - t0)

    def time_each(self, items: Iterable[T]) -> Iterator[T]:
        """Yields ``items``, recording how long each one took to produce (not the consumer's time)."""
        it = iter(items)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.add(time.perf_counter() - t0)
            yield item

    @property
    def values(self) -> list[float]:
        with self._lock:
            return list(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def summary(self, prefix: str) -> dict[str, float | int]:
        return summary(self.values, prefix)


# ---------------------------------------------------------------------------------------------
# A server's Prometheus histograms, read back (the rollout and `served_models`)
# ---------------------------------------------------------------------------------------------


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile from cumulative ``(upper_bound, count)`` buckets, as
    Prometheus's ``histogram_quantile`` does: linear within the bucket that holds it; a quantile
    in the ``+Inf`` bucket is the largest finite bound. None without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _merge(hists: dict, key: str, samples) -> None:
    """Add bucket counts of one labelled histogram into ``hists[key]`` (summing versions)."""
    acc = hists.setdefault(key, {"buckets": {}, "count": 0.0, "sum": 0.0})
    for s in samples:
        if s.name.endswith("_bucket"):
            le = float(s.labels["le"])
            acc["buckets"][le] = acc["buckets"].get(le, 0.0) + s.value
        elif s.name.endswith("_count"):
            acc["count"] += s.value
        elif s.name.endswith("_sum"):
            acc["sum"] += s.value


def served_summary(text: str, prefix: str = SERVING_PREFIX) -> dict[str, dict]:
    """Per model, from a server's Prometheus text: request counts by result, latency
    P50/P95/P99 (ms, estimated from the histogram), queue wait P50/P99 and mean, resident bytes,
    loads/swaps by result, evictions by reason, versions seen, the serving and previous versions,
    and the watcher's alias reads (failures, Unix time of the last one that succeeded)."""
    from prometheus_client.parser import text_string_to_metric_families

    models: dict[str, dict] = {}
    hists: dict[str, dict[str, dict]] = {"request": {}, "queue": {}}

    def row(model: str) -> dict:
        return models.setdefault(model, {"versions": set(), "requests": {}, "resident_bytes": 0.0, "loads": {},
                                         "swaps": {}, "evictions": {}, "queue_depth": 0.0, "roles": {},
                                         "alias_failed": 0.0, "alias_read_at": None})

    for fam in text_string_to_metric_families(text):
        name = fam.name
        by_model: dict[str, list] = {}
        for s in fam.samples:
            if "model" in s.labels:
                by_model.setdefault(s.labels["model"], []).append(s)
        for model, samples in by_model.items():
            r = row(model)
            for s in samples:
                if s.labels.get("version"):
                    r["versions"].add(s.labels["version"])
            if name == f"{prefix}_request_seconds":
                _merge(hists["request"], model, samples)
            elif name == f"{prefix}_queue_wait_seconds":
                _merge(hists["queue"], model, samples)
            elif name == f"{prefix}_requests":
                for s in samples:
                    if s.name.endswith("_total"):
                        res = s.labels.get("result", "ok")
                        r["requests"][res] = r["requests"].get(res, 0.0) + s.value
            elif name in (f"{prefix}_loads", f"{prefix}_swaps"):
                key = name.rsplit("_", 1)[1]
                for s in samples:
                    if s.name.endswith("_total"):
                        res = s.labels.get("result", "ok")
                        r[key][res] = r[key].get(res, 0.0) + s.value
            elif name == f"{prefix}_evictions":
                for s in samples:
                    if s.name.endswith("_total"):
                        why = s.labels.get("reason", "lru")
                        r["evictions"][why] = r["evictions"].get(why, 0.0) + s.value
            elif name == f"{prefix}_resident_bytes":
                r["resident_bytes"] = sum(s.value for s in samples)
            elif name == f"{prefix}_queue_depth":
                r["queue_depth"] = sum(s.value for s in samples)
            elif name == f"{prefix}_version_info":
                for s in samples:
                    if s.value:
                        r["roles"][s.labels.get("role", "")] = s.labels.get("version")
            elif name == f"{prefix}_alias_reads":
                r["alias_failed"] += sum(s.value for s in samples
                                         if s.name.endswith("_total") and s.labels.get("result") == "failed")
            elif name == f"{prefix}_alias_read_timestamp_seconds":
                r["alias_read_at"] = max(s.value for s in samples)

    out = {}
    for model in sorted(models):
        r = models[model]
        req = hists["request"].get(model)
        que = hists["queue"].get(model)
        entry = {
            "versions": sorted(r["versions"]),
            "requests": int(sum(r["requests"].values())),
            "requests_by_result": {k: int(v) for k, v in sorted(r["requests"].items())},
        }
        for q in (50, 95, 99):
            v = histogram_quantile(q / 100, list(req["buckets"].items())) if req else None
            entry[f"p{q}_ms"] = None if v is None else v * 1e3
        for q in (50, 99):
            v = histogram_quantile(q / 100, list(que["buckets"].items())) if que else None
            entry[f"queue_wait_p{q}_ms"] = None if v is None else v * 1e3
        entry["queue_wait_mean_ms"] = (que["sum"] / que["count"] * 1e3) if que and que["count"] else None
        entry.update(queue_depth=int(r["queue_depth"]), resident_bytes=int(r["resident_bytes"]),
                     loads={k: int(v) for k, v in sorted(r["loads"].items())},
                     swaps={k: int(v) for k, v in sorted(r["swaps"].items())},
                     evictions=int(sum(r["evictions"].values())),
                     evictions_by_reason={k: int(v) for k, v in sorted(r["evictions"].items())},
                     serving=r["roles"].get("serving"), previous=r["roles"].get("previous"),
                     alias_reads_failed=int(r["alias_failed"]), alias_read_at=r["alias_read_at"])
        out[model] = entry
    return out



# ---------------------------------------------------------------------------------------------
# Curves as pictures: a small SVG line chart (no plotting library), for Markdown metadata
# ---------------------------------------------------------------------------------------------

_COLORS = ("#4F43DD", "#E5484D", "#12A594", "#F76B15", "#8E4EC6")


def _nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw_step = (hi - lo) / n
    mag = 10 ** np.floor(np.log10(raw_step))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw_step)
    start = np.floor(lo / step) * step
    return [float(start + i * step) for i in range(int(np.ceil((hi - start) / step - 1e-9)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_chart_svg(series: dict[str, list[float | None]], *, title: str = "", x_label: str = "epoch",
                   x: list[float] | None = None, width: int = 520, height: int = 260) -> str:
    """An SVG line chart of ``series`` (name -> y per point; None or non-finite points are gaps),
    one colour per series with a legend, y axis scaled to the data, x = ``x`` (default 1..n)."""
    from html import escape

    n = max((len(v) for v in series.values()), default=0)
    xs = list(x) if x is not None else list(range(1, n + 1))
    ys = [float(y) for v in series.values() for y in v if y is not None and np.isfinite(y)]
    left, right, top, bottom = 56, 16, 30 if title else 12, 40
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        parts.append(f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>')
    if not ys or not xs:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    yt = _nice_ticks(min(ys), max(ys))
    y0, y1 = yt[0], yt[-1]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1

    def px(v):
        return left + (v - x0) / (x1 - x0) * pw

    def py(v):
        return top + ph - (v - y0) / ((y1 - y0) or 1.0) * ph

    for t in yt:  # horizontal grid and y labels
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    step = max(1, int(np.ceil(len(xs) / 10)))
    for v in xs[::step]:  # x labels, at most ~10
        parts.append(f'<text x="{px(v):.1f}" y="{top + ph + 16}" text-anchor="middle">{_fmt(v)}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#999"/>'
                 f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#999"/>'
                 f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>')
    for i, (name, values) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        runs, run = [], []
        for xv, yv in zip(xs, values):
            if yv is None or not np.isfinite(yv):
                runs.append(run)
                run = []
            else:
                run.append((px(xv), py(float(yv))))
        runs.append(run)
        for r in runs:
            if len(r) > 1:
                pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in r)
                parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
            for a, b in r:
                parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{color}"/>')
        lx = left + 8 + i * 130
        parts.append(f'<rect x="{lx}" y="{top + 4}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{lx + 14}" y="{top + 13}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_markdown(svg: str, alt: str) -> str:
    """``svg`` as a Markdown image with a base64 data URI (Dagster's Markdown metadata allows
    ``data:`` image sources)."""
    import base64

    return f"![{alt}](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"
