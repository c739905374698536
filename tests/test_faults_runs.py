"""Faults a user meets in the first hour, runs and messages: a run killed hard does not block the
next one, Ctrl-C cancels a training launch and leaves no rank behind, run config is validated
before anything runs, CLI misuse is one line, and a failed run prints its root cause."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest

from jobs.cli import main
from jobs.runs import UserError, ensure_instance_home, reap_stale_runs, validate_run_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TRACEBACK = "Traceback (most recent call last)"


def _env_vars(home: Path) -> dict:
    return {"FORGELINE_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home")}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh project home (instance + local storage) for in-process CLI calls."""
    h = tmp_path / "fl"
    for k, v in _env_vars(h).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FORGELINE_DEBUG", raising=False)
    return h


def _land(batch: str, *, drop_column: str | None = None) -> None:
    """Land a small digits batch under incoming/<batch>/ (optionally with a table column missing)."""
    import io

    import polars as pl

    from pipeline import datagen
    from pipeline.storage import configured, join

    store = configured()
    prefix = join("incoming", batch)
    datagen.write_batch(store, prefix, datagen.load_digits(), samples_per_shard=1024)
    if drop_column:
        key = join(prefix, "table.parquet")
        frame = pl.read_parquet(io.BytesIO(store.read(key))).drop(drop_column)
        buf = io.BytesIO()
        frame.write_parquet(buf)
        store.write_atomic(key, buf.getvalue())


def _err_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------
# Run config: validated before any process starts, errors name the field
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op, field, value, words", [
    ("trained_model", "epochs", 0, "greater than or equal to 1"),
    ("trained_model", "batch_size", 0, "greater than or equal to 1"),
    ("trained_model", "lr", 0, "greater than 0"),
    ("trained_model", "amp", "fp8", "not in enum"),
    ("trained_model", "model", "vgg", "not in enum"),
    ("compile_artifacts", "mode", "fastest", "not in enum"),
    ("exported_model", "dtype", "int3", "bfloat16"),
    ("quantized_model", "schemes", ["int3"], "int8, int4"),
    ("quantized_model", "max_drop_int8", -1, "greater than or equal to 0"),
    ("raw_shards_image_drift", "warn_share", 2, "less than or equal to 1"),
    ("raw_shards", "workers", -1, "greater than or equal to 0"),
    ("shm_prewarm", "quantized", ["fp4"], "int8, int4"),
])
def test_bad_run_config_names_the_field(op, field, value, words):
    from jobs.definitions import defs

    job = defs.resolve_job_def("lifecycle")
    with pytest.raises(UserError) as e:
        validate_run_config(job, {"ops": {op: {"config": {field: value}}}})
    assert f"{op}.{field}" in str(e.value) and words in str(e.value), str(e.value)
    validate_run_config(job, {})  # the defaults are valid


def test_model_choices_are_the_registry():
    from typing import get_args

    from assets.train import TrainingConfig
    from pipeline.models import REGISTRY

    assert set(get_args(TrainingConfig.model_fields["model"].annotation)) == set(REGISTRY)


def test_bad_run_config_in_the_cli_runs_nothing(home, capsys):
    bad = json.dumps({"ops": {"trained_model": {"config": {"epochs": 0}}}})
    assert main(["launch", "train_and_package", "-c", bad]) == 1
    err = _err_lines(capsys)
    assert len(err) == 1 and "trained_model.epochs" in err[0], err
    assert dg.DagsterInstance.get().get_runs() == []  # no run was even created


# ---------------------------------------------------------------------------------------------
# Messages: one line per user error, the traceback only with --debug
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (["launch", "nope"], "unknown job 'nope'"),
    (["launch", "ingest"], "pass --partition"),
    (["launch", "train_and_package", "-p", "b"], "not partitioned"),
    (["launch", "ingest", "-p", "b", "-c", "{bad"], "not valid YAML/JSON"),
    (["launch", "ingest", "-p", "b", "-c", "missing.yaml"], "no such file"),
    (["launch", "ingest", "-p", "b", "-c", "[1, 2]"], "no such file"),
    (["launch", "ingest", "-p", "b", "-c", '{"ops": {"raw_shards": {"config": {"nope": 1}}}}'], "nope"),
    (["launch", "ingest", "-p", "never-landed"], "never-landed"),
])
def test_cli_misuse_is_one_line(home, capsys, argv, words):
    assert main(argv) != 0
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("forgeline") and words in err[0], err


