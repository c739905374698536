"""``forgeline demo``: the model's whole lifecycle on the embedded defaults, then the loop closing
live through a model server.

    forgeline demo [--batch digits-0001] [--drift-batch digits-shifted] [--no-serve] [--no-retrain]

1. ``lifecycle`` on a batch of scikit-learn's digits: ingest, train, gate, export, quantize, promote.
2. ``forgeline serve`` starts as a subprocess on 127.0.0.1 (a free port), sampling a share of the
   requests it answers into short traffic windows (``incoming/serving-<model>-<time>-<id>/``).
3. A client (a few threads, a fixed request rate, plain HTTP in the v2 protocol) sends the digits
   test images and scores every answer against labels only it knows.
4. The traffic shifts (``pipeline.datagen.shift``: brighter, rotated, noisier digits). The first
   window holding only shifted traffic is ingested: its drift checks fail.
5. The labeled shifted batch lands and is ingested; the ``drift_retrain`` sensor (evaluated here, as
   the daemon would) requests ``train_and_package``, which retrains, gates and promotes. With
   ``FORGELINE_SERVE_URLS`` naming the demo server, its ``model_rollout`` waits for the swap.
6. The client keeps going a few seconds on the new version, then one table: live accuracy before
   the drift, during it and after the swap, requests, failures, P50/P99, and the swap time
   (promotion → first answer of the new version). The server stops at the end.

``--no-serve`` keeps the offline loop (the shifted batch lands, is ingested, the sensor asks for
the retrain); ``--no-retrain`` stops at the sensor's request.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.table import Table

from jobs.runs import (
    load_defs,
    report_failure,
    open_store,
    console,
    ensure_instance_home,
    materialization_table,
    run_job,
)

# The live loop's pace: short enough for `make demo` on 2 cores, long enough for every phase to
# have a few hundred answers and for the drift checks to see a full window.
CLIENT_THREADS = 3
CLIENT_RATE = 30.0  # requests per second, all threads together, one image per request
SAMPLE_RATE = 0.5  # share of answered rows the server writes back
WINDOW_S = 6.0  # a traffic window closes this long after its first sample
CLEAN_S = 8.0  # traffic before the shift
AFTER_SWAP_S = 5.0  # traffic answered by the new version before the demo ends
SERVER_START_TIMEOUT_S = 120.0
WINDOW_TIMEOUT_S = 90.0
SWAP_TIMEOUT_S = 60.0


def add_parser(sub) -> None:
    """Register ``demo`` on the CLI's subparsers."""
    from jobs.withdraw_cli import batch_name, optional_batch_name  # batch names checked before anything is written

    s = sub.add_parser("demo", help="the whole lifecycle, then the loop closing live through a model server")
    s.add_argument("--batch", default="digits-0001", type=batch_name)
    s.add_argument("--drift-batch", default="digits-shifted", type=optional_batch_name,
                   help="the labeled drifted batch that lands after the traffic shifted ('' to stop after the lifecycle)")
    s.add_argument("--no-serve", dest="serve", action="store_false",
                   help="no model server: the drifted batch lands and is ingested, the sensor asks for the retrain")
    s.add_argument("--no-retrain", dest="retrain", action="store_false",
                   help="do not run the retrain the drift sensor requests")
    s.set_defaults(fn=cmd_demo)


def cmd_demo(args) -> int:
    from pipeline import datagen
    from pipeline.storage import join

    home = ensure_instance_home()
    store = open_store()
    console.rule("[bold]forgeline demo: the whole lifecycle on the embedded defaults")
    console.print(f"instance: {home}   storage: {store.uri()}")
    prefix = join("incoming", args.batch)
    if not store.exists(join(prefix, datagen.READY_MARKER)):
        with console.status("generating the digits batch (scikit-learn's bundled data)"):
            datagen.write_batch(store, prefix, datagen.load_digits(), image_size=32)
    console.print(f"[bold]1.[/] lifecycle on {args.batch}: ingest → drift checks → train → gates → export → "
                  "quantize → promote")
    result = run_job("lifecycle", partition=args.batch)
    console.print(materialization_table(result))
    if not result.success:
        return report_failure(result)
    ok = True
    if args.drift_batch and args.serve:
        ok = _live_loop(store, args)
    elif args.drift_batch:
        ok = _offline_drift(store, args.drift_batch, retrain=args.retrain)
    console.rule("[bold]where things are")
    console.print(f"instance: {home}\nstorage:  {store.uri()}\nUI:       `make ui` (or `forgeline ui`), then "
                  "http://127.0.0.1:3000: runs, asset lineage, checks (drift on the serving window), promoted_model, "
                  "model_rollout\nnumbers:  `forgeline report`; versions: `forgeline models digits`")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------------------------


