"""The serving end of the loop: ``model_rollout`` waits until every model server listed in
``FORGELINE_SERVE_URLS`` serves the version just promoted, and ``served_models`` records what
each one actually serves (version, since when, requests, latency). The engine is
:mod:`pipeline.rollout` (plain HTTP against ``forgeline serve``)."""

from urllib.parse import urlsplit

import dagster as dg
from pydantic import Field

from pipeline import promotion, rollout, settings
from resources.storage import StorageResource

NO_SERVERS = "no servers configured (FORGELINE_SERVE_URLS is empty): nothing to wait for"


def _label(url: str) -> str:
    """``host:port`` of a server URL (metadata keys stay short and stable)."""
    parts = urlsplit(url)
    return parts.netloc + (parts.path if parts.path not in ("", "/") else "")


def _cell(v) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(states: list[rollout.ServerState], seconds: dict[str, float] | None = None) -> str:
    head = ["server", "model", "version", "since (UTC)", "requests", "P50 ms", "P99 ms", "state"]
    if seconds is not None:
        head.insert(4, "ready after s")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in states:
        row = [_label(s.url), s.model, s.version, s.since, s.requests, s.p50_ms, s.p99_ms,
               s.error or (f"{s.state}; alias unreadable: {s.alias_error}" if s.alias_error else s.state)]
        if seconds is not None:
            row.insert(4, seconds.get(s.url))
        rows.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(rows)


def _servers(context: dg.AssetExecutionContext) -> list[str]:
    """``FORGELINE_SERVE_URLS``, a ``dns+http://`` entry expanded to one URL per address now."""
    urls, unresolved = rollout.expand(settings.serve_urls())
    for url, why in unresolved.items():
        context.log.warning(f"{url}: {why}")
    return urls


class RolloutConfig(dg.Config):
    timeout_s: float = Field(default=300.0, ge=1, le=3600, description="How long every server has, all together, "
                             "to serve the promoted version (1..3600 s).")
    poll_s: float = Field(default=1.0, ge=0.05, le=60, description="Seconds between polls of one server.")
    request_timeout_s: float = Field(default=5.0, ge=0.1, le=60, description="Timeout of one HTTP request.")


@dg.asset(group_name="serve", kinds={"http"})
def model_rollout(context: dg.AssetExecutionContext, config: RolloutConfig, promoted_model: dict) -> dg.Output:
    """Waits until every server in ``FORGELINE_SERVE_URLS`` answers ``GET /v2/models/<model>`` with
    the promoted version (they pick it up from the promotion alias themselves) and records how long
    each took; fails, naming the servers and what they serve instead, past ``timeout_s``. No servers
    configured: passes with a note."""
    model, version = promoted_model["model"], promoted_model["version"]
    urls = _servers(context)
    if not urls:
        context.log.info(NO_SERVERS)
        return dg.Output({"model": model, "version": version, "servers": {}},
                         metadata={"servers": 0, "note": NO_SERVERS, "version": version})
    context.log.info(f"waiting up to {config.timeout_s:g}s for {len(urls)} server(s) to serve {model}/{version}")
    try:
        result = rollout.wait_for_version(urls, model, version, timeout_s=config.timeout_s, poll_s=config.poll_s,
                                          request_timeout_s=config.request_timeout_s)
    except rollout.RolloutError as e:
        raise dg.Failure(description=str(e), metadata={
            "servers": len(urls),
            "not_ready": dg.MetadataValue.json([s.url for s in e.pending]),
            "table": dg.MetadataValue.md(_table(e.pending + e.ready)),
        }) from None
    ready_s = {_label(u): float(s) for u, s in result.seconds.items()}
    return dg.Output(
        {"model": model, "version": version, "servers": {u: round(s, 3) for u, s in result.seconds.items()}},
        metadata={
            "version": version,
            "servers": len(urls),
            "time_to_ready_max_s": max(ready_s.values()),
            **{f"time_to_ready_s/{label}": s for label, s in ready_s.items()},
            "table": dg.MetadataValue.md(_table(result.ready, result.seconds)),
        },
    )


class ServedModelsConfig(dg.Config):
    model_name: str = Field(default=settings.model_name(), description="The model to ask each server about.")
    request_timeout_s: float = Field(default=5.0, ge=0.1, le=60, description="Timeout of one HTTP request.")


@dg.asset(
    group_name="serve", kinds={"http"}, deps=[model_rollout],
    check_specs=[dg.AssetCheckSpec("serves_production", asset="served_models",
                                   description="Every listed server answers, serves the production version and "
                                               "can read the production alias (WARN otherwise).")],
)
def served_models(context: dg.AssetExecutionContext, config: ServedModelsConfig, storage: StorageResource):
    """What each server in ``FORGELINE_SERVE_URLS`` serves now: model, version, since when, requests
    and latency P50/P99 (from its ``/metrics`` histogram, since the server started). Numeric
    entries per server, so the UI plots them across materializations."""
    model, urls = config.model_name, _servers(context)
    states = rollout.survey(urls, model, timeout_s=config.request_timeout_s)
    current = promotion.production(storage.client(), model)
    production = current["version"] if current else None
    metadata: dict = {"servers": len(urls), "production": production or "",
                      "reachable": sum(s.ok for s in states),
                      "alias_unreadable": sum(bool(s.alias_error) for s in states)}
    if not urls:
        metadata["note"] = "no servers configured (FORGELINE_SERVE_URLS is empty)"
    else:
        metadata["table"] = dg.MetadataValue.md(_table(states))
        metadata["requests_total"] = sum(s.requests or 0 for s in states)
        p99 = [s.p99_ms for s in states if s.p99_ms is not None]
        if p99:
            metadata["p99_ms_max"] = max(p99)
        for s in states:
            label = _label(s.url)
            metadata[f"version/{label}"] = s.version or s.error or "none"
            if s.requests is not None:
                metadata[f"requests/{label}"] = s.requests
            if s.p99_ms is not None:
                metadata[f"p99_ms/{label}"] = s.p99_ms
    yield dg.MaterializeResult(metadata=metadata)
    # a server that cannot read the alias serves production now but will miss the next promotion
    off = [s for s in states if not s.ok or s.version != production or s.alias_error]
    yield dg.AssetCheckResult(
        check_name="serves_production", passed=not off, severity=dg.AssetCheckSeverity.WARN,
        description=("no servers configured (FORGELINE_SERVE_URLS): nothing to check" if not urls else
                     "every server serves production" if not off else
                     "; ".join(f"{_label(s.url)}: {s.describe()}" for s in off))[:1000],
        metadata={"production": production or "", "off": len(off), "servers": len(urls)},
    )
