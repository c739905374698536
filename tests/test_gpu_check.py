"""The GPU check's plumbing (bench/gpu/, docs/gpu-check.md), so it cannot rot between GPU loans:
the dry run end to end on CPU (what `make gpu-check-dry` runs), the commands the GPU run would
start (every flag exists in its benchmark), and the figures/targets/summary from results shaped
like each benchmark's JSON on a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "bench" / "gpu"


def _run_module():
    spec = importlib.util.spec_from_file_location("gpu_check_run", GPU / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_end_to_end(tmp_path):
    """check.sh --dry: preflight, pytest -m gpu (all skip here), tiny loaders, pread, serving on CPU;
    the CUDA-only parts skipped with a reason; results.json + summary.txt within the device limits
    on what comes back ($OUT: at most 8 files, plain names)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(work), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(GPU / "check.sh"), "--dry"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    parts = res["parts"]
    assert list(parts) == ["preflight", "tests", "loaders", "pread", "train", "compile-default",
                           "compile-autotune", "serve", "dali"]
    for ok in ("preflight", "tests", "loaders", "pread", "serve"):
        assert parts[ok]["status"] == "ok", (ok, parts[ok])
    for skipped in ("train", "compile-default", "compile-autotune", "dali"):
        assert parts[skipped]["status"] == "skipped" and "CUDA-only" in parts[skipped]["reason"]
    t = parts["tests"]["data"]
    assert t["failed"] == t["errors"] == 0 and t["skipped"] + t["passed"] >= 4  # every GPU test was collected
    assert set(parts["tests"]["files"]) >= {"tests/test_loading.py", "tests/test_train.py", "tests/test_gpus.py"}
    figs = res["figures"]
    assert figs["loaders.warm.forgeline.gbps"] > 0 and figs["pread.warm_gbps"] > 0
    assert figs["serve.swap.failed"] == 0 and figs["serve.golden_default"] == 1
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary and "loaders.shm.gbps" in summary and "MISS" not in summary
    assert summary.strip().splitlines()[-1] in proc.stdout  # printed last, before the closing line
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)


def test_gpu_commands_use_flags_the_benchmarks_have(tmp_path):
    """The commands the GPU run starts, collected without running them: each script exists and
    declares every --flag passed to it."""
    run = _run_module()
    a = SimpleNamespace(dry=False, out=str(tmp_path / "o"), work=str(tmp_path / "w"), budget_s=510, loader_gb=16)
    check = run.Check(a)
    seen: list[list[str]] = []
    check.run_cmd = lambda part, cmd, limit, env=None: (seen.append(cmd), {"status": "ok"})[1]
    for part in ("loaders", "train", "compile-default", "compile-autotune", "serve", "dali"):
        getattr(check, "part_" + part.replace("-", "_"))(60)
    scripts = {Path(c[1]).name for c in seen}
    assert {"loaders.py", "train.py", "compile_cache.py", "serve_check.py"} <= scripts
    for cmd in seen:
        src = (ROOT / cmd[1]).read_text()
        for flag in (x for x in cmd[2:] if x.startswith("--")):
            assert re.search(rf"add_argument\(\s*\"{re.escape(flag)}\"", src), f"{cmd[1]} has no {flag}"
    loaders = [c for c in seen if c[1].endswith("loaders.py")]
    assert {c[c.index("--sources") + 1] for c in loaders} == {"shm", "warm", "cold"}
    assert all(c[c.index("--size-gb") + 1] == "16" and "cuda:0" in c for c in loaders)
    train = next(c for c in seen if c[1].endswith("train.py"))
    assert train[train.index("--batch-size") + 1] == "128" and train[train.index("--model") + 1] == "resnet50"