def check_table(result) -> Table:
    """Every asset check a run evaluated: verdict, severity and the drift headline when present."""
    table = Table(title="Checks")
    for col in ("check", "partition", "result", "detail"):
        table.add_column(col, overflow="fold")
    for e in result.get_asset_check_evaluations():
        md = {k: v.value for k, v in e.metadata.items()}
        verdict = "[green]passed" if e.passed else f"[red]failed ({e.severity.value})"
        detail = e.description or ""
        if "report" in md:
            detail += f"\nreport: {md['report']}"
        table.add_row(f"{e.asset_key.to_user_string()}:{e.check_name}", e.partition or "", verdict, detail)
    return table


def _land_shifted(store, batch: str) -> None:
    from pipeline import datagen
    from pipeline.storage import join

    prefix = join("incoming", batch)
    if not store.exists(join(prefix, datagen.READY_MARKER)):
        datagen.write_batch(store, prefix, datagen.shift(datagen.load_digits()), image_size=32)


def _ingest(batch: str) -> bool:
    """``ingest`` for one landed batch, its checks printed; says which drift checks failed."""
    result = run_job("ingest", partition=batch)
    console.print(check_table(result))
    if not result.success:
        report_failure(result)
        return False
    drifted = sorted(f"{e.check_name} ({e.severity.value})" for e in result.get_asset_check_evaluations()
                     if not e.passed and e.check_name.endswith("_drift"))
    console.print(f"{batch}: " + (f"[red]drift[/]: {', '.join(drifted)} failed" if drifted
                                   else "no drift check failed"))
    return True


def _sensor_request():
    """Evaluate ``drift_retrain`` as the daemon would; its run request, or None (the reason printed)."""
    import dagster as dg

    defs = load_defs()
    sensor = defs.resolve_sensor_def("drift_retrain")
    with dg.build_sensor_context(instance=dg.DagsterInstance.get(),
                                 resources={"storage": defs.resources["storage"]}) as ctx:
        out = sensor(ctx)
    requests = getattr(out, "run_requests", None) or []
    if not requests:
        console.print(f"drift_retrain: {out.skip_reason.skip_message if out.skip_reason else 'nothing to do'}")
        return None
    req = requests[0]
    console.print(f"drift_retrain requests [bold]train_and_package[/] (run key {req.run_key}, "
                  f"trigger {req.tags.get('forgeline/trigger')})")
    return req


def _offline_drift(store, batch: str, *, retrain: bool) -> bool:
    """The loop without a server: a drifted batch lands and is ingested, its drift checks fail at
    ERROR, and the `drift_retrain` sensor — evaluated here rather than by the daemon — asks for a retrain."""
    console.rule(f"[bold]a drifted batch lands: {batch} (brighter, rotated, noisier digits)")
    _land_shifted(store, batch)
    if not _ingest(batch):
        return False
    req = _sensor_request()
    if req is None or not retrain:
        return True
    run = run_job("train_and_package", tags=req.tags)
    console.print(materialization_table(run))
    if not run.success:
        report_failure(run)
    return run.success


# ---------------------------------------------------------------------------------------------
# The client: fixed rate, a few threads, accuracy against its own labels
# ---------------------------------------------------------------------------------------------


@dataclass
class Answer:
    sent: float  # wall clock (time.time())
    received: float
    traffic: str  # "clean" | "shifted"
    version: str | None  # the version that answered; None for a failed request
    correct: bool
    error: str | None = None
    normalised_for: str | None = None  # the version whose preprocessing statistics the input was normalised with

    @property
    def latency_ms(self) -> float:
        return (self.received - self.sent) * 1e3


