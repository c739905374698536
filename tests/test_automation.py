"""Automation on a real Dagster instance: the drift checks through Dagster, the retrain-on-drift
sensor, the nightly schedules, the run-failure sensor, and the landing sensor on S3."""

import json
import re
from datetime import datetime, timezone

import dagster as dg
import pytest

from assets.drift import image_drift, prediction_drift, table_drift
from assets.ingest import raw_shards, raw_table
from assets.partitions import batches
from jobs import automation
from jobs.automation import build_schedules, drift_retrain, record_run_failure
from jobs.definitions import defs
from jobs.ingest import incoming_batches
from pipeline import datagen
from resources.storage import LocalStorageResource, S3StorageResource

CHECKS = [table_drift, image_drift, prediction_drift]


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture(scope="module")
def checked(drift_world):
    """The drift checks run through Dagster on the fresh and the shifted batch (one instance)."""
    storage = LocalStorageResource(root=str(drift_world["store"].root), fsync=False)
    with dg.instance_for_test() as inst:
        results = {}
        for batch in ("fresh", "shifted"):
            inst.add_dynamic_partitions(batches.name, [batch])
            res = dg.materialize([raw_shards, raw_table, *CHECKS], partition_key=batch, instance=inst,
                                 resources={"storage": storage})
            assert res.success
            results[batch] = {e.check_name: e for e in res.get_asset_check_evaluations()}
        yield {"instance": inst, "storage": storage, "results": results, **drift_world}


def test_drift_checks_pass_on_fresh_data_and_fail_at_error_on_shifted(checked):
    fresh, shifted = checked["results"]["fresh"], checked["results"]["shifted"]
    for name in ("table_drift", "image_drift", "prediction_drift"):
        assert fresh[name].passed, (name, fresh[name].metadata.get("drifted"))
        assert not shifted[name].passed and shifted[name].severity == dg.AssetCheckSeverity.ERROR, name
    md = shifted["image_drift"].metadata
    assert md["drift_share"].value >= 0.5 and md["columns"].value == 4
    assert md["score/brightness"].value < 0.05  # KS p-value: the brightness shift is unmistakable
    report = md["report"].value
    assert report.endswith(".html") and open(report, "rb").read(200).lower().count(b"html")
    assert md["reference"].value["version"] == checked["version"]


def test_checks_pass_with_a_reason_when_there_is_no_reference(tmp_path, instance):
    storage = LocalStorageResource(root=str(tmp_path / "s"), fsync=False)
    datagen.write_batch(storage.client(), "incoming/first", datagen.load_digits())
    instance.add_dynamic_partitions(batches.name, ["first"])
    res = dg.materialize([raw_shards, raw_table, *CHECKS], partition_key="first", instance=instance,
                         resources={"storage": storage})
    evals = {e.check_name: e for e in res.get_asset_check_evaluations()}
    for name in ("table_drift", "image_drift", "prediction_drift"):
        assert evals[name].passed
        assert "no published version of 'digits'" in evals[name].metadata["reference"].value


def test_drift_at_error_requests_one_retrain(checked):
    inst, storage = checked["instance"], checked["storage"]
    ctx = dg.build_sensor_context(instance=inst, resources={"storage": storage})
    out = drift_retrain(ctx)
    assert len(out.run_requests) == 1
    req = out.run_requests[0]
    assert req.tags["forgeline/trigger"] == "drift"
    assert "image_drift@shifted" in req.tags["forgeline/drift"] and "fresh" not in req.tags["forgeline/drift"]
    # the next tick with the advanced cursor sees nothing new: no second retrain for the same drift
    again = drift_retrain(dg.build_sensor_context(instance=inst, cursor=out.cursor, resources={"storage": storage}))
    assert not again.run_requests and "no new drift failure" in again.skip_reason.skip_message
    # the run key is stable, so even a reset cursor cannot make Dagster launch it twice
    assert drift_retrain(dg.build_sensor_context(instance=inst, resources={"storage": storage})).run_requests[0].run_key == req.run_key


