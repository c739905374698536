"""Automation that closes the loop: nightly schedules for ingestion and retraining, the sensor that
retrains when a drift check fails at ERROR, the sensor that requests a failed automatic retrain
again (with backoff, a bounded number of times), and the sensor that records every failed run.

Schedules are built from the environment (``build_schedules``) so the cron strings and timezone are
deployment settings, not code: FORGELINE_INGEST_CRON (default ``0 1 * * *``), FORGELINE_RETRAIN_CRON
(``0 3 * * *``), FORGELINE_TIMEZONE (``UTC``; always explicit, never the server's local zone).
"""

import json
import time
from typing import Optional

import dagster as dg
from dagster._utils.schedules import is_valid_cron_string  # Dagster's own parser (not re-exported)

from assets.drift import DRIFT_CHECKS
from assets.partitions import batches
from jobs.ingest import INCOMING, pending_batches
from jobs.runs import failure_cause, run_failure
from pipeline import dataset as ds
from pipeline import drift, settings
from pipeline.serving.traffic import is_window
from resources.storage import StorageResource

FAILURES_PREFIX = "runs/failures"
TRIGGER_TAG, ATTEMPT_TAG, RETRY_OF_TAG = "forgeline/trigger", "forgeline/attempt", "forgeline/retry_of"
RETRY_BACKOFF_S = 600  # the first re-request waits this long after the failure, each further one twice as long
RETRY_LOOKBACK = 50  # train_and_package runs searched for the newest automatic one
GOING = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
         dg.DagsterRunStatus.CANCELING]
DRIFT_CHECK_KEYS = [
    dg.AssetCheckKey(dg.AssetKey("raw_table" if name == "table_drift" else "raw_shards"), name) for name in DRIFT_CHECKS
]


class AutomationConfigError(settings.SettingError):
    """A schedule setting from the environment is invalid (the message names the variable)."""


def _cron(var: str, default: str) -> str:
    value = settings.cron(var, default)
    if not is_valid_cron_string(value):  # Dagster's own parser: what the daemon will accept
        raise AutomationConfigError(f"{var}={value!r} is not a valid cron expression (e.g. '0 3 * * *')")
    return value


def _timezone() -> str:
    try:
        return settings.timezone()
    except settings.SettingError as e:
        raise AutomationConfigError(str(e)) from None


def build_schedules() -> list[dg.ScheduleDefinition]:
    """The nightly ingest and retrain schedules, with cron and timezone from the environment."""
    tz = _timezone()

    @dg.schedule(job_name="ingest", cron_schedule=_cron("FORGELINE_INGEST_CRON", "0 1 * * *"),
                 execution_timezone=tz, name="nightly_ingest",
                 description="Ingests every landed (_READY) batch that has not been ingested yet, one run per "
                             "batch (run_key per batch: a batch is never ingested twice by the schedule).")
    def nightly_ingest(context: dg.ScheduleEvaluationContext, storage: StorageResource):
        todo = pending_batches(context.instance, storage)
        if not todo:
            return dg.SkipReason(f"no landed batch waiting under {INCOMING}/")
        # schedules cannot return partition requests (sensors can); adding is idempotent
        context.instance.add_dynamic_partitions(batches.name, todo)
        return [dg.RunRequest(partition_key=b, run_key=f"ingest:{b}") for b in todo]

    @dg.schedule(job_name="train_and_package", cron_schedule=_cron("FORGELINE_RETRAIN_CRON", "0 3 * * *"),
                 execution_timezone=tz, name="nightly_retrain",
                 description="Retrains and repackages when the ingested data differs from what the production "
                             "model was trained on; skips otherwise (no new version for the same data).")
    def nightly_retrain(context: dg.ScheduleEvaluationContext, storage: StorageResource):
        store = storage.client()
        try:
            data_version = ds.collect(store)["version"]
        except ValueError as e:  # nothing ingested yet
            return dg.SkipReason(str(e))
        model = settings.model_name()
        ref = drift.production_reference(store, model)
        if ref is not None and ref["data_version"] == data_version:
            return dg.SkipReason(f"{model}/{ref['version']} was trained on the current data ({data_version})")
        return dg.RunRequest(run_key=f"retrain:{data_version}", tags={"forgeline/trigger": "schedule",
                                                                       "forgeline/data_version": data_version})

    return [nightly_ingest, nightly_retrain]


