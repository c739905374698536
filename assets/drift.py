"""Drift checks on every ingested batch: the batch against the data the production model (the
promoted version) was trained on. Each check writes Evidently's HTML report to storage,
links it, and records the headline numbers; a drifted batch fails at WARN or ERROR severity by
the share of drifted columns, and `drift_retrain` (jobs/automation.py) answers ERROR with a retrain."""

import re
import urllib.parse
import warnings
from typing import Callable, Optional

import dagster as dg
from pydantic import Field

from assets.ingest import raw_shards, raw_table
from assets.partitions import batches
from assets.train import shard_cache_dir
from pipeline import drift, settings
from pipeline.serving.traffic import window_model
from pipeline.storage import Storage
from resources.storage import StorageResource

DRIFT_CHECKS = ("table_drift", "image_drift", "prediction_drift")
# Partitioned asset checks are a Dagster preview feature; they are what makes a drift verdict
# belong to its batch in the UI, so we use them knowingly and keep the import quiet.
warnings.filterwarnings("ignore", category=dg.PreviewWarning, message=".*partitions_def on an AssetCheckSpec.*")
MAX_SCORE_ENTRIES = 16  # numeric per-column entries (most drifted first); the rest are in the JSON


class DriftCheckConfig(dg.Config):
    model_name: str = Field(default=settings.model_name(), description="Published model whose training data is the reference.")
    method: Optional[str] = Field(default=None, description="Evidently stattest for numerical columns "
                                  "(ks, wasserstein, psi, ...); None = Evidently's default for the column.")
    threshold: Optional[float] = Field(default=None, gt=0, description="Threshold of `method` (p-value or distance).")
    cat_method: Optional[str] = Field(default="jensenshannon", description="Stattest for categorical columns.")
    cat_threshold: Optional[float] = Field(default=0.1, gt=0, description="Threshold of `cat_method`.")
    warn_share: float = Field(default=0.2, ge=0, le=1, description="Share of drifted columns that fails the check at WARN.")
    error_share: float = Field(default=0.5, ge=0, le=1, description="Share of drifted columns that fails it at ERROR.")
    max_rows: int = Field(default=20_000, ge=1, description="Rows (or images) sampled per side at most.")
    table_columns: Optional[list[str]] = Field(default=None, description="table_drift only: compare these "
                                               "columns (None = every feature column; wide tables cost ~90 ms/column).")

    def policy(self) -> drift.DriftPolicy:
        return drift.DriftPolicy(method=self.method, threshold=self.threshold, cat_method=self.cat_method,
                                 cat_threshold=self.cat_threshold, warn_share=self.warn_share,
                                 error_share=self.error_share, max_rows=self.max_rows)


def _run(context: dg.AssetCheckExecutionContext, config: DriftCheckConfig, storage: StorageResource,
         compare: Callable[[Storage, str, dict], drift.DriftResult]) -> dg.AssetCheckResult:
    """Run ``compare(store, batch, reference)`` against the production model's training data, or
    pass with the reason when there is nothing to compare against."""
    store, batch, model = storage.client(), context.partition_key, config.model_name
    ref = drift.production_reference(store, model)
    owner = window_model(batch)  # a window of serving traffic (unlabeled): whose traffic it is
    if ref is None:
        why = f"no published version of {model!r} yet: nothing to compare against"
    elif owner is not None and owner != model:
        why = f"{batch!r} is traffic of model {owner!r}; these checks watch {model!r}"
    elif set(ref["batches"]) <= {batch}:
        why = f"{batch!r} is the data {model}/{ref['version']} was trained on"
    else:
        return _result(store, compare(store, batch, ref))
    return dg.AssetCheckResult(passed=True, description=why, metadata={"reference": why})


_DISTANCE_WORDS = ("distance", "divergence", "psi", "mmd", "text content")  # higher = more drift; else p-values
MOST_DRIFTED = 5  # rows of the Markdown table


def _severity(score: float, method: str) -> float:
    """How far past its threshold a column's score is (> 1: drifted), whether the stattest is a
    p-value (lower = more drift) or a distance (higher = more drift)."""
    m = re.fullmatch(r"(.*) \(threshold ([^)]*)\)", method or "")
    name, threshold = (m.group(1), m.group(2)) if m else (method or "", "")
    try:
        t = float(threshold)
    except ValueError:
        t = 0.05
    if any(w in name.lower() for w in _DISTANCE_WORDS):
        return score / t if t > 0 else score
    return t / score if score > 0 else float("inf")


