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
a warning. A batch that drifts from the reference as a whole is also compared with each reference
batch alone (:func:`versus_reference`): a model trained on clean and shifted batches has learnt
both, so a clean batch is not drift although it differs from the mixture. Each comparison writes
Evidently's HTML report to storage (atomically) and returns the headline numbers; nothing here
knows about Dagster.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import polars as pl

from pipeline import export, promotion
from pipeline.ingest import MANIFEST, read_shard_manifest, shard_labeled
from pipeline.serving.traffic import is_window, to_image, window_model
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
    # set when the verdict is against one reference batch (``matched``), not the whole reference:
    # then ``whole`` is the comparison with all of it {"share", "drifted", "columns", "verdict"}
    matched: str | None = None
    whole: dict | None = None

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
        manifest = store.read_record(man_key, "table manifest")
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


def _shard_samples(store: Storage, key: str, limit: int, *, labeled: bool = True) -> Iterator[tuple[np.ndarray, int | None]]:
    """(HWC uint8 image, label) pairs of a published shard, in stored order, at most ``limit``
    (label None for an unlabeled shard: ``labeled=False``)."""
    if limit < 1:
        return
    n = 0
    with store.open_read(key) as f:
        try:
            for sample, fields in read_samples(f):
                where = f"{store.uri(key)}:{sample}"
                problem = sample_problem(fields if labeled else [*fields, LABEL_EXT])
                label = None if problem or not labeled else parse_label(fields[LABEL_EXT])
                if problem or (labeled and label is None):
                    raise DriftError(f"{where}: {problem or 'label is not a non-negative integer'}")
                ext = image_ext(fields)
                yield _decode(f"{where}.{ext}", fields[ext]), label
                n += 1
                if n >= limit:
                    return
        except WebDatasetError as e:
            raise DriftError(f"{store.uri(key)}: {e}") from None


def image_features(images: list[np.ndarray], labels: list[int] | np.ndarray | None) -> pl.DataFrame:
    """Per-image features, computed with polars over the flattened pixels (HWC, uint8):
    brightness and contrast (mean and std of all pixels, 0..1), entropy (bits) of the pixel value
    histogram, mean of each channel for colour images, and the label (no ``label`` column when
    ``labels`` is None: unlabeled images)."""
    if not len(images):
        raise DriftError("no images to compute features from")
    channels = {a.shape[2] for a in images}
    if len(channels) != 1:
        raise DriftError(f"images mix channel counts {sorted(channels)}")
    (c,) = channels
    if labels is None:
        df = pl.DataFrame({"pixels": [a.reshape(-1) for a in images]}, schema={"pixels": pl.List(pl.UInt8)})
    else:
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
    return df.select(**cols) if labels is None else df.select(**cols, label=pl.col("label"))


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
    labeled = all(shard_labeled(s) for s in shards)
    images, labels = [], []
    for s in shards:
        for img, label in _shard_samples(store, s["key"], per_shard, labeled=labeled):
            images.append(img)
            labels.append(label)
    feats = image_features(images, labels if labeled else None)
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
# Serving traffic (pipeline.serving.traffic): windows of sampled requests, unlabeled
# --------------------------------------------------------------------------------------------

PREDICTION_CACHE = "drift/predictions"


def _model_view(reference: dict, manifest: dict | None = None) -> dict:
    spec = reference.get("spec") or ((manifest or {}).get("metadata") or {}).get("spec")
    if not spec:
        raise DriftError(f"{reference['model']}/{reference['version']}: no preprocessing spec in its manifest")
    return spec


def _cached(store: Storage, key: str, make) -> pl.DataFrame:
    if store.exists(key):
        return pl.read_parquet(io.BytesIO(store.read(key)))
    df = make()
    buf = io.BytesIO()
    df.write_parquet(buf)
    store.write_atomic(key, buf.getvalue())
    return df