@pytest.mark.parametrize("argv, words", [
    (["bogus"], "invalid choice"), (["launch"], "required"), (["gen", "digits"], "--batch"),
    (["launch", "ingest", "--oops"], "--oops"),
    (["gen", "digits", "--batch", "b", "--samples-per-shard", "0"], "argument --samples-per-shard: must be positive"),
    (["gen", "digits", "--batch", "b", "--image-size", "-3"], "argument --image-size: must be positive"),
    (["gen", "synthetic", "--batch", "b", "--size", "0"], "argument --size: not a positive size"),
    (["ui", "--port", "70000"], "argument --port: not a port"),
])
def test_argparse_misuse_is_one_line(home, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "usage:" not in err[0] and words in err[0], err


def test_debug_shows_the_traceback(home, monkeypatch):
    with pytest.raises(UserError):
        main(["--debug", "launch", "nope"])
    monkeypatch.setenv("FORGELINE_DEBUG", "1")
    with pytest.raises(UserError):
        main(["launch", "nope"])


@pytest.mark.parametrize("env, argv, words", [
    ({"FORGELINE_GPUS_PER_RUN": "lots"}, ["launch", "ingest", "-p", "b"], "FORGELINE_GPUS_PER_RUN"),
    ({"FORGELINE_S3_BUCKET": "b", "FORGELINE_S3_ENDPOINT_URL": "localhost:9000"}, ["models", "digits"],
     "FORGELINE_S3_ENDPOINT_URL: 'localhost:9000' has no scheme"),
    ({"FORGELINE_S3_BUCKET": "b", "FORGELINE_S3_ENDPOINT_URL": "ftp://x"}, ["load", "digits/production"],
     "FORGELINE_S3_ENDPOINT_URL: not an http(s) URL: 'ftp://x'"),
    ({"FORGELINE_S3_BUCKET": "s3://bucket/models"}, ["models", "digits"],
     "FORGELINE_S3_BUCKET: 's3://bucket/models' is not a bucket name (name the bucket alone, e.g. 'bucket';"),
    ({"FORGELINE_S3_BUCKET": "My Bucket"}, ["promote", "digits", "v1"], "FORGELINE_S3_BUCKET: 'My Bucket' is not"),
    ({"FORGELINE_S3_BUCKET": "b", "FORGELINE_S3_PREFIX": "a/../b"}, ["models", "digits"],
     "FORGELINE_S3_PREFIX: invalid storage key 'a/../b'"),
    ({"FORGELINE_S3_BUCKET": "b", "FORGELINE_S3_CONCURRENCY": "lots"}, ["models", "digits"],
     "FORGELINE_S3_CONCURRENCY must be an integer, got 'lots'"),
    ({"FORGELINE_S3_BUCKET": "b", "FORGELINE_S3_CONCURRENCY": "64"}, ["load", "digits/production"],
     "FORGELINE_S3_CONCURRENCY=64 must be <= 32"),
    # read when the code location loads, not first by the step that uses them after a training run
    ({"FORGELINE_SERVE_URLS": "ftp://x"}, ["jobs"], "FORGELINE_SERVE_URLS: not an http(s) URL: 'ftp://x'"),
    ({"FORGELINE_REPORTS_URL": "http://:99999"}, ["jobs"], "FORGELINE_REPORTS_URL: not a URL: 'http://:99999'"),
    ({"FORGELINE_COMPILE_CACHE": "redis", "FORGELINE_COMPILE_CACHE_URL": "localhost:6379"}, ["jobs"],
     "FORGELINE_COMPILE_CACHE_URL: not a Redis URL: 'localhost:6379'"),
    ({"FORGELINE_EXECUTOR": "k8s"}, ["jobs"], "FORGELINE_EXECUTOR=k8s runs every step in its own pod, so they need "
                                              "a shared model store"),
    # paths every process must find alike: never relative to the folder one was started in
    ({"FORGELINE_STORAGE_ROOT": "rel/store"}, ["batches"], "FORGELINE_STORAGE_ROOT: 'rel/store' is a relative path"),
    ({"FORGELINE_HOME": "rel-home"}, ["batches"], "FORGELINE_HOME: 'rel-home' is a relative path"),
    ({"DAGSTER_HOME": "rel-dh"}, ["batches"], "DAGSTER_HOME: 'rel-dh' is a relative path"),
    ({"FORGELINE_SHM_ROOT": "rel-shm"}, ["load", "digits/production"], "FORGELINE_SHM_ROOT: 'rel-shm' is a relative"),
], ids=["gpus", "endpoint without scheme", "endpoint not http", "bucket as a URL", "bucket with a space",
        "prefix not normalized", "concurrency not a number", "concurrency past the pool", "serve urls",
        "reports url", "compile cache url", "k8s without a shared store", "relative storage root",
        "relative home", "relative dagster home", "relative shm root"])
def test_a_bad_environment_setting_is_one_line(home, tmp_path, monkeypatch, capsys, env, argv, words):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(argv) == 1
    err = _err_lines(capsys)
    assert len(err) == 1 and words in err[0], err
    assert not list(cwd.iterdir())  # nothing written where it was started


def test_a_failed_ingest_prints_its_root_cause(home, capsys):
    _land("no-label", drop_column="label")
    assert main(["launch", "ingest", "-p", "no-label"]) == 1
    captured = capsys.readouterr()
    last = [ln for ln in captured.err.splitlines() if ln.strip()][-1]
    assert last.startswith("forgeline: run ") and "failed: step raw_table: IngestError:" in last, last
    assert "table.parquet" in last and "'label'" in last, last  # the file and the column
    assert "DagsterExecutionStepExecutionError" not in captured.out + captured.err
    assert TRACEBACK not in captured.out + captured.err


def test_launching_a_new_batch_on_s3_with_credentials_in_the_environment(home, monkeypatch, capsys, s3_storage,
                                                                         s3_server, s3_credentials):
    """`forgeline launch ingest -p <new batch>` on an S3 store configured from the environment: the
    landing check before the partition is added reads the store with the credentials resolved (it
    once signed with the unresolved EnvVar and failed every time)."""
    from pipeline.storage import configured

    for k, v in {"FORGELINE_S3_BUCKET": s3_storage.bucket, "FORGELINE_S3_PREFIX": "lake",
                 "FORGELINE_S3_ENDPOINT_URL": s3_server, "AWS_REGION": "us-east-1",
                 "AWS_ACCESS_KEY_ID": s3_credentials["aws_access_key_id"],
                 "AWS_SECRET_ACCESS_KEY": s3_credentials["aws_secret_access_key"]}.items():
        monkeypatch.setenv(k, v)
    _land("s3-new")
    assert main(["launch", "ingest", "-p", "s3-new"]) == 0, capsys.readouterr().err
    assert configured().exists("raw/shards/s3-new/manifest.json")
    capsys.readouterr()
    assert main(["launch", "ingest", "-p", "s3-not-landed"]) == 1  # the check itself still refuses
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("forgeline: --partition 's3-not-landed': "), err


# ---------------------------------------------------------------------------------------------
# Instance: run monitoring shipped, and added to an instance made before it
# ---------------------------------------------------------------------------------------------


def test_an_invalid_dagster_yaml_is_one_line_naming_it_and_each_entry(home, capsys):
    cfg = home / "dagster_home" / "dagster.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("run_monitoring:\n  enabled: true\nbogus_key: 1\nstorage:\n  sqlite:\n    base_dir: 12\n")
    assert main(["batches"]) == 1
    [err] = [ln for ln in _err_lines(capsys) if "invalid" in ln]
    assert err.startswith(f"forgeline: {cfg}: invalid instance config: ") and '"bogus_key"' in err, err
    assert "root:storage:sqlite:base_dir" in err and "Expected" not in err and len(err) < 400, err


def test_an_existing_dagster_yaml_gets_run_monitoring_added(home, capsys):
    import yaml

    cfg = home / "dagster_home" / "dagster.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("# mine\ntelemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 2\n")
    ensure_instance_home()
    err = _err_lines(capsys)
    assert len(err) == 1 and "run_monitoring" in err[0], err
    data = yaml.safe_load(cfg.read_text())
    assert data["concurrency"]["pools"]["default_limit"] == 2 and cfg.read_text().startswith("# mine")
    assert data["run_monitoring"]["enabled"] is True
    assert dg.DagsterInstance.get().run_monitoring_enabled
    ensure_instance_home()  # already there: nothing more is said or written
    assert _err_lines(capsys) == [] and cfg.read_text().count("run_monitoring:") == 1


def test_a_full_disk_at_the_first_run_leaves_no_instance_file(home, monkeypatch, capsys):
    import yaml

    from tests.test_storage import _disk_full_in_temporaries

    cfg = home / "dagster_home" / "dagster.yaml"
    with monkeypatch.context() as m:
        _disk_full_in_temporaries(m)
        assert main(["batches"]) == 1
    assert _err_lines(capsys) == [f"forgeline: {cfg}: no space left on device"]
    assert not cfg.exists() and not [p for p in cfg.parent.iterdir() if p.is_file()]  # no empty or partial file
    assert main(["batches"]) == 0  # space again: the defaults are written whole
    assert yaml.safe_load(cfg.read_text())["concurrency"]["pools"]["default_limit"] == 1


def test_an_instance_database_that_fails_is_one_line_naming_its_folder_and_room(home, monkeypatch, capsys):
    """SQLite under DAGSTER_HOME failing mid-command (its disk filled after the instance was made:
    "disk I/O error") is one line naming the folder and the room left, not a bare OperationalError."""
    import sqlite3

    import sqlalchemy.exc

    assert main(["batches"]) == 0
    capsys.readouterr()

    def failing(*a, **k):
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError("disk I/O error"))

    monkeypatch.setattr(dg.DagsterInstance, "get", failing)
    assert main(["launch", "ingest", "-p", "b1"]) == 1
    [err] = _err_lines(capsys)
    assert err.startswith(f"forgeline: the Dagster instance in DAGSTER_HOME {home / 'dagster_home'}: SQLite failed "
                          "(disk I/O error); ") and "free on its disk" in err, err