def most_drifted_table(r: drift.DriftResult, n: int = MOST_DRIFTED) -> str:
    """The ``n`` most drifted columns (drifted first, then by distance past the threshold) as Markdown."""
    order = sorted(r.scores, key=lambda c: (c not in r.drifted, -_severity(r.scores[c], r.methods.get(c, "")), c))
    rows = ["| column | drifted | score | stattest (threshold) |", "|---|---|---|---|"]
    for c in order[:n]:
        cell = c.replace("|", "\\|")
        rows.append(f"| {cell} | {'yes' if c in r.drifted else 'no'} | {r.scores[c]:.4g} | {r.methods.get(c, '')} |")
    more = len(r.scores) - min(n, len(r.scores))
    return "\n".join(rows) + (f"\n\n{more} more column(s): see `scores` and the report." if more else "")


def report_link(store: Storage, key: str) -> dg.MetadataValue:
    """The drift report as a link a browser opens: ``$FORGELINE_REPORTS_URL/reports/<key under
    reports/drift>`` (served by ``forgeline serve``) when that is set, else its storage location."""
    base = settings.reports_url()
    prefix = drift.REPORT_PREFIX + "/"
    if base and key.startswith(prefix):
        return dg.MetadataValue.url(f"{base}/reports/{urllib.parse.quote(key[len(prefix):])}")
    uri = store.uri(key)
    return dg.MetadataValue.path(uri) if "://" not in uri else dg.MetadataValue.url(uri)


def _result(store: Storage, r: drift.DriftResult) -> dg.AssetCheckResult:
    ranked = sorted(r.scores, key=lambda c: (c not in r.drifted, c))[:MAX_SCORE_ENTRIES]
    return dg.AssetCheckResult(
        passed=r.verdict == "ok",
        severity=dg.AssetCheckSeverity.ERROR if r.verdict == "error" else dg.AssetCheckSeverity.WARN,
        description=f"{len(r.drifted)}/{r.columns} {r.view} columns drifted ({r.share:.0%}) against "
                    f"{r.reference['model']}/{r.reference['version']}" + (
                        f"'s batch {r.matched} (against all {len(r.reference['batches'])} of its batches at once: "
                        f"{r.whole['drifted']}/{r.whole['columns']}, {r.whole['share']:.0%})" if r.matched else ""),
        metadata={
            "drift_share": r.share,
            "drifted_columns": len(r.drifted),
            "columns": r.columns,
            "most_drifted": dg.MetadataValue.md(most_drifted_table(r)),
            "drifted": dg.MetadataValue.json(r.drifted),
            **{f"score/{c}": r.scores[c] for c in ranked},
            "scores": dg.MetadataValue.json(r.scores),
            "methods": dg.MetadataValue.json(sorted(set(r.methods.values()))),
            "rows_reference": r.rows_reference,
            "rows_current": r.rows_current,
            "reference": dg.MetadataValue.json(r.reference),
            # the verdict is against this one batch of the reference, which the batch is like
            **({"matched_batch": r.matched, "whole_reference_share": r.whole["share"]} if r.matched else {}),
            "report": report_link(store, r.report_key),
            "seconds": r.seconds,
        },
    )


@dg.asset_check(asset=raw_table, partitions_def=batches,
                description="Per-column drift of the batch's table against the production model's training tables; "
                            "for a window of serving traffic, the served class and confidence against the production "
                            "model's predictions on its held-out reference data.")
def table_drift(context: dg.AssetCheckExecutionContext, config: DriftCheckConfig,
                storage: StorageResource) -> dg.AssetCheckResult:
    return _run(context, config, storage, lambda store, batch, ref: drift.table_drift(
        store, batch, ref, policy=config.policy(), columns=config.table_columns, cache_dir=shard_cache_dir()))


@dg.asset_check(asset=raw_shards, partitions_def=batches,
                description="Drift of per-image features (brightness, contrast, entropy, channel means) and the "
                            "label histogram against the production model's training shards.")
def image_drift(context: dg.AssetCheckExecutionContext, config: DriftCheckConfig,
                storage: StorageResource) -> dg.AssetCheckResult:
    return _run(context, config, storage, lambda store, batch, ref: drift.image_drift(
        store, batch, ref, policy=config.policy(), cache_dir=shard_cache_dir()))


@dg.asset_check(asset=raw_shards, partitions_def=batches,
                description="Drift of the production model's predicted classes and confidence on the batch "
                            "against the same on its held-out (val/test) reference data.")
def prediction_drift(context: dg.AssetCheckExecutionContext, config: DriftCheckConfig,
                     storage: StorageResource) -> dg.AssetCheckResult:
    return _run(context, config, storage, lambda store, batch, ref: drift.prediction_drift(
        store, batch, ref, policy=config.policy(), cache_dir=shard_cache_dir()))
