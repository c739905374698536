"""Multi-node training: the job spec every node reads from storage (:func:`prepare_node_job`), the
per-node entrypoint ``python -m pipeline.train node ...`` (:func:`node_main`, e.g. one pod of an
indexed Kubernetes Job each: stage the shards, join the rendezvous, run this node's torchrun), and
rank 0's result back from storage (:func:`read_node_result`)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from pipeline import settings
from pipeline.dataset import stage
from pipeline.storage import ObjectNotFound, Storage, from_spec
from pipeline.train.config import TrainConfig, TrainingFailed
from pipeline.train.launcher import TrainResult, launch

NODE_JOB_FORMAT = "forgeline.train-node-job/1"


def node_result_key(job_key: str) -> str:
    return f"{job_key}.result.json"


def prepare_node_job(*, storage: Storage, dataset: dict, spec: dict, config: TrainConfig, checkpoint_prefix: str,
                     device_type: str, job_key: str) -> str:
    """Write the job every node of a multi-node run reads, atomically, at ``job_key``; return it.

    Shards travel as storage keys with their sha256 (from :func:`pipeline.dataset.collect`), not
    local paths: each node stages and verifies them itself. A result left by an earlier run of the
    same key is removed, so :func:`read_node_result` never returns a stale one.
    """
    job = {
        "format": NODE_JOB_FORMAT, "config": asdict(config), "spec": spec, "checkpoint_prefix": checkpoint_prefix,
        "device_type": device_type, "dataset_version": dataset.get("version"),
        "shards": {split: [{k: e[k] for k in ("key", "sha256")} for e in entries]
                   for split, entries in dataset["splits"].items()},
    }
    storage.delete(node_result_key(job_key))
    storage.write_atomic(job_key, json.dumps(job, indent=1).encode())
    return job_key


def read_node_result(storage: Storage, job_key: str) -> TrainResult:
    """The result the node hosting global rank 0 wrote for ``job_key``."""
    key = node_result_key(job_key)
    try:
        res = storage.read_record(key, "training result")
    except ObjectNotFound:
        raise TrainingFailed(f"{storage.uri(key)}: no result for training job {job_key!r}; the run has not "
                             "finished, or failed (see the node logs)") from None
    return TrainResult(**{k: res.get(k) for k in TrainResult.__dataclass_fields__ if k != "extra"},
                       extra=res.get("extra") or {})


def node_main(argv: list[str]) -> int:
    """``python -m pipeline.train node ...``: one node of a multi-node run (exit 0 on success)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeline.train node",
                                 description="Run one node of a multi-node training job (see docs/training.md).")
    ap.add_argument("--storage", required=True, help="JSON of Storage.spec()[0]; credentials come from the environment")
    ap.add_argument("--job-key", required=True, help="the key prepare_node_job wrote")
    ap.add_argument("--nnodes", type=int, required=True)
    ap.add_argument("--node-rank", type=int, help="default: $JOB_COMPLETION_INDEX (Kubernetes indexed Job)")
    ap.add_argument("--rdzv-endpoint", required=True, help="HOST:PORT of node 0 (it hosts the rendezvous store)")
    ap.add_argument("--rdzv-id", help="default: derived from --job-key (the same on every node)")
    ap.add_argument("--nproc-per-node", type=int, help="default: the visible GPUs for a cuda job, else 1 CPU rank")
    ap.add_argument("--run-timeout-s", type=float, default=3600.0)
    ap.add_argument("--cache-dir", help="where shards are staged; default $FORGELINE_HOME/cache/shards")
    args = ap.parse_args(argv)
    node_rank = args.node_rank
    if node_rank is None:
        if "JOB_COMPLETION_INDEX" not in os.environ:
            ap.error("--node-rank is required when JOB_COMPLETION_INDEX is not set")
        node_rank = int(os.environ["JOB_COMPLETION_INDEX"])
    if not 0 <= node_rank < args.nnodes:
        ap.error(f"node rank {node_rank} is not in [0, {args.nnodes})")
    tag = f"[forgeline] node {node_rank}/{args.nnodes}"

    store = from_spec(json.loads(args.storage))
    try:
        job = store.read_record(args.job_key, "training job")
    except ObjectNotFound:
        raise SystemExit(f"{tag}: no training job at {store.uri(args.job_key)} (prepare_node_job writes it)") from None
    if job.get("format") != NODE_JOB_FORMAT:
        raise SystemExit(f"{tag}: {store.uri(args.job_key)} is not a {NODE_JOB_FORMAT} job")
    nproc = args.nproc_per_node
    if nproc is None:
        if job["device_type"] == "cuda":
            import torch

            nproc = torch.cuda.device_count()
            if nproc == 0:
                raise SystemExit(f"{tag}: the job wants cuda but this node sees no GPU")
        else:
            nproc = 1
    cache = Path(args.cache_dir) if args.cache_dir else settings.home() / "cache" / "shards"
    shards = {split: stage(store, entries, cache) for split, entries in job["shards"].items()}
    rdzv = {"nnodes": args.nnodes, "node_rank": node_rank, "endpoint": args.rdzv_endpoint,
            "id": args.rdzv_id or "forgeline-" + hashlib.sha256(args.job_key.encode()).hexdigest()[:16]}
    print(f"{tag}: {nproc} rank(s), rendezvous {rdzv['id']} at {rdzv['endpoint']}", flush=True)
    try:
        res = launch(storage=store, shards=shards, spec=job["spec"], config=TrainConfig(**job["config"]),
                     checkpoint_prefix=job["checkpoint_prefix"], world_size=nproc, device_type=job["device_type"],
                     run_timeout_s=args.run_timeout_s, rdzv=rdzv, on_line=lambda ln: print(ln, flush=True))
    except TrainingFailed as e:
        print(f"{tag}: {e}", file=sys.stderr, flush=True)
        return 1
    if res is not None:  # this node hosted global rank 0
        store.write_atomic(node_result_key(args.job_key), json.dumps(asdict(res), indent=1).encode())
        print(f"{tag}: result written to {store.uri(node_result_key(args.job_key))}", flush=True)
    print(f"{tag}: done", flush=True)
    return 0
