"""The pre-warm DaemonSet's loop (``python -m pipeline.k8s prewarm``): keep the latest published
version of each model in the node's /dev/shm tier, outside Dagster, reading the same settings as
the code location (:func:`pipeline.settings.storage`, ``FORGELINE_SHM_*``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pipeline import settings
from pipeline.storage import Storage, from_spec


def model_store(env: settings.Env = None) -> Storage:
    """The model store the code location uses, which must be shared (S3 or a mounted volume)."""
    where = settings.storage(env)
    if where.kind == "local" and not where.root_from_env:
        raise ValueError("no model store: set FORGELINE_S3_BUCKET (S3) or FORGELINE_STORAGE_ROOT (shared volume)")
    return from_spec(where.spec())


def prewarm_loop(models: list[str], *, every_s: float, pin: bool = False, ready_file: str | None = None,
                 rounds: int | None = None, store=None, tier=None, log: Callable[[str], None] = print) -> None:
    """What the DaemonSet runs: pre-warm the latest version of each model, then check again every
    ``every_s`` seconds (``rounds`` bounds it for tests). A failed round is logged and retried; the
    tier's copies are atomic, so being killed mid-copy leaves nothing half-visible."""
    from pipeline.shm_tier import ShmTier

    store = store if store is not None else model_store()
    if tier is None:
        tier = ShmTier(settings.shm_root(), capacity_bytes=settings.shm_capacity_bytes())
    done = 0
    while rounds is None or done < rounds:
        warm = True
        for model in models:
            try:
                version = tier.needs_prewarm(store, model)
                if version is not None:
                    r = tier.prewarm(store, model, version, pin=pin)
                    log(f"[forgeline] prewarmed {model}/{r.version}: {r.bytes} bytes in {r.seconds:.2f}s"
                        + (f", evicted {r.evicted}" if r.evicted else ""))
                elif tier.resolve(model) is None:
                    warm = False
                    log(f"[forgeline] {model}: no published version yet")
            except Exception as e:  # keep serving what is warm; the next round retries
                warm = False
                log(f"[forgeline] prewarm of {model} failed: {type(e).__name__}: {e}")
        if ready_file and warm:
            Path(ready_file).touch()
        done += 1
        if rounds is None or done < rounds:
            time.sleep(every_s)
