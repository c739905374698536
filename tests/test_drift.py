"""Drift detection on real data (the digits): a fresh held-out half of the original data must not
be flagged, the shifted half must be — for the table, the image features and the production
model's predictions; Evidently's HTML report lands in storage."""

import numpy as np
import polars as pl
import pytest

from pipeline import drift
from pipeline.storage import LocalStorage


@pytest.fixture(scope="module")
def world(drift_world):
    return {**drift_world, "ref": drift.production_reference(drift_world["store"], "digits")}


def test_reference_is_what_the_production_model_was_trained_on(world):
    ref = world["ref"]
    assert ref["model"] == "digits" and ref["version"] == world["version"]
    assert ref["batches"] == ["ref"] and ref["spec"]["crop"] == 28


def test_no_reference_before_anything_is_published(tmp_path):
    assert drift.production_reference(LocalStorage(tmp_path), "digits") is None


@pytest.mark.parametrize("method", [None, "wasserstein"])
def test_table_drift_flags_shifted_batch_not_fresh_one(world, method):
    store, ref = world["store"], world["ref"]
    policy = drift.DriftPolicy(method=method)
    fresh = drift.table_drift(store, "fresh", ref, policy=policy)
    shifted = drift.table_drift(store, "shifted", ref, policy=policy)
    assert fresh.verdict == "ok" and fresh.share < policy.warn_share, fresh.drifted
    assert shifted.verdict == "error" and shifted.share >= 0.9
    assert "label" not in shifted.drifted  # the shift changes pixels, not the classes
    assert fresh.columns == shifted.columns == 65  # 64 pixels + label; id and split are not features
    assert fresh.rows_reference == shifted.rows_reference == 898


def test_table_drift_over_chosen_columns(world):
    store, ref = world["store"], world["ref"]
    r = drift.table_drift(store, "shifted", ref, columns=["px_27", "px_36", "label"])
    assert r.columns == 3 and set(r.drifted) == {"px_27", "px_36"}
    with pytest.raises(drift.DriftError, match=r"columns \['nope'\] are not in both tables"):
        drift.table_drift(store, "shifted", ref, columns=["px_27", "nope"])


def test_image_feature_drift_flags_shifted_batch_not_fresh_one(world):
    store, ref = world["store"], world["ref"]
    fresh = drift.image_drift(store, "fresh", ref)
    shifted = drift.image_drift(store, "shifted", ref)
    assert fresh.verdict == "ok" and fresh.drifted == []
    assert shifted.verdict == "error"
    assert {"brightness", "contrast", "entropy"} <= set(shifted.drifted)
    assert set(fresh.scores) == {"brightness", "contrast", "entropy", "label"}


def test_prediction_drift_flags_shifted_batch_not_fresh_one(world):
    store, ref = world["store"], world["ref"]
    out = {batch: drift.prediction_drift(store, batch, ref, cache_dir=world["cache"]) for batch in ("fresh", "shifted")}
    assert out["fresh"].verdict == "ok", out["fresh"].scores
    assert out["shifted"].verdict == "error" and "confidence" in out["shifted"].drifted, out["shifted"].scores


def test_a_batch_like_one_reference_batch_is_not_drift_against_a_mixed_reference(world):
    """A model retrained on clean and shifted batches has learnt both: a clean batch differs from
    that mixture as a whole (every table column), but is like its clean batch, so it is not drift.
    A shifted batch is unlike every clean reference batch and stays drift."""
    store = world["store"]
    mixed = {**world["ref"], "batches": ["ref", "shifted"]}
    for check in (drift.table_drift, drift.image_drift, drift.prediction_drift):
        r = check(store, "fresh", mixed, cache_dir=world["cache"])
        assert r.verdict == "ok" and r.matched == "ref", (check.__name__, r.share)
        assert r.whole["verdict"] != "ok" and r.whole["share"] > r.share, (check.__name__, r.whole)
        assert r.reference["batches"] == ["ref", "shifted"]
    clean = {**world["ref"], "batches": ["ref", "fresh"]}
    for check in (drift.table_drift, drift.image_drift, drift.prediction_drift):
        r = check(store, "shifted", clean, cache_dir=world["cache"])
        assert r.verdict == "error" and r.matched is None and r.whole is None, check.__name__


def test_report_is_evidently_html_in_storage(world):
    store, ref = world["store"], world["ref"]
    r = drift.table_drift(store, "shifted", ref)
    assert r.report_key == f"reports/drift/shifted/table-vs-digits-{world['version']}.html"
    html = store.read(r.report_key)
    assert html.lstrip().lower().startswith(b"<!doctype html") or b"<html" in html[:2000].lower()
    assert b"drift" in html.lower() and b"px_36" in html and len(html) > 10_000  # per-column content
    assert not [o.key for o in store.list("reports") if ".tmp" in o.key]  # published atomically