def client_images(spec: dict, workdir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits test split, clean and shifted, preprocessed as evaluation does (resize, center
    crop; on the 0..1 scale: the client normalises with the answering version's statistics), with
    the labels. The client's own copy: written as a local shard and read through the same loader."""
    from pipeline import datagen
    from pipeline.evaluate import eval_loader
    from pipeline.storage import LocalStorage

    digits = datagen.load_digits()
    test = np.flatnonzero(digits.splits == "test")
    channels = int(spec.get("channels", 1))
    unit = {**spec, "mean": [0.0] * channels, "std": [1.0] * channels}
    local = LocalStorage(workdir, fsync=False)
    out = {}
    for kind, d in (("clean", digits), ("shifted", datagen.shift(digits))):
        datagen.write_tar(local, f"{kind}.tar", ((f"{d.ids[i]:06d}", "png", datagen.encode_image(d.images[i], 32),
                                                  int(d.labels[i])) for i in test))
        xs, ys = [], []
        with eval_loader([str(workdir / f"{kind}.tar")], unit, 128, "cpu") as loader:
            for x, y in loader.epoch(0):
                xs.append(x.numpy().copy())
                ys.append(y.numpy().copy())
        out[kind] = (np.concatenate(xs).astype(np.float32), np.concatenate(ys))
    return out


class TrafficClient:
    """``threads`` threads sending one image per request at ``rate`` requests/s in all, over plain
    HTTP (Open Inference Protocol v2, binary input), to the model's unversioned endpoint. Each
    answer is scored against the label; a request that fails (connection, non-200, bad body) is
    recorded with its error and never stops the client."""

    def __init__(self, url: str, model: str, images: dict, normalisation, *, threads: int = CLIENT_THREADS,
                 rate: float = CLIENT_RATE, timeout_s: float = 10.0):
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port, self.model = host, int(port), model
        self.images, self.normalisation = images, normalisation  # normalisation(version) -> (mean, std)
        self.threads, self.rate, self.timeout_s = threads, rate, timeout_s
        self.traffic = "clean"
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._version: str | None = None  # the version the last answer came from
        self._in_flight = {"clean": 0, "shifted": 0}
        self._workers: list[threading.Thread] = []

    def start(self, version: str) -> None:
        self._version = version
        t0 = time.monotonic()
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i, t0), name=f"demo-client-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def set_traffic(self, traffic: str) -> None:
        with self._lock:
            self.traffic = traffic

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(self.timeout_s + 1)

    def wait_idle(self, traffic: str, timeout_s: float | None = None) -> None:
        """Until no request of ``traffic`` is in flight (at most ``timeout_s``, default the request timeout)."""
        deadline = time.monotonic() + (self.timeout_s + 1 if timeout_s is None else timeout_s)
        while time.monotonic() < deadline:
            with self._lock:
                if not self._in_flight[traffic]:
                    return
            time.sleep(0.02)

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)

    def _request(self, conn: http.client.HTTPConnection, x: np.ndarray) -> dict:
        raw = np.ascontiguousarray(x[None], dtype="<f4").tobytes()
        header = json.dumps({"inputs": [{"name": "input", "shape": [1, *x.shape], "datatype": "FP32",
                                         "parameters": {"binary_data_size": len(raw)}}]}).encode()
        conn.request("POST", f"/v2/models/{self.model}/infer", body=header + raw,
                     headers={"Content-Type": "application/octet-stream",
                              "Inference-Header-Content-Length": str(len(header))})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body[:200].decode(errors='replace')}")
        return json.loads(body)

    def _run(self, i: int, t0: float) -> None:
        rng = np.random.default_rng(i)
        period = self.threads / self.rate
        due = t0 + i / self.rate
        conn = None
        while not self._stop.is_set():
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            due = max(due + period, time.monotonic() - period)  # fixed rate; a late request does not burst
            with self._lock:
                traffic = self.traffic
                self._in_flight[traffic] += 1
            xs, ys = self.images[traffic]
            k = int(rng.integers(len(ys)))
            normalised_for = self._version
            mean, std = self.normalisation(normalised_for)
            x = (xs[k] - mean) / std
            sent = time.time()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
                out = self._request(conn, x.astype(np.float32))
                logits = np.asarray(out["outputs"][0]["data"], dtype=np.float32)
                version = out.get("model_version")
                answer = Answer(sent, time.time(), traffic, version, int(logits.argmax()) == int(ys[k]),
                                normalised_for=normalised_for)
                self._version = version or self._version
            except Exception as e:  # noqa: BLE001 - a failed request is a result, not the end of the client
                if conn is not None:
                    conn.close()
                conn = None
                answer = Answer(sent, time.time(), traffic, None, False, f"{type(e).__name__}: {e}"[:200],
                                normalised_for)
            with self._lock:
                self.answers.append(answer)
                self._in_flight[traffic] -= 1
        if conn is not None:
            conn.close()


