"""The GPU check's parts, each time-boxed, every figure into ``$OUT/results.json``, one summary table
(figures beside the targets of bench/gpu/targets.json) printed last and written to
``$OUT/summary.txt``. Started by bench/gpu/check.sh (which installs the carried wheels first).

    python3 bench/gpu/run.py --out "$OUT"                 # on the GPU machine (check.sh does this)
    .venv/bin/python bench/gpu/run.py --dry --out DIR     # here: CPU, tiny sizes, CUDA-only parts skipped

Parts, in order (``--parts`` or GPU_CHECK_PARTS picks some): preflight (versions, machine, copy and
matmul ceilings), tests (pytest -m gpu), loaders (bench/loaders.py, 16 GB to cuda from /dev/shm,
warm page cache and cold, with the peers), pread (16-thread pread of the same files, cold and warm:
the ceiling for the cold target), train (bench/train.py, ResNet-50 224px batch 128), compile-default
and compile-autotune (bench/compile_cache.py), serve (bench/gpu/serve_check.py), dali
(bench/preprocess.py, mixed decode vs Pillow; only when DALI is importable). Each part runs under
``timeout`` with the smaller of its cap and what the total budget (GPU_CHECK_BUDGET_S, default 510 s)
leaves after the minimums of the parts after it; a part that fails or overruns is recorded and the
next one starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ORDER = ["preflight", "tests", "loaders", "pread", "train", "compile-default", "compile-autotune", "serve", "dali"]
# (cap, minimum) seconds on the GPU machine; the caps add up to more than the budget on purpose:
# most parts finish well inside their cap, and the budget, not the caps, bounds the call.
CAPS = {"preflight": (25, 10), "tests": (75, 20), "loaders": (170, 40), "pread": (35, 10), "train": (60, 25),
        "compile-default": (85, 30), "compile-autotune": (70, 30), "serve": (45, 15), "dali": (50, 25)}
CUDA_ONLY = {
    "train": "CUDA-only: ResNet-50 bf16 throughput, forgeline (NCCL) vs bare (CPU variant: bench/train.py's default)",
    "compile-default": "CUDA-only: GPU kernels (Triton); on CPU each fresh compile takes minutes (CPU numbers: BENCHMARKS.md)",
    "compile-autotune": "CUDA-only: max-autotune tunes Triton templates on the GPU",
    "dali": "CUDA-only: DALI mixed (nvJPEG) decode on the GPU",
}
GPU_TEST_MARK = "@pytest.mark.gpu"


def now() -> float:
    return time.monotonic()


class Check:
    def __init__(self, a):
        self.a = a
        self.dry = a.dry
        self.out = Path(a.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(a.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.py = sys.executable
        self.t0 = now()
        self.deadline = self.t0 + a.budget_s
        self.results: dict = {"env": {}, "parts": {}, "figures": {}, "checks": []}
        self.targets = json.loads((HERE / "targets.json").read_text())

    # ------------------------------------------------------------------ plumbing

    def save(self) -> None:
        self.results["figures"] = figures(self.results)
        self.results["checks"] = verdicts(self.results["figures"], self.targets)
        self.results["elapsed_s"] = round(now() - self.t0, 1)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "results.json")

    def log(self, msg: str) -> None:
        print(f"[gpu-check {now() - self.t0:6.1f}s] {msg}", flush=True)

    def budget_for(self, part: str, later: list[str]) -> float:
        cap, _ = CAPS[part]
        if self.dry:
            cap = max(cap, 120)
        reserve = sum(CAPS[p][1] for p in later)
        return min(cap, self.deadline - now() - reserve)

    def run_cmd(self, part: str, cmd: list[str], limit: float, env: dict | None = None) -> dict:
        """``cmd`` under ``timeout`` (the whole process group: torchrun's workers too)."""
        full = ["timeout", "-k", "10", f"{max(1, int(limit))}", *cmd]
        self.log(f"{part}: {' '.join(cmd)}  (time box {int(limit)} s)")
        t = now()
        rc = subprocess.call(full, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        secs = now() - t
        status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed")
        return {"status": status, "rc": rc, "seconds": round(secs, 1), "command": " ".join(cmd)}

    def read_json(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ parts

    def part_preflight(self, limit: float) -> dict:
        env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry": self.dry, "work": str(self.work),
               "budget_s": self.a.budget_s}
        for cmd, key in ((["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu",
                           "--format=csv,noheader"], "nvidia_smi"),
                         (["df", "-hT", str(self.work), "/dev/shm"], "df"), (["free", "-g"], "free")):
            try:
                env[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
            except (OSError, subprocess.TimeoutExpired) as e:
                env[key] = f"unavailable: {e}"
        self.results["env"].update(env)
        self.log("machine: " + "; ".join(f"{k}={env[k]}" for k in ("python", "cpus", "nvidia_smi") if k in env))
        res = self.run_cmd("preflight", [self.py, str(HERE / "run.py"), "--ceilings", str(self.work / "ceilings.json")]
                           + (["--dry"] if self.dry else []), limit)
        res["data"] = self.read_json(self.work / "ceilings.json")
        if res["data"]:
            self.results["env"].update(res["data"].pop("env", {}))
        return res

    def part_tests(self, limit: float) -> dict:
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                       if GPU_TEST_MARK in p.read_text(errors="replace"))
        absent = [m for m in ("polars", "nvidia.dali") if not _importable(m)]
        xml = self.work / "pytest.xml"
        xml.unlink(missing_ok=True)
        pp = os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        res = self.run_cmd("tests", [self.py, "-m", "pytest", "-m", "gpu", "-p", "gate", "-p", "no:cacheprovider",
                                     "-q", "-rA", f"--junitxml={xml}", "-o", "addopts=", *files], limit,
                           env={"PYTHONPATH": pp, "GPU_CHECK_ABSENT": ",".join(absent)})
        res["files"], res["absent_modules"] = files, absent
        res["data"] = junit(xml)
        if res["status"] == "failed" and res["data"] and not (res["data"]["failed"] or res["data"]["errors"]):
            res["status"] = "ok"  # pytest exits 5 when every test was deselected
        return res

    def part_loaders(self, limit: float) -> dict:
        """One bench/loaders.py run per source (the checkpoint is made by the first and reused), so a
        source that breaks (a small /dev/shm, say) costs only its own rows."""
        if self.dry:
            # the smallest checkpoint it makes (one decoder layer, 0.44 GB); warm only: nothing left in /dev/shm
            sources, args = ["warm"], ["--size-gb", "0.02", "--device", "cpu", "--child-timeout", "60"]
        else:
            sources, args = ["warm", "shm", "cold"], ["--size-gb", f"{self.a.loader_gb:g}", "--device", "cuda:0",
                                                      "--child-timeout", "45"]
        end, runs, rows, size = now() + limit, [], [], None
        for src in sources:
            j = self.work / f"loaders-{src}.json"
            j.unlink(missing_ok=True)
            left = end - now()
            if left < 15:
                runs.append({"source": src, "status": "skipped", "reason": "the part's time box is spent"})
                continue
            r = self.run_cmd(f"loaders/{src}", [self.py, "bench/loaders.py", *args, "--sources", src, "--repeat", "1",
                                                "--root", str(self.work / "loaders"), "--json", str(j)], left)
            data = self.read_json(j) or {}
            rows += data.get("rows", [])
            size = data.get("bytes", size)
            runs.append({"source": src, **r})
        status = "ok" if all(r["status"] == "ok" for r in runs) else next(r["status"] for r in runs if r["status"] != "ok")
        return {"status": status, "seconds": round(sum(r.get("seconds", 0) for r in runs), 1), "runs": runs,
                "data": {"bytes": size, "rows": rows}}

    def part_pread(self, limit: float) -> dict:
        files = sorted((self.work / "loaders").glob("llama-*/*.safetensors"))
        if not files:
            return {"status": "skipped", "reason": "no checkpoint (the loaders part did not write one)"}
        t = now()
        out = {"files": len(files), "bytes": sum(f.stat().st_size for f in files)}
        for label in ("cold", "warm"):
            if now() - t > limit / 2:
                break
            if label == "cold":
                for f in files:
                    fd = os.open(f, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
            out[f"{label}_gbps"] = pread_gbps(files, threads=16, chunk=8 << 20)
        return {"status": "ok", "seconds": round(now() - t, 1), "data": out}

    def part_train(self, limit: float) -> dict:
        j = self.work / "train.json"
        j.unlink(missing_ok=True)
        res = self.run_cmd("train", [self.py, "bench/train.py", "--model", "resnet50", "--image-size", "224",
                                     "--batch-size", "128", "--steps", "50", "--device", "cuda", "--json", str(j)], limit)
        res["data"] = self.read_json(j)
        return res

    def _compile(self, part: str, model: str, mode: str, limit: float) -> dict:
        j = self.work / f"{part}.json"
        j.unlink(missing_ok=True)
        res = self.run_cmd(part, [self.py, "bench/compile_cache.py", "--device", "cuda", "--models", model,
                                  "--modes", mode, "--repeat", "1", "--cold-repeat", "1",
                                  "--timeout", str(int(max(30, limit * 0.45))), "--workdir", str(self.work / part),
                                  "--json", str(j)], limit)
        res["data"] = self.read_json(j)
        return res

    def part_compile_default(self, limit: float) -> dict:
        return self._compile("compile-default", "resnet50", "default", limit)

    def part_compile_autotune(self, limit: float) -> dict:
        # ResNet-18 max-autotune did not finish a cold compile in 7 minutes on an H100 (ANCHORS.md): a
        # small CNN shows the cold/warm ratio within the call
        return self._compile("compile-autotune", "digits_cnn", "max-autotune", limit)

    def part_serve(self, limit: float) -> dict:
        j = self.work / "serve.json"
        j.unlink(missing_ok=True)
        args = (["--device", "cpu", "--model", "digits_cnn", "--steady-s", "1"] if self.dry
                else ["--device", "cuda", "--model", "resnet50", "--steady-s", "4"])
        res = self.run_cmd("serve", [self.py, "bench/gpu/serve_check.py", *args, "--json", str(j)], limit)
        res["data"] = self.read_json(j)
        res["note"] = ("bench/serve.py drives `forgeline serve` over HTTP on the CPU (no --device); this part "
                       "uses the same serving core on the GPU in-process")
        return res

    def part_dali(self, limit: float) -> dict:
        if not _importable("nvidia.dali"):
            return {"status": "skipped", "reason": "DALI is not importable here: carry its parts first "
                    "(docs/gpu-check.md, 'DALI'); then GPU_CHECK_PARTS=dali,tests"}
        j = self.work / "dali.json"
        j.unlink(missing_ok=True)
        res = self.run_cmd("dali", [self.py, "bench/preprocess.py", "--device", "gpu", "--images", "4096",
                                    "--batch-size", "256", "--epochs", "2", "--repeat", "1",
                                    "--only", "forgeline", "dali", "pil", "--root", str(self.work / "preprocess"),
                                    "--json", str(j)], limit)
        res["data"] = self.read_json(j)
        return res

    # ------------------------------------------------------------------ driver

    def run(self, parts: list[str]) -> None:
        for i, part in enumerate(parts):
            later = parts[i + 1:]
            if self.dry and part in CUDA_ONLY:
                res = {"status": "skipped", "reason": f"dry run on CPU: {CUDA_ONLY[part]}"}
            else:
                limit = self.budget_for(part, later)
                if limit < CAPS[part][1]:
                    res = {"status": "skipped", "reason": f"budget: {max(0, limit):.0f} s left for it "
                           f"(GPU_CHECK_BUDGET_S={self.a.budget_s:g}); rerun with GPU_CHECK_PARTS={part}"}
                else:
                    try:
                        res = getattr(self, "part_" + part.replace("-", "_"))(limit)
                    except Exception as e:  # noqa: BLE001  one part's bug must not stop the others
                        res = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
            self.results["parts"][part] = res
            self.log(f"{part}: {res['status']}" + (f" ({res['reason']})" if res.get("reason") else "")
                     + (f" in {res['seconds']} s" if "seconds" in res else ""))
            self.save()
        table = summary(self.results, self.targets)
        (self.out / "summary.txt").write_text(table + "\n")
        print(table, flush=True)


def _importable(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def pread_gbps(files: list[Path], threads: int, chunk: int) -> float:
    """Read every byte of ``files`` with ``threads`` threads of ``chunk``-byte preads; GB/s."""
    jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, chunk)]
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    lock, idx, total = threading.Lock(), [0], [0]

    def worker():
        buf = bytearray(chunk)
        n = 0
        while True:
            with lock:
                if idx[0] >= len(jobs):
                    break
                f, off = jobs[idx[0]]
                idx[0] += 1
            n += os.preadv(fds[f], [buf], off)
        with lock:
            total[0] += n

    t = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    secs = time.perf_counter() - t
    for fd in fds.values():
        os.close(fd)
    return total[0] / secs / 1e9


def ceilings(path: str, dry: bool) -> int:
    """Versions and the machine's copy and matmul ceilings (a fresh process: run.py holds no CUDA context)."""
    import torch

    out: dict = {"env": {"torch": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_available": torch.cuda.is_available()}}
    if torch.cuda.is_available() and not dry:
        dev = torch.device("cuda")
        out["env"]["device_name"] = torch.cuda.get_device_name()
        out["env"]["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        out["env"]["nccl"] = torch.distributed.is_available() and torch.distributed.is_nccl_available()

        def timed(fn, reps=5):
            fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            return statistics.median(ts)

        n = 1 << 30
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True).random_()
        d = torch.empty(n, dtype=torch.uint8, device=dev)
        out["h2d_pinned_gbps"] = n / timed(lambda: d.copy_(host, non_blocking=True)) / 1e9
        pageable = torch.empty(n // 4, dtype=torch.uint8).random_()
        d4 = torch.empty(n // 4, dtype=torch.uint8, device=dev)
        out["h2d_pageable_gbps"] = (n // 4) / timed(lambda: d4.copy_(pageable), reps=3) / 1e9
        big = torch.empty(4 * n, dtype=torch.uint8, device=dev).random_()
        big2 = torch.empty_like(big)
        out["d2d_gbps"] = 2 * big.numel() / timed(lambda: big2.copy_(big)) / 1e9  # read + write
        del big, big2, d, d4
        m = 8192
        x = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
        y = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
        out["bf16_matmul_tflops"] = 2 * m ** 3 / timed(lambda: x @ y, reps=10) / 1e12
    Path(path).write_text(json.dumps(out, indent=1))
    print("ceilings: " + json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in out.items()}))
    return 0


# ---------------------------------------------------------------------------------------------
# results -> figures -> verdicts -> table (pure functions: tests/test_gpu_check.py feeds them)
# ---------------------------------------------------------------------------------------------


def junit(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = []
    for tc in root.iter("testcase"):
        outcome, msg = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = tc.find(kind)
            if el is not None:
                outcome, msg = {"failure": "failed", "error": "errors", "skipped": "skipped"}[kind], el.get("message", "")
                break
        cases.append({"test": f"{tc.get('classname', '')}::{tc.get('name', '')}", "outcome": outcome,
                      "message": (msg or "")[:300], "seconds": float(tc.get("time", 0) or 0)})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "errors", "skipped")}
    return {**counts, "cases": cases}


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def figures(results: dict) -> dict:
    """Every headline figure, by id (the ids targets.json names), from the parts' JSON."""
    f: dict = {}
    parts = results.get("parts", {})
    pre = (parts.get("preflight") or {}).get("data") or {}
    for k in ("h2d_pinned_gbps", "h2d_pageable_gbps", "d2d_gbps", "bf16_matmul_tflops"):
        if _num(pre.get(k)) is not None:
            f[f"ceiling.{k}"] = pre[k]
    t = (parts.get("tests") or {}).get("data")
    if t:
        f["tests.passed"], f["tests.skipped"] = t["passed"], t["skipped"]
        f["tests.failed"] = t["failed"] + t["errors"]
    ld = (parts.get("loaders") or {}).get("data") or {}
    for r in ld.get("rows", []):
        if _num(r.get("seconds")) is not None:
            f[f"loaders.{r['source']}.{r['loader']}.s"] = r["seconds"]
            f[f"loaders.{r['source']}.{r['loader']}.gbps"] = r.get("gbps")
        elif r.get("error"):
            f[f"loaders.{r['source']}.{r['loader']}.error"] = r["error"]
    if ld.get("bytes"):
        f["loaders.checkpoint_gb"] = ld["bytes"] / 1e9
    for src in ("shm", "warm", "cold"):
        fl = f.get(f"loaders.{src}.forgeline.gbps")
        if fl is not None:
            f[f"loaders.{src}.gbps"] = fl
            peers = {k.split(".")[2]: v for k, v in f.items()
                     if k.startswith(f"loaders.{src}.") and k.endswith(".s") and ".forgeline." not in k}
            if peers:
                best = min(peers, key=peers.get)
                f[f"loaders.{src}.best_peer"] = f"{best} {peers[best]:.3f} s"
                f[f"loaders.{src}.vs_best_peer"] = peers[best] / f[f"loaders.{src}.forgeline.s"]
    pr = (parts.get("pread") or {}).get("data") or {}
    for k in ("cold_gbps", "warm_gbps"):
        if _num(pr.get(k)) is not None:
            f[f"pread.{k}"] = pr[k]
    if f.get("loaders.cold.gbps") is not None and pr.get("cold_gbps"):
        f["loaders.cold.vs_pread"] = f["loaders.cold.gbps"] / pr["cold_gbps"]
    tr = (parts.get("train") or {}).get("data") or {}
    rows = {label: v for label, v in tr.get("rows", [])}
    for label, v in rows.items():
        key = "forgeline_bf16" if label.startswith("forgeline") else label.replace("bare eager ", "bare_").split(",")[0]
        f[f"train.{key}.img_s"] = v
    bare_bf16 = next((v for k, v in rows.items() if k.startswith("bare eager bf16")), None)
    fl = next((v for k, v in rows.items() if k.startswith("forgeline")), None)
    if bare_bf16 and fl:
        f["train.vs_bare_bf16"] = fl / bare_bf16
    for part in ("compile-default", "compile-autotune"):
        for r in ((parts.get(part) or {}).get("data") or {}).get("rows", []):
            base = f"compile.{r['mode']}"
            if r.get("error"):
                f[f"{base}.error"] = r["error"][:200]
                continue
            f[f"{base}.model"] = r["model"]
            for k in ("cold_s", "warm_s", "bare_warm_s", "ratio", "bare_ratio", "hits", "allclose"):
                if r.get(k) is not None:
                    f[f"{base}.{k}"] = r[k]
            if r.get("ratio") and r.get("bare_ratio"):
                f[f"{base}.ratio_vs_bare"] = r["ratio"] / r["bare_ratio"]
    sv = (parts.get("serve") or {}).get("data") or {}
    if sv:
        run = sv.get("default") or sv.get("fallback") or {}
        f["serve.golden_default"] = sv.get("golden_default")
        if sv.get("default_error"):
            f["serve.default_error"] = sv["default_error"][:200]
        for k in ("cold_first_answer_s", "swap_s", "rollback_s", "failed", "steady_p99_ms", "swap_window_p99_ms",
                  "throughput_rps", "answers_wrong"):
            if run.get(k) is not None:
                f[f"serve.{'swap.' if k == 'failed' else ''}{k}"] = run[k]
        if run.get("p99_ratio") is not None:
            f["serve.swap.p99_ratio"] = run["p99_ratio"]
    dl = ((parts.get("dali") or {}).get("data") or {}).get("results") or {}
    for name, r in dl.items():
        f[f"dali.{name}.img_s"] = r.get("images_per_s")
    if dl.get("forgeline"):
        f["dali.vs_pil"] = dl["forgeline"].get("vs_pil")
        f["dali.vs_bare"] = dl["forgeline"].get("vs_bare_dali")
    return {k: v for k, v in f.items() if v is not None}


def verdicts(figs: dict, targets: dict) -> list[dict]:
    out = []
    for t in targets["targets"]:
        v = figs.get(t["id"])
        if _num(v) is None:
            ok = None
        else:
            ok = {">=": v >= t["value"], "<=": v <= t["value"], "==": v == t["value"]}[t["op"]]
        out.append({"id": t["id"], "what": t["what"], "value": v, "target": f"{t['op']} {t['value']:g}{t['unit']}",
                    "ok": ok})
    return out


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def summary(results: dict, targets: dict) -> str:
    figs = results.get("figures") or figures(results)
    checks = verdicts(figs, targets)
    env = results.get("env", {})
    smi = env.get("nvidia_smi") or ""
    gpu = env.get("device_name") or (smi if smi and not smi.startswith("unavailable") else "no GPU")
    lines = [f"GPU check — {env.get('date', '')} — {gpu} — "
             f"torch {env.get('torch', '?')} (CUDA {env.get('cuda', '-')}), Python {env.get('python', '?')}, "
             f"{env.get('cpus', '?')} CPUs" + (" — DRY RUN (CPU, tiny sizes)" if env.get("dry") else ""),
             "", f"{'part':<17} {'status':<8} {'s':>6}  note"]
    for part, r in results.get("parts", {}).items():
        note = r.get("reason") or (f"rc {r['rc']}" if r.get("status") != "ok" and "rc" in r else "")
        lines.append(f"{part:<17} {r.get('status', '?'):<8} {r.get('seconds', ''):>6}  {note}"[:160])
    lines += ["", f"{'target':<34} {'figure':>12}  {'target':<12} verdict"]
    for c in checks:
        verdict = "-" if c["ok"] is None else ("not judged (dry)" if env.get("dry") else ("PASS" if c["ok"] else "MISS"))
        lines.append(f"{c['id']:<34} {_fmt(c['value']) if c['value'] is not None else 'n/a':>12}  {c['target']:<12} {verdict}")
    anchors = {a["id"]: a for a in targets.get("anchors", [])}
    ref = {"ceiling.h2d_pinned_gbps": "ceiling.h2d_pinned", "loaders.shm.forgeline.s": "loaders.shm.best_peer",
           "loaders.warm.forgeline.s": "loaders.warm.best_peer", "loaders.cold.forgeline.s": "loaders.cold.best_peer",
           "train.bare_bf16.img_s": "train.bare_bf16", "train.bare_tf32.img_s": "train.bare_tf32",
           "train.bare_fp32.img_s": "train.bare_fp32", "compile.default.cold_s": "compile.resnet50.cold",
           "compile.default.warm_s": "compile.resnet50.warm", "dali.dali.img_s": "dali.bare", "dali.pil.img_s": "dali.pil"}
    target_ids = {t["id"] for t in targets["targets"]}
    lines += ["", f"{'figure':<40} {'value':>14}  H100 anchor (ANCHORS.md)"]
    for k, v in figs.items():
        if k in target_ids:
            continue
        a = anchors.get(ref.get(k, ""))
        lines.append(f"{k:<40} {_fmt(v)[:60]:>14}  " + (f"{a['value']:g} {a['unit']} ({a['what']})" if a else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / ".forgeline" / "gpu-check"))
    p.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK") or str(Path.home() / ".cache" / "forgeline-gpu-check"),
                   help="scratch on the machine's disk (kept: a rerun in the same loan reuses the checkpoint)")
    p.add_argument("--parts", default=os.environ.get("GPU_CHECK_PARTS") or ",".join(ORDER))
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S") or 510))
    p.add_argument("--loader-gb", type=float, default=float(os.environ.get("GPU_CHECK_LOADER_GB") or 16))
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes, CUDA-only parts skipped")
    p.add_argument("--ceilings", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--summary", metavar="RESULTS_JSON", help="print the summary of an earlier results.json")
    a = p.parse_args(argv)
    if a.ceilings:
        return ceilings(a.ceilings, a.dry)
    targets = json.loads((HERE / "targets.json").read_text())
    if a.summary:
        print(summary(json.loads(Path(a.summary).read_text()), targets))
        return 0
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in ORDER]
    if unknown:
        p.error(f"unknown part(s) {unknown}; known: {','.join(ORDER)}")
    parts = [x for x in ORDER if x in parts]
    if "preflight" not in parts:
        parts.insert(0, "preflight")
    if shutil.which("timeout") is None:
        print("gpu-check: FAILED: the `timeout` command (coreutils) is missing", file=sys.stderr)
        return 2
    Check(a).run(parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
