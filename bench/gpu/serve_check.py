"""Serving on the GPU, in one process, through the serving core that `forgeline serve` is built on
(pipeline.serving.ModelRegistry; no HTTP): cold start and hot swap of a model on ``--device``.

    python3 bench/gpu/serve_check.py --device cuda --json out.json
    .venv/bin/python bench/gpu/serve_check.py --device cpu --model digits_cnn --steady-s 1   # CPU smoke

Two versions of the model (different weights) are exported on the CPU with golden outputs, as
the packaging step does, into a fresh LocalStorage; v1 is promoted.

- cold: seconds from creating the registry (CUDA context included) to the first answer, and the
  load's own seconds; the answer is compared with the eager module on the same device.
- swap: ``--clients`` concurrent clients; after ``--steady-s`` v2 is promoted; seconds until v2
  serves; failed requests; P50/P99 before the promotion (steady) and in the swap window
  (promotion -> v2 serving + 1 s); then a rollback to v1 (kept resident: no load).

The registry checks golden outputs at ``golden_atol`` (default 1e-4, as `forgeline serve` does).
If a CPU-exported version fails that check on this device, that is recorded as a finding and
the run is repeated with ``--fallback-atol`` so the timings still come out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {"resnet50": (3, 224, 224), "digits_cnn": (1, 28, 28)}


def publish(store, name: str, version: str, seed: int, arch: str):
    import torch

    from pipeline import export
    from pipeline.models import build_model

    torch.manual_seed(seed)
    kw = {"num_classes": 1000} if arch == "resnet50" else {}
    m = build_model(arch, **kw).eval()
    golden = export.golden_outputs(m, export.golden_input(SHAPES[arch]))
    export.export(export.from_module(m, architecture=arch, model_kwargs=kw), store, name, version, golden=golden)
    return m


def pct(vals: list[float], q: float) -> float | None:
    return float(np.percentile(vals, q)) if vals else None


async def scenario(store, name: str, mods: dict, a, atol: float) -> dict:
    import torch

    from pipeline import promotion
    from pipeline.serving import ModelRegistry, ServeConfig

    dev = torch.device(a.device)
    shape = SHAPES[a.model]
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((a.batch, *shape), dtype=np.float32)
    res: dict = {"golden_atol": atol}
    t0 = time.perf_counter()
    reg = ModelRegistry(store, ServeConfig(device=a.device, poll_s=0.1, golden_atol=atol, load_timeout_s=120.0))
    await reg.start()
    try:
        out = await reg.infer(name, None, {"input": x0})
        res["cold_first_answer_s"] = time.perf_counter() - t0
        meta = reg.metadata(name)["parameters"]
        res["serving_after_cold"] = meta.get("serving")
        eager = {v: m.to(dev) for v, m in mods.items()}
        with torch.inference_mode():
            want = eager["v1"](torch.from_numpy(x0).to(dev)).float().cpu().numpy()
        res["cold_max_abs_diff_vs_eager"] = float(np.abs(out["output"] - want).max())

        lat: list[tuple[float, float]] = []  # (send time, seconds)
        failures: list[str] = []
        answers: list[tuple[np.ndarray, np.ndarray, str]] = []
        stop = asyncio.Event()

        async def client(seed: int):
            r = np.random.default_rng(seed)
            while not stop.is_set():
                x = r.standard_normal((a.batch, *shape), dtype=np.float32)
                s = time.perf_counter()
                try:
                    o = await reg.infer(name, None, {"input": x})
                    lat.append((s, time.perf_counter() - s))
                    if len(answers) < 400 and r.random() < 0.2:
                        answers.append((x, o["output"], o.version))
                except Exception as e:  # noqa: BLE001
                    failures.append(f"{type(e).__name__}: {e}"[:200])

        clients = [asyncio.create_task(client(i + 1)) for i in range(a.clients)]
        await asyncio.sleep(a.steady_s)
        tp = time.perf_counter()
        promotion.promote(store, name, "v2")
        while reg.metadata(name)["parameters"].get("serving") != "v2":
            if time.perf_counter() - tp > a.swap_timeout_s:
                res["swap_error"] = f"v2 not serving {a.swap_timeout_s:g} s after promotion"
                break
            await asyncio.sleep(0.005)
        ts = time.perf_counter()
        res["swap_s"] = ts - tp
        await asyncio.sleep(1.0)
        tr = time.perf_counter()
        promotion.promote(store, name, "v1")  # rollback: v1 is still resident as previous
        while reg.metadata(name)["parameters"].get("serving") != "v1":
            if time.perf_counter() - tr > a.swap_timeout_s:
                res["rollback_error"] = f"v1 not serving {a.swap_timeout_s:g} s after the rollback"
                break
            await asyncio.sleep(0.005)
        res["rollback_s"] = time.perf_counter() - tr
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)

        steady = [d for s, d in lat if s < tp]
        window = [d for s, d in lat if tp <= s <= ts + 1.0]
        res.update(
            requests=len(lat), failed=len(failures), failures_sample=failures[:5], clients=a.clients, batch=a.batch,
            steady_p50_ms=(pct(steady, 50) or 0) * 1e3, steady_p99_ms=(pct(steady, 99) or 0) * 1e3,
            swap_window_p99_ms=(pct(window, 99) or 0) * 1e3, swap_window_requests=len(window),
            throughput_rps=len(lat) / max(1e-9, lat[-1][0] + lat[-1][1] - lat[0][0]) if lat else 0.0,
        )
        res["p99_ratio"] = res["swap_window_p99_ms"] / res["steady_p99_ms"] if res["steady_p99_ms"] else None
        # every sampled answer matches the eager output of the version it names, and only that one
        wrong = 0
        with torch.inference_mode():
            for x, y, v in answers:
                ref = {k: m(torch.from_numpy(x).to(dev)).float().cpu().numpy() for k, m in eager.items()}
                tol = max(1e-3, 1e-2 * float(np.abs(ref[v]).max()))
                close = [k for k, r in ref.items() if np.abs(y - r).max() <= tol]
                wrong += close != [v]
        res["answers_checked"], res["answers_wrong"] = len(answers), wrong
        res["versions_seen"] = sorted({v for _, _, v in answers})
    finally:
        await reg.stop(drain_timeout_s=10)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", choices=sorted(SHAPES), default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steady-s", type=float, default=4.0)
    p.add_argument("--swap-timeout-s", type=float, default=60.0)
    p.add_argument("--fallback-atol", type=float, default=1e-2)
    p.add_argument("--json")
    a = p.parse_args(argv)

    import torch

    from pipeline import promotion
    from pipeline.storage import LocalStorage

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    out: dict = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
                 "model": a.model, "shape": list(SHAPES[a.model]), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="forgeline-serve-check-") as tmp:
        store = LocalStorage(Path(tmp) / "store", fsync=False)
        t = time.perf_counter()
        mods = {"v1": publish(store, "m", "v1", 1, a.model), "v2": publish(store, "m", "v2", 2, a.model)}
        out["export_s"] = time.perf_counter() - t
        promotion.promote(store, "m", "v1")
        try:
            out["default"] = asyncio.run(scenario(store, "m", mods, a, 1e-4))
            out["golden_default"] = 1
        except Exception as e:  # noqa: BLE001
            out["default_error"] = f"{type(e).__name__}: {e}"[:500]
            out["golden_default"] = int("golden" not in str(e).lower())
            promotion.promote(store, "m", "v1")
            out["fallback"] = asyncio.run(scenario(store, "m", mods, a, a.fallback_atol))
    r = out.get("default") or out.get("fallback")
    print(f"serve check ({out['device']}, {a.model}): cold first answer {r['cold_first_answer_s']:.2f} s, "
          f"swap {r['swap_s']:.3f} s, rollback {r['rollback_s']:.3f} s, {r['requests']} requests, {r['failed']} failed, "
          f"P99 steady {r['steady_p99_ms']:.1f} ms / swap window {r['swap_window_p99_ms']:.1f} ms, "
          f"wrong answers {r['answers_wrong']}/{r['answers_checked']}"
          + (f"; default golden check FAILED: {out['default_error']}" if "default_error" in out else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