def test_a_check_still_running_at_a_tick_is_not_skipped(checked, monkeypatch):
    """A tick while a drift check is still running (planned, its run going): the cursor stops
    before it, so its failure, which keeps the record's id, is seen on the next tick."""
    inst, storage = checked["instance"], checked["storage"]
    store = inst.event_log_storage
    real = store.get_asset_check_execution_history
    records = sorted((r for key in automation.DRIFT_CHECK_KEYS for r in real(key, limit=200)), key=lambda r: r.id)
    planned = next(r for r in records if r.partition == "shifted")  # the first of the shifted batch's checks
    running = planned._replace(status=planned.status.__class__("PLANNED"), run_id="still-running")

    class Going:
        is_finished = False

    monkeypatch.setattr(store, "get_asset_check_execution_history",
                        lambda key, limit: [running if r.id == planned.id else r for r in real(key, limit=limit)])
    real_run = inst.get_run_by_id
    monkeypatch.setattr(inst, "get_run_by_id", lambda rid: Going() if rid == "still-running" else real_run(rid))
    first = drift_retrain(dg.build_sensor_context(instance=inst, resources={"storage": storage}))
    assert not first.run_requests and int(first.cursor) == max(r.id for r in records if r.id < planned.id)

    monkeypatch.setattr(store, "get_asset_check_execution_history", real)  # the check has failed since
    second = drift_retrain(dg.build_sensor_context(instance=inst, cursor=first.cursor, resources={"storage": storage}))
    assert len(second.run_requests) == 1 and int(second.cursor) == records[-1].id
    assert {"table_drift@shifted", "image_drift@shifted", "prediction_drift@shifted"} == set(
        second.run_requests[0].tags["forgeline/drift"].split(","))


def test_no_retrain_when_the_production_model_already_has_the_drifted_batch(checked, tmp_path):
    from pipeline import export, models, promotion

    store = LocalStorageResource(root=str(tmp_path / "s"), fsync=False)
    m = export.export(export.from_module(models.build_model("digits_cnn", width=4), architecture="digits_cnn",
                                         model_kwargs={"width": 4}), store.client(), "digits",
                      metadata={"spec": checked["spec"], "dataset": {"version": "x", "batches": ["ref", "shifted"]}})
    promotion.promote(store.client(), "digits", m["version"])
    out = drift_retrain(dg.build_sensor_context(instance=checked["instance"], resources={"storage": store}))
    assert not out.run_requests and "already in the production model" in out.skip_reason.skip_message


def test_schedules_have_explicit_timezone_and_configurable_cron(monkeypatch):
    monkeypatch.setenv("FORGELINE_RETRAIN_CRON", "30 4 * * 1-5")
    monkeypatch.setenv("FORGELINE_TIMEZONE", "Europe/Berlin")
    s = {x.name: x for x in build_schedules()}
    assert s["nightly_retrain"].cron_schedule == "30 4 * * 1-5"
    assert s["nightly_ingest"].cron_schedule == "0 1 * * *"
    assert {x.execution_timezone for x in s.values()} == {"Europe/Berlin"}
    assert {x.job_name for x in s.values()} == {"ingest", "train_and_package"}
    monkeypatch.setenv("FORGELINE_RETRAIN_CRON", "every night")
    with pytest.raises(automation.AutomationConfigError, match="FORGELINE_RETRAIN_CRON='every night'"):
        build_schedules()
    monkeypatch.delenv("FORGELINE_RETRAIN_CRON")
    monkeypatch.setenv("FORGELINE_TIMEZONE", "Mars/Olympus")
    with pytest.raises(automation.AutomationConfigError, match="FORGELINE_TIMEZONE"):
        build_schedules()


def test_nightly_ingest_requests_each_landed_batch_once(tmp_path, instance):
    storage = LocalStorageResource(root=str(tmp_path / "s"), fsync=False)
    nightly_ingest = {x.name: x for x in build_schedules()}["nightly_ingest"]
    when = datetime(2026, 11, 23, 1, 0, tzinfo=timezone.utc)
    ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=when, resources={"storage": storage},
                                    repository_def=defs.get_repository_def())
    assert isinstance(nightly_ingest.evaluate_tick(ctx).skip_message, str)  # nothing landed yet
    datagen.write_batch(storage.client(), "incoming/night-1", datagen.load_digits())
    datagen.write_batch(storage.client(), "incoming/unready", datagen.load_digits())
    storage.client().delete("incoming/unready/_READY")  # still being written
    reqs = nightly_ingest.evaluate_tick(ctx).run_requests
    assert [(r.partition_key, r.run_key) for r in reqs] == [("night-1", "ingest:night-1")]
    assert instance.get_dynamic_partitions(batches.name) == ["night-1"]
    res = dg.materialize([raw_shards, raw_table], partition_key="night-1", instance=instance,
                         resources={"storage": storage})
    assert res.success
    assert nightly_ingest.evaluate_tick(ctx).run_requests == []  # ingested: not requested again


