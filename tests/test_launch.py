"""Plain Dagster tooling against the code location, for real: `dagster job launch -w workspace.yaml`
queues a run, `dagster-daemon` (started here as a subprocess) dequeues and executes it, and the
run's materializations land on the instance; then `dagster sensor start` switches on the landing
sensor and the same daemon ingests the next batch that lands."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _env(tmp_path) -> dict:
    home = tmp_path / "fl"
    return {**os.environ, "FORGELINE_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home"),
            "PYTHONPATH": str(ROOT)}


def _runs(env: dict) -> list[list]:
    """(job, status, partition, sensor) of every run on the instance, read by a separate client."""
    out = subprocess.run([sys.executable, "-c", (
        "import dagster as dg, json; i = dg.DagsterInstance.get(); "
        "print(json.dumps([(r.job_name, r.status.value, r.tags.get('dagster/partition'), "
        "r.tags.get('dagster/sensor_name')) for r in i.get_runs()]))")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_dagster_job_launch_and_a_sensor_are_executed_by_the_daemon(tmp_path):
    env = _env(tmp_path)
    forgeline = [str(BIN / "forgeline")]
    small = ["gen", "digits", "--batch", "cli-1", "--samples-per-shard", "512"]
    subprocess.run(forgeline + small, env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)
    code = ("import dagster as dg; from assets.partitions import batches; from jobs.runs import ensure_instance_home; "
            "ensure_instance_home(); "  # the instance forgeline's CLI would create (dagster.yaml, pools)

            "dg.DagsterInstance.get().add_dynamic_partitions(batches.name, ['cli-1'])")
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, timeout=120)

    launch = subprocess.run(
        [str(BIN / "dagster"), "job", "launch", "-w", "workspace.yaml", "-j", "ingest",
         "--tags", json.dumps({"dagster/partition": "cli-1"})],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert launch.returncode == 0, launch.stdout + launch.stderr

    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        status, deadline = None, time.monotonic() + 300
        while time.monotonic() < deadline:
            runs = _runs(env)
            assert len(runs) == 1 and runs[0][0] == "ingest" and runs[0][2] == "cli-1", runs
            status = runs[0][1]
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            time.sleep(2)
        assert status == "SUCCESS", f"run ended {status}; daemon log:\n" + (tmp_path / "daemon.log").read_text()[-3000:]

        # the landing sensor under the same daemon: a new batch lands, the sensor is switched on
        # with Dagster's CLI, and only the new batch is ingested (cli-1 is already materialized)
        subprocess.run(forgeline + ["gen", "digits", "--batch", "cli-2", "--samples-per-shard", "512"], env=env,
                       cwd=ROOT, check=True, capture_output=True, timeout=120)
        start = subprocess.run([str(BIN / "dagster"), "sensor", "start", "incoming_batches", "-w", "workspace.yaml"],
                               env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, start.stdout + start.stderr
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            runs = _runs(env)
            done = [r for r in runs if r[2] == "cli-2" and r[1] in ("SUCCESS", "FAILURE", "CANCELED")]
            if done:
                break
            time.sleep(2)
        assert sorted((r[0], r[2], r[1]) for r in runs) == [("ingest", "cli-1", "SUCCESS"), ("ingest", "cli-2", "SUCCESS")], \
            f"{runs}; daemon log:\n" + (tmp_path / "daemon.log").read_text()[-3000:]
        assert [r[3] for r in runs if r[2] == "cli-2"] == ["incoming_batches"]
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
        log.close()

    manifest = Path(env["FORGELINE_HOME"]) / "storage" / "raw" / "shards" / "cli-1" / "manifest.json"
    assert json.loads(manifest.read_text())["samples"] == 1797
