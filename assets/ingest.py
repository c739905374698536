"""Ingestion assets: ``raw_shards`` (WebDataset) and ``raw_table`` (Parquet), one partition per batch."""


import dagster as dg
from pydantic import Field

from assets.partitions import batches
from pipeline import ingest, metrics
from pipeline.storage import join
from resources.storage import StorageResource


class ShardIngestConfig(dg.Config):
    incoming_prefix: str = Field(default="incoming", description="Landing prefix; shards under <prefix>/<batch>/.")
    num_classes: int = Field(default=10, ge=1, description="Labels must lie in [0, num_classes).")
    workers: int | None = Field(default=None, ge=0, le=256, description=(
        "Processes that check the images (0: the step's shard threads check them, which suits up to 4 "
        "CPUs since the PNG check runs outside the GIL; default: 0 up to 4 CPUs, else one per CPU). "
        "Shards are streamed, parsed and hashed in the step's process."))


class TableIngestConfig(dg.Config):
    incoming_prefix: str = Field(default="incoming", description="Landing prefix; tables under <prefix>/<batch>/.")


def _quarantined_summary(reports: list, where: str, shown: int = 3) -> str | None:
    """The first few quarantined shards and why, for the check's line in the CLI and the UI."""
    if not reports:
        return None
    said = "; ".join(f"{r.source.rsplit('/shards/', 1)[-1]}: {r.reason}" for r in reports[:shown])
    more = f"; and {len(reports) - shown} more" if len(reports) > shown else ""
    return f"{len(reports)} quarantined in {where}: {said}{more}"[:1000]


@dg.asset(
    partitions_def=batches,
    group_name="ingest",
    kinds={"webdataset", "python"},
    check_specs=[
        dg.AssetCheckSpec("no_quarantined_shards", asset="raw_shards",
                          description="Every landed shard was valid (WARN: bad ones are quarantined)."),
        dg.AssetCheckSpec("all_classes_present", asset="raw_shards",
                          description="Published samples cover every class."),
    ],
)
def raw_shards(context: dg.AssetExecutionContext, config: ShardIngestConfig, storage: StorageResource) -> dg.MaterializeResult:
    """Validated WebDataset shards of one landed batch; corrupt shards are quarantined, not published."""
    store = storage.client()
    ingest.require_ready(store, context.partition_key, incoming=config.incoming_prefix)
    result = ingest.ingest_shards(
        store,
        context.partition_key,
        incoming=config.incoming_prefix,
        num_classes=config.num_classes,
        workers=config.workers,
        on_shard=lambda r: context.log.info(
            f"{r.source}: {'ok' if r.ok else 'QUARANTINED'} {r.samples} samples" + ("" if r.ok else f" — {r.reason}")
        ),
    )
    unlabeled = result.samples > 0 and result.unlabeled == result.samples  # e.g. a window of serving traffic
    missing = [] if unlabeled else sorted(set(range(config.num_classes)) - set(result.classes))
    return dg.MaterializeResult(
        metadata={
            "manifest": dg.MetadataValue.path(store.uri(result.manifest_key)),
            "shards_published": len(result.published),
            "shards_quarantined": len(result.quarantined),
            "quarantined": dg.MetadataValue.json([{"source": r.source, "reason": r.reason} for r in result.quarantined]),
            "samples": result.samples,
            "unlabeled_samples": result.unlabeled,
            "bytes": result.bytes,
            "classes": dg.MetadataValue.json(result.classes),
            "seconds": result.seconds,
            "mb_per_s": result.bytes / 1e6 / max(result.seconds, 1e-9),
            "samples_per_s": result.samples / max(result.seconds, 1e-9),
            **metrics.summary(result.shard_seconds, "shard_latency"),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="no_quarantined_shards",
                passed=not result.quarantined,
                severity=dg.AssetCheckSeverity.WARN,
                description=_quarantined_summary(
                    result.quarantined, store.uri(join(ingest.QUARANTINE, context.partition_key))),
                metadata={"quarantined": len(result.quarantined)},
            ),
            dg.AssetCheckResult(
                check_name="all_classes_present",
                passed=not missing,
                description="unlabeled batch (never training data): no classes to check" if unlabeled else None,
                metadata={"missing_classes": dg.MetadataValue.json(missing), "unlabeled": unlabeled},
            ),
        ],
    )


@dg.asset(
    partitions_def=batches,
    group_name="ingest",
    kinds={"parquet", "polars"},
    check_specs=[
        dg.AssetCheckSpec("every_split_present", asset="raw_table",
                          description="train, val and test rows all exist."),
    ],
)
def raw_table(context: dg.AssetExecutionContext, config: TableIngestConfig, storage: StorageResource) -> dg.MaterializeResult:
    """The batch's Parquet table after schema, null, range and duplicate-id checks."""
    store = storage.client()
    ingest.require_ready(store, context.partition_key, incoming=config.incoming_prefix)
    result = ingest.ingest_table(store, context.partition_key, incoming=config.incoming_prefix)
    splits = result.splits
    predictions = result.kind == "predictions"  # served predictions (serving traffic): no splits, no labels
    return dg.MaterializeResult(
        metadata={
            "manifest": dg.MetadataValue.path(store.uri(result.manifest_key)),
            "files": dg.MetadataValue.json(result.published),
            "rows": result.rows,
            "bytes": sum(f.bytes for f in result.files),
            "seconds": result.seconds,
            "mb_per_s": sum(f.bytes for f in result.files) / 1e6 / max(result.seconds, 1e-9),
            "rows_per_s": result.rows / max(result.seconds, 1e-9),
            **metrics.summary(result.file_seconds, "file_latency"),
            "splits": dg.MetadataValue.json(splits),
            "label_histogram": dg.MetadataValue.json({str(k): v for k, v in result.labels.items()}),
            "column_stats": dg.MetadataValue.json({f.source: f.columns for f in result.files}),
            "extra_columns": dg.MetadataValue.json(sorted({c for f in result.files for c in f.extra_columns})),
            "kind": result.kind,
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="every_split_present",
                passed=predictions or all(splits.get(s, 0) > 0 for s in ("train", "val", "test")),
                description="a table of served predictions (unlabeled traffic) has no splits" if predictions else None,
                metadata={"splits": dg.MetadataValue.json(splits)},
            )
        ],
    )