# ---------------------------------------------------------------------------------------------
# The live loop
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def _forgeline_argv() -> list[str]:
    script = Path(sys.executable).with_name("forgeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "jobs.cli"]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    _file: object = field(repr=False, default=None)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # drains in-flight requests, lands the open window
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        if self._file is not None:
            self._file.close()
        return self.proc.returncode


def start_server(model: str, log: Path) -> Server:
    """``forgeline serve`` on 127.0.0.1 and a free port, sampling traffic into short windows,
    polling the production alias twice a second (:func:`wait_ready` waits for it to answer)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [*_forgeline_argv(), "serve", "--models", model, "--host", "127.0.0.1", "--port", str(port),
            "--poll-s", "0.5", "--sample-rate", str(SAMPLE_RATE), "--sample-window-s", str(WINDOW_S),
            "--drain-timeout-s", "10"]
    console.print(f"$ {' '.join(['forgeline', *argv[len(_forgeline_argv()):]])}   (log: {log})")
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "wb")
    proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Server(proc, url, log, f)


def wait_ready(server: Server, model: str) -> None:
    """Returns once ``model`` answers on ``server``; stops it and raises when it exits or times out."""
    proc, url, log = server.proc, server.url, server.log
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"forgeline serve exited ({proc.returncode}) before answering; log {log}:\n"
                               + log.read_text(errors="replace")[-2000:])
        if _get(f"{url}/v2/models/{model}/ready")[0] == 200:
            return
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"forgeline serve did not serve {model} within {SERVER_START_TIMEOUT_S:.0f}s; log {log}")
        time.sleep(0.25)


def _windows(store, model: str) -> list[str]:
    """Traffic windows of ``model`` that landed (``_READY`` written), oldest first."""
    from pipeline.serving.traffic import window_model

    names = set()
    for o in store.list("incoming"):
        parts = o.key.split("/")
        if len(parts) == 3 and parts[2] == "_READY" and window_model(parts[1]) == model:
            names.add(parts[1])
    return sorted(names)


def _window_times(store, window: str) -> tuple[float, float, int, list[str]]:
    """(first, last) answer time of a window's samples, their count and the versions that answered."""
    import io

    import polars as pl

    df = pl.read_parquet(io.BytesIO(store.read(f"incoming/{window}/predictions.parquet")))
    times = [t.replace(tzinfo=timezone.utc).timestamp() for t in df["time"].to_list()]
    return min(times), max(times), df.height, sorted(set(df["model_version"].to_list()))


def _wait_for_window(store, model: str, after: float, skip: set[str]) -> tuple[str, int]:
    """The first window landed whose every sample was answered after ``after`` (wall clock)."""
    deadline = time.monotonic() + WINDOW_TIMEOUT_S
    while time.monotonic() < deadline:
        for w in _windows(store, model):
            if w in skip:
                continue
            first, _, n, _ = _window_times(store, w)
            if first > after:
                return w, n
            skip.add(w)
        time.sleep(0.5)
    raise RuntimeError(f"no window of shifted traffic landed within {WINDOW_TIMEOUT_S:.0f}s")


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S")


def phase_table(answers: list[Answer], before: str, after: str | None, swap_at: float | None) -> Table:
    """Live accuracy per phase: clean traffic on the first version, shifted traffic before the swap,
    shifted traffic after it. A failed request counts in the phase its send time falls in."""
    names = {before: "v1", **({after: "v2"} if after else {})}
    phases = [("before drift", "clean"), ("drift", "shifted")] + ([("after swap", "shifted")] if after else [])

    def phase_of(a: Answer) -> int:
        if a.traffic == "clean":
            return 0
        if after and (a.version == after or (a.version is None and swap_at is not None and a.sent >= swap_at)):
            return 2
        return 1

    legend = ", ".join(f"{short} = {v}" for v, short in names.items())
    table = Table(title="Live traffic, as the client saw it", caption=legend)
    for col in ("phase", "traffic", "version", "from", "s", "requests", "failed", "accuracy", "P50 ms", "P99 ms"):
        table.add_column(col, justify="left" if col in ("phase", "traffic", "version", "from") else "right")
    rows: list[list[Answer]] = [[] for _ in phases]
    for a in answers:
        rows[phase_of(a)].append(a)
    for (name, traffic), got in zip(phases, rows):
        ok = [a for a in got if a.error is None]
        lat = [a.latency_ms for a in ok]
        acc = f"{sum(a.correct for a in ok) / len(ok):.3f}" if ok else "—"
        versions = ", ".join(names.get(v, v) for v in sorted({a.version for a in ok})) or "—"
        start, end = (min(a.sent for a in got), max(a.received for a in got)) if got else (None, None)
        table.add_row(name, traffic, versions, _clock(start) if got else "—", f"{end - start:.0f}" if got else "—",
                      str(len(got)), str(len(got) - len(ok)), acc, _ms(_pct(lat, 50)), _ms(_pct(lat, 99)))
    return table


def _live_loop(store, args) -> bool:
    from pipeline import export, promotion, settings

    model = settings.model_name()
    current = promotion.production(store, model)
    if current is None:
        console.print(f"[red]no production version of {model} after the lifecycle: nothing to serve")
        return False
    v1 = current["version"]
    spec_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    spec_lock = threading.Lock()

    def normalisation(version: str) -> tuple[np.ndarray, np.ndarray]:
        """The answering version's mean/std (its manifest's preprocessing spec), per channel."""
        with spec_lock:
            if version not in spec_cache:
                spec = export.read_manifest(store, model, version)["metadata"]["spec"]
                shape = (-1, 1, 1)
                spec_cache[version] = (np.asarray(spec["mean"], np.float32).reshape(shape),
                                       np.asarray(spec["std"], np.float32).reshape(shape))
            return spec_cache[version]

    console.rule(f"[bold]2. the model server: {model}/{v1} in production")
    console.print(f"forgeline serve samples {SAMPLE_RATE:.0%} of the rows it answers into windows of {WINDOW_S:g}s "
                  f"(incoming/serving-{model}-<time>-<id>/: unlabeled batches for the drift checks)")
    server = start_server(model, settings.home() / "demo" / "serve.log")
    client, window = None, None
    try:
        spec = export.read_manifest(store, model, v1)["metadata"]["spec"]
        with console.status("client: preprocessing the digits test images (clean and shifted) while the server starts"):
            with tempfile.TemporaryDirectory(prefix="forgeline-demo-client-") as tmp:
                images = client_images(spec, Path(tmp))
            wait_ready(server, model)
        console.print(f"[green]serving[/] {server.url}/v2/models/{model} ({model}/{v1}); it stops at the end of the demo")
        n_test = len(images["clean"][1])

        console.rule("[bold]3. live traffic")
        client = TrafficClient(server.url, model, images, normalisation)
        console.print(f"client: {CLIENT_THREADS} threads, {CLIENT_RATE:g} requests/s, one image each: the "
                      f"{n_test} digits test images; the labels stay with the client, which scores every answer")
        client.start(v1)
        with console.status(f"clean traffic for {CLEAN_S:g}s"):
            time.sleep(CLEAN_S)
        _summary_line(client.snapshot(), "clean traffic")

        console.rule("[bold]4. the traffic shifts")
        console.print("the client now sends the same test digits brighter, rotated and noisier (pipeline.datagen.shift)")
        client.set_traffic("shifted")
        # the server answers a request before its client sees the answer: once no clean request is in
        # flight, every sample answered after the last clean answer the client saw is shifted traffic
        with console.status(f"waiting for a window of only shifted traffic to land (windows close {WINDOW_S:g}s "
                            "after their first sample)"):
            client.wait_idle("clean")
            clean_done = max([a.received for a in client.snapshot() if a.traffic == "clean"] or [time.time()])
            window, samples = _wait_for_window(store, model, clean_done, set())
        _summary_line([a for a in client.snapshot() if a.traffic == "shifted"], "shifted traffic so far")
        console.print(f"window landed: incoming/{window}/ ({samples} sampled requests, unlabeled); "
                      f"ingesting it (a launch of `ingest` for that partition, as the incoming_batches sensor would)")
        if not _ingest(window):
            return False
        return _retrain_and_swap(store, server, client, model, v1, args)
    finally:
        if client is not None:
            client.stop()
        code = server.stop()
        console.print(f"the demo server ({server.url}) stopped (exit status {code}); its log: {server.log}")
        others = [w for w in _windows(store, model) if w != window]
        if others:
            console.print(f"{len(others)} more traffic windows landed under incoming/serving-{model}-*/ and were not "
                          "ingested: the incoming_batches sensor takes them once it runs (`make ui`, Automation)")


def _summary_line(answers: list[Answer], what: str) -> None:
    ok = [a for a in answers if a.error is None]
    acc = sum(a.correct for a in ok) / len(ok) if ok else float("nan")
    console.print(f"client, {what}: {len(answers)} requests, {len(answers) - len(ok)} failed, live accuracy {acc:.3f}, "
                  f"P99 {_ms(_pct([a.latency_ms for a in ok], 99))} ms")


def _rollout_seconds(run) -> float | None:
    for m in run.asset_materializations_for_node("model_rollout"):
        v = m.metadata.get("time_to_ready_max_s")
        if v is not None:
            return float(v.value)
    return None


def _retrain_and_swap(store, server: Server, client: TrafficClient, model: str, v1: str, args) -> bool:
    from pipeline import promotion

    console.rule(f"[bold]5. the labels arrive: {args.drift_batch} lands (the shifted digits, labeled)")
    console.print("relabelling the window would do too; retraining on the old labels alone would not fix input drift")
    _land_shifted(store, args.drift_batch)
    if not _ingest(args.drift_batch):
        return False
    req = _sensor_request()
    if req is None or not args.retrain:
        client.stop()
        console.print(phase_table(client.snapshot(), v1, None, None))
        return req is not None

    console.rule("[bold]6. retrain → gates → promotion → rollout, while the traffic goes on")
    before = os.environ.get("FORGELINE_SERVE_URLS")
    os.environ["FORGELINE_SERVE_URLS"] = server.url
    console.print(f"FORGELINE_SERVE_URLS={server.url}: model_rollout waits until the demo server answers with "
                  "the promoted version (it follows the production alias itself)")
    try:
        run = run_job("train_and_package", tags=req.tags)
    finally:
        if before is None:
            os.environ.pop("FORGELINE_SERVE_URLS", None)
        else:
            os.environ["FORGELINE_SERVE_URLS"] = before
    console.print(materialization_table(run))
    for e in run.get_asset_check_evaluations():  # champion and challenger, on the same held-out data
        if e.check_name == "not_worse_than_production":
            console.print(f"{e.check_name}: {'passed' if e.passed else '[red]failed[/]'}: {e.description}")
    if not run.success:
        report_failure(run)
        return False
    record = promotion.production(store, model)
    v2, promoted_at = record["version"], datetime.fromisoformat(record["promoted_at"]).timestamp()
    with console.status(f"{AFTER_SWAP_S:g}s more traffic on {model}/{v2}"):
        deadline = time.monotonic() + SWAP_TIMEOUT_S
        while time.monotonic() < deadline:
            new = [a.received for a in client.snapshot() if a.version == v2]
            if new and max(new) - min(new) >= AFTER_SWAP_S:
                break
            time.sleep(0.25)
    client.stop()
    status, body = _get(f"{server.url}/v2/models/{model}")
    last_swap = (json.loads(body).get("parameters") or {}).get("last_swap") if status == 200 else None

    answers = client.snapshot()
    new = [a for a in answers if a.version == v2]
    first_new = min((a.received for a in new), default=None)
    console.rule("[bold]7. the loop, closed")
    console.print(phase_table(answers, v1, v2, first_new))
    failed = [a for a in answers if a.error is not None]
    ok_lat = [a.latency_ms for a in answers if a.error is None]
    rollout_s = _rollout_seconds(run)
    if first_new is None:
        console.print(f"[red]{model}/{v2} was promoted but never answered the client within {SWAP_TIMEOUT_S:g}s")
    else:
        console.print(f"swap {model}/{v1} → {model}/{v2}: promoted at {_clock(promoted_at)}, first answer of the new "
                      f"version [bold]{first_new - promoted_at:.2f}s[/] later"
                      + (f" (model_rollout saw it after {rollout_s:.2f}s" if rollout_s is not None else " (")
                      + (f"; the server loaded and golden-checked it in {last_swap['seconds']:.2f}s)"
                         if last_swap and last_swap.get("seconds") is not None else ")"))
    console.print(f"requests: {len(answers)} in all, [bold]{len(failed)} failed[/]; P99 over the whole run "
                  f"[bold]{_ms(_pct(ok_lat, 99))} ms[/] (P50 {_ms(_pct(ok_lat, 50))} ms)")
    for err in sorted({a.error for a in failed})[:5]:
        console.print(f"  [red]failed:[/] {err}")
    return first_new is not None and not failed
