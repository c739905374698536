"""Training checkpoints in the storage: rank 0 writes ``<prefix>/epoch-NNNN.pt`` atomically, then
moves ``<prefix>/latest.json`` to it, so a run killed at any point resumes from a complete,
sha256-verified checkpoint. Every rank (and packaging) may read them."""

from __future__ import annotations

import hashlib
import io
import json

from pipeline.storage import ObjectNotFound, Storage, join
from pipeline.train.config import TrainingFailed

CHECKPOINT_FORMAT = "forgeline.checkpoint/1"


def latest_checkpoint(store: Storage, prefix: str) -> dict | None:
    """The pointer written after the newest complete checkpoint, or None for a fresh run."""
    try:
        return store.read_record(join(prefix, "latest.json"), "checkpoint pointer")
    except ObjectNotFound:
        return None


def read_checkpoint(store: Storage, key: str, expected_sha256: str | None = None) -> dict:
    """One checkpoint, verified against its recorded sha256, loaded on the CPU (weights only)."""
    import torch

    data = store.read(key)
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise TrainingFailed(f"{store.uri(key)}: checkpoint sha256 does not match the recorded {expected_sha256}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_checkpoint(store: Storage, prefix: str) -> dict | None:
    """The newest complete checkpoint under ``prefix`` (via ``latest.json``), or None."""
    ptr = latest_checkpoint(store, prefix)
    return None if ptr is None else read_checkpoint(store, ptr["key"], ptr["sha256"])


def save_checkpoint(store: Storage, prefix: str, state: dict, keep: int) -> str:
    """Write ``epoch-NNNN.pt`` atomically, then move ``latest.json`` to it, then prune old ones.
    A crash at any point leaves ``latest.json`` naming a complete, verified checkpoint."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    key = join(prefix, f"epoch-{state['epoch']:04d}.pt")
    info = store.write_atomic(key, buf.getbuffer())
    ptr = {"format": CHECKPOINT_FORMAT, "epoch": state["epoch"], "key": key, "sha256": info.sha256, "bytes": info.size}
    store.write_atomic(join(prefix, "latest.json"), json.dumps(ptr).encode())
    ckpts = sorted(o.key for o in store.list(prefix) if o.key.rsplit("/", 1)[-1].startswith("epoch-"))
    for old in ckpts[:-keep] if keep > 0 else []:
        store.delete(old)
    return key
