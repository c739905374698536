"""Per-item latencies: recorded where the work happens, summarized as P50/P95/P99.

Each stage times its unit of work (a shard validated, a batch delivered, an optimizer step, a
shard written, a file copied, ...) and keeps the seconds in its result object; the assets turn
them into numeric metadata with :func:`summary`, always under the same names::

    summary([0.010, 0.012, 0.030], "shard_latency")
    # {"shard_latency_p50_ms": 12.0, "shard_latency_p95_ms": 28.2, "shard_latency_p99_ms": 29.64,
    #  "shard_latency_max_ms": 30.0, "shard_latency_count": 3}

:class:`Latencies` is the recorder for work done on several threads at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np

PERCENTILES = (50, 95, 99)

T = TypeVar("T")


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
