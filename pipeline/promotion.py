"""Promotion: which published version of a model is in production, said explicitly.

"Newest published" is not "fit to serve": a version can fail a gate after it is published. The
production alias is a small JSON object, ``<root>/<model>/production``, written atomically::

    {"model": "digits", "version": "20260101T120000Z-a1b2c3", "promoted_at": "2026-01-01T12:05:00.000000+00:00",
     "run_id": "...", "gates": {"accuracy_gate.int4": {"passed": true, "value": 0.4, "limit": 2.0}},
     "previous": "20251231T...", "reason": "lifecycle run ..."}

and every promotion (rollbacks included) is also kept as ``<root>/<model>/promotions/<UTC
stamp>-<version>.json`` (same content; keys sort by time). :func:`promote` refuses a version that
is not published, is incomplete, is rejected, or whose recorded (or given) gates failed;
:func:`rollback` promotes ``previous``. :func:`resolve` turns ``production``, ``latest`` (newest
complete, non-rejected version) or a version id into a version id. Two promotions of one model at
the same instant race on the alias (last writer wins); the history keeps both.

This module never imports dagster.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from pipeline.export import (
    DEFAULT_ROOT,
    ExportError,
    latest_manifest,
    read_manifest,
    version_prefix,
    version_problem,
)
from pipeline.storage import ObjectNotFound, Storage, StorageError, join

ALIAS = "production"
LATEST = "latest"
HISTORY = "promotions"


class PromotionError(ExportError):
    """A promotion, rollback or reference that cannot be honoured; the message names model/version and why."""


class NotPromoted(PromotionError):
    """``production`` was asked for a model that has no production alias: nothing was ever promoted."""


def _alias_key(model: str, root: str) -> str:
    return version_prefix(model, ALIAS, root)  # export refuses these names as versions


def _history_prefix(model: str, root: str) -> str:
    return version_prefix(model, HISTORY, root)


def production(store: Storage, model: str, *, root: str = DEFAULT_ROOT) -> dict | None:
    """The production alias of ``model`` (the promotion record), or None when nothing was promoted."""
    try:
        return store.read_record(_alias_key(model, root), "production alias")
    except ObjectNotFound:
        return None


def promoted_before(store: Storage, model: str, *, root: str = DEFAULT_ROOT) -> bool:
    """Whether ``model`` has a promotion on record (one LIST): with no alias, it tells a model
    never promoted from one whose alias was lost."""
    return any(o.key.endswith(".json") for o in store.list(_history_prefix(model, root)))


def _failed(gates: dict | None) -> list[str]:
    return sorted(name for name, g in (gates or {}).items() if not (g or {}).get("passed"))


def promote(store: Storage, model: str, version: str, *, run_id: str | None = None, gates: dict | None = None,
            reason: str = "", root: str = DEFAULT_ROOT) -> dict:
    """Make ``model/version`` production and return the new alias record. Refused
    (:class:`PromotionError`) when the version is not published, incomplete, rejected, or when a
    gate recorded in its manifest or given in ``gates`` failed. Promoting the current production
    version again records a new promotion (with ``previous`` unchanged)."""
    what = f"cannot promote {model}/{version}"
    if version in (ALIAS, LATEST, HISTORY):
        raise PromotionError(f"{what}: {version!r} is a reference, not a version: name a version id "
                             f"(`forgeline models {model}` lists them)")
    try:
        version_prefix(model, version, root)
    except ValueError as e:  # a name that cannot be a version ('../x'): say so, not "malformed manifest"
        raise PromotionError(f"{what}: {e}") from None
    problem = version_problem(store, model, version, root=root)
    if problem is not None:
        raise PromotionError(f"{what}: {problem}")
    recorded = read_manifest(store, model, version, root=root).get("gates") or {}
    failed = _failed(recorded) + _failed(gates)
    if failed:
        raise PromotionError(f"{what}: gate(s) failed: {', '.join(sorted(set(failed)))}")
    current = production(store, model, root=root)
    previous = current["version"] if current else None
    if previous == version:
        previous = current.get("previous")
    now = datetime.now(timezone.utc)
    record = {"model": model, "version": version, "promoted_at": now.isoformat(timespec="microseconds"),
              "run_id": run_id, "gates": {**recorded, **(gates or {})}, "previous": previous, "reason": reason}
    data = json.dumps(record, indent=1).encode()
    stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
    store.write_atomic(join(_history_prefix(model, root), f"{stamp}-{version}.json"), data)
    store.write_atomic(_alias_key(model, root), data)  # last: the history never misses what is live
    return record


def rollback(store: Storage, model: str, *, reason: str = "rollback", root: str = DEFAULT_ROOT) -> dict:
    """Promote the version production had before the current one (the alias's ``previous``).
    :class:`PromotionError` when nothing is in production or there was nothing before it, or when
    that version can no longer be promoted (e.g. rejected since)."""
    current = production(store, model, root=root)
    if current is None:
        raise NotPromoted(f"cannot roll back {model}: nothing is in production")
    if not current.get("previous"):
        raise PromotionError(f"cannot roll back {model}: production {current['version']} has no previous version")
    return promote(store, model, current["previous"], run_id=current.get("run_id"),
                   reason=f"{reason} (from {current['version']})", root=root)


def history(store: Storage, model: str, *, root: str = DEFAULT_ROOT) -> list[dict]:
    """Every promotion of ``model``, oldest first."""
    prefix = _history_prefix(model, root)
    keys = sorted(o.key for o in store.list(prefix) if o.key.endswith(".json"))
    return [store.read_record(k, "promotion record") for k in keys]


def resolve(store: Storage, model: str, ref: str, *, root: str = DEFAULT_ROOT) -> str:
    """The version id ``ref`` names: ``"production"`` (the alias; refused if that version has been
    rejected since), ``"latest"`` (the newest complete, non-rejected version) or a version id
    (which must be published and complete). :class:`PromotionError` otherwise."""
    return resolve_manifest(store, model, ref, root=root)[0]


def resolve_manifest(store: Storage, model: str, ref: str, *, root: str = DEFAULT_ROOT,
                     files: bool = True, candidates: list[tuple[str, dict]] | None = None) -> tuple[str, dict]:
    """:func:`resolve`, with the version's manifest: read once, for the check and the caller.
    ``files=False``: the version's files are not stat-ed (:func:`~pipeline.export.version_problem`)
    for a caller that reads them and checks their sizes itself; ``latest`` stats them anyway, to
    choose, among ``candidates`` when the caller has them (:func:`~pipeline.export.newest_manifests`)."""
    if ref == LATEST:
        found = latest_manifest(store, model, root, candidates=candidates)
        if found is None:
            raise PromotionError(f"{model}/latest: no complete, non-rejected published version")
        return found
    if ref == ALIAS:
        current = production(store, model, root=root)
        if current is None:
            raise NotPromoted(f"{model}/production: nothing has been promoted")
        version, allow_rejected = current["version"], False
        what = f"{model}/production is {version}, which is not servable"
    else:
        version, what, allow_rejected = ref, f"{model}/{ref}", True
    try:
        manifest = read_manifest(store, model, version, root=root)
    except (ExportError, StorageError, ValueError):
        manifest = None  # version_problem says why
    problem = version_problem(store, model, version, root=root, allow_rejected=allow_rejected, manifest=manifest,
                              files=files)
    if problem is not None:
        raise PromotionError(f"{what}: {problem}")
    assert manifest is not None
    return version, manifest


__all__ = ["ALIAS", "LATEST", "NotPromoted", "PromotionError", "history", "production", "promote", "promoted_before",
           "resolve", "resolve_manifest", "rollback"]
