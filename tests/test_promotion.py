"""Promotion, for real on local storage: the production alias and its history, rollback, refusals
(missing, incomplete, rejected, failed gates), a quantization variant rejected by its gate never
resolving as latest, and the ``promoted_model`` asset moving the alias only past the blocking gates."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import torch

from pipeline import export as ex
from pipeline import models, package, promotion
from pipeline.evaluate import EvalResult
from pipeline.promotion import PromotionError
from pipeline.storage import join

MODEL = "digits"
KW = {"width": 4}


def publish(store, version: str, seed: int = 0, model: str = MODEL) -> dict:
    torch.manual_seed(seed)
    module = models.build_model("digits_cnn", **KW).eval()
    golden = ex.golden_outputs(module, ex.golden_input((1, 28, 28)))
    return ex.export(ex.from_module(module, architecture="digits_cnn", model_kwargs=KW), store, model, version,
                     golden=golden)


def test_promote_rollback_history(local_storage):
    store = local_storage
    assert promotion.production(store, MODEL) is None and promotion.history(store, MODEL) == []
    with pytest.raises(PromotionError, match="nothing has been promoted"):
        promotion.resolve(store, MODEL, "production")
    publish(store, "v1", 1)
    publish(store, "v2", 2)

    first = promotion.promote(store, MODEL, "v1", run_id="r1", gates={"g": {"passed": True, "value": 0.1, "limit": 1}},
                              reason="first")
    assert first["previous"] is None and first["version"] == "v1" and first["model"] == MODEL
    with pytest.raises(PromotionError, match="no previous version"):
        promotion.rollback(store, MODEL)
    second = promotion.promote(store, MODEL, "v2", run_id="r2")
    assert second["previous"] == "v1"
    assert promotion.production(store, MODEL) == second
    assert json.loads(store.read(f"models/{MODEL}/production")) == second  # the alias object itself
    assert set(second) == {"model", "version", "promoted_at", "run_id", "gates", "previous", "reason"}
    assert second["promoted_at"].endswith("+00:00")
    assert promotion.resolve(store, MODEL, "production") == "v2"

    back = promotion.rollback(store, MODEL)
    assert (back["version"], back["previous"]) == ("v1", "v2") and "rollback" in back["reason"]
    assert promotion.resolve(store, MODEL, "production") == "v1"
    assert promotion.resolve(store, MODEL, "latest") == "v2"  # newest, whatever production is
    assert promotion.resolve(store, MODEL, "v2") == "v2"
    assert [h["version"] for h in promotion.history(store, MODEL)] == ["v1", "v2", "v1"]
    assert promotion.history(store, MODEL)[0]["gates"] == {"g": {"passed": True, "value": 0.1, "limit": 1}}
    # the alias and history sit beside the versions without being taken for one
    assert ex.list_versions(store, MODEL) == ["v1", "v2"]
    with pytest.raises(ValueError, match="references, not versions"):
        ex.export({"w": torch.ones(2)}, store, MODEL, "production")


def test_promote_refuses_missing_incomplete_rejected_and_failed_gates(local_storage):
    store = local_storage
    with pytest.raises(PromotionError, match=r"digits/nope.*no such published version"):
        promotion.promote(store, MODEL, "nope")
    m = publish(store, "broken")
    store.delete(join(ex.version_prefix(MODEL, "broken"), m["shards"][0]["file"]))
    with pytest.raises(PromotionError, match=r"digits/broken.*missing"):
        promotion.promote(store, MODEL, "broken")
    assert ex.latest_version(store, MODEL) is None  # incomplete: never latest either

    publish(store, "ok")
    with pytest.raises(PromotionError, match=r"digits/ok: gate\(s\) failed: accuracy_gate"):
        promotion.promote(store, MODEL, "ok", gates={"accuracy_gate": {"passed": False, "value": 3.0, "limit": 2.0}})
    assert promotion.production(store, MODEL) is None
    promotion.promote(store, MODEL, "ok")

    publish(store, "bad")
    ex.record_gates(store, MODEL, "bad", {"accuracy_gate": {"passed": False, "value": 3.0, "limit": 2.0}})
    with pytest.raises(PromotionError, match=r"digits/bad is rejected: failed gate\(s\): accuracy_gate"):
        promotion.promote(store, MODEL, "bad")
    assert promotion.resolve(store, MODEL, "production") == "ok"


def test_gate_failed_variant_is_rejected_never_latest_never_promoted(local_storage, monkeypatch):
    store = local_storage
    publish(store, "v1")
    accuracy = {"digits": 0.9, "digits-int8": 0.899, "digits-int4": 0.80}  # int4 drops 10 points

    def fake_evaluate(module, shards, spec):
        return EvalResult(accuracy[fake_evaluate.next.pop(0)], 0.0, 100)

    fake_evaluate.next = ["digits", "digits-int8", "digits-int4"]
    monkeypatch.setattr(package, "evaluate", fake_evaluate)
    result = package.quantize_and_gate(store, MODEL, "v1", [], {}, schemes=["int8", "int4"],
                                       max_drop_points={"int8": 0.5, "int4": 2.0})
    assert [f.split(":")[0] for f in result["failures"]] == ["int4"]
    assert result["gates"]["accuracy_gate.int8"]["passed"] and not result["gates"]["accuracy_gate.int4"]["passed"]

    int4 = ex.read_manifest(store, "digits-int4", "v1")
    assert int4["gates"]["accuracy_gate"]["limit"] == 2.0 and "accuracy_gate" in int4["rejected"]["reason"]
    assert "rejected" not in ex.read_manifest(store, "digits-int8", "v1")
    assert ex.verify(store, "digits-int4", "v1") == []  # only the manifest was rewritten
    assert ex.list_versions(store, "digits-int4") == ["v1"] and ex.latest_version(store, "digits-int4") is None
    assert ex.version_problem(store, "digits-int4", "v1", allow_rejected=True) is None
    with pytest.raises(PromotionError, match="no complete, non-rejected"):
        promotion.resolve(store, "digits-int4", "latest")
    with pytest.raises(PromotionError, match="rejected"):
        promotion.promote(store, "digits-int4", "v1")
    assert promotion.resolve(store, "digits-int8", "latest") == "v1"
    promotion.promote(store, "digits-int8", "v1")

    # each variant records its own golden outputs: the dequantized model on the base's input
    base_golden = ex.read_golden(store, MODEL, "v1")
    for name in ("digits-int8", "digits-int4"):
        golden = ex.read_golden(store, name, "v1")
        assert torch.equal(golden["input"], base_golden["input"])
        want = package.load_quantized_module(store, name, "v1")(golden["input"])
        assert torch.equal(golden["output"], want.detach())


# ---------------------------------------------------------------------------------------------
# The promoted_model asset, behind the blocking checks
# ---------------------------------------------------------------------------------------------


def _upstream(store, version: str, gate_passes: bool) -> list:
    """Stand-ins for ``exported_model``/``quantized_model`` (same keys, same blocking checks)
    over really published versions, so ``promoted_model`` runs as in the lifecycle."""
    pubs = {s: package.publish_quantized(store, MODEL, version, s) for s in ("int8", "int4")}
    gates = {f"accuracy_gate.{s}": {"passed": s == "int8" or gate_passes, "value": 1.0, "limit": 2.0 if gate_passes else 0.5}
             for s in pubs}
    for s in pubs:
        ex.record_gates(store, package.quantized_name(MODEL, s), version, {"accuracy_gate": gates[f"accuracy_gate.{s}"]})

    @dg.asset(name="exported_model", check_specs=[dg.AssetCheckSpec("loads_back_bit_exact", asset="exported_model",
                                                                    blocking=True)])
    def exported_model():
        yield dg.Output({"model": MODEL, "version": version,
                         "gates": {"loads_back_bit_exact": {"passed": True, "value": 0, "limit": 0}}})
        yield dg.AssetCheckResult(check_name="loads_back_bit_exact", passed=True)

    @dg.asset(name="quantized_model", check_specs=[dg.AssetCheckSpec("accuracy_gate", asset="quantized_model",
                                                                     blocking=True)])
    def quantized_model(exported_model: dict):
        variants = {s: {"model": p["manifest"]["model"], "version": version} for s, p in pubs.items()}
        yield dg.Output({"base": {"model": MODEL, "version": version}, "variants": variants, "gates": gates})
        yield dg.AssetCheckResult(check_name="accuracy_gate", passed=gate_passes)

    return [exported_model, quantized_model]


def test_promoted_model_moves_the_alias_only_past_the_gates(tmp_path):
    from assets.package import promoted_model
    from resources.storage import LocalStorageResource

    storage = LocalStorageResource(root=str(tmp_path / "store"))
    store = storage.client()
    publish(store, "v1", 1)
    publish(store, "v2", 2)

    with dg.instance_for_test() as instance:
        ok = dg.materialize([*_upstream(store, "v1", True), promoted_model], instance=instance,
                            resources={"storage": storage})
        assert ok.success
        md = ok.asset_materializations_for_node("promoted_model")[0].metadata
        assert md["version"].value == "v1" and md["previous"].value == ""
        prod = promotion.production(store, MODEL)
        assert prod["version"] == "v1" and prod["run_id"] == ok.run_id
        assert set(prod["gates"]) == {"loads_back_bit_exact", "accuracy_gate.int8", "accuracy_gate.int4"}
        assert promotion.resolve(store, "digits-int4", "production") == "v1"

        failed = dg.materialize([*_upstream(store, "v2", False), promoted_model], instance=instance,
                                resources={"storage": storage}, raise_on_error=False)
        assert not failed.success
        assert not failed.asset_materializations_for_node("promoted_model")
        assert promotion.resolve(store, MODEL, "production") == "v1"  # production stays where it was
        assert promotion.resolve(store, "digits-int4", "production") == "v1"
        assert [h["version"] for h in promotion.history(store, MODEL)] == ["v1"]
        assert ex.latest_version(store, "digits-int4") == "v1"  # v2's int4 was rejected


# ---------------------------------------------------------------------------------------------
# Champion and challenger: a new version is not promoted when it came out worse than production
# ---------------------------------------------------------------------------------------------


def _world_copy(drift_world, tmp_path):
    """A private copy of the drift world's store (so promotions here cannot move the shared
    fixture's alias) whose production version ``good`` is a small CNN trained for 10 epochs on
    the digits (~0.9 held-out accuracy). Returns the store, the dataset, the test shards and the
    trained module."""
    import shutil

    from pipeline import dataset as ds
    from pipeline.storage import LocalStorage
    from tests.conftest import _train_small_cnn

    shutil.copytree(drift_world["store"].root, tmp_path / "store")
    store = LocalStorage(tmp_path / "store", fsync=False)
    data = ds.collect(store, batches=["ref", "fresh"])
    test = ds.stage(store, data["splits"]["test"], tmp_path / "cache")
    trained = _train_small_cnn(ds.stage(store, data["splits"]["train"], tmp_path / "cache"), drift_world["spec"], 10)
    _publish_module(store, trained, "good", drift_world["spec"])
    promotion.promote(store, MODEL, "good")
    return store, data, test, trained


def _publish_module(store, module, version, spec):
    from tests.conftest import DRIFT_MODEL_KW

    return ex.export(ex.from_module(module, architecture="digits_cnn", model_kwargs=DRIFT_MODEL_KW), store, MODEL,
                     version, metadata={"spec": spec})


def test_a_version_worse_than_production_fails_the_gate_a_better_one_passes(drift_world, tmp_path):
    from pipeline.evaluate import evaluate
    from tests.conftest import DRIFT_MODEL_KW

    store, _, test, trained = _world_copy(drift_world, tmp_path)
    spec, prod = drift_world["spec"], "good"
    torch.manual_seed(3)
    _publish_module(store, models.build_model("digits_cnn", **DRIFT_MODEL_KW).eval(), "untrained", spec)

    worse = package.compare_with_production(store, MODEL, "untrained", test, spec, max_regression_points=1.0)
    good = evaluate(trained, test, spec)
    assert not worse["passed"] and worse["production_version"] == prod and worse["limit"] == 1.0
    assert worse["production_accuracy"] == good.accuracy > 0.85 and worse["accuracy"] < 0.5
    assert worse["value"] == pytest.approx(100 * (good.accuracy - worse["accuracy"]))
    assert worse["samples"] == good.samples
    assert f"digits/untrained: accuracy {worse['accuracy']:.4f} against production {prod}'s" in worse["reason"]
    assert "points below it (limit 1.0)" in worse["reason"]
    # recorded: the version that lost is rejected, never latest nor promotable
    assert ex.read_manifest(store, MODEL, "untrained")["gates"]["not_worse_than_production"]["value"] == worse["value"]
    assert promotion.resolve(store, MODEL, "latest") == prod
    with pytest.raises(PromotionError, match=r"rejected: failed gate\(s\): not_worse_than_production"):
        promotion.promote(store, MODEL, "untrained")

    # the same weights re-published are not worse: 0 points; a limit past the drop lets it through
    _publish_module(store, trained, "same", spec)
    same = package.compare_with_production(store, MODEL, "same", test, spec, max_regression_points=0.0)
    assert same["passed"] and same["value"] == 0.0 and same["accuracy"] == same["production_accuracy"]
    assert package.compare_with_production(store, MODEL, "untrained", test, spec, max_regression_points=100.0)["passed"]
    assert "rejected" not in ex.read_manifest(store, MODEL, "untrained")  # a comparison it passes clears the mark

    # each model is evaluated under its own preprocessing: the same weights under another
    # normalisation score lower, and production is still measured under its own spec
    skewed = {**spec, "mean": [0.9], "std": [0.1]}
    _publish_module(store, trained, "skewed", skewed)
    other = package.compare_with_production(store, MODEL, "skewed", test, skewed, max_regression_points=1.0)
    assert other["production_accuracy"] == good.accuracy and other["accuracy"] < good.accuracy - 0.1
    assert not other["passed"]

    # a better version passes with a negative drop
    promotion.promote(store, MODEL, "untrained")
    better = package.compare_with_production(store, MODEL, "same", test, spec, max_regression_points=0.0)
    assert better["passed"] and better["value"] < -30 and better["production_version"] == "untrained"


def test_nothing_to_compare_passes_and_says_why(drift_world, tmp_path):
    store, _, test, trained = _world_copy(drift_world, tmp_path)
    spec, prod = drift_world["spec"], "good"
    itself = package.compare_with_production(store, MODEL, prod, test, spec, max_regression_points=0.0)
    assert itself["passed"] and itself["reason"] == f"digits/{prod} is the production version"

    _publish_module(store, trained, "new", spec)
    shard = store.root / "models" / MODEL / prod / ex.read_manifest(store, MODEL, prod)["shards"][0]["file"]
    healthy = shard.read_bytes()
    shard.write_bytes(healthy[:-4] + bytes(4))  # same size, other bytes: production's weights are damaged
    damaged = package.compare_with_production(store, MODEL, "new", test, spec, max_regression_points=0.0)
    assert damaged["passed"] and damaged["accuracy"] is None
    assert damaged["reason"].startswith(f"nothing to compare against: production digits/{prod} cannot be loaded: ")
    shard.write_bytes(healthy)
    ex.record_gates(store, MODEL, prod, {"manual": {"passed": False, "value": 1, "limit": 0}})  # production rejected
    gone = package.compare_with_production(store, MODEL, "new", test, spec, max_regression_points=0.0)
    assert gone["passed"] and gone["accuracy"] is None
    assert gone["reason"].startswith(f"nothing to compare against: digits/production is {prod}, which is not servable")

    store.delete(f"models/{MODEL}/production")
    for o in store.list(f"models/{MODEL}/promotions"):
        store.delete(o.key)
    never = package.compare_with_production(store, MODEL, "new", test, spec, max_regression_points=0.0)
    assert never["passed"] and never["reason"] == "digits has no production version yet: nothing to compare against"


def test_exported_model_blocks_a_worse_retrain_and_production_stays(drift_world, tmp_path):
    """The real ``exported_model`` asset on a checkpoint that came out worse than production:
    its blocking check fails, nothing downstream runs, the alias does not move; the same run with
    the production weights passes and promotes."""
    import hashlib

    from assets.package import exported_model, promoted_model, quantized_model
    from pipeline.train import checkpoints
    from resources.storage import LocalStorageResource
    from tests.conftest import DRIFT_MODEL_KW

    store, data, _, trained = _world_copy(drift_world, tmp_path)
    storage = LocalStorageResource(root=str(tmp_path / "store"))
    prod = "good"

    def stand_in(module, name):
        state = {"format": checkpoints.CHECKPOINT_FORMAT, "epoch": 1, "model": module.state_dict(),
                 "optimizer": {"state": {}, "param_groups": []}, "history": "[]"}
        key = checkpoints.save_checkpoint(store, f"checkpoints/{name}", state, keep=1)

        @dg.asset(name="trained_model")
        def trained_model() -> dict:
            return {"model": {"name": "digits_cnn", "kwargs": DRIFT_MODEL_KW}, "checkpoint": key,
                    "checkpoint_sha256": hashlib.sha256(store.read(key)).hexdigest(), "spec": drift_world["spec"],
                    "dataset": data, "run_id": name, "dataset_version": data["version"]}
        return trained_model

    torch.manual_seed(5)
    untrained = models.build_model("digits_cnn", **DRIFT_MODEL_KW).eval()
    with dg.instance_for_test() as instance:
        run = dg.materialize([stand_in(untrained, "worse"), exported_model, quantized_model, promoted_model],
                             instance=instance, resources={"storage": storage}, raise_on_error=False)
        assert not run.success
        evals = {e.check_name: e for e in run.get_asset_check_evaluations()}
        assert evals["loads_back_bit_exact"].passed and not evals["not_worse_than_production"].passed
        gate = evals["not_worse_than_production"]
        assert "points below it (limit 1.0)" in gate.description and prod in gate.description
        assert gate.metadata["production_version"].value == prod and gate.metadata["points_below"].value > 1.0
        assert not run.asset_materializations_for_node("promoted_model")
        assert not run.asset_materializations_for_node("quantized_model")
        assert promotion.production(store, MODEL)["version"] == prod
        worse = run.asset_materializations_for_node("exported_model")[0].metadata["version"].value
        assert "not_worse_than_production" in ex.read_manifest(store, MODEL, worse)["rejected"]["reason"]

        ok = dg.materialize([stand_in(trained, "same"), exported_model, quantized_model, promoted_model],
                            instance=instance, resources={"storage": storage}, raise_on_error=False)
        assert ok.success
        new = ok.asset_materializations_for_node("exported_model")[0].metadata["version"].value
        record = promotion.production(store, MODEL)
        assert record["version"] == new != prod and record["previous"] == prod
        assert record["gates"]["not_worse_than_production"]["passed"]
        assert record["gates"]["not_worse_than_production"]["production_version"] == prod
