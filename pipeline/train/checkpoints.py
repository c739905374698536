"""Training checkpoints in the storage: rank 0 writes ``<prefix>/epoch-NNNN.pt`` atomically, then
moves ``<prefix>/latest.json`` to it, so a run killed at any point resumes from a complete,
sha256-verified checkpoint. Every rank (and packaging) may read them."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from typing import Callable

from pipeline.storage import CorruptObject, IntegrityError, ObjectNotFound, Storage, join
from pipeline.train.config import TrainingFailed

CHECKPOINT_FORMAT = "forgeline.checkpoint/1"


def latest_checkpoint(store: Storage, prefix: str) -> dict | None:
    """The pointer written after the newest complete checkpoint, or None for a fresh run."""
    try:
        return store.read_record(join(prefix, "latest.json"), "checkpoint pointer")
    except ObjectNotFound:
        return None


def _epoch_keys(store: Storage, prefix: str) -> list[str]:
    """The ``epoch-NNNN.pt`` checkpoints under ``prefix``, oldest first."""
    return sorted(o.key for o in store.list(prefix) if o.key.rsplit("/", 1)[-1].startswith("epoch-"))


def _write_pointer(store: Storage, prefix: str, epoch: int, key: str, sha256: str, size: int) -> None:
    """Move ``latest.json`` to the complete checkpoint ``key``."""
    ptr = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "key": key, "sha256": sha256, "bytes": size}
    store.write_atomic(join(prefix, "latest.json"), json.dumps(ptr).encode())


def _unpickle(data: bytes) -> dict:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_checkpoint(store: Storage, key: str, expected_sha256: str | None = None) -> dict:
    """One checkpoint, verified against its recorded sha256, loaded on the CPU (weights only)."""
    data = store.read(key)
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise TrainingFailed(f"{store.uri(key)}: checkpoint sha256 does not match the recorded {expected_sha256}")
    return _unpickle(data)


def load_checkpoint(store: Storage, prefix: str, warn: Callable[[str], None] = print) -> dict | None:
    """The newest complete checkpoint under ``prefix`` (via ``latest.json``), or None. When the
    pointer or the checkpoint it names is damaged (truncated, sha256 mismatch), the newest older
    checkpoint that loads is used instead (``latest.json`` is moved to it) and ``warn`` says so;
    with none, one line names the damaged file and the way out."""
    ptr = None
    try:
        ptr = latest_checkpoint(store, prefix)
        return None if ptr is None else read_checkpoint(store, ptr["key"], ptr["sha256"])
    except (CorruptObject, ObjectNotFound, IntegrityError, TrainingFailed, EOFError, pickle.UnpicklingError,
            RuntimeError, KeyError, TypeError) as e:  # damaged; a store that does not answer raises on
        damaged = (f"the checkpoint pointer has no field {e}" if isinstance(e, KeyError)
                   else " ".join(str(e).split()) or type(e).__name__)
        if store.uri(prefix) not in damaged:
            named = ptr.get("key") if isinstance(ptr, dict) else None
            damaged = f"{store.uri(named if isinstance(named, str) else join(prefix, 'latest.json'))}: {damaged}"
    for key in reversed(_epoch_keys(store, prefix)):
        if isinstance(ptr, dict) and key == ptr.get("key"):
            continue
        try:
            data = store.read(key)
            state = _unpickle(data)
        except Exception:  # noqa: BLE001 - damaged too: try the one before
            continue
        # the pointer names it from now on: what a later resume and the run's result read
        _write_pointer(store, prefix, state["epoch"], key, hashlib.sha256(data).hexdigest(), len(data))
        warn(f"[forgeline] {damaged}; resuming from the older {store.uri(key)} instead (latest.json now names it)")
        return state
    raise TrainingFailed(f"{damaged}; no older intact checkpoint under {store.uri(prefix)}: "
                         "start over with fresh: true")


def save_checkpoint(store: Storage, prefix: str, state: dict, keep: int) -> str:
    """Write ``epoch-NNNN.pt`` atomically, then move ``latest.json`` to it, then prune old ones.
    A crash at any point leaves ``latest.json`` naming a complete, verified checkpoint."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    key = join(prefix, f"epoch-{state['epoch']:04d}.pt")
    info = store.write_atomic(key, buf.getbuffer())
    _write_pointer(store, prefix, state["epoch"], key, info.sha256, info.size)
    ckpts = _epoch_keys(store, prefix)
    for old in ckpts[:-keep] if keep > 0 else []:
        store.delete(old)
    return key
