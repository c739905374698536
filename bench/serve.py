"""Serving side by side: `forgeline serve` vs a plain script, cold torch.compile and Ray Serve's
model multiplexing (Ray is optional: `pip install -e ".[bench]" -c constraints.txt`; benchmark-only).
Every server is a real process on 127.0.0.1, driven over HTTP by the same client code.

    .venv/bin/python bench/serve.py                          # all four, ~25 min on 2 cores (compiles dominate)
    .venv/bin/python bench/serve.py --quick --only cold,swap,many   # smoke run, < 60 s
    .venv/bin/python bench/serve.py --only many,ray --json out.json

1. cold  — seconds from spawning a fresh process to the first correct prediction (checked against
   the eager output) of ResNet-50 (in-house, 1000 classes, 3x64x64 input, 102 MB fp32): a plain
   script (`torch.load` state dict, build, call), safetensors + cold `torch.compile`, `forgeline
   serve` (spawn CLI, poll /v2/health/ready, POST infer), `forgeline serve --compile` (an
   AOTInductor package) with an empty compile cache, and with a compile-cache hit (the cache warmed
   by another *version* of the model: the key is the program, not the weights; the server's log
   says hit or miss and the seconds of each step). Every compiling process gets an empty
   TORCHINDUCTOR_CACHE_DIR. Target: cache hit ≤ 1/3 of the cold-compile baseline.
2. swap  — DigitsCNN(width 64), 4 client threads at a fixed total rate (40 req/s) against `forgeline serve`; `promote()` mid-run.
   Latency is measured from each request's scheduled send time (no coordinated omission). Targets:
   0 failed requests, P99 in the swap window (promotion → new version answering + 1 s) ≤ 1.5x
   steady P99; seconds from promotion to the new version answering (bounded by --poll-s + load).
3. many  — 100 DigitsCNN(width 64, 1.05 MB) models with different weights, pre-warmed into a /dev/shm tier,
   `--budget` for 10 resident, Zipf(s=1.1, seed 0) requests from 4 closed-loop threads. Hit rate
   from the server's load count; swap-in request latency = requests whose model an LRU-10
   simulation of the sequence says was not resident; the registry's load seconds from its log;
   bare loader = `pipeline.loading.load` of the shm copy into a meta-built module. Target: registry
   swap-in ≤ 2x the bare loader.
4. ray   — Ray Serve 2.60, one replica, `@serve.multiplexed(max_num_models_per_replica=10)`, the
   same models (safetensors `load_file` of the same shm files), the same client, sequence and
   concurrency, in the same run (forgeline is stopped first). Targets: throughput ≥ 1.0x Ray's,
   swap-in latency ≤ 0.5x Ray's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORGELINE = str(ROOT / ".venv" / "bin" / "forgeline") if (ROOT / ".venv" / "bin" / "forgeline").exists() else "forgeline"
COLD_SHAPE = (3, 64, 64)
DIGITS_SHAPE = (1, 28, 28)


# ---------------------------------------------------------------------------------------------
# helpers: models, publishing, servers, the HTTP client
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, q) -> float | None:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else None


def digits(seed: int, width: int):
    import torch

    from pipeline.models import DigitsCNN

    torch.manual_seed(seed)
    m = DigitsCNN(width=width)
    with torch.no_grad():  # BatchNorm statistics that differ per model
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def resnet(seed: int):
    import torch

    from pipeline.models import ResNet50

    torch.manual_seed(seed)
    return ResNet50().eval()


def publish(store, name: str, version: str, module, shape, arch: str, kwargs: dict) -> dict:
    from pipeline import export

    golden = export.golden_outputs(module, export.golden_input(shape))
    return export.export(export.from_module(module, architecture=arch, model_kwargs=kwargs), store, name, version,
                         golden=golden)


def eager(module, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def infer_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


class Client:
    """One keep-alive HTTP connection: POST a v2 JSON infer, the model also named in Ray's
    multiplexing header (forgeline ignores it). The same code drives every server."""

    def __init__(self, port: int, timeout: float = 60.0):
        self.port, self.timeout = port, timeout
        self.conn = None

    def infer(self, model: str, body: bytes) -> tuple[int, dict | None]:
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                self.conn.request("POST", f"/v2/models/{model}/infer", body,
                                  {"Content-Type": "application/json", "serve_multiplexed_model_id": model})
                r = self.conn.getresponse()
                data = r.read()
                try:
                    return r.status, json.loads(data)
                except ValueError:
                    return r.status, {"error": data[:200].decode(errors="replace")}
            except (OSError, http.client.HTTPException) as e:
                self.conn = None
                if attempt:
                    return 0, {"error": f"{type(e).__name__}: {e}"}
        return 0, None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def output_of(resp: dict) -> np.ndarray:
    out = resp["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return 0


class Forgeline:
    """A `forgeline serve` process (the CLI, as a user starts it) with its own environment."""

    def __init__(self, work: Path, args: list[str], env: dict, log_name: str):
        self.port = free_port()
        self.log_path = work / f"{log_name}.log"
        self.log = open(self.log_path, "w")
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen([FORGELINE, "serve", "--port", str(self.port), *args], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"forgeline serve exited {self.proc.returncode}: {self.log_text()[-600:]}")
            if get(self.url + "/v2/health/ready", 1.0) == 200:
                return time.perf_counter() - self.t_spawn
            time.sleep(0.02)
        raise RuntimeError(f"forgeline serve not ready after {timeout}s")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def base_env(work: Path, tier_root: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGELINE_", "TORCHINDUCTOR_", "AWS_ACCESS", "AWS_SECRET"))}
    env.update(FORGELINE_HOME=str(work / "home"), FORGELINE_STORAGE_ROOT=str(work / "storage"),
               FORGELINE_COMPILE_CACHE="local", PYTHONUNBUFFERED="1")
    if tier_root is not None:
        env["FORGELINE_SHM_ROOT"] = str(tier_root)
    return env


def first_answer(port: int, model: str, body: bytes, deadline_s: float) -> tuple[float, dict]:
    """POST until a 200 (a 503 while loading is retried); returns (perf_counter at the answer, response)."""
    c = Client(port, timeout=deadline_s)
    end = time.perf_counter() + deadline_s
    try:
        while time.perf_counter() < end:
            status, resp = c.infer(model, body)
            if status == 200:
                return time.perf_counter(), resp
            time.sleep(0.05)
    finally:
        c.close()
    raise RuntimeError(f"no answer from {model} within {deadline_s}s (last: {status} {resp})")


# ---------------------------------------------------------------------------------------------
# 1. cold start
# ---------------------------------------------------------------------------------------------

SCRIPT = r"""
import sys, time, json
import numpy as np
import torch
sys.path.insert(0, {root!r})
from pipeline.models import build_model
cfg = json.loads(sys.argv[1])
x = torch.from_numpy(np.load(cfg["x"]))
if cfg["kind"] == "plain":
    sd = torch.load(cfg["pt"], weights_only=True)