def _ident(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_entries(store: Storage, reference: dict, *, held_out: bool) -> list[dict]:
    """Published shards of the reference batches (labeled ones); with ``held_out`` only the val/test
    shards when there are any (the model is overconfident on what it was trained on)."""
    from pipeline.dataset import split_of

    entries = [e for e in batch_shard_entries(store, list(reference["batches"])) if e.get("labeled", True)]
    if held_out:
        entries = [e for e in entries if split_of(e["key"]) != "train"] or entries
    if not entries:
        raise DriftError(f"{reference['model']}/{reference['version']}: its training batches have no published shards")
    return entries


def reference_predictions(store: Storage, reference: dict, *, cache_dir, max_images: int = 20_000,
                          device: str = "cpu") -> pl.DataFrame:
    """The production model's predicted class and confidence on its held-out reference data,
    computed once per model version and data (cached in storage under ``drift/predictions``)."""
    from pipeline.dataset import stage

    entries = reference_entries(store, reference, held_out=True)
    key = join(PREDICTION_CACHE, f"{reference['model']}-{reference['version']}-"
                                 f"{_ident([(e['key'], e['sha256']) for e in entries], max_images)}.parquet")

    def make() -> pl.DataFrame:
        module, manifest = _production_module(store, reference)
        return prediction_frame(module, stage(store, entries, cache_dir), _model_view(reference, manifest),
                                max_images=max_images, device=device)

    return _cached(store, key, make)


def _production_module(store: Storage, reference: dict):
    state = export.load_state_dict(store, reference["model"], reference["version"])
    manifest = export.read_manifest(store, reference["model"], reference["version"])
    return export.module_from_state(manifest, state), manifest


def _as_images(x: np.ndarray, spec: dict) -> list[np.ndarray]:
    return [to_image(row, spec)[0] for row in x]


def model_view_features(store: Storage, reference: dict, *, cache_dir, max_images: int = 20_000) -> pl.DataFrame:
    """Image features of the reference data *as the model sees it*: each image preprocessed as in
    evaluation (resize, center crop, normalise: the production spec), then turned back into 8-bit
    pixels exactly as the server turns a sampled input into its PNG (:func:`to_image`). Served
    inputs are already cropped and resized, so this, not the landed images, is what their features
    compare with. Cached in storage by shard contents and spec."""
    from pipeline.dataset import stage
    from pipeline.evaluate import eval_loader

    spec = _model_view(reference)
    entries = reference_entries(store, reference, held_out=False)
    key = join(FEATURE_CACHE, f"{reference['model']}-model-view-"
                              f"{_ident([(e['key'], e['sha256']) for e in entries], spec, max_images)}.parquet")

    def make() -> pl.DataFrame:
        images, labels = [], []
        with eval_loader(stage(store, entries, cache_dir), spec, 256, "cpu") as loader:
            for x, y in loader.epoch(0):
                images += _as_images(x.float().cpu().numpy(), spec)
                labels += y.cpu().tolist()
                if len(images) >= max_images:
                    break
        return image_features(images[:max_images], labels[:max_images])

    return _cached(store, key, make)


def window_inputs(store: Storage, batch: str, *, max_images: int = 20_000,
                  published: str = "raw/shards") -> tuple[np.ndarray, list[np.ndarray]]:
    """The exact model inputs (``.npy``: float32 [N, C, H, W]) and the 8-bit images (``.png``) of
    a published window of serving traffic, in stored order, at most ``max_images``."""
    xs, images = [], []
    for entry in sorted(read_shard_manifest(store, batch, published)["shards"], key=lambda e: e["key"]):
        with store.open_read(entry["key"]) as f:
            try:
                for sample, fields in read_samples(f):
                    where = f"{store.uri(entry['key'])}:{sample}"
                    if "npy" not in fields:
                        raise DriftError(f"{where}: no .npy input (not a window of serving traffic?)")
                    xs.append(np.load(io.BytesIO(fields["npy"]), allow_pickle=False))
                    ext = image_ext(fields)
                    images.append(_decode(f"{where}.{ext}", fields[ext]))
                    if len(xs) >= max_images:
                        break
            except WebDatasetError as e:
                raise DriftError(f"{store.uri(entry['key'])}: {e}") from None
        if len(xs) >= max_images:
            break
    if not xs:
        raise DriftError(f"window {batch!r} has no samples")
    shapes = {x.shape for x in xs}
    if len(shapes) != 1:
        raise DriftError(f"window {batch!r}: inputs of several shapes {sorted(shapes)}")
    return np.stack(xs).astype(np.float32), images


def window_predictions(store: Storage, batch: str, model: str) -> pl.DataFrame:
    """What the server answered in a window (its published predictions table), rows of ``model``."""
    rows = table_rows(store, [batch])
    if "prediction" not in rows.columns:
        raise DriftError(f"batch {batch!r}: its table has no 'prediction' column (not a window of serving traffic)")
    rows = rows.filter(pl.col("model") == model)
    if rows.height == 0:
        raise DriftError(f"window {batch!r} has no predictions of model {model!r}")
    return rows.select(pl.col("prediction").cast(pl.Int64), pl.col("confidence").cast(pl.Float64))


def _check_window(batch: str, reference: dict) -> None:
    owner = window_model(batch)
    if owner is not None and owner != reference["model"]:
        raise DriftError(f"window {batch!r} is traffic of model {owner!r}, not {reference['model']!r}")


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


MAX_COMPONENTS = 8  # reference batches (the last in natural name order) a drifted batch is compared with alone
MIN_COMPONENT_ROWS = 100  # fewer rows are too few for a stattest to tell drift from chance: not tried alone
_RANK = {"ok": 0, "warn": 1, "error": 2}


def natural_order(names: list[str]) -> list[str]:
    """``names`` with runs of digits compared as numbers: ``day-2`` before ``day-10``."""
    return sorted(names, key=lambda n: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", n)])


def versus_reference(ref_batches: list[str], frame_of, current: pl.DataFrame, *, view: str,
                     categorical: list[str] | tuple[str, ...] = ("label",),
                     policy: DriftPolicy = DriftPolicy()) -> tuple[DriftResult, Any]:
    """:func:`compare` of ``current`` with the reference batches together (``frame_of(batches)``
    gives their frame); when that is not ``ok`` and there are several, also with each of the
    last :data:`MAX_COMPONENTS` alone (in natural name order, newest first; those of at least
    :data:`MIN_COMPONENT_ROWS` rows), and the batch it is most like (fewest drifted columns)
    gives the verdict if that is better than the whole's (``matched``, with the whole comparison
    in ``whole``). A mixture of clean and shifted batches differs from a clean batch as a whole,
    but the model was trained on both; a batch unlike every one of them is drift."""
    whole, snap = compare(frame_of(ref_batches), current, view=view, categorical=categorical, policy=policy)
    if whole.verdict == "ok" or len(ref_batches) < 2:
        return whole, snap
    spent, best = whole.seconds, None
    for b in natural_order(ref_batches)[::-1][:MAX_COMPONENTS]:
        try:
            one = frame_of([b])
        except DriftError:  # this batch alone has no view (no held-out shards, other columns): the whole decides
            continue
        if one.height < MIN_COMPONENT_ROWS:
            continue
        alone, alone_snap = compare(one, current, view=view, categorical=categorical, policy=policy)
        spent += alone.seconds
        if best is None or (_RANK[alone.verdict], alone.share) < (_RANK[best[0].verdict], best[0].share):
            best = (alone, alone_snap, b)
        if not alone.drifted:
            break  # nothing drifted: no batch can be more like it
    if best is None or _RANK[best[0].verdict] >= _RANK[whole.verdict]:
        whole.seconds = spent
        return whole, snap
    alone, alone_snap, b = best
    alone.matched, alone.seconds = b, spent
    alone.whole = {"share": whole.share, "drifted": len(whole.drifted), "columns": whole.columns,
                   "verdict": whole.verdict}
    return alone, alone_snap


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
                columns: list[str] | None = None, report_prefix: str = REPORT_PREFIX,
                cache_dir=None) -> DriftResult:
    """Per-column drift of the batch's Parquet table against the reference batches' tables, over
    every feature column or only ``columns`` (wide tables: Evidently costs ~90 ms per column).
    A window of serving traffic has a predictions table instead: see :func:`window_table_drift`
    (``cache_dir``: where reference shards are staged)."""
    if is_window(batch):
        return window_table_drift(store, batch, reference, policy=policy, cache_dir=cache_dir,
                                  report_prefix=report_prefix)
    ref_batches = [b for b in reference["batches"] if b != batch]
    if not ref_batches:
        raise DriftError(f"batch {batch!r} is itself the whole reference of {reference['model']}/{reference['version']}")
    cur = table_rows(store, [batch])

    def frame_of(batches: list[str]) -> pl.DataFrame:
        ref = table_rows(store, batches)
        if columns is None:
            return ref
        unknown = sorted(set(columns) - (set(ref.columns) & set(cur.columns)))
        if unknown:
            raise DriftError(f"table drift of batch {batch!r}: columns {unknown} are not in both tables")
        return ref.select(columns)

    result, snap = versus_reference(ref_batches, frame_of, cur if columns is None else cur.select(
        [c for c in columns if c in cur.columns]), view="table", policy=policy)
    return _finish(store, result, snap, batch, reference, report_prefix)


def image_drift(store: Storage, batch: str, reference: dict, *, policy: DriftPolicy = DriftPolicy(),
                report_prefix: str = REPORT_PREFIX, cache_dir=None) -> DriftResult:
    """Drift of per-image features (and the label histogram, for labeled batches) of the batch's
    shards. A window of serving traffic holds model inputs (already resized and cropped), so its
    features compare with the reference *as the model sees it* (:func:`model_view_features`;
    ``cache_dir``: where reference shards are staged)."""
    if is_window(batch):
        _check_window(batch, reference)
        if cache_dir is None:
            raise DriftError(f"window {batch!r}: image drift of serving traffic needs a cache_dir to stage the reference")
        _, images = window_inputs(store, batch, max_images=policy.max_rows)
        result, snap = versus_reference(
            reference["batches"],
            lambda bs: model_view_features(store, {**reference, "batches": bs}, cache_dir=cache_dir,
                                           max_images=policy.max_rows),
            image_features(images, None), view="image", policy=policy)
        return _finish(store, result, snap, batch, reference, report_prefix)
    ref_batches = [b for b in reference["batches"] if b != batch]
    if not ref_batches:
        raise DriftError(f"batch {batch!r} is itself the whole reference of {reference['model']}/{reference['version']}")
    cur = batch_image_features(store, batch, max_images=policy.max_rows)
    result, snap = versus_reference(
        ref_batches, lambda bs: pl.concat([batch_image_features(store, b, max_images=policy.max_rows) for b in bs]),
        cur, view="image", policy=policy)
    return _finish(store, result, snap, batch, reference, report_prefix)


def window_table_drift(store: Storage, batch: str, reference: dict, *, policy: DriftPolicy = DriftPolicy(),
                       cache_dir=None, device: str = "cpu", report_prefix: str = REPORT_PREFIX) -> DriftResult:
    """The table check of a window of serving traffic: what the server *answered* (the predicted
    class and confidence in its predictions table, rows of the reference model, whichever version
    answered) against the production model's predictions on its held-out reference data."""
    _check_window(batch, reference)
    if cache_dir is None:
        raise DriftError(f"window {batch!r}: table drift of serving traffic needs a cache_dir to stage the reference")
    cur = window_predictions(store, batch, reference["model"])
    result, snap = versus_reference(reference["batches"], _predictions_of(store, reference, cache_dir, policy, device),
                                    cur, view="table", categorical=("prediction",), policy=policy)
    return _finish(store, result, snap, batch, reference, report_prefix)


def _predictions_of(store: Storage, reference: dict, cache_dir, policy: DriftPolicy, device: str):
    """``frame_of`` for :func:`versus_reference`: the production model's predictions on the
    held-out data of the given reference batches (cached)."""
    return lambda batches: reference_predictions(store, {**reference, "batches": batches}, cache_dir=cache_dir,
                                                 max_images=policy.max_rows, device=device)


def window_prediction_drift(store: Storage, batch: str, reference: dict, *, cache_dir,
                            policy: DriftPolicy = DriftPolicy(), device: str = "cpu",
                            report_prefix: str = REPORT_PREFIX, batch_size: int = 256) -> DriftResult:
    """The prediction check of a window of serving traffic: the *production* model run now on the
    exact sampled inputs (``.npy``, no preprocessing again) against the same model on its held-out
    reference data. Unlike the table check this judges the current production version, even on
    traffic an earlier version answered."""
    import torch

    _check_window(batch, reference)
    x, _ = window_inputs(store, batch, max_images=policy.max_rows)
    module, _ = _production_module(store, reference)
    module = module.to(device).eval()
    preds, confs = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            p = torch.softmax(module(torch.from_numpy(x[i:i + batch_size]).to(device)).float(), dim=1)
            conf, cls = p.max(dim=1)
            preds.append(cls.cpu().numpy())
            confs.append(conf.cpu().numpy())
    cur = pl.DataFrame({"prediction": np.concatenate(preds).astype(np.int64),
                        "confidence": np.concatenate(confs).astype(np.float64)})
    result, snap = versus_reference(reference["batches"], _predictions_of(store, reference, cache_dir, policy, device),
                                    cur, view="prediction", categorical=("prediction",), policy=policy)
    return _finish(store, result, snap, batch, reference, report_prefix)


def prediction_drift(store: Storage, batch: str, reference: dict, *, cache_dir, policy: DriftPolicy = DriftPolicy(),
                     device: str = "cpu", report_prefix: str = REPORT_PREFIX) -> DriftResult:
    """Drift of the production model's predicted classes and confidence on the batch against the
    same on the held-out (val/test) shards of its other reference batches: on its own training
    split the model is overconfident, so unseen is compared with unseen. Shards are staged in
    ``cache_dir`` (see pipeline.dataset.stage), the reference predictions cached in storage. A
    window of serving traffic goes to :func:`window_prediction_drift`."""
    from pipeline.dataset import stage

    if is_window(batch):
        return window_prediction_drift(store, batch, reference, cache_dir=cache_dir, policy=policy, device=device,
                                       report_prefix=report_prefix)
    ref_batches = [b for b in reference["batches"] if b != batch]
    if not ref_batches:
        raise DriftError(f"batch {batch!r} is itself the whole reference of "
                         f"{reference['model']}/{reference['version']}")
    module, manifest = _production_module(store, reference)
    cur = prediction_frame(module, stage(store, batch_shard_entries(store, [batch]), cache_dir),
                           _model_view(reference, manifest), max_images=policy.max_rows, device=device)
    result, snap = versus_reference(ref_batches, _predictions_of(store, reference, cache_dir, policy, device), cur,
                                    view="prediction", categorical=("prediction",), policy=policy)
    return _finish(store, result, snap, batch, reference, report_prefix)


def batch_shard_entries(store: Storage, batches: list[str], published: str = "raw/shards") -> list[dict]:
    """The published shard entries (key, sha256, bytes, samples) of ``batches``, for staging."""
    out = []
    for b in batches:
        out.extend({**{k: e[k] for k in ("key", "sha256", "bytes", "samples")}, "labeled": shard_labeled(e)}
                   for e in read_shard_manifest(store, b, published)["shards"])
    return sorted(out, key=lambda e: e["key"])


__all__ = [
    "DriftError", "DriftPolicy", "DriftResult", "batch_image_features", "batch_shard_entries", "compare",
    "image_drift", "image_features", "model_view_features", "prediction_drift", "prediction_frame",
    "production_reference", "reference_predictions", "table_drift", "table_rows", "versus_reference", "window_inputs",
    "window_prediction_drift", "window_predictions", "window_table_drift", "write_report",
]