def test_image_features_are_computed_per_image():
    gray = np.zeros((4, 4, 1), np.uint8)
    half = np.concatenate([np.zeros((4, 2, 1), np.uint8), np.full((4, 2, 1), 255, np.uint8)], axis=1)
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0] = 255
    f = drift.image_features([gray, half], [3, 7])
    assert f.columns == ["brightness", "contrast", "entropy", "label"]
    assert f["brightness"].to_list() == [0.0, 0.5]
    assert f["contrast"].to_list() == [0.0, 0.5]
    assert f["entropy"].to_list() == [0.0, 1.0]  # one value: 0 bits; two equally likely values: 1 bit
    assert f["label"].to_list() == [3, 7]
    c = drift.image_features([rgb], [0])
    assert c.row(0, named=True) | {} == {"brightness": pytest.approx(1 / 3), "contrast": pytest.approx(c["contrast"][0]),
                                         "entropy": pytest.approx(c["entropy"][0]), "mean_c0": 1.0, "mean_c1": 0.0,
                                         "mean_c2": 0.0, "label": 0}


def test_features_of_a_batch_are_cached_by_content(world):
    store = world["store"]
    first = drift.batch_image_features(store, "fresh")
    cached = [o.key for o in store.list(drift.FEATURE_CACHE) if o.key.split("/")[-1].startswith("fresh-")]
    assert len(cached) == 1
    assert drift.batch_image_features(store, "fresh").equals(first)


def test_bad_inputs_are_clear_errors():
    a = pl.DataFrame({"x": [1.0, 2.0, 3.0]})
    with pytest.raises(drift.DriftError, match="share no feature columns"):
        drift.compare(a, pl.DataFrame({"y": [1.0]}), view="table")
    with pytest.raises(drift.DriftError, match="nothing to compare"):
        drift.compare(a, a.clear(), view="table")
    with pytest.raises(ValueError, match="warn_share"):
        drift.DriftPolicy(warn_share=0.6, error_share=0.5)
    with pytest.raises(drift.DriftError, match="mix channel counts"):
        drift.image_features([np.zeros((2, 2, 1), np.uint8), np.zeros((2, 2, 3), np.uint8)], [0, 1])


def test_model_without_training_batches_in_its_manifest_is_a_clear_error(tmp_path):
    from pipeline import export, models, promotion

    store = LocalStorage(tmp_path)
    old = export.export(export.from_module(models.build_model("digits_cnn", width=4), architecture="digits_cnn",
                                           model_kwargs={"width": 4}), store, "old")
    promotion.promote(store, "old", old["version"])
    with pytest.raises(drift.DriftError, match="does not say which batches"):
        drift.production_reference(store, "old")


def _frame(rng, shifted: list[int], rows: int = 300) -> pl.DataFrame:
    return pl.DataFrame({f"x{i}": rng.normal(3.0 if i in shifted else 0.0, 1.0, rows) for i in range(5)})


def test_versus_reference_tries_the_newest_batches_in_natural_order_and_keeps_the_closest():
    rng = np.random.default_rng(0)
    frames = {f"day-{i}": _frame(rng, []) for i in range(1, 10)} | {"day-10": _frame(rng, [0, 1, 2, 3, 4])}
    tried = []

    def frame_of(batches):
        tried.append(batches)
        return pl.concat([frames[b] for b in batches])

    r, _ = drift.versus_reference(list(frames), frame_of, frames["day-10"].clone(), view="table")
    assert r.verdict == "ok" and r.matched == "day-10" and r.whole["verdict"] == "error"  # day-10 sorts last
    assert tried[1] == ["day-10"] and len(tried) == 2  # nothing drifted against it: no need to try more
    assert drift.natural_order(["day-10", "day-2", "day-1"]) == ["day-1", "day-2", "day-10"]

    # like no batch: the closest one decides when it is better than the whole (warn, not error)...
    two = {"a": _frame(rng, []), "b": _frame(rng, [0, 1, 2, 3, 4])}
    half = two["a"].with_columns(two["b"]["x0"], two["b"]["x1"])  # two columns of b, three of a
    r, _ = drift.versus_reference(["a", "b"], lambda bs: pl.concat([two[b] for b in bs]), half, view="table")
    assert r.verdict == "warn" and r.matched == "a" and sorted(r.drifted) == ["x0", "x1"]
    assert r.whole["verdict"] == "error"
    # ...and a batch unlike every one stays drift against the whole; too small batches are not tried alone
    far = _frame(rng, [0, 1, 2, 3, 4]).with_columns(pl.all() * -5)
    r, _ = drift.versus_reference(["a", "b"], lambda bs: pl.concat([two[b] for b in bs]), far, view="table")
    assert r.verdict == "error" and r.matched is None and r.whole is None
    def broken(bs):
        if bs == ["a"]:
            raise drift.DriftError("batch 'a' alone has no view")
        return pl.concat([two[b] for b in bs])

    r, _ = drift.versus_reference(["a", "b"], broken, half, view="table")  # a batch that cannot be seen alone
    assert r.verdict == "error" and r.matched is None  # b alone is no closer; a is skipped, not an error
    small = {"a": _frame(rng, [], rows=50), "b": two["b"]}
    r, _ = drift.versus_reference(["a", "b"], lambda bs: pl.concat([small[b] for b in bs]), _frame(rng, []),
                                  view="table")
    assert r.matched is None and r.verdict != "ok"