def test_a_home_that_cannot_be_a_folder_is_one_line_naming_it(home, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    monkeypatch.setenv("FORGELINE_HOME", str(a_file))
    monkeypatch.delenv("DAGSTER_HOME")
    assert main(["batches"]) == 1
    assert _err_lines(capsys) == [f"forgeline: FORGELINE_HOME: {a_file} is a file, not a directory"]
    monkeypatch.setenv("FORGELINE_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(a_file))
    assert main(["batches"]) == 1
    assert _err_lines(capsys) == [f"forgeline: DAGSTER_HOME {a_file}: exists and is not a directory"]
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    monkeypatch.setenv("FORGELINE_STORAGE_ROOT", str(a_file))
    assert main(["gen", "digits", "--batch", "b1"]) == 1
    assert _err_lines(capsys) == [f"forgeline: FORGELINE_STORAGE_ROOT: {a_file} is a file, not a directory"]
    monkeypatch.setenv("FORGELINE_STORAGE_ROOT", str(a_file / "store"))
    assert main(["gen", "digits", "--batch", "b1"]) == 1
    assert _err_lines(capsys) == [f"forgeline: FORGELINE_STORAGE_ROOT: {a_file}/store is under the file {a_file}, "
                                  "not a directory"]


def test_an_empty_dagster_yaml_gets_the_defaults(home, capsys):
    import yaml

    cfg = home / "dagster_home" / "dagster.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("\n")  # as an interrupted write left it: not just the run_monitoring block appended
    ensure_instance_home()
    assert _err_lines(capsys) == [f"forgeline: {cfg} was empty: wrote the embedded defaults"]
    data = yaml.safe_load(cfg.read_text())
    assert data["concurrency"]["pools"]["default_limit"] == 1 and data["run_monitoring"]["enabled"] is True


def test_reaper_fails_a_run_whose_process_is_gone_and_frees_its_slot(home):
    ensure_instance_home()
    instance = dg.DagsterInstance.get()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    from jobs.runs import TAG_HOST, TAG_PID, TAG_STARTED

    run = instance.add_run(dg.DagsterRun(
        job_name="train_and_package", run_id="deadbeef-0000-0000-0000-000000000000",
        status=dg.DagsterRunStatus.STARTED,
        tags={TAG_PID: str(dead.pid), TAG_HOST: socket.gethostname(), TAG_STARTED: "1.00"}))
    storage = instance.event_log_storage
    storage.initialize_concurrency_limit_to_default("gpu")
    assert storage.claim_concurrency_slot("gpu", run.run_id, "train").is_claimed
    assert not storage.claim_concurrency_slot("gpu", "next-run", "train").is_claimed  # blocked
    storage.free_concurrency_slot_for_step("next-run", "train")

    notes = reap_stale_runs(instance)
    assert any(run.run_id[:8] in n and "marked failed" in n for n in notes), notes
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert storage.claim_concurrency_slot("gpu", "next-run", "train").is_claimed  # the next one proceeds


# ---------------------------------------------------------------------------------------------
# A run killed hard, then Ctrl-C: real `forgeline launch` processes and torchrun ranks
# ---------------------------------------------------------------------------------------------


def _training_procs(pid: int) -> list[psutil.Process]:
    """torchrun and its ranks under ``pid``."""
    out = []
    try:
        for p in psutil.Process(pid).children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "torch.distributed.run" in cmd or "pipeline.train.worker" in cmd:
                out.append(p)
    except psutil.NoSuchProcess:
        pass
    return out


def _wait_for_ranks(proc: subprocess.Popen, log: Path, timeout: float = 240) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = _training_procs(proc.pid)
        if sum("pipeline.train.worker" in " ".join(p.cmdline()) for p in procs) >= 1:
            return procs
        assert proc.poll() is None, f"launch ended early (rc {proc.returncode}):\n{log.read_text()}"
        time.sleep(0.5)
    raise AssertionError(f"no training ranks started:\n{log.read_text()}")


def _gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def _runs(env: dict) -> list[dict]:
    code = ("import dagster as dg, json; i = dg.DagsterInstance.get(); s = i.event_log_storage; "
            "print(json.dumps({'runs': [[r.run_id, r.job_name, r.status.value] for r in i.get_runs()], "
            "'slots': [c.run_id for k in s.get_concurrency_keys() for c in s.get_concurrency_info(k).claimed_slots]}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_sigkilled_run_does_not_block_the_next_and_ctrl_c_cancels(tmp_path):
    env = {**os.environ, **_env_vars(tmp_path / "fl"), "PYTHONPATH": str(ROOT), "FORGELINE_TRAIN_FAULT": "0:0:0:hang"}
    env.pop("FORGELINE_DEBUG", None)
    forgeline = str(BIN / "forgeline")
    subprocess.run([forgeline, "gen", "digits", "--batch", "b1", "--samples-per-shard", "1024"], env=env, cwd=ROOT,
                   check=True, capture_output=True, timeout=180)
    subprocess.run([forgeline, "launch", "ingest", "-p", "b1"], env=env, cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    launch = [forgeline, "launch", "train_and_package"]

    # 1. a launch killed hard while training holds the GPU pool's slot
    log1 = tmp_path / "launch1.log"
    with open(log1, "w") as out:
        first = subprocess.Popen(launch, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        ranks = _wait_for_ranks(first, log1)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        assert not _gone(ranks, 30), "torchrun or a rank outlived the SIGKILLed launch"
    finally:
        for p in _training_procs(first.pid):
            p.kill()
    state = _runs(env)
    killed = [r for r in state["runs"] if r[1] == "train_and_package"]
    assert [r[2] for r in killed] == ["STARTED"] and killed[0][0] in state["slots"]  # stale: it would block

    # 2. the next launch fails the stale run, frees its slot and trains; then Ctrl-C cancels it
    log2 = tmp_path / "launch2.log"
    with open(log2, "w") as out, open(tmp_path / "launch2.err", "w") as err:
        # Ctrl-C as at a terminal, even when this suite runs as a background job (`make test &`
        # in a script), whose children inherit SIGINT ignored and so never see KeyboardInterrupt
        second = subprocess.Popen(launch, env=env, cwd=ROOT, stdout=out, stderr=err,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ranks = _wait_for_ranks(second, log2)
        second.send_signal(signal.SIGINT)
        rc = second.wait(90)
    finally:
        if second.poll() is None:
            second.kill()
    err_lines = [ln for ln in (tmp_path / "launch2.err").read_text().splitlines() if ln.strip()]
    assert any(killed[0][0][:8] in ln and "marked failed" in ln for ln in err_lines), err_lines
    assert rc == 130, (rc, err_lines, log2.read_text()[-3000:])
    assert err_lines[-1].startswith("forgeline: run ") and "canceled" in err_lines[-1], err_lines
    assert not any(TRACEBACK in ln for ln in err_lines) and TRACEBACK not in log2.read_text()
    assert not _gone(ranks, 15), "torchrun or a rank outlived the canceled launch"
    state = _runs(env)
    statuses = [r[2] for r in state["runs"] if r[1] == "train_and_package"]
    assert sorted(statuses) == ["CANCELED", "FAILURE"], state
    assert state["slots"] == [], state
