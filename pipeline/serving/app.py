"""The model server's HTTP side: Open Inference Protocol v2 on Starlette, served by uvicorn.

    app = build_app(registry)            # any object with ModelRegistry's interface
    serve(registry, "127.0.0.1", 8000)   # blocks; SIGTERM/SIGINT drain, then return 0

Routes (KServe / Triton HTTP, what ``tritonclient.http`` calls):

    GET  /v2/health/live | /v2/health/ready
    GET  /v2                                            server metadata (name, version, extensions)
    GET  /v2/models/{name}[/versions/{version}]         model metadata
    GET  /v2/models/{name}[/versions/{version}]/ready
    POST /v2/models/{name}[/versions/{version}]/infer   JSON or binary tensor data
    POST /v2/repository/index                           {"ready": true} lists only ready models
    POST /v2/repository/models/{name}/load | /unload
    GET  /metrics                                       Prometheus text (the registry's metrics + HTTP ones)

Errors are ``{"error": "<one line>"}`` with the status of the :class:`ProtocolError` or
``ServingError`` raised (404 unknown model/version, 400 bad input, 413 body too large, 503 with a
``Retry-After`` header when a model cannot take the request now); anything else is a 500 with the
exception's one-line message, logged with its traceback. No request can stop the server.

The ASGI lifespan starts the registry (``await registry.start()``) and, on shutdown, stops it
(``await registry.stop(drain_timeout_s)``). :func:`serve` runs uvicorn so that SIGTERM/SIGINT
close the listening socket, let every request already in flight finish (``drain_timeout_s`` at
most), stop the registry, and return normally (exit status 0) instead of re-raising the signal.

The response's ``model_version`` is the one the registry's answer names (a mapping with a
``.version`` attribute), else the model's serving version in ``registry.index()`` when the answer
is sent.

This module is part of the engine: it never imports dagster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import signal
import sys
import time
from typing import Any

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.serving.protocol import (
    DEFAULT_MAX_BODY_BYTES,
    HEADER_LENGTH,
    ProtocolError,
    decode_request,
    load_json,
    decompress,
    encode_response,
    error_body,
    read_body_limit,
)

log = logging.getLogger("forgeline.serving")

SERVER_NAME = "forgeline"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
# Drift reports (pipeline.drift.REPORT_PREFIX, not imported: that module pulls in Evidently) that
# ``GET /reports/{path}`` serves from storage; nothing outside this prefix is reachable through it.
REPORTS_PREFIX = "reports/drift"
_REPORT_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]*")
_REPORT_TYPES = {".html": "text/html; charset=utf-8", ".json": "application/json"}
# Bodies above this are decoded (and responses encoded) off the event loop, so a large JSON
# request does not hold up the other connections.
_OFFLOAD_BYTES = 256 * 1024
# ...at most this many at once: a JSON body costs ~12x its size while decoded (a 60 MB one: ~0.75
# GB of Python numbers), so a burst of large requests queues here instead of exhausting memory.
_LARGE_DECODES = 2
KEEP_ALIVE_S = 75  # idle HTTP keep-alive: longer than a load balancer's idle timeout (make_server)


def _server_version() -> str:
    try:
        from importlib.metadata import version

        return version("forgeline")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0"


def _status_of(exc: BaseException) -> int | None:
    """The HTTP status a ServingError/ProtocolError carries (duck-typed: the registry module's
    classes are not imported here, so any registry with ``status`` attributes works)."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) and 400 <= status <= 599 else None


def error_response(exc: BaseException | str, status: int | None = None) -> Response:
    if isinstance(exc, BaseException):
        status = status or _status_of(exc) or 500
        message = str(exc) or type(exc).__name__
    else:
        message = exc
        status = status or 500
    headers = {}
    if status == 503:
        retry = getattr(exc, "retry_after_s", None)
        headers["Retry-After"] = str(max(1, math.ceil(retry))) if isinstance(retry, (int, float)) else "1"
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


