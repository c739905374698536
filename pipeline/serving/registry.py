"""The serving core: many models, hot swap, LRU within a byte budget, dynamic batching (no HTTP).

Interface (the HTTP layer in ``pipeline/serving/app.py`` is built on exactly this)::

    registry = ModelRegistry(store, ServeConfig(models=None, device="cpu", budget_bytes=2 << 30), tier=tier)
    await registry.start()                      # alias watcher; preloads config.models (background)
    out = await registry.infer("digits", None, {"input": np.ndarray[N, 1, 28, 28] float32})
    out["output"]                               # np.ndarray[N, 10] float32
    registry.index(); registry.metadata("digits"); await registry.load("digits"); await registry.unload("digits")
    await registry.stop(drain_timeout_s=30)

Errors are :class:`ServingError` subclasses with an HTTP ``status`` and a one-line message:
:class:`ModelNotFound` (404: unknown model or version), :class:`InvalidInput` (400: input name,
rank, shape or dtype; the message says what was expected), :class:`Unavailable` (503, with
``retry_after_s``: queue full, load failed or timed out, budget full, draining, unloaded).

**Which version serves.** Each model follows its production alias (``pipeline.promotion``;
without one, its newest complete, non-rejected version when ``latest_without_alias``). The alias
is re-read every ``poll_s`` for models that serve, and on :meth:`load` (the newest version of a
never-promoted model every ``discover_s``: finding it costs a stat per file per version). A model
that is not resident loads on its first request (requests wait in a queue bounded by
``queue_limit``; past it: Unavailable).

**Hot swap.** A new production version loads in the background (``pipeline.serving.loader``:
shm tier when pre-warmed and byte-identical to the storage manifest, else storage; sha256
verified; golden outputs reproduced within ``golden_atol``; warmed up) while the old one keeps
answering. Then the swap is one assignment on the event loop: a request picks its version when
admitted, so requests in flight finish on the old version. The old version stays resident as
``previous`` (``keep_previous``, within the budget): a rollback (alias back to it) swaps without
loading. Versions older than that are dropped once idle. A failed load or golden check leaves the
old version serving; the reason goes to the log (``forgeline.serving``), the ``*_failed`` counters
and ``metadata()["parameters"]["last_error"]``, and the watcher does not retry that version until
the alias names another one or :meth:`load` is called.

**Budget and LRU.** ``budget_bytes`` bounds the weight bytes of resident versions plus the
estimates of loads in progress. To make room, idle versions are evicted least recently used first:
extra versions (asked for by id), then ``previous`` versions, then serving versions. Never evicted:
a version with requests in flight or queued, any version of a model that has requests waiting for
a load, the version being loaded, and the serving version of a model whose new version is being
loaded. When nothing can be evicted the load waits for requests to finish (up to
``load_timeout_s``), then fails with Unavailable; one that cannot fit beside its model's serving
version fails at once. An evicted model loads again on its next request.

**Concurrency.** Everything runs on one asyncio loop; loads and forwards run in thread pools
(``load_workers``, ``infer_workers``; torch releases the GIL). Each model has its own lock for
swaps and loads: loading one model never blocks requests to another, and loads of different models
run concurrently. Each resident version has its own dynamic batcher (``batching.DynamicBatcher``).

**Traffic sampling.** With ``sample_rate > 0`` each answered row is taken with that probability
and handed to :class:`pipeline.serving.traffic.TrafficSampler` (``traffic_store``, default the model
store), which lands windows of it under ``incoming/serving-*/`` for ingestion and the drift checks.
Handing over never waits (a bounded buffer, a background writer) and never fails the request.

Notes for the HTTP layer: ``metadata()`` of a model that was never loaded reads its manifest and
golden file from storage once (cached); ``index()`` lists one row per model (its serving version,
or the production one when not resident) plus one row per other resident version; ``inputs`` of
``infer`` is ``{"input": array}``; the answer is ``{"output": array}``. :meth:`infer` raises
``ModelNotFound`` for a model or version that does not exist, and ``Unavailable`` after
:meth:`unload` until the next :meth:`load`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import Any

import numpy as np

from pipeline import export
from pipeline.serving import loader
from pipeline.serving.batching import BatcherClosed, DynamicBatcher, QueueFull
from pipeline.serving.metrics import ServingMetrics
from pipeline.serving.watcher import Poller

log = logging.getLogger("forgeline.serving")
ALIAS_WARN_EVERY_S = 300.0  # the same unreadable alias is logged again after this long

_NP_DATATYPES = {
    np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.float16): "FP16",
    np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.int16): "INT16", np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL",
}


@dataclass
class ServeConfig:
    models: list[str] | None = None  # names to serve; None = every model under models/
    device: str = "cpu"
    budget_bytes: int | None = None  # resident weight bytes (device memory on GPU, RAM on CPU); None = unlimited
    max_batch_size: int = 32  # dynamic batching (Triton semantics)
    max_queue_delay_ms: float = 0.0  # Triton's default: batches form while the previous forward runs
    queue_limit: int = 256  # requests waiting per model (while loading or batching); past it -> Unavailable
    load_timeout_s: float = 120.0
    poll_s: float = 2.0  # how often production aliases are re-read
    compile: bool = False  # torch.compile through the compile cache
    compile_mode: str = "default"
    keep_previous: bool = True  # keep the previous version resident (within budget) for instant rollback
    golden_atol: float = 1e-4
    # additions (beyond the agreed interface)
    require_golden: bool = False  # refuse versions published without golden outputs
    latest_without_alias: bool = True  # a model never promoted serves its newest complete version
    preload: bool = True  # start() loads config.models in the background (when models is given)
    load_workers: int = 4  # concurrent loads (threads)
    infer_workers: int = 8  # concurrent forwards (threads), all models together
    retry_after_s: float = 1.0  # what Unavailable suggests to clients
    discover_s: float = 30.0  # how often models/ is re-listed when models is None
    retry_failed_s: float = 30.0  # a version that failed to load is not loaded again for requests within this
    root: str = export.DEFAULT_ROOT
    # sampled traffic flows back as landed batches (pipeline.serving.traffic); 0 = off
    sample_rate: float = 0.0  # share of inference rows sampled
    sample_window_s: float = 300.0  # a window closes this long after its first sample...
    sample_window_samples: int = 10_000  # ...or when it holds this many samples
    sample_buffer: int = 1024  # requests waiting for the traffic writer; past it, samples are dropped
    sample_prefix: str = "incoming"  # windows land under <prefix>/serving-<model>-<time>-<id>/


def _one_line(message: Any) -> str:
    text = str(message).strip()
    return text.splitlines()[0] if text else type(message).__name__


class Outputs(dict):
    """An inference result: output name -> array, and ``version``, the version that computed it
    (the one the request was admitted to, even when a swap happened while it ran)."""

    def __init__(self, data: Mapping[str, np.ndarray], version: str):
        super().__init__(data)
        self.version = version


class ServingError(Exception):
    """Base serving error: ``status`` is the HTTP status; the message is one line."""

    status: int = 500

    def __init__(self, message: Any):
        super().__init__(_one_line(message))


class ModelNotFound(ServingError):
    """Unknown model or version."""

    status = 404


class InvalidInput(ServingError):
    """Wrong input name, shape or dtype."""

    status = 400


class Unavailable(ServingError):
    """Queue full, model failed to load, budget full, draining, unloaded; try again later."""

    status = 503

    def __init__(self, message: Any, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = float(retry_after_s)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class _Resident:
    """One loaded version: its weights, its batcher, who is using it."""

    def __init__(self, loaded: loader.LoadedVersion, batcher: DynamicBatcher):
        self.loaded = loaded
        self.version = loaded.version
        self.batcher = batcher
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.loaded_at = _now()
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def nbytes(self) -> int:
        return self.loaded.nbytes

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.batcher.depth > 0


@dataclass
class _Model:
    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    versions: dict[str, _Resident] = field(default_factory=dict)
    loading: dict[str, asyncio.Task] = field(default_factory=dict)
    guard: Counter = field(default_factory=Counter)  # versions held against eviction (being loaded/swapped in)
    serving: str | None = None
    previous: str | None = None
    production: str | None = None  # the version the alias (or latest) named at the last read
    alias: dict | None = None
    reference_at: float = -math.inf  # time.monotonic() when that read started
    alias_error: str | None = None  # why the watcher's last read of the alias failed (None: it read)
    alias_warned_at: float = -math.inf  # time.monotonic() of the last warning about it
    manifests: dict[str, tuple[dict, float]] = field(default_factory=dict)  # version -> (manifest, read at)
    last_error: str | None = None
    last_swap: dict | None = None
    failed: dict[str, str] = field(default_factory=dict)  # version -> why (not retried by the watcher)
    failed_at: dict[str, float] = field(default_factory=dict)  # version -> time.monotonic() of the failure
    waiting: int = 0  # requests waiting for a load
    activating: asyncio.Task | None = None
    follow: asyncio.Task | None = None
    unloaded: bool = False
    latest_checked: float = 0.0  # time.monotonic() of the last "latest version" lookup by the watcher
    evicted: str | None = None
    specs: dict[str, tuple[loader.TensorSpec, loader.TensorSpec]] = field(default_factory=dict)

    def resident(self) -> _Resident | None:
        return self.versions.get(self.serving) if self.serving else None

    def roles(self) -> tuple[str | None, str | None]:
        """``(serving, previous)`` as reported (metadata, ``version_info``): each only while resident."""
        return (self.serving if self.resident() is not None else None,
                self.previous if self.previous in self.versions else None)


class ModelRegistry:
    def __init__(self, store, config: ServeConfig | None = None, *, tier=None, cache=None,
                 metrics: ServingMetrics | None = None, traffic=None, traffic_store=None):
        self.store = store
        self.config = config or ServeConfig()
        self.tier = tier
        self.cache = cache
        self.metrics = metrics if metrics is not None else ServingMetrics()
        # sampled requests -> incoming/serving-*/ (traffic_store: where they land, default store)
        self.traffic = traffic if traffic is not None else self._traffic(traffic_store or store)
        self._models: dict[str, _Model] = {}
        self._known: set[str] = set(self.config.models or [])
        self._reserved = 0
        self._started = False
        self._draining = False
        self._stopped = False
        self._room: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._last_discovery = 0.0
        self._load_pool = ThreadPoolExecutor(max(1, self.config.load_workers), thread_name_prefix="forgeline-load")
        self._infer_pool = ThreadPoolExecutor(max(1, self.config.infer_workers), thread_name_prefix="forgeline-infer")
        self._io_pool = ThreadPoolExecutor(2, thread_name_prefix="forgeline-io")
        self._poller = Poller(self.config.poll_s, self._poll, name="forgeline-alias-watcher")
        self._load_fn = loader.load_version  # tests wrap it (slow loads)
        # (model, version, compiled, shard sha256s) that passed the full golden check here: an
        # eager re-load of those verified bytes skips it, a compiled one checks one row
        self._golden_passed: set[tuple] = set()
        self.metrics.resident_models.set_function(
            lambda: sum(1 for m in list(self._models.values()) if m.versions))
        self.metrics.track_versions(self._version_roles)
        for name in self._known:
            self._check_name(name)

    def _version_roles(self):
        """``(model, version, role)`` of every version that serves or is kept for rollback (the
        ``version_info`` metric)."""
        for m in list(self._models.values()):
            for version, role in zip(m.roles(), ("serving", "previous")):
                if version is not None:
                    yield m.name, version, role

    def _traffic(self, store):
        if not self.config.sample_rate > 0:
            return None
        from pipeline.serving.traffic import TrafficConfig, TrafficSampler

        c = self.config
        return TrafficSampler(store, TrafficConfig(rate=c.sample_rate, window_s=c.sample_window_s,
                                                   window_samples=c.sample_window_samples, buffer=c.sample_buffer,
                                                   incoming=c.sample_prefix), registry=self.metrics.registry)

    def _sample(self, name: str, r: _Resident, x: np.ndarray, y: np.ndarray, t0: float) -> None:
        """Offer an answered request to the traffic sampler; whatever happens there, the request is
        not slowed (no wait) nor failed (errors are logged)."""
        try:
            spec = (r.loaded.manifest.get("metadata") or {}).get("spec")
            self.traffic.offer(name, r.version, x, y, latency_s=time.perf_counter() - t0, spec=spec)
        except Exception as e:  # noqa: BLE001
            log.warning("%s: traffic sampling failed: %s", name, _one_line(e))

    # lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the alias watcher; with ``config.models`` and ``preload``, load those models in
        the background (their requests queue meanwhile). Nothing else is loaded eagerly."""
        if self._started:
            return
        self._room = asyncio.Event()
        self._started = True
        if self.traffic is not None:
            self.traffic.start()
        if self.config.models is None:
            await self._discover()
            if not self._known:  # a server up and ready with nothing to serve: say so once
                log.warning("no model is published under %s yet: models are looked for again every %gs, and "
                            "on a request naming one", self.store.uri(self.config.root), self.config.discover_s)
        self._poller.start()
        if self.config.models and self.config.preload:
            for name in self.config.models:
                m = self._model_state(name)
                self._spawn(self._preload(m))

    async def _preload(self, m: _Model) -> None:
        try:
            await self._activate_task(m, why="preload")
        except Exception as e:  # noqa: BLE001 - already recorded; requests will retry
            log.warning("%s: preload failed: %s", m.name, _one_line(e))

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting requests, let those in flight (queued, batching, waiting for a load)
        finish for up to ``drain_timeout_s``, stop the watcher, free every resident version."""
        if self._stopped:
            return
        self._draining = True
        await self._poller.stop()
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self._in_flight():
            await asyncio.sleep(0.01)
        left = self._in_flight()
        if left:
            log.warning("stop: %d request(s) still in flight after %.1fs; they fail", left, drain_timeout_s)
        for t in list(self._tasks):
            t.cancel()
        residents = []
        for m in self._models.values():
            residents += m.versions.values()
            m.versions.clear()
            m.serving = m.previous = None
        await asyncio.gather(*(r.batcher.close() for r in residents), return_exceptions=True)
        for r in residents:
            loader.release(r.loaded)
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        self._infer_pool.shutdown(wait=False, cancel_futures=True)
        self._io_pool.shutdown(wait=False, cancel_futures=True)
        if self.traffic is not None:  # write the open windows (bounded wait: storage may hang)
            await asyncio.to_thread(self.traffic.close)
        self._stopped = True

    def _in_flight(self) -> int:
        return sum(m.waiting + sum(r.in_flight for r in m.versions.values()) for m in self._models.values())

    def live(self) -> bool:
        return not self._stopped

    def ready(self) -> bool:
        return self._started and not self._draining

    # repository -----------------------------------------------------------------------------------
    def index(self) -> list[dict]:
        """Triton repository index: one row per model (serving version, else production) and
        one per other resident version."""
        rows = []
        for name in sorted(self._known | set(self._models)):
            m = self._models.get(name)
            if m is None:
                rows.append({"name": name, "version": "", "state": "UNAVAILABLE",
                             "reason": "not loaded; loads on the first request"})
                continue
            state, reason = self._state(m)
            rows.append({"name": name, "version": m.serving or m.production or "", "state": state, "reason": reason})
            for v in sorted(m.versions):
                if v != m.serving:
                    role = "previous (kept for rollback)" if v == m.previous else "resident"
                    rows.append({"name": name, "version": v, "state": "READY", "reason": role})
        return rows

    def _state(self, m: _Model) -> tuple[str, str]:
        if m.resident() is not None:
            loading = [v for v in m.loading if v != m.serving]
            return "READY", (f"loading {', '.join(loading)} in the background" if loading else "")
        if m.unloaded:
            return "UNAVAILABLE", "unloaded"
        if m.loading or (m.activating is not None and not m.activating.done()):
            return "LOADING", f"loading {', '.join(m.loading) or m.production or ''}".strip()
        if m.last_error:
            return "UNAVAILABLE", m.last_error
        if m.evicted:
            return "UNAVAILABLE", m.evicted
        return "UNAVAILABLE", "not loaded; loads on the first request"

    async def load(self, name: str) -> None:
        """Repository load: resolve the production version now and make it serve (loading it if
        needed). Retries a version that failed before. Raises ModelNotFound / Unavailable(reason)."""
        self._check_accepting()
        m = await self._model(name)
        m.unloaded = False
        version, alias = await self._reference(m)
        m.failed.pop(version, None)
        m.failed_at.pop(version, None)
        try:
            await self._swap(m, version, why="repository load")
        except ServingError:
            raise
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"{name}/{version} failed to load: {_one_line(e)}", self.config.retry_after_s) from None

    async def unload(self, name: str) -> None:
        """Repository unload: the model stops taking new requests (Unavailable until the next
        :meth:`load`); requests in flight finish, then its versions are freed."""
        m = await self._model(name)
        m.unloaded = True
        m.serving = None
        m.previous = None
        for v in list(m.versions):
            self._drop_when_idle(m, v, "unloaded")

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Whether ``name`` (at ``version``) answers now; :class:`ModelNotFound` (404) for a model
        or version that does not exist, as the metadata route says, not a bare "not ready"."""
        m = self._models.get(name)
        ready = m is not None and not m.unloaded and (
            m.resident() is not None if version is None else version in m.versions)
        if not ready and (name not in self._known or version is not None):
            self.metadata(name, version)  # raises ModelNotFound for what does not exist
        return ready

    def metadata(self, name: str, version: str | None = None) -> dict:
        """KServe v2 model metadata, with the serving state under ``parameters``."""
        if name not in self._known and name not in self._models:
            raise ModelNotFound(f"unknown model {name!r}")
        m = self._model_state(name)
        spec_version = version or m.serving or m.production
        r = m.versions.get(spec_version) if spec_version else None
        if r is not None:
            inp, out = r.loaded.input, r.loaded.output
        else:
            if spec_version is None:
                try:
                    spec_version, _ = loader.serving_reference(self.store, name, root=self.config.root,
                                                               latest_without_alias=self.config.latest_without_alias)
                except Exception as e:  # noqa: BLE001
                    raise Unavailable(f"{name}: cannot read its production alias: {_one_line(e)}") from None
                if spec_version is None:
                    raise ModelNotFound(f"{name}: no servable version (nothing promoted, nothing published)")
            if spec_version not in m.specs:
                try:
                    m.specs[spec_version] = loader.spec_for(self.store, name, spec_version, root=self.config.root)
                except export.VersionNotFound:
                    raise ModelNotFound(f"{name}/{spec_version}: no such version") from None
                except Exception as e:  # noqa: BLE001
                    raise Unavailable(f"{name}/{spec_version}: {_one_line(e)}") from None
            inp, out = m.specs[spec_version]
        state, reason = self._state(m)
        serving = m.resident()
        serving_version, previous = m.roles()
        return {
            "name": name,
            "versions": sorted(m.versions),
            "platform": "pytorch_libtorch",
            "inputs": [inp.as_metadata()],
            "outputs": [out.as_metadata()],
            "parameters": {
                "production": m.production,
                "serving": serving_version,
                "previous": previous,
                "state": state,
                "reason": reason,
                "last_error": m.last_error,
                "last_swap": m.last_swap,
                "alias": m.alias,
                "alias_error": m.alias_error,
                "lineage": serving.loaded.lineage() if serving is not None else None,
                "source": serving.loaded.source if serving is not None else None,
                "golden": serving.loaded.golden if serving is not None else None,
                "compile": serving.loaded.compile if serving is not None else None,  # None: eager
                "resident_bytes": sum(r.nbytes for r in m.versions.values()),
                "latency": self.metrics.latency(name),
                "max_batch_size": self.config.max_batch_size,
            },
        }

    # inference ------------------------------------------------------------------------------------
    async def infer(self, name: str, version: str | None, inputs: Mapping[str, np.ndarray]) -> Outputs:
        """Run ``inputs["input"]`` (float32, ``[N, *input shape]``, ``N <= max_batch_size``)
        through ``name`` (its serving version when ``version`` is None) and return
        ``Outputs({"output": float32 [N, ...]}, version=<the version that answered>)``. Batched with concurrent requests to the same version."""
        t0 = time.perf_counter()
        self._check_accepting()
        m = await self._model(name)  # unknown names raise here, before any metric gets their label
        r: _Resident | None = None
        label, result = "", "error"  # a version label only once resolved (bounded label values)
        try:
            r = await self._acquire(m, version)
            label = r.version
            x = self._validate(m, r, inputs)
            try:
                y = await r.batcher.submit(x)
            except QueueFull as e:
                raise Unavailable(f"{name}/{r.version}: queue full ({e})", self.config.retry_after_s) from None
            except BatcherClosed:
                raise Unavailable(f"{name}/{r.version} was unloaded before the request ran",
                                  self.config.retry_after_s) from None
            except Exception as e:  # noqa: BLE001 - the forward itself failed
                log.error("%s/%s: forward failed: %s", name, r.version, _one_line(e))
                raise ServingError(f"{name}/{r.version}: inference failed: {_one_line(e)}") from None
            result = "ok"
            if self.traffic is not None:
                self._sample(name, r, x, y, t0)
            return Outputs({r.loaded.output.name: y}, r.version)
        except InvalidInput:
            result = "invalid"
            raise
        except Unavailable:
            result = "unavailable"
            raise
        except ModelNotFound:
            result = "not_found"
            raise
        finally:
            if r is not None:
                self._release(r)
            self.metrics.observe_request(name, label, time.perf_counter() - t0, result)

    def _check_accepting(self) -> None:
        if self._stopped or self._draining:
            raise Unavailable("the server is draining (shutting down)", self.config.retry_after_s)
        if not self._started:
            raise Unavailable("the server is not started yet", self.config.retry_after_s)

    async def _acquire(self, m: _Model, version: str | None) -> _Resident:
        def unloaded() -> Unavailable:
            return Unavailable(f"{m.name} is unloaded (repository load it first)", self.config.retry_after_s)

        if m.unloaded:
            raise unloaded()
        if version is None:
            for _ in range(3):
                r = m.resident()
                if r is not None:
                    break
                await self._wait_for(m, self._activate_task(m))
                if m.unloaded:  # unloaded while this request waited: not loaded again for it
                    raise unloaded()
            else:
                raise Unavailable(f"{m.name}: no version became ready", self.config.retry_after_s)
        else:
            r = m.versions.get(version)
            if r is None:
                # held while this request waits, so that a swap finishing meanwhile does not drop
                # the version as "replaced" before the request takes it (it is not serving)
                m.guard[version] += 1
                try:
                    await self._wait_for(m, self._version_task(m, version))
                finally:
                    m.guard[version] -= 1
                if m.unloaded:
                    raise unloaded()
                r = m.versions.get(version)
                if r is None:
                    raise Unavailable(f"{m.name}/{version} was evicted before it could answer (no room: "
                                      f"see --budget)", self.config.retry_after_s)
        r.in_flight += 1  # no await since the load finished: nothing was evicted in between
        r.idle.clear()
        r.last_used = time.monotonic()
        return r

    def _release(self, r: _Resident) -> None:
        r.in_flight -= 1
        r.last_used = time.monotonic()
        if r.in_flight == 0:
            r.idle.set()
            self._notify_room()

    async def _wait_for(self, m: _Model, task: asyncio.Task) -> None:
        if m.waiting >= self.config.queue_limit:
            raise Unavailable(f"{m.name}: {m.waiting} requests already waiting for it to load "
                              f"(queue_limit {self.config.queue_limit})", self.config.retry_after_s)
        m.waiting += 1
        try:
            await asyncio.wait_for(asyncio.shield(task), self.config.load_timeout_s)
        except asyncio.TimeoutError:
            raise Unavailable(f"{m.name}: still loading after {self.config.load_timeout_s:g}s",
                              self.config.retry_after_s) from None
        except ServingError:
            raise
        except asyncio.CancelledError:
            if task.cancelled():  # the load was cancelled (server stopping), not this request
                raise Unavailable(f"{m.name}: its load was cancelled (the server is stopping)",
                                  self.config.retry_after_s) from None
            raise
        except Exception as e:  # noqa: BLE001 - the load failed: say why
            raise Unavailable(f"{m.name} failed to load: {_one_line(e)}", self.config.retry_after_s) from None
        finally:
            m.waiting -= 1

    def _validate(self, m: _Model, r: _Resident, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        spec = r.loaded.input
        want = f"{spec.name!r} {spec.datatype} {[-1, *spec.shape]}"
        if not isinstance(inputs, Mapping) or set(inputs) != {spec.name}:
            names = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise InvalidInput(f"{m.name}/{r.version}: got input(s) {names}, expected exactly one input {want}")
        x = inputs[spec.name]
        if not isinstance(x, np.ndarray):
            raise InvalidInput(f"{m.name}/{r.version}: input {spec.name!r} is a {type(x).__name__}, expected an array {want}")
        if x.dtype != spec.dtype:
            got = _NP_DATATYPES.get(x.dtype, str(x.dtype))
            raise InvalidInput(f"{m.name}/{r.version}: input {spec.name!r} is {got}, expected {want}")
        ok = x.ndim == 1 + len(spec.shape) and all(w == -1 or g == w for g, w in zip(x.shape[1:], spec.shape))
        if not ok:
            raise InvalidInput(f"{m.name}/{r.version}: input {spec.name!r} has shape {list(x.shape)}, expected {want}")
        if x.shape[0] < 1:
            raise InvalidInput(f"{m.name}/{r.version}: input {spec.name!r} has an empty batch")
        if x.shape[0] > self.config.max_batch_size:
            raise InvalidInput(f"{m.name}/{r.version}: batch of {x.shape[0]} exceeds max_batch_size "
                               f"{self.config.max_batch_size}")
        x = np.ascontiguousarray(x)
        return x if x.flags.writeable else x.copy()

    # models -------------------------------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        try:
            export.version_prefix(name, "v", self.config.root)
        except ValueError:
            raise ModelNotFound(f"invalid model name {name!r}") from None

    def _model_state(self, name: str) -> _Model:
        m = self._models.get(name)
        if m is None:
            m = self._models[name] = _Model(name)
            self.metrics.resident_bytes.labels(name).set_function(
                lambda m=m: sum(r.nbytes for r in list(m.versions.values())))
            self.metrics.queue_depth.labels(name).set_function(
                lambda m=m: m.waiting + sum(r.batcher.depth for r in list(m.versions.values())))
        return m

    async def _model(self, name: str) -> _Model:
        if not isinstance(name, str):
            raise ModelNotFound(f"invalid model name {name!r}")
        self._check_name(name)
        if self.config.models is not None and name not in self.config.models:
            raise ModelNotFound(f"unknown model {name!r} (this server serves {sorted(self.config.models)})")
        if name not in self._known and name not in self._models:
            exists = await self._io(lambda: bool(export.list_versions(self.store, name, self.config.root))
                                    or loader.serving_reference(self.store, name, root=self.config.root,
                                                                latest_without_alias=False)[1] is not None)
            if not exists:
                raise ModelNotFound(f"unknown model {name!r}: nothing published under {self.config.root}/{name}")
            self._known.add(name)
        return self._model_state(name)

    async def _discover(self) -> None:
        self._last_discovery = time.monotonic()
        try:
            names = await self._io(loader.discover_models, self.store, root=self.config.root)
        except Exception as e:  # noqa: BLE001
            log.warning("model discovery failed: %s", _one_line(e))
            return
        self._known.update(names)

    async def _io(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._io_pool, partial(fn, *args, **kwargs))

    def _fresh(self, read_at: float) -> bool:
        """A read of the alias or a manifest started less than ``poll_s`` ago: as current as what
        a resident model serves (the watcher re-reads its alias every ``poll_s``), so a swap-in
        of a model evicted moments ago reads neither again."""
        return time.monotonic() - read_at < self.config.poll_s

    async def _reference(self, m: _Model, *, cached: bool = False) -> tuple[str, dict | None]:
        if cached and m.production is not None and self._fresh(m.reference_at):
            return m.production, m.alias
        t = time.monotonic()
        try:
            version, alias = await self._io(loader.serving_reference, self.store, m.name, root=self.config.root,
                                            latest_without_alias=self.config.latest_without_alias)
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"{m.name}: cannot read its production alias: {_one_line(e)}",
                              self.config.retry_after_s) from None
        m.production, m.alias, m.reference_at = version, alias, t
        if version is None:
            raise ModelNotFound(f"{m.name}: no servable version (nothing promoted"
                                f"{', nothing complete published' if self.config.latest_without_alias else ''})")
        return version, alias

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _activate_task(self, m: _Model, why: str = "request") -> asyncio.Task:
        """The shared task that makes the production version serve (requests wait on it); ``why``
        (a request, or the preload at start) is what the log line says."""
        if m.activating is None or m.activating.done():
            m.activating = self._spawn(self._activate(m, why))
        return m.activating

    async def _manifest(self, m: _Model, version: str) -> dict:
        """The version's manifest (one read per ``poll_s`` at most: see :meth:`_fresh`); raises
        export.VersionNotFound / ValueError as ``export.read_manifest`` does."""
        got = m.manifests.get(version)
        if got is not None and self._fresh(got[1]):
            return got[0]
        t = time.monotonic()
        manifest = await self._io(export.read_manifest, self.store, m.name, version, root=self.config.root)
        m.manifests = {v: mt for v, mt in m.manifests.items() if self._fresh(mt[1])}  # drop stale ones
        m.manifests[version] = (manifest, t)
        return manifest

    async def _activate(self, m: _Model, why: str) -> None:
        version, _ = await self._reference(m, cached=True)
        since = time.monotonic() - m.failed_at.get(version, -1e18)
        if version in m.failed and version not in m.versions and since < self.config.retry_failed_s:
            raise Unavailable(f"{m.name}/{version} failed to load {since:.0f}s ago: {m.failed[version]}",
                              max(self.config.retry_after_s, self.config.retry_failed_s - since))
        await self._swap(m, version, why=why)  # a resident version (e.g. previous) swaps without loading

    def _version_task(self, m: _Model, version: str) -> asyncio.Task:
        return self._spawn(self._ensure_version(m, version))

    async def _ensure_version(self, m: _Model, version: str) -> None:
        if version in m.versions:
            return
        try:
            await self._manifest(m, version)
        except export.VersionNotFound:
            raise ModelNotFound(f"{m.name}/{version}: no such version") from None
        except ValueError:
            raise ModelNotFound(f"{m.name}/{version}: invalid version") from None
        m.guard[version] += 1
        try:
            await self._load_resident(m, version)
        finally:
            m.guard[version] -= 1

    # swaps and loads ------------------------------------------------------------------------------
    async def _swap(self, m: _Model, version: str, *, why: str) -> None:
        """Make ``version`` serve: load it (unless resident), then switch in one step. Raises on
        failure after recording it (the old version keeps serving)."""
        asked = time.monotonic()
        async with m.lock:
            if m.serving == version and version in m.versions:
                return
            if version in m.failed and m.failed_at.get(version, 0.0) >= asked:  # failed while we waited
                raise Unavailable(f"{m.name}/{version} failed to load: {m.failed[version]}", self.config.retry_after_s)
            t0 = time.perf_counter()
            old = m.serving if m.serving in m.versions else None
            was_resident = version in m.versions
            m.guard[version] += 1
            try:
                r = m.versions.get(version) or await self._load_resident(m, version)
            except BaseException as e:
                m.guard[version] -= 1
                if isinstance(e, asyncio.CancelledError):
                    raise
                msg = _one_line(e)
                m.last_error = msg if version in msg else f"{version}: {msg}"
                m.failed[version] = msg
                m.failed_at[version] = time.monotonic()
                if old is not None:
                    self.metrics.swaps.labels(m.name, "failed").inc()
                    log.error("%s: swap %s -> %s failed (%s); %s keeps serving", m.name, old, version, msg, old)
                else:
                    log.error("%s: %s could not be loaded (%s)", m.name, version, msg)
                raise
            m.guard[version] -= 1
            if m.unloaded:  # unloaded while this version was loading: do not serve it
                self._drop_when_idle(m, version, "unloaded")
                return
            m.serving = version
            m.evicted = None
            m.failed.pop(version, None)
            m.failed_at.pop(version, None)
            m.last_error = None
            if old is not None and old != version:
                m.previous = old if self.config.keep_previous else None
            if m.previous == version:
                m.previous = None
            seconds = time.perf_counter() - t0
            m.last_swap = {"from": old, "to": version, "at": _now(), "seconds": seconds, "why": why,
                           "loaded": not was_resident, "source": r.loaded.source, "golden": r.loaded.golden,
                           "tier_problem": r.loaded.tier_problem}
            if old is not None:
                self.metrics.swaps.labels(m.name, "ok").inc()
                self.metrics.swap_seconds.labels(m.name).observe(seconds)
                log.info("%s: swapped %s -> %s in %.3fs (%s, %s)", m.name, old, version, seconds,
                         "loaded" if not was_resident else "already resident", why)
            else:
                log.info("%s: serving %s (%.3fs, %s)", m.name, version, seconds, why)
            for v in list(m.versions):
                if v not in (m.serving, m.previous):
                    self._drop_when_idle(m, v, f"replaced by {version}")

    async def _load_resident(self, m: _Model, version: str) -> _Resident:
        task = m.loading.get(version)
        if task is None:
            task = self._spawn(self._load(m, version))
            m.loading[version] = task
            task.add_done_callback(lambda t, v=version: m.loading.pop(v, None) if m.loading.get(v) is t else None)
        return await asyncio.shield(task)

    async def _load(self, m: _Model, version: str) -> _Resident:
        t0 = time.perf_counter()
        cfg = self.config
        try:
            try:
                manifest = await self._manifest(m, version)
            except export.VersionNotFound:
                raise ModelNotFound(f"{m.name}/{version}: no such version") from None
            need = loader.estimate_bytes(manifest)
            await self._reserve(m, version, need)
            try:
                passed = (m.name, version, cfg.compile, tuple(str(s.get("sha256")) for s in manifest.get("shards") or []))
                fn = partial(self._load_fn, self.store, m.name, version, device=cfg.device, tier=self.tier,
                             cache=self.cache, compile=cfg.compile, compile_mode=cfg.compile_mode,
                             golden_atol=cfg.golden_atol, require_golden=cfg.require_golden,
                             golden_rows=(1 if cfg.compile else 0) if passed in self._golden_passed else None,
                             max_batch_size=cfg.max_batch_size, root=cfg.root, manifest=manifest,
                             on_tier_reject=lambda why: self.metrics.tier_rejects.labels(m.name).inc())
                loaded = await asyncio.get_running_loop().run_in_executor(self._load_pool, fn)
                if loaded.golden.get("checked"):
                    self._golden_passed.add(passed)
            finally:
                self._reserved -= need
                self._notify_room()
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                self.metrics.loads.labels(m.name, "failed").inc()
                log.warning("%s/%s: load failed: %s", m.name, version, _one_line(e))
            raise
        seconds = time.perf_counter() - t0
        batcher = DynamicBatcher(loaded.run, max_batch_size=cfg.max_batch_size,
                                 max_queue_delay_ms=cfg.max_queue_delay_ms, queue_limit=cfg.queue_limit,
                                 executor=self._infer_pool, on_batch=partial(self._on_batch, m.name))
        r = _Resident(loaded, batcher)
        m.versions[version] = r
        m.specs[version] = (loaded.input, loaded.output)
        self.metrics.loads.labels(m.name, "ok").inc()
        self.metrics.load_seconds.labels(m.name).observe(seconds)
        log.info("%s/%s: loaded from %s in %.3fs (%d bytes; golden %s)%s", m.name, version, loaded.source, seconds,
                 loaded.nbytes, "ok" if loaded.golden.get("checked") else "not checked",
                 f"; tier copy rejected: {loaded.tier_problem}" if loaded.tier_problem else "")
        self._trim(protect=m)
        return r

    def _on_batch(self, model: str, rows: int, waits: list[float]) -> None:
        self.metrics.batch_size.labels(model).observe(rows)
        h = self.metrics.queue_wait_seconds.labels(model)
        for w in waits:
            h.observe(w)

    # budget ---------------------------------------------------------------------------------------
    def _used(self) -> int:
        return self._reserved + sum(r.nbytes for m in self._models.values() for r in m.versions.values())

    def _notify_room(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = asyncio.Event()

    def _victim(self, protect: _Model | None) -> tuple[_Model, str] | None:
        best, best_key = None, None
        for mm in self._models.values():
            if mm.waiting > 0:
                continue
            for v, r in mm.versions.items():
                if r.busy or mm.guard[v] > 0 or v in mm.loading:
                    continue
                if v == mm.serving and (mm is protect or mm.lock.locked()):
                    continue
                rank = 2 if v == mm.serving else 1 if v == mm.previous else 0
                key = (rank, r.last_used)
                if best_key is None or key < best_key:
                    best, best_key = (mm, v), key
        return best

    async def _reserve(self, m: _Model, version: str, need: int) -> None:
        budget = self.config.budget_bytes
        if budget is None:
            self._reserved += need
            return
        if need > budget:
            raise Unavailable(f"{m.name}/{version} needs {need} bytes, more than the whole budget ({budget})",
                              self.config.retry_after_s)
        serving = m.versions.get(m.serving) if m.serving not in (None, version) else None
        if serving is not None and serving.nbytes + need > budget:  # it is never evicted for this load: no wait helps
            raise Unavailable(f"{m.name}/{version} needs {need} bytes beside {m.name}/{m.serving} ({serving.nbytes} "
                              f"bytes), which serves until it is ready: the budget ({budget}) cannot hold both; a hot "
                              f"swap needs at least {need + serving.nbytes} (--budget)", self.config.retry_after_s)
        deadline = time.monotonic() + self.config.load_timeout_s
        while True:
            if self._used() + need <= budget:
                self._reserved += need
                return
            victim = self._victim(m)
            if victim is not None:
                self._evict_now(*victim, f"evicted (LRU) to make room for {m.name}/{version}; loads again on request")
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"{m.name}/{version} needs {need} bytes; {self._used()} of the {budget}-byte budget "
                                  "are held by versions in use or loading, nothing idle to evict",
                                  self.config.retry_after_s)
            room = self._room
            assert room is not None
            try:
                await asyncio.wait_for(room.wait(), min(left, 0.25))
            except asyncio.TimeoutError:
                pass

    def _trim(self, protect: _Model) -> None:
        """After a load: if the real size exceeded the estimate, evict until within the budget."""
        budget = self.config.budget_bytes
        while budget is not None and self._used() > budget:
            victim = self._victim(protect)
            if victim is None:
                log.warning("resident weights %d bytes exceed the budget %d; nothing idle to evict", self._used(), budget)
                return
            self._evict_now(*victim, "evicted (LRU): over the budget after a load")

    def _evict_now(self, m: _Model, version: str, why: str, *, count: bool = True) -> None:
        r = m.versions.pop(version, None)
        if r is None:
            return
        if m.serving == version:
            m.serving = None
            m.evicted = why
        if m.previous == version:
            m.previous = None
        if count:
            reason = "lru" if why.startswith("evicted") else "replaced" if why.startswith("replaced") else "unload"
            self.metrics.evictions.labels(m.name, reason).inc()
        log.info("%s/%s: %s (%d bytes freed)", m.name, version, why, r.nbytes)
        self._notify_room()

        async def dispose() -> None:
            try:
                await r.batcher.close()
            finally:
                self._free_weights(r.loaded)

        try:
            self._spawn(dispose())
        except RuntimeError:  # no running loop (interpreter shutdown)
            loader.release(r.loaded)

    def _free_weights(self, loaded: loader.LoadedVersion) -> None:
        """Free a version's weights on an I/O thread: each tensor's free hands the GIL over and
        back (torch releases it while a tensor is destroyed), which on the event loop delayed
        every request behind a swap-in by ~0.4 ms under load."""
        try:
            self._io_pool.submit(loader.release, loaded)
        except RuntimeError:  # the pool is shut down (stopping)
            loader.release(loaded)

    def _drop_when_idle(self, m: _Model, version: str, why: str) -> None:
        r = m.versions.get(version)
        if r is None:
            return

        async def drop() -> None:
            await r.idle.wait()
            while r.batcher.depth:
                await asyncio.sleep(0.005)
            if m.versions.get(version) is r and version not in (m.serving, m.previous) and m.guard[version] == 0:
                self._evict_now(m, version, why)

        self._spawn(drop())

    # the alias watcher ----------------------------------------------------------------------------
    async def _poll(self) -> None:
        if self.config.models is None and time.monotonic() - self._last_discovery >= self.config.discover_s:
            await self._discover()
        # models that serve: a model without a serving version loads on its next request instead
        active = [m for m in self._models.values() if not m.unloaded and m.resident() is not None]
        if not active:
            return

        now = time.monotonic()

        def read_all() -> dict[str, tuple[str | None, dict | None, str | None]]:
            out = {}
            for m in active:
                try:
                    # the alias every round (one small read); "newest complete version" (a stat per
                    # file per version) for never-promoted models only every discover_s
                    latest = self.config.latest_without_alias and now - m.latest_checked >= self.config.discover_s
                    v, a = loader.serving_reference(self.store, m.name, root=self.config.root,
                                                    latest_without_alias=latest)
                    if a is None and m.alias is not None:  # it followed an alias that is gone now
                        raise loader.lost_alias(self.store, m.name, self.config.root)
                    if a is None and not latest:
                        v = m.production
                    elif a is None:
                        m.latest_checked = now
                    out[m.name] = (v, a, None)
                except Exception as e:  # noqa: BLE001 - storage hiccup: keep serving what we have
                    out[m.name] = (None, None, _one_line(e))
            return out

        refs = await self._io(read_all)
        for m in active:
            version, alias, err = refs[m.name]
            if err is not None:
                self.metrics.alias_reads.labels(m.name, "failed").inc()
                # a new or changed failure at once, the same one at most every ALIAS_WARN_EVERY_S
                # (every --poll-s, it filled the log; the metrics count every failed read)
                if err != m.alias_error or now - m.alias_warned_at >= ALIAS_WARN_EVERY_S:
                    log.warning("%s: cannot read the production alias (%s); keeping %s", m.name, err, m.serving)
                    m.alias_warned_at = now
                m.alias_error = err
                continue
            self.metrics.alias_reads.labels(m.name, "ok").inc()
            self.metrics.alias_read_time.labels(m.name).set(time.time())
            m.production, m.alias, m.reference_at, m.alias_error = version, alias, now, None
            if version is None or version == m.serving or version in m.failed:
                continue
            if m.unloaded or m.resident() is None:  # evicted or unloaded while the alias was read:
                continue  # its next request loads the production version; the watcher does not

            if m.follow is not None and not m.follow.done():
                continue
            m.follow = self._spawn(self._follow(m, version))

    async def _follow(self, m: _Model, version: str) -> None:
        try:
            await self._swap(m, version, why="production alias changed")
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - recorded by _swap
            pass


__all__ = [
    "InvalidInput",
    "ModelNotFound",
    "ModelRegistry",
    "ServeConfig",
    "ServingError",
    "Unavailable",
]
