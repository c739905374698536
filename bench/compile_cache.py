"""torch.compile artifact caching: cold compile + first call vs warm (artifacts loaded), each in a fresh
process with its own empty Inductor (and Triton) cache dir, so only the loaded artifacts can explain
the difference.

    .venv/bin/python bench/compile_cache.py                                   # GPU if torch sees one, else CPU
    .venv/bin/python bench/compile_cache.py --device cpu --models digits_cnn convstack --modes default --json out.json

Per (model, mode), four kinds of fresh processes, each timing from just before the first
compile-related call to the first output (CUDA synchronized), inference (eval, no_grad):

- ``cold``: plain ``torch.compile`` + first call; then ``torch.compiler.save_cache_artifacts()``
  (untimed) writes the bare mega-cache bytes;
- ``bare warm``: ``torch.compiler.load_cache_artifacts(bytes)`` + ``torch.compile`` + first call
  (no forgeline): what the mega-cache alone gives;
- ``fl cold``: forgeline's miss path (key, fetch miss, cold compile, save + put into a
  ``LocalDirCache``);
- ``warm``: forgeline's hit path (key incl. architecture digest, fetch, checks, kernel restore, load, compile,
  first call) — ``ratio`` = cold / warm; ``bare ratio`` = cold / bare warm.

Warm runs are repeated ``--repeat`` times (alternating bare / forgeline), cold ones
``--cold-repeat`` times; medians are reported. One untimed compile first brings torch's libraries,
headers and the C++ compiler into the page cache.
Models: ``digits_cnn`` (pipeline.models.DigitsCNN, 8x1x28x28), ``convstack`` (defined here: a
ResNet-style stack of 10 conv blocks, 8x3x64x64) and ``resnet50`` (pipeline.models.ResNet50,
8x3x224x224 on CPU, 32 on GPU). Targets (H100): ratio ≥ 10x for ``max-autotune``; for the default
mode, forgeline's ratio ≥ the bare mega-cache ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def _convstack():
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
            )
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return (self.body(x) + self.skip(x)).relu()

    class ConvStack(nn.Module):
        """ResNet-18-like: stem + 10 residual blocks (64→512 channels) + linear head."""

        def __init__(self, num_classes: int = 100):
            super().__init__()
            layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
            cin = 64
            for cout, n, stride in ((64, 2, 1), (128, 3, 2), (256, 3, 2), (512, 2, 2)):
                for i in range(n):
                    layers.append(Block(cin, cout, stride if i == 0 else 1))
                    cin = cout
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

        def forward(self, x):
            return self.head(self.features(x))

    return ConvStack()


def build(name: str, device: str, batch: int | None):
    import torch

    torch.manual_seed(0)
    if name == "digits_cnn":
        from pipeline.models import DigitsCNN

        model, shape, b = DigitsCNN(), (1, 28, 28), 8
    elif name == "convstack":
        model, shape, b = _convstack(), (3, 64, 64), 8
    elif name == "resnet50":
        from pipeline.models import build_model

        model, shape, b = build_model("resnet50"), (3, 224, 224), (32 if device == "cuda" else 8)
    else:
        raise SystemExit(f"unknown model {name!r}")
    model = model.eval().to(device)
    x = torch.randn(batch or b, *shape, device=device)
    return model, x


# ---------------------------------------------------------------------------------------------
# worker (one fresh process per measurement)
# ---------------------------------------------------------------------------------------------


def worker(spec: dict) -> dict:
    t_import = time.perf_counter()
    import torch

    from pipeline.compile_cache import LocalDirCache, compile_with_cache

    t_import = time.perf_counter() - t_import
    device, mode, role = spec["device"], spec["mode"], spec["role"]
    model, x = build(spec["model"], device, spec.get("batch"))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out: dict = {"role": role, "import_s": t_import}
    with torch.no_grad():
        if role in ("cold", "bare-warm"):
            t0 = time.perf_counter()
            if role == "bare-warm":
                info = torch.compiler.load_cache_artifacts(Path(spec["artifacts"]).read_bytes())
                out["loaded"] = {k: len(v) for k, v in info.artifacts.items()} if info else None
            compiled = torch.compile(model, mode=None if mode == "default" else mode)
            y = compiled(x)
            sync()
            out["seconds"] = time.perf_counter() - t0
            if role == "cold":
                saved = torch.compiler.save_cache_artifacts()
                if saved is not None:
                    Path(spec["artifacts"]).write_bytes(saved[0])
                    out["artifact_bytes"] = len(saved[0])
        else:  # fl-cold / fl-warm
            t0 = time.perf_counter()
            compiled, report = compile_with_cache(model, (x,), LocalDirCache(spec["store"]), mode=mode)
            out["seconds"] = time.perf_counter() - t0
            y = compiled(x)
            sync()
            rep = report.to_metadata()
            rep.pop("components", None)
            out["report"] = rep
            out["artifact_bytes"] = report.artifact_bytes
        from torch._dynamo.utils import counters

        out["counters"] = {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}
        out["allclose"] = bool(torch.allclose(y, model(x), rtol=1e-3, atol=1e-3))
    return out


def run_worker(spec: dict, workdir: Path, timeout: float) -> dict:
    """``spec`` in a fresh process with fresh, empty Inductor and Triton cache dirs."""
    ind = Path(tempfile.mkdtemp(prefix=f"inductor-{spec['role']}-", dir=workdir))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(ind), "TRITON_CACHE_DIR": str(ind / "triton"),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"role": spec["role"], "error": f"timeout after {timeout:.0f}s"}
    finally:
        shutil.rmtree(ind, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"role": spec["role"], "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_s"] = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def measure(model: str, mode: str, device: str, args, workdir: Path, log) -> dict:
    base = {"model": model, "mode": mode, "device": device, "batch": args.batch}
    row: dict = {"model": model, "mode": mode, "device": device}
    case = Path(tempfile.mkdtemp(prefix=f"{model}-{mode}-", dir=workdir))
    artifacts, store = case / "bare.bin", case / "store"

    colds = []
    for i in range(max(1, args.cold_repeat)):
        res = run_worker({**base, "role": "cold", "artifacts": str(artifacts)}, workdir, args.timeout)
        log(f"{model}/{mode} cold #{i + 1}: {res.get('seconds', res.get('error'))}")
        colds.append(res)
        if "error" in res:
            break
    cold = next((r for r in colds if "error" in r), None) or dict(
        colds[-1], seconds=statistics.median(r["seconds"] for r in colds))
    fl_cold = run_worker({**base, "role": "fl-cold", "store": str(store)}, workdir, args.timeout)
    log(f"{model}/{mode} forgeline cold: {fl_cold.get('seconds', fl_cold.get('error'))}")
    row["runs"] = {"cold": colds, "fl-cold": fl_cold, "bare-warm": [], "fl-warm": []}
    if "error" in cold or "error" in fl_cold:
        row["error"] = cold.get("error") or fl_cold.get("error")
        return row

    for i in range(args.repeat):
        order = ("bare-warm", "fl-warm") if i % 2 == 0 else ("fl-warm", "bare-warm")
        for role in order:
            spec = {**base, "role": role, "artifacts": str(artifacts), "store": str(store)}
            res = run_worker(spec, workdir, args.timeout)
            log(f"{model}/{mode} {role} #{i + 1}: {res.get('seconds', res.get('error'))}")
            row["runs"][role].append(res)

    def med(role):
        vals = [r["seconds"] for r in row["runs"][role] if "seconds" in r]
        return statistics.median(vals) if vals else None

    row.update(
        cold_s=cold["seconds"],
        fl_cold_s=fl_cold["seconds"],
        warm_s=med("fl-warm"),
        bare_warm_s=med("bare-warm"),
        entry_bytes=fl_cold.get("artifact_bytes"),
        bare_bytes=cold.get("artifact_bytes"),
    )
    row["ratio"] = row["cold_s"] / row["warm_s"] if row["warm_s"] else None
    row["bare_ratio"] = row["cold_s"] / row["bare_warm_s"] if row["bare_warm_s"] else None
    fl_warm = [r for r in row["runs"]["fl-warm"] if "report" in r]
    row["hits"] = all(r["report"]["hit"] for r in fl_warm) and bool(fl_warm)
    row["allclose"] = all(r.get("allclose") for r in [*colds, fl_cold, *row["runs"]["bare-warm"], *fl_warm])
    if fl_warm:
        rep = fl_warm[-1]["report"]
        row["warm_breakdown"] = {k: rep[k] for k in ("seconds_fetch", "seconds_load", "seconds_compile_first_call")}
        row["warnings"] = sorted({w for r in fl_warm for w in r["report"]["warnings"]})
    if not args.keep:
        shutil.rmtree(case, ignore_errors=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--models", nargs="+", default=None,
                   help="digits_cnn, convstack, resnet50 (default: all three)")
    p.add_argument("--modes", nargs="+", default=["default", "max-autotune"])
    p.add_argument("--batch", type=int, default=None, help="override the per-model batch size")
    p.add_argument("--repeat", type=int, default=3, help="warm runs per contender (median reported)")
    p.add_argument("--cold-repeat", type=int, default=1, help="cold runs (median reported)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    p.add_argument("--workdir", default=None, help="scratch dir (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the artifacts")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    models = args.models or ["digits_cnn", "convstack", "resnet50"]
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine())
    if device == "cpu":
        try:
            dev_name = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        except (OSError, StopIteration):
            pass
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device, "device_name": dev_name,
           "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "command": " ".join([sys.executable, *sys.argv])}
    console.print(f"[bold]compile cache bench[/] torch {env['torch']} on {device} ({dev_name}, {env['cpus']} CPUs)")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="forgeline-compile-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        # untimed: brings torch's libraries, headers and the compiler into the page cache, so the
        # first timed process does not pay for the disk
        run_worker({"model": "digits_cnn", "mode": "default", "device": device, "role": "cold",
                    "artifacts": str(workdir / "warmup.bin")}, workdir, args.timeout)
        for model in models:
            for mode in args.modes:
                rows.append(measure(model, mode, device, args, workdir, lambda m: console.log(m)))
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    t = Table(title=f"torch.compile cold vs warm, fresh processes, empty Inductor cache dirs ({device}: {dev_name})")
    for col in ("model", "mode", "device", "cold s", "warm s", "ratio", "bare warm s", "bare ratio",
                "fl cold s", "entry KB", "hit"):
        t.add_column(col, justify="left" if col in ("model", "mode", "device") else "right")
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            t.add_row(r["model"], r["mode"], r["device"], f"error: {r['error'][:60]}", *[""] * 7)
            continue
        t.add_row(r["model"], r["mode"], r["device"], f(r["cold_s"]), f(r["warm_s"]), f(r["ratio"], 1) + "x",
                  f(r["bare_warm_s"]), f(r["bare_ratio"], 1) + "x", f(r["fl_cold_s"]),
                  f((r["entry_bytes"] or 0) / 1024, 0), "yes" if r["hits"] else "NO")
    console.print(t)
    for r in rows:
        if r.get("warm_breakdown"):
            b = r["warm_breakdown"]
            console.print(f"{r['model']}/{r['mode']}: warm = fetch {b['seconds_fetch']:.2f}s + load {b['seconds_load']:.2f}s "
                          f"+ compile/first call {b['seconds_compile_first_call']:.2f}s; outputs allclose: {r['allclose']}"
                          + (f"; warnings: {r['warnings']}" if r.get("warnings") else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