else:
    from safetensors.torch import load_file
    sd = {{}}
    for f in cfg["shards"]:
        sd.update(load_file(f))
m = build_model(cfg["arch"], **cfg["kwargs"])
m.load_state_dict(sd)
m.eval()
fn = torch.compile(m) if cfg["kind"] == "compile" else m
with torch.inference_mode():
    y = fn(x)
t = time.time()
np.save(cfg["out"], y.numpy())
print(json.dumps({{"t_answer": t}}), flush=True)
"""


def run_script(work: Path, kind: str, cfg: dict, tag: str) -> float:
    env = base_env(work, None)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{tag}")
    expected = cfg["expected"]
    cfg = {**{k: v for k, v in cfg.items() if k != "expected"}, "kind": kind, "out": str(work / f"{tag}.npy")}
    t_spawn = time.time()
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT)), json.dumps(cfg)], env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"{kind} script failed: {out.stderr.strip().splitlines()[-1:]}")
    t = json.loads(out.stdout.strip().splitlines()[-1])["t_answer"] - t_spawn
    got = np.load(cfg["out"])
    if not np.allclose(got, expected, rtol=1e-3, atol=1e-4):
        raise RuntimeError(f"{kind}: wrong answer")
    return t


def forgeline_cold(work: Path, model: str, body: bytes, expected: np.ndarray, extra: list[str], tag: str,
                   deadline_s: float = 900) -> dict:
    env = base_env(work, None)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{tag}")
    srv = Forgeline(work, ["--models", model, "--no-shm", *extra], env, tag)
    try:
        t_ready = srv.wait_ready()
        t_answer, resp = first_answer(srv.port, model, body, deadline_s)
        seconds = t_answer - srv.t_spawn
        if not np.allclose(output_of(resp), expected, rtol=1e-3, atol=1e-4):
            raise RuntimeError(f"forgeline {tag}: wrong answer")
        text = srv.log_text()
        load = re.findall(r"loaded from (\w+) in ([\d.]+)s", text)
        out = {"seconds": seconds, "ready_s": t_ready, "version": resp.get("model_version"),
               "server_load_s": float(load[-1][1]) if load else None}
        # the loader's line for --compile: "<model>/<v>: compiled (aoti, cache hit) in 0.31s: fetch 0.01s, load 0.30s"
        comp = re.findall(r"compiled \(([^,]+), cache (.+?)\) in ([\d.]+)s: (.*)$", text, re.M)
        if comp:
            kind, cache, secs, steps = comp[-1]
            out["compile"] = {"kind": kind, "hit": cache == "hit", "cache": cache, "seconds": float(secs),
                              "steps": {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)s", steps)}}
        return out
    finally:
        srv.stop()


def bench_cold(work: Path, quick: bool) -> dict:
    import torch
    from safetensors.torch import save_file  # noqa: F401 - import check before the clock

    from pipeline import promotion
    from pipeline.storage.local import LocalStorage

    store = LocalStorage(work / "storage")
    if quick:
        arch, kwargs, shape, name = "digits_cnn", {"width": 64}, DIGITS_SHAPE, "coldq"
        mods = {v: digits(s, 64) for v, s in (("v1", 11), ("v2", 12))}
    else:
        arch, kwargs, shape, name = "resnet50", {}, COLD_SHAPE, "cold"
        mods = {v: resnet(s) for v, s in (("v1", 11), ("v2", 12))}
    manifests = {v: publish(store, name, v, m, shape, arch, kwargs) for v, m in mods.items()}
    x = np.random.default_rng(1).standard_normal((1, *shape), dtype=np.float32)
    np.save(work / "cold_x.npy", x)
    body = infer_body(x)
    expected = {v: eager(m, x) for v, m in mods.items()}
    pt = work / "cold_v2.pt"
    torch.save(mods["v2"].state_dict(), pt)
    shards = [str(work / "storage" / "models" / name / "v2" / s["file"]) for s in manifests["v2"]["shards"]]
    cfg = {"x": str(work / "cold_x.npy"), "pt": str(pt), "shards": shards, "arch": arch, "kwargs": kwargs,
           "expected": expected["v2"]}
    nbytes = manifests["v2"]["total_size"]
    rows: dict[str, dict] = {}
    promotion.promote(store, name, "v2")
    # warm the page cache for every reader alike
    for f in [pt, *shards]:
        Path(f).read_bytes()
    print(f"[cold] {arch} {kwargs or ''} input {shape}, {nbytes / 1e6:.1f} MB", flush=True)
    rows["plain script (torch.load, build, call)"] = {"seconds": run_script(work, "plain", cfg, "plain")}
    print(f"[cold] plain {rows['plain script (torch.load, build, call)']['seconds']:.2f}s", flush=True)
    rows["forgeline serve"] = forgeline_cold(work, name, body, expected["v2"], [], "fl-eager")
    print(f"[cold] forgeline {rows['forgeline serve']['seconds']:.2f}s", flush=True)
    if not quick:
        rows["safetensors + cold torch.compile"] = {"seconds": run_script(work, "compile", cfg, "compile")}
        print(f"[cold] safetensors+compile {rows['safetensors + cold torch.compile']['seconds']:.2f}s", flush=True)
        # warm the compile cache with v1 (a cache miss: this is forgeline --compile cold), then v2 hits
        promotion.promote(store, name, "v1")
        rows["forgeline serve --compile (empty cache, v1)"] = forgeline_cold(
            work, name, body, expected["v1"], ["--compile"], "fl-compile-miss")
        print(f"[cold] forgeline --compile miss {rows['forgeline serve --compile (empty cache, v1)']['seconds']:.2f}s", flush=True)
        cache_dir = work / "home" / "compile-cache"
        before = {p.name: p.stat().st_mtime_ns for p in cache_dir.rglob("*.flcc")}
        promotion.promote(store, name, "v2")
        r = forgeline_cold(work, name, body, expected["v2"], ["--compile"], "fl-compile-hit")
        after = {p.name: p.stat().st_mtime_ns for p in cache_dir.rglob("*.flcc")}
        # the server logs hit/miss (r["compile"]); the entry for this program was there (stored by v1)
        # and the key does not depend on weights. A rewritten entry means the hit compiled again.
        r["cache_entry_present"] = bool(before)
        r["cache_entry_rewritten"] = before != after
        rows["forgeline serve --compile (cache hit, v2)"] = r
        print(f"[cold] forgeline --compile hit {r['seconds']:.2f}s (entry present {r['cache_entry_present']}, "
              f"rewritten {r['cache_entry_rewritten']}; server: {r.get('compile')})", flush=True)
        base = rows["safetensors + cold torch.compile"]["seconds"]
        for v in rows.values():
            v["vs_cold_compile"] = v["seconds"] / base
    return {"model": f"{arch} {kwargs}", "input": list(shape), "bytes": nbytes, "rows": rows}


# ---------------------------------------------------------------------------------------------
# 2. hot swap under load
# ---------------------------------------------------------------------------------------------


def bench_swap(work: Path, tier_root: Path, quick: bool, poll_s: float, rate: float, threads: int = 4,
               width: int = 64) -> dict:
    from pipeline import promotion
    from pipeline.shm_tier import ShmTier
    from pipeline.storage.local import LocalStorage

    store = LocalStorage(work / "storage")
    tier = ShmTier(tier_root)
    mods = {v: digits(s, width) for v, s in (("v1", 21), ("v2", 22))}
    for v, m in mods.items():
        publish(store, "swap", v, m, DIGITS_SHAPE, "digits_cnn", {"width": width})
        tier.prewarm(store, "swap", v)
    promotion.promote(store, "swap", "v1")
    x = np.random.default_rng(2).standard_normal((1, *DIGITS_SHAPE), dtype=np.float32)
    body = infer_body(x)
    expected = {v: eager(m, x) for v, m in mods.items()}
    duration = 8.0 if quick else 30.0
    promote_at = duration * 0.5
    srv = Forgeline(work, ["--models", "swap", "--poll-s", str(poll_s)], base_env(work, tier_root), "fl-swap")
    try:
        srv.wait_ready()
        first_answer(srv.port, "swap", body, 120)
        records: list[tuple] = []  # (scheduled, sent, done, status, version, correct)
        lock = threading.Lock()
        t0 = time.perf_counter() + 0.2
        n_total = int(duration * rate)

        def worker(tid: int) -> None:
            c = Client(srv.port, timeout=30)
            mine = []
            for k in range(tid, n_total, threads):
                due = t0 + k / rate
                now = time.perf_counter()
                if due > now:
                    time.sleep(due - now)
                if time.perf_counter() > t0 + duration + 30:  # bounded in time as well as count
                    break
                sent = time.perf_counter()
                status, resp = c.infer("swap", body)
                done = time.perf_counter()
                ver = (resp or {}).get("model_version")
                ok = status == 200 and ver in expected and np.allclose(output_of(resp), expected[ver], atol=1e-4)
                mine.append((due, sent, done, status, ver, ok))
            c.close()
            with lock:
                records.extend(mine)

        ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
        for t in ts:
            t.start()
        time.sleep(max(0.0, t0 + promote_at - time.perf_counter()))
        promotion.promote(store, "swap", "v2", reason="bench/serve.py")
        t_promote = time.perf_counter()
        for t in ts:
            t.join(duration + 60)
        log = srv.log_text()
    finally:
        srv.stop()
    records.sort()
    failed = [r for r in records if not r[5]]
    lat = lambda rs: [(r[2] - r[0]) * 1e3 for r in rs]  # noqa: E731 - from the scheduled send
    v2_done = [r[2] for r in records if r[4] == "v2" and r[1] >= t_promote]
    t_new = min(v2_done) if v2_done else None
    steady = [r for r in records if t0 + 2.0 <= r[0] < t_promote]
    window_end = (t_new if t_new else t_promote + poll_s + 5) + 1.0
    window = [r for r in records if t_promote <= r[0] < window_end]
    after = [r for r in records if r[0] >= window_end]
    old_after = sum(1 for r in records if r[1] > (t_new or 1e18) + 0.5 and r[4] == "v1")
    swap_line = re.findall(r"swapped v1 -> v2 in ([\d.]+)s", log)
    res = {
        "requests": len(records), "rate_rps": rate, "threads": threads, "duration_s": duration, "poll_s": poll_s,
        "failed": len(failed), "failed_examples": [(r[3], r[4]) for r in failed[:3]],
        "steady_p50_ms": pct(lat(steady), 50), "steady_p99_ms": pct(lat(steady), 99),
        "window_p50_ms": pct(lat(window), 50), "window_p99_ms": pct(lat(window), 99),
        "window_requests": len(window), "after_p99_ms": pct(lat(after), 99),
        "promotion_to_new_version_s": (t_new - t_promote) if t_new else None,
        "server_swap_s": float(swap_line[0]) if swap_line else None,
        "v1_answers_after_swap": old_after,
        "max_send_lag_ms": max((r[1] - r[0]) * 1e3 for r in records) if records else None,
    }
    res["width"] = width
    res["window_vs_steady_p99"] = (res["window_p99_ms"] / res["steady_p99_ms"]) if steady and window else None
    return res


# ---------------------------------------------------------------------------------------------
# 3./4. many models: forgeline vs Ray Serve multiplexing
# ---------------------------------------------------------------------------------------------


def zipf_sequence(n_models: int, n: int, s: float = 1.1, seed: int = 0) -> list[int]:
    p = 1.0 / np.arange(1, n_models + 1) ** s
    return np.random.default_rng(seed).choice(n_models, size=n, p=p / p.sum()).tolist()


def lru_misses(seq: list[int], capacity: int) -> list[bool]:
    cache: OrderedDict[int, None] = OrderedDict()
    out = []
    for k in seq:
        if k in cache:
            cache.move_to_end(k)
            out.append(False)
        else:
            out.append(True)
            cache[k] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return out


def drive(port: int, names: list[str], seq: list[int], bodies: dict, expected: dict, threads: int,
          time_limit_s: float) -> dict:
    """Closed loop: ``threads`` clients take the next request of ``seq`` until it is exhausted or
    the time limit passes. Returns per-request latency (ms, by index), failures, throughput."""
    nxt = iter(range(len(seq)))
    lock = threading.Lock()
    lat: dict[int, float] = {}
    bad: list[tuple] = []
    t_end = time.perf_counter() + time_limit_s

    def worker() -> None:
        c = Client(port, timeout=60)
        while time.perf_counter() < t_end:
            with lock:
                i = next(nxt, None)
            if i is None:
                break
            k = seq[i]
            t = time.perf_counter()
            status, resp = c.infer(names[k], bodies[k % len(bodies)])
            dt = (time.perf_counter() - t) * 1e3
            ok = status == 200 and np.allclose(output_of(resp), expected[k], atol=1e-4)
            with lock:
                lat[i] = dt
                if not ok:
                    bad.append((i, status, str(resp)[:160]))
        c.close()

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(time_limit_s + 120)
    elapsed = time.perf_counter() - t0
    return {"lat": lat, "bad": bad, "elapsed": elapsed}


def summarize(run: dict, misses: list[bool], loads: list[float], n_loads: int | None) -> dict:
    lat = run["lat"]
    done = sorted(lat)
    miss = [lat[i] for i in done if misses[i]]
    hit = [lat[i] for i in done if not misses[i]]
    allv = [lat[i] for i in done]
    n = len(done)
    nl = n_loads if n_loads is not None else len(loads)
    return {"requests": n, "failed": len(run["bad"]), "failed_examples": run["bad"][:3],
            "throughput_rps": n / run["elapsed"] if run["elapsed"] else None,
            "hit_rate": 1 - nl / n if n else None, "loads": nl,
            "p50_ms": pct(allv, 50), "p99_ms": pct(allv, 99),
            "hit_p50_ms": pct(hit, 50), "hit_p99_ms": pct(hit, 99),
            "swapin_p50_ms": pct(miss, 50), "swapin_p99_ms": pct(miss, 99), "swapin_requests": len(miss),
            "load_p50_ms": pct([v * 1e3 for v in loads], 50), "load_p99_ms": pct([v * 1e3 for v in loads], 99)}


class Fleet:
    """N DigitsCNN models published and pre-warmed into the shm tier, with expected answers."""

    def __init__(self, work: Path, tier_root: Path, n: int, width: int):
        from pipeline import export
        from pipeline.shm_tier import ShmTier
        from pipeline.storage.local import LocalStorage

        self.store = LocalStorage(work / "storage")
        self.tier = ShmTier(tier_root)
        self.width = width
        self.names = [f"m{k:03d}" for k in range(n)]
        rng = np.random.default_rng(3)
        xs = [rng.standard_normal((1, *DIGITS_SHAPE), dtype=np.float32) for _ in range(4)]
        self.bodies = {j: infer_body(x) for j, x in enumerate(xs)}
        self.expected = {}
        self.files: dict[str, list[str]] = {}
        t = time.perf_counter()
        for k, name in enumerate(self.names):
            m = digits(1000 + k, width)
            man = publish(self.store, name, "v1", m, DIGITS_SHAPE, "digits_cnn", {"width": width})
            self.tier.prewarm(self.store, name, "v1")
            self.expected[k] = eager(m, xs[k % len(xs)])
            folder = self.tier.resolve(name, "v1")
            self.files[name] = [str(folder / s["file"]) for s in man["shards"]]
        self.nbytes = int(man["total_size"])
        self.manifest = export.read_manifest(self.store, self.names[0], "v1")
        print(f"[many] published and pre-warmed {n} models ({self.nbytes / 1e6:.2f} MB each) in "
              f"{time.perf_counter() - t:.1f}s", flush=True)


def bare_loader(fleet: Fleet, count: int) -> dict:
    """`pipeline.loading.load` of pre-warmed shm copies into meta-built modules, in this process;
    plain (zero-copy), then as the server loads (verify sha256, owned copy), then the server's
    whole `load_version` (manifest, golden check...) without HTTP."""
    from pipeline.loading import load
    from pipeline.serving import loader

    def meta():
        return loader.meta_module(fleet.manifest)

    names = fleet.names[-count:]  # rarely requested ones: not in this process's page tables
    out: dict[str, list[float]] = {"bare": [], "verify_owned": [], "load_version": [], "lv_load": [], "lv_golden": [],
                                   "reload": [], "reload_fresh": []}
    shas = {s["file"]: s["sha256"] for s in fleet.manifest["shards"]}
    for name in names:
        folder = str(Path(fleet.files[name][0]).parent)
        m = meta()
        t = time.perf_counter()
        load(folder, "cpu", module=m)
        out["bare"].append(time.perf_counter() - t)
    for name in names:
        folder = str(Path(fleet.files[name][0]).parent)
        man = json.loads((Path(folder) / "manifest.json").read_text()) if (Path(folder) / "manifest.json").exists() else None
        sha = {s["file"]: s["sha256"] for s in man["shards"]} if man else shas
        m = meta()
        t = time.perf_counter()
        load(folder, "cpu", module=m, verify=True, owned=True, expected_sha256=sha)
        out["verify_owned"].append(time.perf_counter() - t)
    for name in names:
        t = time.perf_counter()
        lv = loader.load_version(fleet.store, name, "v1", tier=fleet.tier)
        out["load_version"].append(time.perf_counter() - t)
        out["lv_load"].append(lv.seconds["load"])
        out["lv_golden"].append(lv.seconds["golden"])
        assert lv.source == "shm", lv.source
        loader.release(lv)
    from pipeline import export

    for name in names:  # what the server does when an evicted version is requested again
        t = time.perf_counter()
        man = export.read_manifest(fleet.store, name, "v1")
        lv = loader.load_version(fleet.store, name, "v1", tier=fleet.tier, manifest=man, golden_rows=0)
        out["reload"].append(time.perf_counter() - t)
        assert lv.source == "shm" and lv.golden.get("reused"), (lv.source, lv.golden)
        loader.release(lv)
        # the server's swap-in of a model evicted less than --poll-s after its manifest was read:
        # that read is reused (ModelRegistry._manifest)
        t = time.perf_counter()
        lv = loader.load_version(fleet.store, name, "v1", tier=fleet.tier, manifest=man, golden_rows=0)
        out["reload_fresh"].append(time.perf_counter() - t)
        loader.release(lv)
    return {k: {"p50_ms": pct([x * 1e3 for x in v], 50), "p99_ms": pct([x * 1e3 for x in v], 99), "n": len(v)}
            for k, v in out.items()}


def bench_many_forgeline(work: Path, tier_root: Path, fleet: Fleet, seq: list[int], misses: list[bool],
                         threads: int, resident: int, time_limit_s: float) -> dict:
    budget = int((resident + 0.5) * fleet.nbytes)
    srv = Forgeline(work, ["--budget", str(budget), "--poll-s", "2"], base_env(work, tier_root), "fl-many")
    try:
        srv.wait_ready()
        run = drive(srv.port, fleet.names, seq, fleet.bodies, fleet.expected, threads, time_limit_s)
        log = srv.log_text()
        metrics = srv.metrics()
    finally:
        srv.stop()
    loads = re.findall(r"loaded from (\w+) in ([\d.]+)s", log)
    n_loads = int(sum(float(v) for v in re.findall(r'forgeline_serving_loads_total\{[^}]*result="ok"[^}]*\} ([\d.e+]+)', metrics)))
    res = summarize(run, misses, [float(s) for _, s in loads], n_loads)
    res["load_sources"] = sorted(set(src for src, _ in loads))
    res["budget_bytes"] = budget
    res["evictions"] = int(sum(float(v) for v in re.findall(r"forgeline_serving_evictions_total\{[^}]*\} ([\d.e+]+)", metrics)))
    return res


RAY_APP = r'''
import time
import numpy as np
import torch
from ray import serve
from safetensors.torch import load_file
from starlette.requests import Request
from starlette.responses import JSONResponse


@serve.deployment(num_replicas=1, max_ongoing_requests=64)
class Multi:
    def __init__(self, files, width, threads, root):
        import sys
        sys.path.insert(0, root)
        torch.set_num_threads(threads)
        self.files, self.width, self.loads = files, width, []

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS)
    async def get_model(self, model_id: str):
        from pipeline.models import DigitsCNN
        t = time.perf_counter()
        m = DigitsCNN(width=self.width)
        sd = {}
        for f in self.files[model_id]:
            sd.update(load_file(f))
        m.load_state_dict(sd)
        m.eval()
        self.loads.append(time.perf_counter() - t)
        return m

    async def __call__(self, request: Request):
        if request.url.path.endswith("/stats"):
            return JSONResponse({"loads": self.loads})
        body = await request.json()
        inp = body["inputs"][0]
        x = torch.from_numpy(np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"]))
        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id)
        with torch.inference_mode():
            y = model(x).numpy()
        return JSONResponse({"model_name": model_id, "outputs": [{"name": "output", "datatype": "FP32",
                             "shape": list(y.shape), "data": y.ravel().tolist()}]})
'''


class RayServe:
    """A local Ray (files under a temp folder of ours) with Serve's HTTP proxy on 127.0.0.1; the
    multiplexing app is deployed per round (fresh replica: nothing resident) and deleted after."""

    def __init__(self, work: Path, fleet: Fleet, resident: int):
        import ray
        from ray import serve

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local only; no token file in $HOME
        self.ray, self.serve, self.fleet = ray, serve, fleet
        self.tmp = Path(tempfile.mkdtemp(prefix="flray-", dir="/tmp"))
        (work / "ray_multi_app.py").write_text(RAY_APP.replace("MAX_MODELS", str(resident)))
        sys.path.insert(0, str(work))
        self.port = free_port()
        t = time.perf_counter()
        ray.init(_temp_dir=str(self.tmp), num_cpus=os.cpu_count() or 2, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{work}"}})
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.start_s = time.perf_counter() - t

    def run(self, seq, misses, threads, time_limit_s) -> dict:
        import torch

        import ray_multi_app

        t = time.perf_counter()
        self.serve.run(ray_multi_app.Multi.bind(self.fleet.files, self.fleet.width, torch.get_num_threads(), str(ROOT)),
                       route_prefix="/", name="multi")
        deadline = time.perf_counter() + 120
        while get(f"http://127.0.0.1:{self.port}/stats", 5) != 200 and time.perf_counter() < deadline:
            time.sleep(0.1)
        deploy_s = time.perf_counter() - t
        try:
            run = drive(self.port, self.fleet.names, seq, self.fleet.bodies, self.fleet.expected, threads, time_limit_s)
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as r:
                loads = json.loads(r.read())["loads"]
        finally:
            self.serve.delete("multi")
        res = summarize(run, misses, loads, None)
        res["deploy_s"] = deploy_s
        return res

    def close(self) -> None:
        try:
            self.serve.shutdown()
        except Exception:  # noqa: BLE001
            pass
        self.ray.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


def best_side(rounds: list[dict]) -> dict:
    """Each side's best round (highest throughput): other helpers' load on a shared machine only
    ever slows a round down. Every round is kept in the JSON."""
    ok = [r for r in rounds if "throughput_rps" in r]
    if not ok:
        return rounds[-1]
    return {**max(ok, key=lambda r: r["throughput_rps"]), "rounds": len(ok)}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    p.add_argument("--only", default="cold,swap,many,ray", help="comma-separated: cold,swap,many,ray")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--models", type=int, default=None, help="models in the many-models run (default 100; quick 12)")
    p.add_argument("--resident", type=int, default=None, help="models the budget holds (default 10; quick 3)")
    p.add_argument("--requests", type=int, default=None, help="requests in the many-models run (default 3000)")
    p.add_argument("--threads", type=int, default=4, help="client threads (swap and many)")
    p.add_argument("--rate", type=float, default=40.0, help="total req/s in the swap run")
    p.add_argument("--poll-s", type=float, default=2.0, help="forgeline serve --poll-s in the swap run")
    p.add_argument("--width", type=int, default=64, help="DigitsCNN width of the many models")
    p.add_argument("--time-limit-s", type=float, default=300.0, help="bound of each many-models run")
    p.add_argument("--rounds", type=int, default=None, help="alternating forgeline/Ray rounds (default 3; quick 1)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    a = p.parse_args(argv)
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    unknown = only - {"cold", "swap", "many", "ray"}
    if unknown:
        p.error(f"unknown --only part(s): {sorted(unknown)}")
    n_models = a.models or (12 if a.quick else 100)
    resident = a.resident or (3 if a.quick else 10)
    n_req = a.requests or (150 if a.quick else 1500)
    a.rounds = a.rounds or (1 if a.quick else 3)

    import torch

    work = Path(tempfile.mkdtemp(prefix="forgeline-bench-serve-"))
    tier_root = Path(tempfile.mkdtemp(prefix="forgeline-bench-serve-", dir="/dev/shm"))
    machine = f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    results: dict = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "quick": a.quick}
    try:
        if "cold" in only:
            results["cold"] = bench_cold(work, a.quick)
        if "swap" in only:
            results["swap"] = bench_swap(work, tier_root, a.quick, a.poll_s, min(a.rate, 40.0) if a.quick else a.rate,
                                         a.threads, a.width)
            print(f"[swap] {json.dumps(results['swap'])}", flush=True)
        if only & {"many", "ray"}:
            fleet = Fleet(work, tier_root, n_models, a.width)
            seq = zipf_sequence(n_models, n_req)
            misses = lru_misses(seq, resident)
            results["many_setup"] = {"models": n_models, "resident": resident, "requests": n_req, "zipf_s": 1.1,
                                     "seed": 0, "width": a.width, "bytes_per_model": fleet.nbytes,
                                     "lru_sim_hit_rate": 1 - sum(misses) / len(misses), "threads": a.threads}
            results["bare_loader"] = bare_loader(fleet, 5 if a.quick else 20)
            print(f"[many] bare loader {json.dumps(results['bare_loader'])}", flush=True)
            rs = None
            if "ray" in only:
                try:
                    rs = RayServe(work, fleet, resident)
                    results["ray_start_s"] = rs.start_s
                except ImportError:
                    results["ray"] = {"error": 'ray[serve] is not installed: pip install -e ".[bench]" -c constraints.txt'}
            rounds: dict[str, list] = {"many": [], "ray": []}
            try:
                for k in range(a.rounds):  # alternate the sides: machine noise hits both alike
                    if "many" in only:
                        r = bench_many_forgeline(work, tier_root, fleet, seq, misses, a.threads, resident, a.time_limit_s)
                        rounds["many"].append(r)
                        print(f"[many] round {k + 1} forgeline {json.dumps(r)}", flush=True)
                    if rs is not None:
                        r = rs.run(seq, misses, a.threads, a.time_limit_s)
                        rounds["ray"].append(r)
                        print(f"[many] round {k + 1} ray {json.dumps(r)}", flush=True)
            finally:
                if rs is not None:
                    rs.close()
            for side, rr in rounds.items():
                if rr:
                    results[side] = best_side(rr)
                    results[f"{side}_rounds"] = rr
    finally:
        shutil.rmtree(tier_root, ignore_errors=True)
        if a.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


def _f(v, fmt="{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=160)
    if "cold" in r:
        c = r["cold"]
        t = Table(title=f"cold start: {c['model']} input {c['input']}, {c['bytes'] / 1e6:.0f} MB, {r['machine']}")
        for col in ("path", "seconds to first correct answer", "vs cold compile", "note"):
            t.add_column(col)
        for k, v in c["rows"].items():
            note = ""
            if "cache_entry_present" in v:
                note = (f"cache entry from v1 present: {v['cache_entry_present']}"
                        f"{' (rewritten: the hit compiled again)' if v['cache_entry_rewritten'] else ''};")
            if c_ := v.get("compile"):
                steps = ", ".join(f"{k} {s:.2f}s" for k, s in c_["steps"].items())
                note += f" {c_['kind']}, cache {c_['cache']}: {c_['seconds']:.2f}s ({steps});"
            if v.get("server_load_s") is not None:
                note += f" server load+check {v['server_load_s']:.2f}s; ready {v['ready_s']:.2f}s"
            t.add_row(k, _f(v["seconds"]), _f(v.get("vs_cold_compile"), "{:.2f}x"), note.strip())
        con.print(t)
    if "swap" in r:
        s = r["swap"]
        t = Table(title=f"hot swap under load: DigitsCNN width {s.get('width')}, {s['threads']} threads, {s['rate_rps']:.0f} req/s, "
                        f"{s['duration_s']:.0f}s, --poll-s {s['poll_s']}")
        for col in ("requests", "failed", "steady P50/P99 ms", "swap-window P50/P99 ms", "window/steady P99",
                    "promotion → new version s", "server swap s"):
            t.add_column(col)
        t.add_row(str(s["requests"]), str(s["failed"]), f"{_f(s['steady_p50_ms'])} / {_f(s['steady_p99_ms'])}",
                  f"{_f(s['window_p50_ms'])} / {_f(s['window_p99_ms'])}", _f(s["window_vs_steady_p99"], "{:.2f}x"),
                  _f(s["promotion_to_new_version_s"]), _f(s["server_swap_s"], "{:.3f}"))
        con.print(t)
    if "bare_loader" in r:
        b = r["bare_loader"]
        ms = r["many_setup"]
        t = Table(title=f"load one of the many models from /dev/shm in-process ({ms['bytes_per_model'] / 1e6:.2f} MB, "
                        f"DigitsCNN width {ms['width']})")
        for col in ("what", "P50 ms", "P99 ms"):
            t.add_column(col)
        for k, label in (("bare", "pipeline.loading.load into a meta module (bare loader)"),
                         ("verify_owned", "same + verify sha256 + owned copy (what the server asks)"),
                         ("load_version", "serving.loader.load_version (+ manifest, golden check, warm-up)"),
                         ("lv_load", "  of which: manifest + verified load"),
                         ("lv_golden", "  of which: golden check (8 recorded rows through the model)"),
                         ("reload", "re-load after an LRU eviction (manifest, verified owned load; golden passed)"),
                         ("reload_fresh", "  same, manifest read < --poll-s ago (the server's usual swap-in)")):
            if k in b:
                t.add_row(label, _f(b[k]["p50_ms"]), _f(b[k]["p99_ms"]))
        con.print(t)
        for k, what in (("reload", "re-load"), ("reload_fresh", "re-load, fresh manifest")):
            if b.get(k, {}).get("p50_ms") and b["bare"].get("p50_ms"):
                con.print(f"{what} / bare loader at P50: {b[k]['p50_ms'] / b['bare']['p50_ms']:.2f}x (target ≤ 2x)")
    sides = [(k, r[k]) for k in ("many", "ray") if k in r and "error" not in r[k]]
    if sides:
        ms = r["many_setup"]
        t = Table(title=f"many models: {ms['models']} models, {ms['resident']} resident, Zipf s={ms['zipf_s']} seed "
                        f"{ms['seed']}, {ms['requests']} requests, {ms['threads']} threads (LRU-sim hit rate "
                        f"{ms['lru_sim_hit_rate']:.3f}); best round (throughput) of {sides[0][1].get('rounds', 1)}")
        for col in ("server", "req/s", "failed", "hit rate", "P50/P99 ms", "hit P50/P99 ms",
                    "swap-in request P50/P99 ms", "load P50/P99 ms"):
            t.add_column(col)
        for k, v in sides:
            t.add_row("forgeline serve" if k == "many" else "Ray Serve 2.60 multiplexed", _f(v["throughput_rps"], "{:.1f}"),
                      str(v["failed"]), _f(v["hit_rate"], "{:.3f}"), f"{_f(v['p50_ms'])} / {_f(v['p99_ms'])}",
                      f"{_f(v['hit_p50_ms'])} / {_f(v['hit_p99_ms'])}",
                      f"{_f(v['swapin_p50_ms'])} / {_f(v['swapin_p99_ms'])}",
                      f"{_f(v['load_p50_ms'])} / {_f(v['load_p99_ms'])}")
        con.print(t)
        if len(sides) == 2:
            f, y = r["many"], r["ray"]
            con.print(f"forgeline/Ray throughput {f['throughput_rps'] / y['throughput_rps']:.2f}x; swap-in request P50 "
                      f"{f['swapin_p50_ms'] / y['swapin_p50_ms']:.2f}x, P99 {f['swapin_p99_ms'] / y['swapin_p99_ms']:.2f}x "
                      "of Ray's")
    for k in ("many", "ray"):
        if k in r and "error" in r[k]:
            con.print(f"{k}: {r[k]['error']}")


if __name__ == "__main__":
    sys.exit(main())
