"""Ingestion job and the sensor that turns landed batches into partitions + runs."""


import json
from pathlib import PurePosixPath

import dagster as dg

from assets.partitions import batches
from pipeline.datagen import READY_MARKER
from resources.storage import StorageResource

INCOMING = "incoming"

ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.groups("ingest"),
    partitions_def=batches,
    description="Validate and publish one landed batch (WebDataset shards + Parquet table).",
)


def ready_batches(storage: StorageResource, incoming: str = INCOMING) -> list[str]:
    """Batches under ``incoming/`` whose writer has finished (``<batch>/_READY`` exists)."""
    out = set()
    for o in storage.client().list(incoming):
        p = PurePosixPath(o.key)
        if p.name == READY_MARKER and len(p.parts) == 3:
            out.add(p.parts[1])
    return sorted(out)


def pending_batches(instance: dg.DagsterInstance, storage: StorageResource, skip=()) -> list[str]:
    """Ready batches that are not ingested yet (no ``raw_shards`` materialization, by whatever ran
    it: the sensor, the schedule, a hand launch) and not in ``skip``."""
    done = instance.get_materialized_partitions(dg.AssetKey("raw_shards")) | set(skip)
    return [b for b in ready_batches(storage) if b not in done]


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=30,
    description="Adds a `batches` partition and requests `ingest` for each batch that lands "
    "under incoming/<batch>/ with a _READY marker. Idempotent: run_key per batch, cursor of seen batches.",
)
def incoming_batches(context: dg.SensorEvaluationContext, storage: StorageResource):
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    new = pending_batches(context.instance, storage, skip=seen)
    if not new:
        return dg.SkipReason(f"no new ready batch under {INCOMING}/ ({len(seen)} seen)")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=b, run_key=f"ingest:{b}") for b in new],
        dynamic_partitions_requests=[batches.build_add_request(new)],
        cursor=json.dumps(sorted(seen | set(new))),
    )
