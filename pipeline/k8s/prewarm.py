"""The pre-warm DaemonSet's loop (``python -m pipeline.k8s prewarm``): keep the PRODUCTION version of
each model (the promotion alias, :mod:`pipeline.promotion`) in the node's /dev/shm tier, outside
Dagster, reading the same settings as the code location (:func:`pipeline.settings.storage`,
``FORGELINE_SHM_*``).

Each round re-reads the alias, so a promotion or a rollback is followed within ``every_s``: the new
production version is copied in (a rollback to a version still in the tier is a hit, nothing is
copied), and the version the loop pinned before is unpinned so LRU eviction can reclaim it. A model
with no production alias yet is warmed at its newest complete, non-rejected version, which is what
the model server serves in that case (``pipeline.serving.loader``); a production version rejected
since it was promoted is not warmed (logged; the round is not ready)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pipeline import promotion, settings
from pipeline.storage import Storage, StorageFull, from_spec, write_file_atomic


def model_store(env: settings.Env = None) -> Storage:
    """The model store the code location uses, which must be shared (S3 or a mounted volume)."""
    where = settings.storage(env)
    if where.kind == "local" and not where.root_from_env:
        raise ValueError("no model store: set FORGELINE_S3_BUCKET (S3) or FORGELINE_STORAGE_ROOT (shared volume)")
    return from_spec(where.spec())


def target_version(store: Storage, model: str) -> tuple[str, str] | None:
    """``(ref, version)`` the node should hold for ``model``: the production alias's version, else
    (nothing promoted yet) the newest complete, non-rejected version; None when there is none.
    :class:`~pipeline.promotion.PromotionError` when the production version is no longer servable."""
    try:  # the alias and the manifest (rejection): a steady round sends these two requests, no stats
        # (the pre-warm checks every file it lands, and a warm copy is already whole)
        return promotion.ALIAS, promotion.resolve_manifest(store, model, promotion.ALIAS, files=False)[0]
    except promotion.NotPromoted:  # (promoted, but that version not servable: raised)
        pass
    try:
        return promotion.LATEST, promotion.resolve(store, model, promotion.LATEST)
    except promotion.PromotionError:
        return None


def _held_file(tier, model: str) -> Path:
    return Path(tier.meta) / "prewarm-loop" / model


def _held(tier, model: str) -> str | None:
    """The version the loop last kept warm (and pinned) for ``model``: kept in the tier's
    bookkeeping, so a restarted DaemonSet pod still unpins it when the alias moves."""
    try:
        return _held_file(tier, model).read_text().strip() or None
    except OSError:
        return None


def _hold(tier, model: str, version: str) -> None:
    path = _held_file(tier, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, version, durable=False)  # tmpfs: nothing to make durable


def prewarm_loop(models: list[str], *, every_s: float, pin: bool = False, ready_file: str | None = None,
                 rounds: int | None = None, store=None, tier=None, log: Callable[[str], None] = print) -> None:
    """What the DaemonSet runs: pre-warm the production version of each model (:func:`target_version`),
    then check again every ``every_s`` seconds (``rounds`` bounds it for tests). A failed round is
    logged and retried; the tier's copies are atomic, so being killed mid-copy leaves nothing
    half-visible. With ``pin``, the production version is pinned and the one it replaced (pinned by
    this loop, recorded in the tier's bookkeeping) unpinned, once the new one is warm (or sooner, if
    the tier has no room for both)."""
    from pipeline.shm_tier import ShmTier

    store = store if store is not None else model_store()
    if tier is None:
        tier = ShmTier(settings.shm_root(), capacity_bytes=settings.shm_capacity_bytes())
    done = 0
    while rounds is None or done < rounds:
        warm = True
        for model in models:
            try:
                target = target_version(store, model)
                if target is None:
                    warm = False
                    log(f"[forgeline] {model}: no published version yet")
                    continue
                ref, version = target
                before = _held(tier, model)
                if not tier.complete(model, version) or (pin and not tier.pinned(model, version)):
                    try:
                        r = tier.prewarm(store, model, version, pin=pin)
                    except StorageFull:
                        if not (pin and before is not None and before != version and tier.pinned(model, before)):
                            raise
                        log(f"[forgeline] {model}: no room for {version} while {before} is pinned; unpinning {before}")
                        tier.unpin(model, before)  # the tier may now evict it to make room
                        r = tier.prewarm(store, model, version, pin=pin)
                    if not r.hit:
                        log(f"[forgeline] prewarmed {model}/{r.version} ({ref}): {r.bytes} bytes in {r.seconds:.2f}s"
                            + (f", evicted {r.evicted}" if r.evicted else ""))
                if before != version:
                    if before is not None:
                        log(f"[forgeline] {model}: {ref} is now {version} (was {before})")
                        if pin:
                            tier.unpin(model, before)
                    _hold(tier, model, version)
            except Exception as e:  # keep serving what is warm; the next round retries
                warm = False
                log(f"[forgeline] prewarm of {model} failed: {type(e).__name__}: {e}")
        if ready_file and warm:
            Path(ready_file).touch()
        done += 1
        if rounds is None or done < rounds:
            time.sleep(every_s)