def test_nightly_retrain_skips_when_production_already_has_the_data(checked, instance, monkeypatch):
    nightly_retrain = {x.name: x for x in build_schedules()}["nightly_retrain"]
    storage = checked["storage"]
    when = datetime(2026, 11, 23, 3, 0, tzinfo=timezone.utc)
    ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=when, resources={"storage": storage},
                                    repository_def=defs.get_repository_def())
    # three batches are ingested, the production model was trained on one of them: retrain
    reqs = nightly_retrain.evaluate_tick(ctx).run_requests
    assert len(reqs) == 1 and reqs[0].tags["forgeline/trigger"] == "schedule"
    from pipeline import dataset as ds

    monkeypatch.setattr(automation.drift, "production_reference",
                        lambda store, model: {"model": model, "version": "v", "batches": [],
                                              "data_version": ds.collect(store)["version"]})
    assert "trained on the current data" in nightly_retrain.evaluate_tick(ctx).skip_message


def test_run_failure_sensor_records_the_failed_step(tmp_path, instance):
    storage = LocalStorageResource(root=str(tmp_path / "s"), fsync=False)
    datagen.write_batch(storage.client(), "incoming/bad", datagen.load_digits())
    storage.client().write_atomic("incoming/bad/table.parquet", b"PAR1 this is not parquet")
    instance.add_dynamic_partitions(batches.name, ["bad"])
    job = defs.resolve_job_def("ingest")
    res = job.execute_in_process(partition_key="bad", instance=instance, raise_on_error=False,
                                 resources={"storage": storage})
    assert not res.success
    failure = next(e for e in res.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE)
    ctx = dg.build_run_status_sensor_context(sensor_name="record_run_failure", dagster_instance=instance,
                                             dagster_run=res.dagster_run, dagster_event=failure,
                                             resources={"storage": storage}).for_run_failure()
    record_run_failure(ctx)
    rec = json.loads(storage.client().read(f"runs/failures/{res.run_id}.json"))
    assert rec["job"] == "ingest" and rec["partition"] == "bad"
    assert rec["failed_steps"] == ["raw_table"]
    assert "incoming/bad/table.parquet" in rec["steps"][0]["error"]
    assert rec["summary"].startswith("step raw_table: IngestError: ") and "table.parquet" in rec["summary"]


def test_landing_sensor_on_s3_requests_each_batch_once(s3_server, s3_credentials, s3_storage_factory, instance):
    store = s3_storage_factory()
    resource = S3StorageResource(bucket=store.bucket, prefix=store.prefix, endpoint_url=s3_server,
                                 region_name="us-east-1", **s3_credentials)
    small = datagen.load_digits()
    small = datagen.Digits(small.images[:60], small.labels[:60], small.splits[:60], small.ids[:60])
    datagen.write_batch(store, "incoming/s3-a", small)
    ctx = dg.build_sensor_context(instance=instance, resources={"storage": resource})
    first = incoming_batches(ctx)
    assert [(r.partition_key, r.run_key) for r in first.run_requests] == [("s3-a", "ingest:s3-a")]
    assert first.dynamic_partitions_requests[0].partition_keys == ["s3-a"]
    datagen.write_batch(store, "incoming/s3-b", small)
    second = incoming_batches(dg.build_sensor_context(instance=instance, cursor=first.cursor,
                                                      resources={"storage": resource}))
    assert [r.partition_key for r in second.run_requests] == ["s3-b"]  # s3-a is not requested again
    third = incoming_batches(dg.build_sensor_context(instance=instance, cursor=second.cursor,
                                                     resources={"storage": resource}))
    assert isinstance(third, dg.SkipReason)


def test_definitions_carry_the_automation():
    assert {s.name for s in defs.schedules} == {"nightly_ingest", "nightly_retrain"}
    assert {"drift_retrain", "retrain_retry", "record_run_failure", "incoming_batches",
            "new_model_version"} <= {s.name for s in defs.sensors}


