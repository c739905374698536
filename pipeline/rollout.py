"""What the model servers actually serve, read over plain HTTP, and the wait for a rollout.

A server is a ``forgeline serve`` (or anything speaking the same protocol): ``GET
/v2/models/{name}`` gives the serving version under ``parameters.serving`` (and, when it swapped
or first loaded, ``parameters.last_swap.at``: since when), ``GET /metrics`` the Prometheus
histogram of request latency (requests and P50/P95/P99 per model, since the server started).

* :func:`probe` reads one server once; never raises (an unreachable server is a
  :class:`ServerState` with ``error``).
* :func:`survey` probes several at once.
* :func:`wait_for_version` polls each server until it serves ``version`` of ``model`` or the
  deadline passes; :class:`RolloutError` names every server that did not get there and what it
  was doing instead.

Servers find a new production version on their own (they poll the promotion alias); nothing
here tells them to load anything. This module never imports dagster.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from pipeline import metrics as latency_metrics

DEFAULT_REQUEST_TIMEOUT_S = 5.0
_MAX_BODY = 8 << 20  # a metrics page or metadata document larger than this is not a forgeline server


class RolloutError(RuntimeError):
    """Some servers did not serve the new version in time; ``pending`` holds their last states."""

    def __init__(self, message: str, pending: list["ServerState"], ready: list["ServerState"]):
        super().__init__(message)
        self.pending = pending
        self.ready = ready


@dataclass
class ServerState:
    url: str
    model: str
    version: str | None = None  # the version answering requests (parameters.serving)
    production: str | None = None  # what the server last read from the promotion alias
    state: str | None = None  # READY / LOADING / UNAVAILABLE ... (parameters.state)
    since: str | None = None  # UTC ISO time the serving version took traffic (last_swap.at)
    reason: str | None = None  # parameters.reason / last_error, when the server gives one
    alias_error: str | None = None  # why the server's last read of the alias failed: it misses promotions
    requests: int | None = None  # inference requests for the model since the server started
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    error: str | None = None  # could not be read (unreachable, HTTP error, not the protocol)
    seconds: float = 0.0  # time the probe took

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        """One line: what the server is doing (for error messages)."""
        if self.error:
            return self.error
        what = f"serves {self.model}/{self.version}" if self.version else f"serves no version of {self.model}"
        extra = [f"state {self.state}"] if self.state else []
        if self.production and self.production != self.version:
            extra.append(f"production read as {self.production}")
        if self.reason:
            extra.append(self.reason)
        if self.alias_error:
            extra.append(f"cannot read the production alias: {self.alias_error}")
        return what + (f" ({'; '.join(extra)})" if extra else "")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RolloutResult:
    model: str
    version: str
    ready: list[ServerState] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # url -> time until it served the version


DNS_SCHEMES = ("dns+http", "dns+https")


def expand(urls: list[str]) -> tuple[list[str], dict[str, str]]:
    """``urls`` with each ``dns+http(s)://name:port`` replaced by ``http(s)://<address>:port`` for
    every address ``name`` resolves to now (a headless Service: one per serving pod, sorted).
    Returns ``(urls, unresolved)``: ``unresolved`` maps a DNS URL that resolved to nothing to why
    (it is kept in the list so a rollout fails naming it)."""
    import ipaddress
    import socket

    out: list[str] = []
    unresolved: dict[str, str] = {}
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in DNS_SCHEMES:
            out.append(url)
            continue
        scheme = parts.scheme.removeprefix("dns+")
        port = parts.port or (443 if scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except OSError as e:
            unresolved[url] = f"{parts.hostname} does not resolve: {e}"
            out.append(url)
            continue
        addresses = sorted({info[4][0] for info in infos}, key=lambda a: ipaddress.ip_address(a.split("%")[0]))
        for a in addresses:
            host = f"[{a}]" if ":" in a else a
            expanded = f"{scheme}://{host}:{port}{parts.path}"
            if expanded not in out:
                out.append(expanded)
    return out, unresolved


def _get(url: str, timeout_s: float) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": "application/json, text/plain"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 - URLs are http(s), checked in settings
        return r.read(_MAX_BODY)


def _why(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        try:
            detail = json.loads(e.read(64 * 1024) or b"{}").get("error") or e.reason
        except (ValueError, AttributeError, OSError):
            detail = e.reason
        return f"HTTP {e.code}: {' '.join(str(detail).split())}"
    reason = getattr(e, "reason", None) or e
    return " ".join(str(reason).split()) or type(e).__name__


def probe(url: str, model: str, *, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, with_metrics: bool = True) -> ServerState:
    """What ``url`` serves for ``model`` now (and, ``with_metrics``, its request count and latency)."""
    t0 = time.perf_counter()
    s = ServerState(url=url, model=model)
    if urllib.parse.urlsplit(url).scheme in DNS_SCHEMES:  # not expanded: it resolved to nothing
        s.error = f"{url} resolves to no server (use rollout.expand first)"
        return s
    try:
        body = _get(f"{url}/v2/models/{urllib.parse.quote(model, safe='')}", timeout_s)
        meta = json.loads(body)
        params = meta.get("parameters") or {}
        if not isinstance(params, dict):
            raise ValueError("'parameters' is not an object")
    except (urllib.error.URLError, OSError, ValueError, AttributeError) as e:
        s.error = f"cannot read /v2/models/{model}: {_why(e)}"
        s.seconds = time.perf_counter() - t0
        return s
    s.version = params.get("serving") or None
    s.production = params.get("production") or None
    s.state = params.get("state") or None
    s.reason = params.get("last_error") or params.get("reason") or None
    s.alias_error = params.get("alias_error") or None
    swap = params.get("last_swap") or {}
    if isinstance(swap, dict) and s.version and swap.get("to") == s.version:
        s.since = swap.get("at")
    if with_metrics:
        try:
            row = latency_metrics.served_summary(_get(f"{url}/metrics", timeout_s).decode()).get(model, {})
            s.requests = row.get("requests", 0)
            s.p50_ms, s.p95_ms, s.p99_ms = row.get("p50_ms"), row.get("p95_ms"), row.get("p99_ms")
        except (urllib.error.URLError, OSError, ValueError, UnicodeDecodeError) as e:
            # the model answer is what matters; metrics that cannot be read stay None
            s.reason = "; ".join(x for x in (s.reason, f"/metrics unreadable: {_why(e)}") if x)
    s.seconds = time.perf_counter() - t0
    return s


def survey(urls: list[str], model: str, *, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> list[ServerState]:
    """:func:`probe` of every server in ``urls`` at once, in the order given."""
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(urls)), thread_name_prefix="forgeline-probe") as pool:
        return list(pool.map(lambda u: probe(u, model, timeout_s=timeout_s), urls))


def wait_for_version(urls: list[str], model: str, version: str, *, timeout_s: float, poll_s: float = 1.0,
                     request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> RolloutResult:
    """Poll every server in ``urls`` until each serves ``version`` of ``model``; the time each
    took is in ``RolloutResult.seconds``. Past ``timeout_s`` (one deadline for all),
    :class:`RolloutError` names the servers still not serving it, with what they serve instead."""
    if timeout_s <= 0 or poll_s <= 0 or request_timeout_s <= 0:
        raise ValueError("timeout_s, poll_s and request_timeout_s must be positive")
    t0 = time.monotonic()
    deadline = t0 + timeout_s

    stop = threading.Event()

    def one(url: str) -> tuple[bool, ServerState, float]:
        while True:
            left = deadline - time.monotonic()
            s = probe(url, model, timeout_s=max(0.1, min(request_timeout_s, left)), with_metrics=False)
            if s.ok and s.version == version:
                return True, probe(url, model, timeout_s=request_timeout_s), time.monotonic() - t0
            left = deadline - time.monotonic()
            if left <= 0 or stop.wait(min(poll_s, left)):
                return False, s, time.monotonic() - t0

    if not urls:
        return RolloutResult(model=model, version=version)
    # One daemon thread per server (at most 16 at a time), not a pool joined on the way out: a run
    # canceled meanwhile (Ctrl-C, a terminate from the UI, a pod stopped) ends now, not when the
    # rollout's deadline (minutes) would have passed.
    outcomes: list = [None] * len(urls)
    slots = threading.Semaphore(16)

    def run(i: int, url: str) -> None:
        with slots:
            try:
                outcomes[i] = one(url)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i, u), name=f"forgeline-rollout-{i}", daemon=True)
               for i, u in enumerate(urls)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
    for o in outcomes:
        if isinstance(o, BaseException):
            raise o
    ready = [s for ok, s, _ in outcomes if ok]
    pending = [s for ok, s, _ in outcomes if not ok]
    if pending:
        lines = "; ".join(f"{s.url}: {s.describe()}" for s in pending)
        raise RolloutError(f"{len(pending)} of {len(urls)} server(s) did not serve {model}/{version} within "
                           f"{timeout_s:g}s: {lines}", pending, ready)
    return RolloutResult(model=model, version=version, ready=ready,
                         seconds={s.url: sec for ok, s, sec in outcomes})
