"""The training dataset: every published shard of every ingested batch, grouped by split, with a
content version; and staging of those shards to local paths for readers that need files (DALI)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from pipeline.datagen import SPLITS
from pipeline.ingest import shard_labeled, withdrawn
from pipeline.storage import LocalStorage, Storage, copy_between

MANIFEST = "manifest.json"


def split_of(shard_key: str) -> str:
    """``train-000003.tar`` → ``train``; shards without a split prefix count as training data."""
    head = PurePosixPath(shard_key).name.split("-", 1)[0]
    return head if head in SPLITS else "train"


def collect(store: Storage, *, published: str = "raw/shards", batches: list[str] | None = None) -> dict:
    """Gather the published shard manifests into one dataset description.

    ``version`` is a hash of the exact shard contents, so the same data always gives the same
    version and any new or changed shard gives a new one. Batches and shards withdrawn with
    :func:`pipeline.ingest.withdraw` are left out (``withdrawn`` lists what was skipped), and so are
    unlabeled shards (sampled serving traffic: ``unlabeled`` lists their keys); ``batches`` names
    only batches that gave at least one shard, so a model's recorded training batches (the drift
    reference) never include a window of traffic.
    """
    manifests = sorted(o.key for o in store.list(published) if PurePosixPath(o.key).name == MANIFEST)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    used, skipped, unlabeled = [], [], []
    gone_batches, gone_shards = withdrawn(store)
    for key in manifests:
        m = store.read_record(key, "batch manifest")
        if batches is not None and m["batch"] not in batches:
            continue
        if m["batch"] in gone_batches:
            skipped.append(m["batch"])
            continue
        gave = False
        for entry in m["shards"]:
            if entry["key"] in gone_shards:
                skipped.append(entry["key"])
                continue
            if not shard_labeled(entry):  # no labels: nothing to train on
                unlabeled.append(entry["key"])
                continue
            gave = True
            splits[split_of(entry["key"])].append(
                {k: entry[k] for k in ("key", "sha256", "bytes", "samples")}
            )
        if gave or not m["shards"]:
            used.append(m["batch"])
    if not splits["train"]:
        raise ValueError(f"{store.uri(published)}: no published training shards (ingest a batch first)")
    for entries in splits.values():
        entries.sort(key=lambda e: e["key"])
    fingerprint = json.dumps({s: [(e["key"], e["sha256"]) for e in es] for s, es in splits.items()}, sort_keys=True)
    return {
        "version": hashlib.sha256(fingerprint.encode()).hexdigest()[:16],
        "batches": used,
        "withdrawn": skipped,
        "unlabeled": sorted(unlabeled),
        "splits": splits,
        "samples": {s: sum(e["samples"] for e in es) for s, es in splits.items()},
        "bytes": sum(e["bytes"] for es in splits.values() for e in es),
    }


def stage(store: Storage, entries: list[dict], cache_dir: str | os.PathLike) -> list[str]:
    """Local file paths for the given shard entries: the files themselves on filesystem storage,
    else verified copies in ``cache_dir`` named by sha256 (a cache hit costs nothing)."""
    out = []
    cache = Path(cache_dir)
    for e in entries:
        path = store.local_path(e["key"])
        if path is None:
            path = cache / f"{e['sha256']}.tar"
            if not path.exists():
                copy_between(store, e["key"], LocalStorage(cache, fsync=False), path.name, expected_sha256=e["sha256"])
        out.append(str(path))
    return out


def stage_all(store: Storage, dataset: dict, cache_dir: str | os.PathLike) -> dict[str, list[str]]:
    return {s: stage(store, es, cache_dir) for s, es in dataset["splits"].items()}