def _automatic(run) -> bool:
    """Requested by the automation (a sensor or schedule set ``forgeline/trigger``), not launched
    or re-executed by hand (a re-execution copies its parent's tags, and names its parent)."""
    return TRIGGER_TAG in run.tags and "dagster/parent_run_id" not in run.tags


def _running(instance, record) -> bool:
    """A check evaluation still to come: planned, and its run has not finished."""
    if record.status.value != "PLANNED":
        return False
    run = instance.get_run_by_id(record.run_id)
    return run is not None and not run.is_finished


def _evaluation(record) -> Optional[dg.AssetCheckEvaluation]:
    ev = record.event.dagster_event if record.event else None
    return ev.event_specific_data if ev is not None else None


@dg.sensor(job_name="train_and_package", minimum_interval_seconds=60,
           description="Requests `train_and_package` when a drift check (table_drift, image_drift, prediction_drift) "
                       "fails at ERROR on a batch the production model was not trained on. One run per failing "
                       "check evaluation batch (run_key), cursor = last evaluation seen; when only windows of "
                       "serving traffic (unlabeled) drifted, one run per labeled data version.")
def drift_retrain(context: dg.SensorEvaluationContext, storage: StorageResource):
    cursor = int(context.cursor or 0)
    new = []
    for key in DRIFT_CHECK_KEYS:
        for rec in context.instance.event_log_storage.get_asset_check_execution_history(key, limit=200):
            if rec.id <= cursor:
                break  # newest first: everything further down was seen on an earlier tick
            new.append((rec, key))
    # The cursor never passes a check still running: its record keeps its id when it later fails,
    # so a cursor past it would never see that failure. Later records wait for it.
    seen, triggers = cursor, []
    for rec, key in sorted(new, key=lambda rk: rk[0].id):
        if _running(context.instance, rec):
            break
        seen = rec.id
        ev = _evaluation(rec)
        if rec.status.value == "FAILED" and ev is not None and ev.severity == dg.AssetCheckSeverity.ERROR:
            triggers.append((rec, key))
    if not triggers:
        return dg.SensorResult(skip_reason=dg.SkipReason("no new drift failure at ERROR"), cursor=str(seen))
    ref = drift.production_reference(storage.client(), settings.model_name())
    trained_on = set(ref["batches"]) if ref else set()
    fresh = [(r, k) for r, k in triggers if r.partition not in trained_on]  # already retrained on that batch
    if not fresh:
        return dg.SensorResult(skip_reason=dg.SkipReason("drifted batches are already in the production model"),
                               cursor=str(seen))
    newest = max(r.id for r, _ in fresh)
    what = sorted({f"{k.name}@{r.partition}" for r, k in fresh})
    run_key, tags = f"retrain-on-drift:{newest}", {"forgeline/trigger": "drift", "forgeline/drift": ",".join(what)[:200]}
    if all(is_window(r.partition or "") for r, _ in fresh):
        # Only production traffic drifted. Traffic is unlabeled, so the retrain can only use the labeled
        # batches available: one retrain per labeled data version (run_key), not one per drifting window.
        try:
            data_version = ds.collect(storage.client())["version"]
        except ValueError as e:  # nothing labeled ingested
            return dg.SensorResult(skip_reason=dg.SkipReason(f"traffic drifted ({', '.join(what)}) but {e}"),
                                   cursor=str(seen))
        run_key = f"retrain-on-drift:traffic:{data_version}"
        tags |= {"forgeline/trigger": "drift-traffic", "forgeline/data_version": data_version}
    context.log.info(f"drift at ERROR: {', '.join(what)} → requesting train_and_package")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=run_key, tags=tags)], cursor=str(seen))


@dg.sensor(job_name="train_and_package", minimum_interval_seconds=60,
           description="Requests `train_and_package` again when its newest automatic run (drift or schedule) "
                       "FAILED, none is going, and the production model is still not trained on the ingested "
                       "data: after 10 min, then 20, 40, ... up to FORGELINE_RETRAIN_ATTEMPTS runs in all "
                       "(default 3). Not for a run stopped by a gate (the same data gives the same verdict) or "
                       "canceled; runs launched or re-executed by hand are not attempts.")