class HttpMetrics:
    """What the HTTP side sees (requests refused before they reach the registry included), on its
    own CollectorRegistry: ``forgeline_http_requests_total{endpoint,code}`` and
    ``forgeline_http_request_seconds{endpoint}`` (body read, decode, registry, encode). ``endpoint``
    is the handler (infer, model_metadata, ...), never the raw path, so labels stay bounded."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("forgeline_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.seconds = Histogram("forgeline_http_request_seconds", "HTTP request handling time", ["endpoint"],
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                                          5.0, 10.0, 30.0), registry=self.registry)

    def observe(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.seconds.labels(endpoint).observe(seconds)


class _Handler:
    """Route handlers bound to one registry; every exception becomes a protocol error response."""

    def __init__(self, registry: Any, *, max_body_bytes: int, drain: dict, reports_store: Any = None):
        self.registry = registry
        self.reports_store = reports_store
        self.max_body_bytes = max_body_bytes
        self.drain = drain
        self.version = _server_version()
        self.http = HttpMetrics()
        self._large_decodes: anyio.CapacityLimiter | None = None  # made on the event loop, at first use

    async def guard(self, fn, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            response = await fn(request)
        except ProtocolError as e:
            response = error_response(e, e.status)
        except ClientDisconnect:  # the client went away mid-body: nobody to answer, nothing to log
            response = error_response("client disconnected before the request body was complete", 400)
        except asyncio.CancelledError:
            if not self.drain["draining"]:
                raise
            # the drain's time ran out with this request unfinished (uvicorn cancels it): a 503 the
            # client can retry elsewhere, not uvicorn's plain-text 500 and a traceback in the log
            response = error_response("the server shut down before this request finished: retry it", 503)
        except Exception as e:  # noqa: BLE001 - any failure is an answer, never a dead server
            status = _status_of(e)
            if status is None:
                log.exception("%s %s failed", request.method, request.url.path)
            response = error_response(e, status)
        self.http.observe(fn.__name__, response.status_code, time.perf_counter() - t0)
        return response

    # -- health and metadata -----------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return Response(status_code=200 if self.registry.live() else 503)

    async def ready(self, request: Request) -> Response:
        ok = not self.drain["draining"] and self.registry.ready()
        return Response(status_code=200 if ok else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": self.version, "extensions": EXTENSIONS})

    async def model_metadata(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        return JSONResponse(self.registry.metadata(name, version))

    async def model_ready(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        ok = not self.drain["draining"] and self.registry.model_ready(name, version)
        return Response(status_code=200 if ok else 503)

    # -- inference ---------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        read_body_limit(request.headers.get("content-length"), self.max_body_bytes)
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.max_body_bytes:
                raise ProtocolError(f"request body is over the server's limit of {self.max_body_bytes} bytes", 413)
            chunks.append(chunk)
        body = b"".join(chunks)
        return decompress(body, request.headers.get("content-encoding"), self.max_body_bytes)

    async def infer(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        body = await self._body(request)
        header_length = request.headers.get(HEADER_LENGTH)
        if len(body) > _OFFLOAD_BYTES:
            self._large_decodes = self._large_decodes or anyio.CapacityLimiter(_LARGE_DECODES)
            req = await anyio.to_thread.run_sync(decode_request, body, header_length, limiter=self._large_decodes)
        else:
            req = decode_request(body, header_length)
        del body
        for input_name, arr in req.inputs.items():
            if arr.dtype == object:
                raise ProtocolError(f"input {input_name!r}: BYTES tensors are not supported "
                                    "(forgeline models take numeric tensors)")
        outputs = await self.registry.infer(name, version, req.inputs)
        served = getattr(outputs, "version", None) or version or self._current_version(name)
        size = sum(a.nbytes for a in outputs.values() if isinstance(a, np.ndarray))
        if size > _OFFLOAD_BYTES:
            data, headers = await anyio.to_thread.run_sync(encode_response, name, served, outputs, req)
        else:
            data, headers = encode_response(name, served, outputs, req)
        return Response(data, status_code=200, headers=headers)

    def _current_version(self, name: str) -> str | None:
        """The version the registry reports for ``name`` (model_version in the response is
        optional in the protocol: None leaves it out)."""
        try:
            for row in self.registry.index():
                if row.get("name") == name and row.get("state") == "READY":
                    return row.get("version")
        except Exception:  # noqa: BLE001
            pass
        return None

    # -- model repository extension ---------------------------------------------------------

    async def _json_object(self, request: Request) -> dict:
        body = await self._body(request)
        if not body.strip():
            return {}
        obj = load_json(body, "request")
        if not isinstance(obj, dict):
            raise ProtocolError("request must be a JSON object")
        return obj

    async def repository_index(self, request: Request) -> Response:
        opts = await self._json_object(request)
        ready_only = opts.get("ready", False)
        if not isinstance(ready_only, bool):
            raise ProtocolError("'ready' must be true or false")
        rows = self.registry.index()
        if ready_only:
            rows = [r for r in rows if r.get("state") == "READY"]
        return JSONResponse(rows)

    async def load(self, request: Request) -> Response:
        opts = await self._json_object(request)
        params = opts.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError("'parameters' must be an object")
        if "config" in params or any(k.startswith("file:") for k in params):
            raise ProtocolError("load with an override config or files is not supported: "
                                "publish a version and load the model by name")
        await self.registry.load(request.path_params["name"])
        return Response(status_code=200)

    async def unload(self, request: Request) -> Response:
        await self._json_object(request)  # validated; unload_dependents has no meaning here
        await self.registry.unload(request.path_params["name"])
        return Response(status_code=200)

    # -- drift reports -----------------------------------------------------------------------

    async def report(self, request: Request) -> Response:
        """A drift report from storage, under ``REPORTS_PREFIX`` only: every path segment is a
        plain name (no ``..``, no hidden names, no separators of any kind), .html or .json."""
        path = request.path_params["path"]
        segments = path.split("/")
        suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
        if (len(path) > 1024 or not all(_REPORT_SEGMENT.fullmatch(p) for p in segments)
                or suffix not in _REPORT_TYPES):
            raise ProtocolError(f"not a report path: {path[:200]!r}", 404)
        if self.reports_store is None:
            raise ProtocolError("this server has no storage to serve reports from", 404)
        from pipeline.storage import ObjectNotFound, join

        key = join(REPORTS_PREFIX, *segments)
        try:
            data = await anyio.to_thread.run_sync(self.reports_store.read, key)
        except ObjectNotFound:
            raise ProtocolError(f"no report {path!r}", 404) from None
        return Response(data, media_type=_REPORT_TYPES[suffix],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    # -- metrics -----------------------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics = getattr(self.registry, "metrics", None)
        reg = getattr(metrics, "registry", None)
        core = generate_latest(reg) if reg is not None else b""
        return Response(core + generate_latest(self.http.registry), media_type=CONTENT_TYPE_LATEST)


def build_app(registry: Any, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, drain_timeout_s: float = 30.0,
              manage_registry: bool = True, reports_store: Any = None) -> Starlette:
    """The OIP v2 Starlette app over ``registry``. With ``manage_registry`` (default) the app's
    lifespan starts the registry and stops it (draining ``drain_timeout_s`` at most) at shutdown.
    ``GET /reports/{path}`` serves drift reports from ``reports_store`` (default: the registry's
    ``store``), under ``REPORTS_PREFIX`` only."""
    drain = {"draining": False}
    if reports_store is None:
        reports_store = getattr(registry, "store", None)
    h = _Handler(registry, max_body_bytes=max_body_bytes, drain=drain, reports_store=reports_store)

    def route(path: str, fn, methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            return await h.guard(fn, request)

        return Route(path, endpoint, methods=methods)

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [
        route("/v2/health/live", h.live, ["GET"]),
        route("/v2/health/ready", h.ready, ["GET"]),
        route("/v2", h.server_metadata, ["GET"]),
        route(model, h.model_metadata, ["GET"]),
        route(versioned, h.model_metadata, ["GET"]),
        route(model + "/ready", h.model_ready, ["GET"]),
        route(versioned + "/ready", h.model_ready, ["GET"]),
        route(model + "/infer", h.infer, ["POST"]),
        route(versioned + "/infer", h.infer, ["POST"]),
        route("/v2/repository/index", h.repository_index, ["POST"]),
        route("/v2/repository/models/{name}/load", h.load, ["POST"]),
        route("/v2/repository/models/{name}/unload", h.unload, ["POST"]),
        route("/metrics", h.metrics, ["GET"]),
        route("/reports/{path:path}", h.report, ["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_registry:
            await registry.start()
        try:
            yield
        finally:
            drain["draining"] = True
            if manage_registry:
                t0 = time.perf_counter()
                await registry.stop(drain_timeout_s=drain_timeout_s)
                log.info("registry stopped in %.2fs", time.perf_counter() - t0)

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        detail = getattr(exc, "detail", None) or "not found"
        if status == 404:
            detail = f"no route {request.method} {request.url.path}"
        return error_response(str(detail), status)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.drain = drain
    app.state.registry = registry
    return app


class _Server:
    """Factory for a uvicorn.Server that drains on SIGTERM/SIGINT and then returns normally."""

    @staticmethod
    def make(config, on_signal):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):  # noqa: D401 - uvicorn's hook
                on_signal(sig)
                # Like uvicorn's, minus remembering the signal (uvicorn re-raises it after the
                # shutdown, which would turn a clean drain into death by SIGTERM).
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                else:
                    self.should_exit = True

        return Server(config)


def make_server(registry: Any, host: str = "127.0.0.1", port: int = 8000, *,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, drain_timeout_s: float = 30.0,
                log_level: str = "warning", **uvicorn_options):
    """A configured uvicorn server for ``registry`` (call ``.run()``; ``.should_exit = True`` stops
    it from another thread)."""
    import uvicorn

    app = build_app(registry, max_body_bytes=max_body_bytes, drain_timeout_s=drain_timeout_s)

    def on_signal(sig: int) -> None:
        if not app.state.drain["draining"]:
            log.warning("%s: draining in-flight requests (at most %.0fs)", signal.Signals(sig).name, drain_timeout_s)
        app.state.drain["draining"] = True

    # An idle connection is kept 75 s, not uvicorn's 5: a client (or a load balancer, whose idle
    # timeout is typically 60 s) that sends on a connection the server is closing at that moment
    # sees "connection closed" (a soak saw 2 of 19 repository loads lost so, 5 s after the last use).
    uvicorn_options.setdefault("timeout_keep_alive", KEEP_ALIVE_S)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout_s, **uvicorn_options)
    return _Server.make(config, on_signal)


def serve(registry: Any, host: str = "127.0.0.1", port: int = 8000, **options) -> int:
    """Serve ``registry`` until SIGTERM/SIGINT, then drain and return 0 (3, uvicorn's startup
    failure, when the port cannot be bound or the registry failed to start; uvicorn logs why)."""
    server = make_server(registry, host, port, **options)
    # The event loop, loads and forwards hand the GIL to each other all the time (torch releases
    # it in every op): a thread waiting for it waits up to the switch interval, 5 ms by default,
    # which a small model's swap-in paid several times. At 1 ms: 12-15% more requests/s and
    # swap-ins ~12% faster on 2 cores (bench/serve.py --only many; BENCHMARKS.md).
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.001))
    try:
        server.run()
    except SystemExit as e:  # uvicorn's sys.exit(3) when it cannot start; it logged why
        return e.code if isinstance(e.code, int) and e.code else 1
    finally:
        sys.setswitchinterval(interval)
    return 0 if server.started else 1
