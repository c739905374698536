"""Ingestion job and the sensor that turns landed batches into partitions + runs."""


import json
from pathlib import PurePosixPath

import dagster as dg

from assets.partitions import batches
from pipeline.datagen import READY_MARKER
from pipeline.ingest import BadBatchName, check_batch_name
from resources.storage import StorageResource

INCOMING = "incoming"

ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.groups("ingest"),  # partitioned by `batches`, inferred from the assets
    description="Validate and publish one landed batch (WebDataset shards + Parquet table).",
)


def landed_batches(storage: StorageResource, incoming: str = INCOMING) -> tuple[list[str], dict[str, str]]:
    """``(ready, refused)``: batches under ``incoming/`` whose writer has finished
    (``<batch>/_READY`` exists) and have a valid name; ``{folder: why}`` for ready folders whose name
    cannot be a batch (they never become partitions)."""
    ready, refused = set(), {}
    for o in storage.client().list(incoming):
        p = PurePosixPath(o.key)
        if p.name == READY_MARKER and len(p.parts) == 3:
            try:
                ready.add(check_batch_name(p.parts[1]))
            except BadBatchName as e:
                refused[p.parts[1]] = str(e)
    return sorted(ready), refused


def ready_batches(storage: StorageResource, incoming: str = INCOMING) -> list[str]:
    """Batches under ``incoming/`` whose writer has finished (``<batch>/_READY`` exists) and whose
    name is a valid batch name (:func:`pipeline.ingest.check_batch_name`)."""
    return landed_batches(storage, incoming)[0]


def pending_batches(instance: dg.DagsterInstance, storage: StorageResource, skip=(), ready=None) -> list[str]:
    """Ready batches that are not ingested yet (no ``raw_shards`` materialization, by whatever ran
    it: the sensor, the schedule, a hand launch) and not in ``skip``."""
    done = instance.get_materialized_partitions(dg.AssetKey("raw_shards")) | set(skip)
    return [b for b in (ready_batches(storage) if ready is None else ready) if b not in done]


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=30,
    description="Adds a `batches` partition and requests `ingest` for each batch that lands "
    "under incoming/<batch>/ with a _READY marker. Idempotent: run_key per batch, cursor of seen batches.",
)
def incoming_batches(context: dg.SensorEvaluationContext, storage: StorageResource):
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    ready, refused = landed_batches(storage)
    for folder, why in refused.items():
        context.log.warning(f"{INCOMING}/{folder}/ is ready but not ingested: {why}")
    new = pending_batches(context.instance, storage, skip=seen, ready=ready)
    if not new:
        # the refused in the tick's own line, where the ticks list shows it (not only in its logs)
        also = "".join(f"; refused {INCOMING}/{f}/: {why}" for f, why in sorted(refused.items())[:3])
        return dg.SkipReason(f"no new ready batch under {INCOMING}/ ({len(ready)} ready, all requested or "
                             f"ingested){also}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=b, run_key=f"ingest:{b}") for b in new],
        dynamic_partitions_requests=[batches.build_add_request(new)],
        cursor=json.dumps(sorted(seen | set(new))),
    )