def retrain_retry(context: dg.SensorEvaluationContext, storage: StorageResource):
    going = context.instance.get_runs(filters=dg.RunsFilter(job_name="train_and_package", statuses=GOING), limit=1)
    if going:
        return dg.SkipReason(f"train_and_package run {going[0].run_id[:8]} is {going[0].status.value}: "
                             "nothing is requested while one goes")
    recent = context.instance.get_runs(filters=dg.RunsFilter(job_name="train_and_package"), limit=RETRY_LOOKBACK)
    # Launched by hand runs (and re-executions from the UI, which copy the tags) neither retry nor
    # end the automation's chain of attempts: the newest automatic run decides.
    run = next((r for r in recent if _automatic(r)), None)
    if run is None:
        return dg.SkipReason(f"none of the last {RETRY_LOOKBACK} train_and_package runs was requested by the "
                             "automation" if recent else "no train_and_package run yet")
    what = f"the newest automatic train_and_package run ({run.run_id[:8]})"
    if run.status != dg.DagsterRunStatus.FAILURE:
        return dg.SkipReason(f"{what} is {run.status.value}: nothing to retry")
    attempt, attempts = int(run.tags.get(ATTEMPT_TAG, "1")), settings.retrain_attempts()
    if attempt >= attempts:  # not re-reading its event log every tick: the UI shows why it failed
        return dg.SkipReason(f"{what} failed on attempt {attempt} of FORGELINE_RETRAIN_ATTEMPTS={attempts}: "
                             f"not requested again (run {run.run_id}: its event log says why)")
    cause, gates = failure_cause(context.instance, run.run_id)
    if gates:
        return dg.SkipReason(f"{what} was stopped by a gate ({'; '.join(gates)}): the same data gives the "
                             "same verdict, so it is not requested again")
    store = storage.client()
    try:
        data_version = ds.collect(store)["version"]
    except ValueError as e:  # the ingested data was withdrawn since
        return dg.SkipReason(f"{what} failed, but {e}")
    model = settings.model_name()
    ref = drift.production_reference(store, model)
    if ref is not None and ref["data_version"] == data_version:
        return dg.SkipReason(f"{what} failed, but {model}/{ref['version']} is trained on the current data "
                             f"({data_version}) since: nothing to retry")
    record = context.instance.get_run_record_by_id(run.run_id)
    ended = record.end_time if record is not None and record.end_time else time.time()
    wait = RETRY_BACKOFF_S * 2 ** (attempt - 1) - (time.time() - ended)
    if wait > 0:
        return dg.SkipReason(f"{what} failed on attempt {attempt} of {attempts}: requesting it again in {wait:.0f} s")
    base = run.tags.get(RETRY_OF_TAG) or run.tags.get("dagster/run_key") or run.run_id
    # the data version it was asked for may be stale: the retrain takes the data ingested now
    tags = {k: v for k, v in run.tags.items() if k.startswith("forgeline/") and k != "forgeline/data_version"}
    tags |= {ATTEMPT_TAG: str(attempt + 1), RETRY_OF_TAG: base}
    context.log.info(f"{what} failed ({cause}): requesting attempt {attempt + 1} of {attempts}")
    return dg.RunRequest(run_key=f"{base}:attempt-{attempt + 1}", tags=tags)


@dg.run_failure_sensor(name="record_run_failure", minimum_interval_seconds=30,
                       description="Writes every failed run's job, partition, failing steps and errors to "
                                   f"storage under {FAILURES_PREFIX}/<run_id>.json (and the sensor's log).")
def record_run_failure(context: dg.RunFailureSensorContext, storage: StorageResource):
    run = context.dagster_run
    steps = []
    for e in context.get_step_failure_events():
        err = getattr(e.event_specific_data, "error", None)
        chain = []
        while err is not None:  # Dagster wraps the real error ("Error occurred while executing op"): keep causes
            chain.append(err.message.strip())
            err = err.cause
        steps.append({"step": e.step_key, "error": chain[-1] if chain else e.message, "chain": chain})
    record = {
        "run_id": run.run_id,
        "job": run.job_name,
        "partition": run.tags.get("dagster/partition"),
        "tags": {k: v for k, v in run.tags.items() if k.startswith("forgeline/")},
        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "failed_steps": [s["step"] for s in steps],
        "steps": steps,
        "message": context.failure_event.message,
        # the CLI's one line: the first failed step's root cause, or the blocking check that stopped
        # it and what that check found (a gate's own error names only the check)
        "summary": run_failure(context.instance, run.run_id),
    }
    key = f"{FAILURES_PREFIX}/{run.run_id}.json"
    storage.client().write_atomic(key, json.dumps(record, indent=1).encode())
    context.log.info(f"run {run.run_id} ({run.job_name}) failed in {record['failed_steps'] or 'no step'}: "
                     f"recorded at {storage.client().uri(key)}")