# ---------------------------------------------------------------------------------------------
# retrain_retry: a failed automatic retrain is requested again, with backoff, a bounded number of times
# ---------------------------------------------------------------------------------------------


def _train_and_package_run(instance, tags: dict, *, fails: str | None = "boom") -> str:
    """A finished run of a job named ``train_and_package``: failed with ``fails`` as its error,
    stopped by a failing blocking check (``fails="gate"``), failed in a step after a failing check
    that blocks nothing (``"check"``), or succeeded (``None``)."""
    if fails in ("gate", "check"):
        spec = dg.AssetCheckSpec("not_worse_than_production", asset="exported_model", blocking=fails == "gate")

        @dg.asset(name="exported_model", check_specs=[spec])
        def exported():
            yield dg.Output(1)
            yield dg.AssetCheckResult(check_name="not_worse_than_production", passed=False,
                                      description="accuracy 0.50 against production's 0.90")

        @dg.asset(name="promoted_model", deps=["exported_model"])
        def promoted():
            raise RuntimeError("rollout timed out")

        job = dg.Definitions(assets=[exported, promoted], jobs=[dg.define_asset_job("train_and_package")]
                             ).resolve_job_def("train_and_package")
    else:
        @dg.op(name="trained_model")
        def step():
            if fails:
                raise RuntimeError(fails)

        @dg.job(name="train_and_package")
        def job():
            step()
    return job.execute_in_process(instance=instance, tags=tags, raise_on_error=False).run_id


def _retry(instance, storage):
    return automation.retrain_retry(dg.build_sensor_context(instance=instance, resources={"storage": storage}))


def test_a_failed_automatic_retrain_is_requested_again_after_its_backoff(checked, instance, monkeypatch):
    storage = checked["storage"]
    assert "no train_and_package run yet" in _retry(instance, storage).skip_message
    first = _train_and_package_run(instance, {"forgeline/trigger": "drift", "forgeline/drift": "image_drift@shifted",
                                              "dagster/run_key": "retrain-on-drift:7"})
    # production (trained on `ref`) lacks the ingested `fresh` and `shifted`: the retrain is still needed
    assert re.search(r"attempt 1 of 3: requesting it again in (59\d|600) s$", _retry(instance, storage).skip_message)
    monkeypatch.setattr(automation, "RETRY_BACKOFF_S", 0)
    req = _retry(instance, storage)
    assert req.run_key == "retrain-on-drift:7:attempt-2"
    assert req.tags == {"forgeline/trigger": "drift", "forgeline/drift": "image_drift@shifted",
                        "forgeline/attempt": "2", "forgeline/retry_of": "retrain-on-drift:7"}
    assert first not in req.run_key

    # the second attempt fails too: the third keeps the first request's key; the backoff doubles
    _train_and_package_run(instance, {**req.tags, "dagster/run_key": req.run_key})
    monkeypatch.setattr(automation, "RETRY_BACKOFF_S", 1000)
    assert re.search(r"attempt 2 of 3: requesting it again in (199\d|2000) s$", _retry(instance, storage).skip_message)
    monkeypatch.setattr(automation, "RETRY_BACKOFF_S", 0)
    third = _retry(instance, storage)
    assert third.run_key == "retrain-on-drift:7:attempt-3" and third.tags["forgeline/attempt"] == "3"

    # the third failure is the last (FORGELINE_RETRAIN_ATTEMPTS=3): left alone, saying why
    _train_and_package_run(instance, {**third.tags, "dagster/run_key": third.run_key}, fails="store unreachable")
    last = _retry(instance, storage).skip_message
    last_run = instance.get_runs(limit=1)[0].run_id
    assert f"attempt 3 of FORGELINE_RETRAIN_ATTEMPTS=3: not requested again (run {last_run}: its event log" in last
    monkeypatch.setenv("FORGELINE_RETRAIN_ATTEMPTS", "4")
    assert _retry(instance, storage).run_key == "retrain-on-drift:7:attempt-4"


