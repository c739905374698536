"""Drift between the data the production model was trained on (the *reference*) and a newly
ingested batch (the *current* data), with Evidently doing the statistics.

Three views of a batch, each a plain table that Evidently's data-drift preset compares column by
column (its per-column stattest and threshold, configurable here):

* **table** — the batch's published Parquet rows (every feature column, the label as categorical);
* **image** — per-image features computed with polars from the published WebDataset shards (read
  by the conventions of :mod:`pipeline.webdataset`, as ingestion and the loader read them):
  brightness, contrast, entropy of the pixel histogram, mean per channel (colour images only; for
  grayscale it would repeat brightness), and the label as categorical;
* **prediction** — the production model's predicted class (categorical) and confidence on the
  batch, against the same on the reference data.

A view's verdict is the share of drifted columns: ``>= error_share`` is an error, ``>= warn_share``
a warning. Each comparison writes Evidently's HTML report to storage (atomically) and returns the
headline numbers; nothing here knows about Dagster.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import polars as pl

from pipeline import export, promotion
from pipeline.ingest import MANIFEST, read_shard_manifest
from pipeline.storage import Storage, join
from pipeline.webdataset import LABEL_EXT, WebDatasetError, image_ext, parse_label, read_samples, sample_problem

REPORT_PREFIX = "reports/drift"
FEATURE_CACHE = "drift/features"
NON_FEATURES = ("id", "split")  # identifiers and bookkeeping, not data


class DriftError(ValueError):
    """The comparison cannot be made (no rows, no shared columns, unreadable report input)."""


@dataclass(frozen=True)
class DriftPolicy:
    """How drift is detected and judged.

    ``method``/``threshold`` pick Evidently's stattest for numerical columns (e.g. ``"ks"`` with
    p-value threshold 0.05, ``"wasserstein"`` or ``"psi"`` with distance threshold 0.1; None =
    Evidently's default by column type and size); ``cat_method``/``cat_threshold`` the same for
    categorical columns. ``max_rows`` caps each side (deterministic sample) to bound the cost.

    Categorical columns default to Jensen-Shannon distance, not Evidently's chi-square: chi-square
    takes the reference proportions as exact, so two random halves of the same data (a few hundred
    rows per class) already "drift" at p < 0.05. A distance compares the two samples as samples.
    """

    method: str | None = None
    threshold: float | None = None
    cat_method: str | None = "jensenshannon"
    cat_threshold: float | None = 0.1
    warn_share: float = 0.2
    error_share: float = 0.5
    max_rows: int = 20_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.warn_share <= self.error_share <= 1.0:
            raise ValueError(f"need 0 < warn_share <= error_share <= 1, got warn_share={self.warn_share}, "
                             f"error_share={self.error_share}")
        if self.max_rows < 10:
            raise ValueError(f"max_rows must be >= 10, got {self.max_rows}")


@dataclass
class DriftResult:
    view: str                         # "table" | "image" | "prediction"
    share: float                      # drifted columns / columns
    drifted: list[str]
    scores: dict[str, float]          # column → stattest score (p-value or distance, see methods)
    methods: dict[str, str]           # column → "<stattest> (threshold t)"
    rows_reference: int
    rows_current: int
    verdict: str                      # "ok" | "warn" | "error"
    report_key: str | None = None
    reference: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def columns(self) -> int:
        return len(self.scores)


# --------------------------------------------------------------------------------------------
# The reference: what the production model was trained on
# --------------------------------------------------------------------------------------------


def production_reference(store: Storage, model: str) -> dict | None:
    """``{"model", "version", "batches", "spec", "data_version"}`` of the production version of
    ``model`` (the promotion alias: what serving loads), or None when nothing is promoted yet."""
    current = promotion.production(store, model)
    if current is None:
        return None
    version = current["version"]
    manifest = export.read_manifest(store, model, version)
    meta = manifest.get("metadata") or {}
    dataset = meta.get("dataset") or {}
    batches = dataset.get("batches")
    if not batches:
        raise DriftError(f"{model}/{version}: its manifest does not say which batches it was trained on "
                         "(metadata.dataset.batches); re-export it with this version of forgeline")
    return {"model": model, "version": version, "batches": list(batches), "spec": meta.get("spec"),
            "data_version": manifest.get("data_version") or dataset.get("version")}


# --------------------------------------------------------------------------------------------
# Views of a batch
# --------------------------------------------------------------------------------------------


def table_rows(store: Storage, batches: list[str], *, published: str = "raw/table") -> pl.DataFrame:
    """Every published Parquet row of ``batches`` (in batch order)."""
    frames = []
    for batch in batches:
        man_key = join(published, batch, MANIFEST)
        if not store.exists(man_key):
            raise DriftError(f"{store.uri(man_key)}: batch {batch!r} has no published table")
        manifest = json.loads(store.read(man_key))
        for f in manifest["files"]:
            frames.append(pl.read_parquet(io.BytesIO(store.read(f["key"]))))
    if not frames:
        raise DriftError(f"no published table rows for batches {batches}")
    return pl.concat(frames, how="diagonal_relaxed")


def _decode(name: str, data: bytes) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise DriftError(f"{name}: cannot decode image: {e}") from e
    return arr if arr.ndim == 3 else arr[:, :, None]


def _shard_samples(store: Storage, key: str, limit: int) -> Iterator[tuple[np.ndarray, int]]:
    """(HWC uint8 image, label) pairs of a published shard, in stored order, at most ``limit``."""
    if limit < 1:
        return
    n = 0
    with store.open_read(key) as f:
        try:
            for sample, fields in read_samples(f):
                where = f"{store.uri(key)}:{sample}"
                problem = sample_problem(fields)
                label = None if problem else parse_label(fields[LABEL_EXT])
                if label is None:
                    raise DriftError(f"{where}: {problem or 'label is not a non-negative integer'}")
                ext = image_ext(fields)
                yield _decode(f"{where}.{ext}", fields[ext]), label
                n += 1
                if n >= limit:
                    return
        except WebDatasetError as e:
            raise DriftError(f"{store.uri(key)}: {e}") from None


def image_features(images: list[np.ndarray], labels: list[int] | np.ndarray) -> pl.DataFrame:
    """Per-image features, computed with polars over the flattened pixels (HWC, uint8):
    brightness and contrast (mean and std of all pixels, 0..1), entropy (bits) of the pixel value
    histogram, mean of each channel for colour images, and the label."""
    if not len(images):
        raise DriftError("no images to compute features from")
    channels = {a.shape[2] for a in images}
    if len(channels) != 1:
        raise DriftError(f"images mix channel counts {sorted(channels)}")
    (c,) = channels
    df = pl.DataFrame({"pixels": [a.reshape(-1) for a in images], "label": np.asarray(labels, dtype=np.int64)},
                      schema={"pixels": pl.List(pl.UInt8), "label": pl.Int64})
    px = pl.col("pixels")
    cols = {
        "brightness": px.list.mean() / 255.0,
        "contrast": px.list.std(ddof=0) / 255.0,
        "entropy": px.list.eval(pl.element().unique_counts().entropy(base=2)).list.first(),
    }
    if c > 1:
        cols |= {f"mean_c{i}": px.list.gather_every(c, offset=i).list.mean() / 255.0 for i in range(c)}
    return df.select(**cols, label=pl.col("label"))


def batch_image_features(store: Storage, batch: str, *, max_images: int = 20_000,
                         published: str = "raw/shards", cache: str | None = FEATURE_CACHE) -> pl.DataFrame:
    """Image features of a published batch (up to ``max_images``, spread over its shards), cached
    in storage under ``cache`` keyed by the shards' sha256 — published shards never change, so a
    reference batch is decoded once, not on every check."""
    manifest = read_shard_manifest(store, batch, published)
    shards = sorted(manifest["shards"], key=lambda s: s["key"])
    if not shards:
        raise DriftError(f"batch {batch!r} has no published shards")
    ident = hashlib.sha256(json.dumps([[s["key"], s["sha256"]] for s in shards] + [max_images]).encode()).hexdigest()[:16]
    cache_key = join(cache, f"{batch}-{ident}.parquet") if cache else None
    if cache_key and store.exists(cache_key):
        return pl.read_parquet(io.BytesIO(store.read(cache_key)))
    per_shard = max(1, -(-max_images // len(shards)))
    images, labels = [], []
    for s in shards:
        for img, label in _shard_samples(store, s["key"], per_shard):
            images.append(img)
            labels.append(label)
    feats = image_features(images, labels)
    if cache_key:
        buf = io.BytesIO()
        feats.write_parquet(buf)
        store.write_atomic(cache_key, buf.getvalue())
    return feats


def prediction_frame(model: Any, shard_paths: list[str], spec: dict, *, max_images: int = 20_000,
                     device: str = "cpu", batch_size: int = 256) -> pl.DataFrame:
    """The model's predicted class and confidence (max softmax) for the samples of ``shard_paths``
    (local files), preprocessed exactly as in evaluation."""
    import torch

    from pipeline.evaluate import eval_loader

    preds, confs = [], []
    n = 0
    model = model.to(device).eval()
    with torch.no_grad(), eval_loader(shard_paths, spec, batch_size, device) as loader:
        for x, _ in loader.epoch(0):
            p = torch.softmax(model(x).float(), dim=1)
            conf, cls = p.max(dim=1)
            preds.append(cls.cpu().numpy())
            confs.append(conf.cpu().numpy())
            n += len(cls)
            if n >= max_images:
                break
    if not preds:
        raise DriftError(f"no samples in {shard_paths}")
    return pl.DataFrame({"prediction": np.concatenate(preds)[:max_images].astype(np.int64),
                         "confidence": np.concatenate(confs)[:max_images].astype(np.float64)})


# --------------------------------------------------------------------------------------------
# The comparison (Evidently)
# --------------------------------------------------------------------------------------------


def _sample(df: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    return df if df.height <= n else df.sample(n, seed=seed, shuffle=False)


def compare(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    *,
    view: str,
    categorical: list[str] | tuple[str, ...] = ("label",),
    policy: DriftPolicy = DriftPolicy(),
) -> tuple[DriftResult, Any]:
    """Column drift of ``current`` against ``reference`` over their shared feature columns.
    Returns the result (no report written yet) and Evidently's snapshot (for :func:`write_report`)."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # Evidently's own imports: numpy.core and litestar deprecations, not ours
        warnings.filterwarnings("ignore", message=r"numpy\.core is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"(Call to|Use of) deprecated (function|class) '(Dependency|DependencyKwarg)'")
        from evidently import DataDefinition, Dataset, Report
        from evidently.presets import DataDriftPreset

    cols = [c for c in reference.columns if c in current.columns and c not in NON_FEATURES]
    if not cols:
        raise DriftError(f"{view}: reference and current share no feature columns "
                         f"(reference {reference.columns}, current {current.columns})")
    if reference.height == 0 or current.height == 0:
        raise DriftError(f"{view}: nothing to compare (reference {reference.height} rows, current {current.height})")
    cat = [c for c in cols if c in categorical]
    num = [c for c in cols if c not in cat]
    ref = _sample(reference.select(cols), policy.max_rows, policy.seed).to_pandas()
    cur = _sample(current.select(cols), policy.max_rows, policy.seed).to_pandas()
    for c in num:  # Evidently types columns from pandas dtypes: make numbers numbers
        ref[c], cur[c] = ref[c].astype("float64"), cur[c].astype("float64")
    definition = DataDefinition(numerical_columns=num, categorical_columns=cat)
    preset = DataDriftPreset(
        columns=cols, num_method=policy.method, num_threshold=policy.threshold,
        cat_method=policy.cat_method, cat_threshold=policy.cat_threshold,
    )
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # constant columns (e.g. an always-black border pixel) make some stattests divide by zero;
        # Evidently still scores them, the warnings are noise
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report([preset], include_tests=True).run(
            Dataset.from_pandas(cur, data_definition=definition), Dataset.from_pandas(ref, data_definition=definition)
        )
    result = _result_from(snapshot.dict(), view, cols, policy, len(ref), len(cur))
    result.seconds = time.perf_counter() - t0
    return result, snapshot


def _result_from(d: dict, view: str, cols: list[str], policy: DriftPolicy, n_ref: int, n_cur: int) -> DriftResult:
    scores, methods = {}, {}
    for m in d["metrics"]:
        cfg = m.get("config", {})
        if cfg.get("type", "").endswith(":ValueDrift") and cfg.get("column") in cols:
            scores[cfg["column"]] = float(m["value"])
            methods[cfg["column"]] = f"{cfg.get('method')} (threshold {cfg.get('threshold')})"
    drifted = []
    for t in d["tests"]:
        params = (t.get("metric_config") or {}).get("params") or {}
        if params.get("type", "").endswith(":ValueDrift") and t.get("status") == "FAIL":
            drifted.append(params["column"])
    missing = set(cols) - set(scores)
    if missing:
        raise DriftError(f"{view}: Evidently gave no drift score for columns {sorted(missing)}")
    share = len(drifted) / len(cols)
    verdict = "error" if share >= policy.error_share else "warn" if share >= policy.warn_share else "ok"
    return DriftResult(view=view, share=share, drifted=sorted(drifted), scores=scores, methods=methods,
                       rows_reference=n_ref, rows_current=n_cur, verdict=verdict)


def write_report(store: Storage, key: str, snapshot: Any) -> str:
    """Evidently's HTML report at ``key`` (temp file, then an atomic publish)."""
    fd, tmp = tempfile.mkstemp(suffix=".html", prefix="forgeline-drift-")
    os.close(fd)
    try:
        snapshot.save_html(tmp)
        with open(tmp, "rb") as f:
            store.write_atomic(key, f)
    finally:
        os.unlink(tmp)
    return key


def report_key(view: str, batch: str, reference: dict, prefix: str = REPORT_PREFIX) -> str:
    return join(prefix, batch, f"{view}-vs-{reference['model']}-{reference['version']}.html")


# --------------------------------------------------------------------------------------------
# One call per view: what the asset checks run
# --------------------------------------------------------------------------------------------


def _finish(store: Storage, result: DriftResult, snapshot: Any, batch: str, reference: dict,
            report_prefix: str) -> DriftResult:
    result.reference = {k: reference[k] for k in ("model", "version", "batches")}
    result.report_key = write_report(store, report_key(result.view, batch, reference, report_prefix), snapshot)
    return result


def table_drift(store: Storage, batch: str, reference: dict, *, policy: DriftPolicy = DriftPolicy(),
                columns: list[str] | None = None, report_prefix: str = REPORT_PREFIX) -> DriftResult:
    """Per-column drift of the batch's Parquet table against the reference batches' tables, over
    every feature column or only ``columns`` (wide tables: Evidently costs ~90 ms per column)."""
    ref_batches = [b for b in reference["batches"] if b != batch]
    if not ref_batches:
        raise DriftError(f"batch {batch!r} is itself the whole reference of {reference['model']}/{reference['version']}")
    ref, cur = table_rows(store, ref_batches), table_rows(store, [batch])
    if columns is not None:
        unknown = sorted(set(columns) - (set(ref.columns) & set(cur.columns)))
        if unknown:
            raise DriftError(f"table drift of batch {batch!r}: columns {unknown} are not in both tables")
        ref, cur = ref.select(columns), cur.select(columns)
    result, snap = compare(ref, cur, view="table", policy=policy)
    return _finish(store, result, snap, batch, reference, report_prefix)


def image_drift(store: Storage, batch: str, reference: dict, *, policy: DriftPolicy = DriftPolicy(),
                report_prefix: str = REPORT_PREFIX) -> DriftResult:
    """Drift of per-image features (and the label histogram) of the batch's shards."""
    ref_batches = [b for b in reference["batches"] if b != batch]
    if not ref_batches:
        raise DriftError(f"batch {batch!r} is itself the whole reference of {reference['model']}/{reference['version']}")
    ref = pl.concat([batch_image_features(store, b, max_images=policy.max_rows) for b in ref_batches])
    cur = batch_image_features(store, batch, max_images=policy.max_rows)
    result, snap = compare(ref, cur, view="image", policy=policy)
    return _finish(store, result, snap, batch, reference, report_prefix)


def prediction_drift(store: Storage, batch: str, reference: dict, *, shard_paths: dict[str, list[str]],
                     policy: DriftPolicy = DriftPolicy(), device: str = "cpu",
                     report_prefix: str = REPORT_PREFIX) -> DriftResult:
    """Drift of the production model's predicted classes and confidence on the batch against the
    same on its reference data. ``shard_paths``: ``{"reference": [...], "current": [...]}`` local
    files (see pipeline.dataset.stage)."""
    state = export.load_state_dict(store, reference["model"], reference["version"])
    manifest = export.read_manifest(store, reference["model"], reference["version"])
    module = export.module_from_state(manifest, state)
    spec = reference.get("spec") or (manifest.get("metadata") or {}).get("spec")
    if not spec:
        raise DriftError(f"{reference['model']}/{reference['version']}: no preprocessing spec in its manifest")
    ref = prediction_frame(module, shard_paths["reference"], spec, max_images=policy.max_rows, device=device)
    cur = prediction_frame(module, shard_paths["current"], spec, max_images=policy.max_rows, device=device)
    result, snap = compare(ref, cur, view="prediction", categorical=("prediction",), policy=policy)
    return _finish(store, result, snap, batch, reference, report_prefix)


def batch_shard_entries(store: Storage, batches: list[str], published: str = "raw/shards") -> list[dict]:
    """The published shard entries (key, sha256, bytes, samples) of ``batches``, for staging."""
    out = []
    for b in batches:
        out.extend({k: e[k] for k in ("key", "sha256", "bytes", "samples")}
                   for e in read_shard_manifest(store, b, published)["shards"])
    return sorted(out, key=lambda e: e["key"])


__all__ = [
    "DriftError", "DriftPolicy", "DriftResult", "batch_image_features", "batch_shard_entries", "compare",
    "image_drift", "image_features", "prediction_drift", "prediction_frame", "production_reference",
    "table_drift", "table_rows", "write_report",
]
