"""The asset graph is a contract: this snapshot (keys, deps, partitions, checks, jobs, schedules,
sensors) changes only deliberately. Update it with FORGELINE_UPDATE_SNAPSHOTS=1 make test."""

import json
import os
import subprocess
import sys
from pathlib import Path

from jobs.definitions import defs

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"
ROOT = Path(__file__).resolve().parent.parent


def graph_snapshot(d) -> dict:
    graph = d.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "deps": sorted(p.to_user_string() for p in node.parent_keys),
            "partitions": getattr(node.partitions_def, "name", None) or (type(node.partitions_def).__name__ if node.partitions_def else None),
            "kinds": sorted(node.kinds),
        }
    checks = sorted(
        f"{ck.asset_key.to_user_string()}:{ck.name}" for ck in graph.asset_check_keys
    )
    jobs = {
        j.name: {"assets": sorted(j.graph.node_names()), "partitions": getattr(j.partitions_def, "name", None)}
        for j in d.resolve_all_job_defs()
        if not j.name.startswith("__")
    }
    schedules = {s.name: {"cron": s.cron_schedule, "job": s.job_name, "timezone": s.execution_timezone}
                 for s in (d.schedules or [])}
    sensors = {s.name: {"jobs": sorted(t.job_name for t in s.targets), "min_interval_s": s.minimum_interval_seconds}
               for s in (d.sensors or [])}
    return {"assets": assets, "checks": checks, "jobs": jobs, "schedules": schedules, "sensors": sensors}


def test_asset_graph_matches_snapshot():
    snap = graph_snapshot(defs)
    if os.environ.get("FORGELINE_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(snap, indent=2, sort_keys=True) + "\n")
    assert snap == json.loads(SNAPSHOT.read_text()), "graph changed: review, then FORGELINE_UPDATE_SNAPSHOTS=1"


def test_workspace_loads_with_dagster_cli(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    dagster = Path(sys.executable).with_name("dagster")
    out = subprocess.run([str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful for code location forgeline" in out.stdout + out.stderr


def test_engine_never_imports_dagster():
    # Every module under pipeline/ (found by walking the package, so new modules are covered too).
    code = ("import importlib, pkgutil, sys, pipeline\n"
            "names = [m.name for m in pkgutil.walk_packages(pipeline.__path__, 'pipeline.') if not m.name.endswith('__main__')]\n"
            "for n in names: importlib.import_module(n)\n"
            "bad = sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.'))\n"
            "print(len(names)); sys.exit(f'dagster imported: {bad[:5]}' if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert int(out.stdout.split()[-1]) >= 20  # the walk really found the engine's modules