def test_no_retry_for_a_success_a_manual_run_a_gate_or_data_production_has(checked, instance, monkeypatch):
    storage = checked["storage"]
    monkeypatch.setattr(automation, "RETRY_BACKOFF_S", 0)
    _train_and_package_run(instance, {}, fails=None)
    assert "none of the last 50 train_and_package runs was requested by the automation" in \
        _retry(instance, storage).skip_message
    _train_and_package_run(instance, {"forgeline/trigger": "schedule"}, fails=None)
    assert "is SUCCESS: nothing to retry" in _retry(instance, storage).skip_message
    _train_and_package_run(instance, {})  # a failed hand run is not retried...
    assert "is SUCCESS: nothing to retry" in _retry(instance, storage).skip_message
    _train_and_package_run(instance, {"forgeline/trigger": "schedule"}, fails="gate")
    gate = _retry(instance, storage).skip_message
    assert "stopped by a gate (exported_model:not_worse_than_production failed (accuracy 0.50" in gate
    assert "not requested again" in gate
    _train_and_package_run(instance, {"forgeline/trigger": "schedule", "dagster/run_key": "retrain:x"}, fails="check")
    assert _retry(instance, storage).run_key == "retrain:x:attempt-2"  # a failed check that stopped nothing

    auto = _train_and_package_run(instance, {"forgeline/trigger": "schedule", "dagster/run_key": "retrain:dv",
                                             "forgeline/data_version": "dv"})
    assert _retry(instance, storage).run_key == "retrain:dv:attempt-2"
    # ...and neither a later hand run, failed or canceled, nor a re-execution of the automatic run
    # from the UI (which copies its tags) ends the automatic chain or counts as its attempt
    _train_and_package_run(instance, {})
    _train_and_package_run(instance, {"forgeline/trigger": "schedule", "dagster/run_key": "retrain:dv",
                                      "dagster/parent_run_id": auto})
    req = _retry(instance, storage)
    assert req.run_key == "retrain:dv:attempt-2" and "forgeline/data_version" not in req.tags  # it may be stale
    going = instance.add_run(dg.DagsterRun(job_name="train_and_package", run_id="a-run-going",
                                           status=dg.DagsterRunStatus.STARTED))
    assert f"train_and_package run {going.run_id[:8]} is STARTED: nothing is requested while one goes" in \
        _retry(instance, storage).skip_message
    instance.report_run_canceled(going)
    from pipeline import dataset as ds

    monkeypatch.setattr(automation.drift, "production_reference",
                        lambda store, model: {"model": model, "version": "v9", "batches": [],
                                              "data_version": ds.collect(store)["version"]})
    assert "digits/v9 is trained on the current data" in _retry(instance, storage).skip_message


def test_a_bad_retrain_attempts_setting_is_named(monkeypatch):
    from pipeline import settings

    for bad in ("0", "three", "-1"):
        monkeypatch.setenv("FORGELINE_RETRAIN_ATTEMPTS", bad)
        with pytest.raises(settings.SettingError, match="FORGELINE_RETRAIN_ATTEMPTS"):
            settings.check()


def test_checks_say_which_reference_batch_a_batch_is_like(drift_world, tmp_path, instance):
    """Production retrained on a clean and a shifted batch: a new clean batch passes every drift
    check against the clean batch, and the check says so, with what the whole reference gave."""
    import shutil

    from pipeline import export, promotion

    shutil.copytree(drift_world["store"].root, tmp_path / "store")
    storage = LocalStorageResource(root=str(tmp_path / "store"), fsync=False)
    store = storage.client()
    base = export.read_manifest(store, "digits", drift_world["version"])
    m = export.export(export.load_state_dict(store, "digits", drift_world["version"]), store, "digits",
                      config=base["config"], metadata={"spec": drift_world["spec"],
                                                       "dataset": {"version": "mix", "batches": ["ref", "shifted"]}})
    promotion.promote(store, "digits", m["version"])
    instance.add_dynamic_partitions(batches.name, ["fresh"])
    res = dg.materialize([raw_shards, raw_table, *CHECKS], partition_key="fresh", instance=instance,
                         resources={"storage": storage})
    evals = [e for e in res.get_asset_check_evaluations() if e.check_name in automation.DRIFT_CHECKS]
    assert len(evals) == 3
    for e in evals:
        assert e.passed, (e.check_name, e.description)
        assert f"against digits/{m['version']}'s batch ref (against all 2 of its batches at once: " in e.description
        assert e.metadata["matched_batch"].value == "ref" and e.metadata["whole_reference_share"].value >= 0.5