def _gpu_shaped_results() -> dict:
    """What each benchmark writes on a GPU (shapes from bench/*.py's --json output)."""
    rows = [{"source": s, "loader": n, "seconds": sec, "bytes": 16e9, "gbps": 16 / sec}
            for s, n, sec in (("shm", "forgeline", 0.30), ("shm", "instanttensor", 0.375), ("shm", "safetensors", 2.5),
                              ("warm", "forgeline", 0.45), ("warm", "safetensors", 2.06),
                              ("cold", "forgeline", 9.0), ("cold", "fastsafetensors", 8.93))]
    rows.append({"source": "cold", "loader": "runai", "error": "timeout after 45 s"})
    compile_row = lambda mode, cold, warm, bare: {  # noqa: E731
        "model": "resnet50", "mode": mode, "device": "cuda", "cold_s": cold, "warm_s": warm, "bare_warm_s": bare,
        "ratio": cold / warm, "bare_ratio": cold / bare, "hits": True, "allclose": True}
    return {
        "env": {"device_name": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0", "python": "3.12.3", "cpus": 16},
        "parts": {
            "preflight": {"status": "ok", "data": {"h2d_pinned_gbps": 55.0, "d2d_gbps": 4300.0}},
            "tests": {"status": "ok", "data": {"passed": 3, "failed": 0, "errors": 0, "skipped": 1, "cases": []}},
            "loaders": {"status": "ok", "data": {"device": "NVIDIA H200", "bytes": 16e9, "rows": rows}},
            "pread": {"status": "ok", "data": {"cold_gbps": 1.8, "warm_gbps": 18.0}},
            "train": {"status": "ok", "data": {"rows": [["bare eager fp32", 950.0], ["bare eager tf32", 2500.0],
                                                        ["bare eager bf16", 3800.0],
                                                        ["forgeline bf16, 1 rank (NCCL DDP)", 3700.0]]}},
            "compile-default": {"status": "ok", "data": {"rows": [compile_row("default", 18.0, 6.0, 8.0)]}},
            "compile-autotune": {"status": "ok", "data": {"rows": [dict(compile_row("max-autotune", 60.0, 5.0, 20.0),
                                                                        model="digits_cnn")]}},
            "serve": {"status": "ok", "data": {"golden_default": 0, "default_error": "Unavailable: golden check failed",
                                               "fallback": {"cold_first_answer_s": 2.0, "swap_s": 0.8, "rollback_s": 0.01,
                                                            "failed": 0, "steady_p99_ms": 10.0,
                                                            "swap_window_p99_ms": 12.0, "p99_ratio": 1.2}}},
            "dali": {"status": "ok", "data": {"results": {
                "forgeline": {"images_per_s": 16500.0, "vs_pil": 5.5, "vs_bare_dali": 0.92},
                "dali": {"images_per_s": 18000.0}, "pil": {"images_per_s": 3000.0}}}},
        },
    }


def test_every_target_is_computed_from_gpu_shaped_results():
    run = _run_module()
    targets = json.loads((GPU / "targets.json").read_text())
    res = _gpu_shaped_results()
    figs = run.figures(res)
    checks = {c["id"]: c for c in run.verdicts(figs, targets)}
    assert set(checks) == {t["id"] for t in targets["targets"]}
    missing = [k for k, c in checks.items() if c["value"] is None]
    assert not missing, f"targets no figure feeds: {missing}"
    assert figs["loaders.shm.gbps"] == pytest.approx(16 / 0.30) and checks["loaders.shm.gbps"]["ok"]
    assert figs["loaders.cold.vs_pread"] == pytest.approx((16 / 9.0) / 1.8) and checks["loaders.cold.vs_pread"]["ok"]
    assert figs["loaders.cold.best_peer"].startswith("fastsafetensors") and "loaders.cold.runai.error" in figs
    assert figs["train.vs_bare_bf16"] == pytest.approx(3700 / 3800) and checks["train.vs_bare_bf16"]["ok"]
    assert checks["compile.max-autotune.ratio"]["ok"] and checks["compile.default.ratio_vs_bare"]["ok"]
    assert checks["serve.golden_default"]["ok"] is False and checks["serve.swap.failed"]["ok"]
    assert checks["dali.vs_pil"]["ok"] and checks["dali.vs_bare"]["ok"]
    table = run.summary({**res, "figures": figs}, targets)
    assert "NVIDIA H200" in table and "MISS" in table and "PASS" in table
    assert "3719 img/s" in table  # the H100 anchor beside the bare bf16 figure


def test_scripts_parse_and_wheel_list_is_pinned():
    for sh in ("check.sh", "prepare.sh"):
        subprocess.run(["bash", "-n", str(GPU / sh)], check=True)
    specs = [ln.split() for ln in (GPU / "wheels.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert specs and all(mode in ("deps", "nodeps") and "==" in spec for mode, spec in specs)
    pre = {ln.strip() for ln in (GPU / "preinstalled.txt").read_text().splitlines() if ln and not ln.startswith("#")}
    assert {"torch", "safetensors", "numpy", "pytest"} <= pre and "dagster" not in pre
    assert "/.gpu-wheels/" in (ROOT / ".gitignore").read_text().splitlines()
