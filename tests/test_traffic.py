"""Serving traffic flows back (pipeline.serving.traffic): the server samples requests into windows
that land like any batch; ingestion takes them as unlabeled, the drift checks run on them, training
never sees them; a failing or hanging storage never fails or slows a request; a crash never leaves
a half-written window visible."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import dataset as ds
from pipeline import datagen, drift, ingest, settings
from pipeline.serving.registry import ModelRegistry, ServeConfig
from pipeline.serving.traffic import TrafficConfig, TrafficSampler, is_window, to_image, window_model
from pipeline.storage import LocalStorage


def _inputs(world, batch: str, n: int) -> np.ndarray:
    """``n`` model inputs of ``batch`` preprocessed as a client would (evaluation preprocessing)."""
    from pipeline.evaluate import eval_loader

    store = world["store"]
    paths = ds.stage(store, drift.batch_shard_entries(store, [batch]), world["cache"])
    xs = []
    with eval_loader(paths, world["spec"], 64, "cpu") as loader:
        for x, _ in loader.epoch(0):
            xs.append(x.numpy().copy())
    return np.concatenate(xs)[:n]


async def _serve(store, config: ServeConfig, batches: list[np.ndarray], *, sequential: bool = False, **kw):
    """Start a registry, answer every request of ``batches`` (concurrently, or one after the other),
    stop it; returns (registry, [(seconds, rows answered) per request])."""
    reg = ModelRegistry(store, config, **kw)
    await reg.start()
    try:
        await reg.infer("digits", None, {"input": batches[0][:1]})  # loaded and warm before timing

        async def one(x):
            t = time.perf_counter()
            out = await reg.infer("digits", None, {"input": x})
            return time.perf_counter() - t, len(out["output"])

        if sequential:
            return reg, [await one(x) for x in batches]
        return reg, await asyncio.gather(*(one(x) for x in batches))
    finally:
        await reg.stop(drain_timeout_s=5)


def _chunks(x: np.ndarray, size: int = 32) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, len(x), size)]


# ---------------------------------------------------------------------------------------------
# A window of real traffic: lands, ingests as unlabeled, drift checks run on it
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traffic(drift_world):
    store = drift_world["store"]
    rows = 192
    config = ServeConfig(models=["digits"], max_batch_size=32, sample_rate=1.0, sample_window_s=60,
                         sample_window_samples=rows)
    fresh, shifted = _inputs(drift_world, "fresh", rows), _inputs(drift_world, "shifted", rows)
    # the warm-up row is sampled too: send it from fresh, then windows close every `rows` samples
    reg, answers = asyncio.run(_serve(store, config, _chunks(np.concatenate([fresh[:rows - 1], shifted, fresh[:1]])),
                                      sequential=True))  # in order: one window of fresh, one of shifted
    written = reg.traffic.written
    return {**drift_world, "windows": written, "answers": answers, "registry": reg, "rows": rows,
            "ref": drift.production_reference(store, "digits")}


def test_sampled_requests_land_as_windows_with_ready_last(traffic):
    store, windows = traffic["store"], traffic["windows"]
    assert all(n == 32 for _, n in traffic["answers"])
    assert len(windows) == 3  # fresh, shifted, and the 1 row left open, written at stop
    for w in windows:
        assert is_window(w) and window_model(w) == "digits" and ingest.batch_ready(store, w)
        ready = json.loads(store.read(f"incoming/{w}/_READY"))
        assert ready["source"] == "serving" and ready["labeled"] is False and ready["model"] == "digits"
    assert json.loads(store.read(f"incoming/{windows[0]}/_READY"))["samples"] == traffic["rows"]
    m = traffic["registry"].metrics
    assert m.registry.get_sample_value("forgeline_traffic_samples_total", {"model": "digits"}) == 2 * traffic["rows"] + 1
    assert m.registry.get_sample_value("forgeline_traffic_windows_total", {"model": "digits", "result": "ok"}) == 3
    # what a sample holds: the PNG, the exact input, what was answered
    with store.open_read(f"incoming/{windows[0]}/shards/traffic-000000.tar") as f:
        tar = tarfile.open(fileobj=io.BytesIO(f.read()))
        names = tar.getnames()
        assert names[:3] == ["000000.png", "000000.npy", "000000.json"] and not [n for n in names if n.endswith(".cls")]
        x = np.load(io.BytesIO(tar.extractfile("000000.npy").read()))
        meta = json.loads(tar.extractfile("000000.json").read())
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    assert meta["normalization"]["mean"] == [0.3] and meta["normalization"]["std"] == [0.4]
    assert meta["normalization"]["max_error"] <= 0.5 / 255 / 0.4 + 1e-6  # half a grey level, in input units


def test_window_is_ingested_as_unlabeled_and_never_trained_on(traffic):
    store, w = traffic["store"], traffic["windows"][0]
    shards = ingest.ingest_shards(store, w)
    assert not shards.quarantined and shards.samples == traffic["rows"] and shards.unlabeled == traffic["rows"]
    manifest = ingest.read_shard_manifest(store, w)
    assert manifest["unlabeled"] == traffic["rows"] and manifest["shards"][0]["labeled"] is False
    assert ingest.batch_unlabeled(store, w)
    table = ingest.ingest_table(store, w)
    assert table.kind == "predictions" and table.rows == traffic["rows"] and table.labels == {}
    published = json.loads(store.read(table.manifest_key))
    assert published["kind"] == "predictions" and published["labeled"] is False
    data = ds.collect(store)
    assert w not in data["batches"] and any(k.startswith(f"raw/shards/{w}/") for k in data["unlabeled"])
    assert data["version"] == ds.collect(store, batches=[b for b in data["batches"]])["version"]


def test_drift_checks_run_on_windows(traffic):
    store, ref, cache = traffic["store"], traffic["ref"], traffic["cache"]
    fresh_w, shifted_w = traffic["windows"][:2]
    for w in (fresh_w, shifted_w):
        if not store.exists(f"raw/shards/{w}/manifest.json"):
            ingest.ingest_shards(store, w)
            ingest.ingest_table(store, w)
    out = {}
    for name, w in (("fresh", fresh_w), ("shifted", shifted_w)):
        out[name] = {
            "table": drift.table_drift(store, w, ref, cache_dir=cache),
            "image": drift.image_drift(store, w, ref, cache_dir=cache),
            "prediction": drift.prediction_drift(store, w, ref, cache_dir=cache),
        }
    for name, views in out.items():
        assert set(views["table"].scores) == {"prediction", "confidence"}
        assert set(views["image"].scores) == {"brightness", "contrast", "entropy"}  # no label: unlabeled traffic
        assert set(views["prediction"].scores) == {"prediction", "confidence"}
        for r in views.values():
            assert r.rows_current == traffic["rows"] and store.exists(r.report_key)
    assert out["fresh"]["image"].verdict == "ok", out["fresh"]["image"].scores  # same data as the model saw it
    assert out["shifted"]["image"].verdict == "error", out["shifted"]["image"].scores
    # the server answered with production: what it answered is what production predicts now
    assert out["shifted"]["table"].scores == pytest.approx(out["shifted"]["prediction"].scores, abs=1e-6)
    with pytest.raises(drift.DriftError, match="traffic of model 'other'"):
        drift.image_drift(store, fresh_w.replace("serving-digits-", "serving-other-"), ref, cache_dir=cache)


# ---------------------------------------------------------------------------------------------
# Storage that fails or hangs: requests neither fail nor slow down; drops are counted
# ---------------------------------------------------------------------------------------------


class _BadStorage(LocalStorage):
    """Writes raise (``mode="raise"``) or block until ``release`` is set (``mode="hang"``)."""

    def __init__(self, root, mode: str):
        super().__init__(root, fsync=False)
        self.mode, self.release, self.calls = mode, threading.Event(), 0

    def _bad(self):
        self.calls += 1
        if self.mode == "hang":
            self.release.wait(60)
        raise OSError("storage is down")

    def open_write(self, key, **kw):
        self._bad()

    def write_atomic(self, key, data, **kw):
        self._bad()


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_failing_or_hanging_storage_never_fails_or_slows_requests(drift_world, tmp_path, mode):
    from pipeline.serving.metrics import ServingMetrics

    bad = _BadStorage(tmp_path / "traffic", mode)
    x = _inputs(drift_world, "fresh", 32 * 24)
    config = ServeConfig(models=["digits"], max_batch_size=32)
    metrics = ServingMetrics()
    sampler = TrafficSampler(bad, TrafficConfig(rate=1.0, window_samples=16, buffer=2, close_timeout_s=1),
                             registry=metrics.registry)
    # a baseline without sampling, then the same requests with the bad storage
    _, base = asyncio.run(_serve(drift_world["store"], ServeConfig(models=["digits"], max_batch_size=32), _chunks(x)))
    t0 = time.perf_counter()
    try:
        reg, answers = asyncio.run(_serve(drift_world["store"], config, _chunks(x), traffic=sampler, metrics=metrics))
    finally:
        bad.release.set()
    total = time.perf_counter() - t0
    assert all(n == 32 for _, n in answers)  # every request answered
    slowest, base_slowest = max(s for s, _ in answers), max(s for s, _ in base)
    assert slowest < max(1.0, 5 * base_slowest), (slowest, base_slowest)
    assert total < 10  # stop() waits for the writer at most close_timeout_s, never for the storage
    value = reg.metrics.registry.get_sample_value
    dropped = {r: value("forgeline_traffic_dropped_total", {"model": "digits", "reason": r}) or 0
               for r in ("buffer_full", "write_failed")}
    assert bad.calls >= 1 and not list((tmp_path / "traffic").rglob("_READY"))
    if mode == "raise":
        assert reg.traffic is sampler and dropped["write_failed"] >= 16 and value("forgeline_traffic_windows_total",
                                                        {"model": "digits", "result": "failed"}) >= 1
    else:
        assert dropped["buffer_full"] > 0  # the writer is stuck: the bounded buffer fills, rows are dropped
    assert b"forgeline_traffic_dropped_total" in reg.metrics.render()


# ---------------------------------------------------------------------------------------------
# A crash mid-window
# ---------------------------------------------------------------------------------------------

_CRASH = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from pipeline.storage import LocalStorage
    from pipeline.serving.traffic import TrafficConfig, TrafficSampler

    root, signal_file = sys.argv[1], Path(sys.argv[2])

    class Store(LocalStorage):
        windows = 0
        def write_atomic(self, key, data, **kw):
            if key.endswith("predictions.parquet"):
                Store.windows += 1
                if Store.windows == 2:  # the second window: its shard is written, then the process dies
                    signal_file.write_text(key)
                    time.sleep(600)
            return super().write_atomic(key, data, **kw)

    s = TrafficSampler(Store(root), TrafficConfig(rate=1.0, window_samples=4, window_s=600))
    s.start()
    x = np.random.default_rng(0).normal(size=(4, 1, 8, 8)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(4, 10)).astype(np.float32)
    spec = {"mean": [0.5], "std": [0.5]}
    s.offer("digits", "v1", x, y, latency_s=0.001, spec=spec)   # window 1: complete
    s.offer("digits", "v1", x, y, latency_s=0.001, spec=spec)   # window 2: killed while written
    s.offer("digits", "v1", x[:2], y[:2], latency_s=0.001, spec=spec)  # window 3: open, in memory
    time.sleep(600)
""")


def test_crash_mid_window_leaves_no_half_written_window_and_earlier_ones_intact(tmp_path):
    root, flag = tmp_path / "store", tmp_path / "writing"
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", _CRASH, str(root), str(flag)], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never reached window 2"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = LocalStorage(root)
    folders = sorted({o.key.split("/")[1] for o in store.list("incoming")})
    assert len(folders) == 2  # window 3 was only in memory: lost, nothing written
    ready = [f for f in folders if ingest.batch_ready(store, f)]
    assert len(ready) == 1  # the half-written window has no _READY: the landing sensor never sees it
    half = next(f for f in folders if f not in ready)
    assert store.exists(f"incoming/{half}/shards/traffic-000000.tar")  # its shard was written, atomically
    assert not store.exists(f"incoming/{half}/predictions.parquet")
    r = ingest.ingest_shards(store, ready[0])  # the earlier window is intact
    assert not r.quarantined and r.samples == 4 and r.unlabeled == 4
    assert ingest.ingest_table(store, ready[0]).rows == 4


# ---------------------------------------------------------------------------------------------
# Ingestion of unlabeled data; training skips it
# ---------------------------------------------------------------------------------------------


def _unlabeled_tar(store, key: str, images: list[bytes], labels: list[int | None]) -> None:
    with store.open_write(key) as w, tarfile.open(fileobj=w, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for i, (img, label) in enumerate(zip(images, labels)):
            members = [(f"{i:06d}.png", img)] + ([(f"{i:06d}.cls", f"{label}\n".encode())] if label is not None else [])
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_unlabeled_batches_are_ingested_and_skipped_by_collect(tmp_path):
    store = LocalStorage(tmp_path / "store", fsync=False)
    d = datagen.load_digits()
    small = datagen.Digits(d.images[:60], d.labels[:60], d.splits[:60], d.ids[:60])
    datagen.write_batch(store, "incoming/labeled", small)
    ingest.ingest_shards(store, "labeled")
    before = ds.collect(store)
    images = [datagen.encode_image(img) for img in d.images[:8]]
    _unlabeled_tar(store, "incoming/unl/shards/a.tar", images, [None] * 8)
    _unlabeled_tar(store, "incoming/unl/shards/mixed.tar", images[:2], [3, None])
    r = ingest.ingest_shards(store, "unl")
    assert r.samples == 8 and r.unlabeled == 8 and r.classes == {}
    assert [q.source.split("/")[-1] for q in r.quarantined] == ["mixed.tar"]
    assert "labeled or unlabeled as a whole" in r.quarantined[0].reason
    assert ingest.read_shard_manifest(store, "unl")["unlabeled"] == 8
    assert ingest.read_shard_manifest(store, "labeled")["unlabeled"] == 0
    after = ds.collect(store)
    assert after["batches"] == ["labeled"] and after["unlabeled"] == ["raw/shards/unl/a.tar"]
    assert after["version"] == before["version"] and after["samples"] == before["samples"]


def test_image_rendering_inverts_the_normalisation():
    spec = {"mean": [0.3], "std": [0.4]}
    u8 = np.arange(0, 256, dtype=np.uint8).reshape(1, 16, 16)
    x = ((u8 / 255.0 - 0.3) / 0.4).astype(np.float32)
    img, info = to_image(x, spec)
    assert img.shape == (16, 16, 1) and np.array_equal(img[:, :, 0], u8[0]) and info["clipped"] == 0
    _, info = to_image(np.full((1, 2, 2), 10.0, np.float32), spec)  # far outside 0..255: clipped, recorded
    assert info["clipped"] == 4 and info["max_error"] > 1


def test_rows_with_nan_or_infinite_values_are_not_sampled(tmp_path):
    """A NaN or infinite input value has no 8-bit pixel: such rows are dropped and counted
    (not_finite), the others land; they once landed as undefined bytes, with a numpy warning."""
    import warnings

    store = LocalStorage(tmp_path / "store")
    s = TrafficSampler(store, TrafficConfig(rate=1.0, window_samples=100, window_s=600))
    s.start()
    x = np.random.default_rng(0).normal(size=(4, 1, 8, 8)).astype(np.float32)
    x[1, 0, 2, 3], x[2, 0, 0, 0] = np.nan, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert s.offer("digits", "v1", x, np.zeros((4, 10), np.float32), latency_s=0.001) == 2
        assert s.close(timeout_s=30)
    assert s.metrics.value("dropped_total", model="digits", reason="not_finite") == 2
    [window] = s.written
    assert json.loads(store.read(f"incoming/{window}/_READY"))["samples"] == 2


def test_sampling_settings_and_flags():
    assert settings.serve_sample_rate({}) == 0.0 and settings.serve_sample_rate({"FORGELINE_SERVE_SAMPLE_RATE": "0.25"}) == 0.25
    with pytest.raises(settings.SettingError, match="FORGELINE_SERVE_SAMPLE_RATE"):
        settings.serve_sample_rate({"FORGELINE_SERVE_SAMPLE_RATE": "2"})
    assert settings.serve_sample_window_s({"FORGELINE_SERVE_SAMPLE_WINDOW_S": "30"}) == 30.0
    with pytest.raises(ValueError, match="within 0..1"):
        TrafficConfig(rate=1.5)
    assert ModelRegistry(LocalStorage("/nonexistent-forgeline"), ServeConfig()).traffic is None  # default: off
    import argparse

    from jobs.serve_cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--sample-rate", "0.5", "--sample-window-s", "10"])
    assert args.sample_rate == 0.5 and args.sample_window_s == 10.0 and args.sample_window_samples is None
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--sample-rate", "1.5"])
    sampler = TrafficSampler(LocalStorage("/nonexistent-forgeline"), TrafficConfig(rate=0.0))
    assert sampler.offer("m", "v", np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 3)), latency_s=0) == 0


def test_dagster_ingests_a_window_checks_it_and_retrains_on_error(traffic):
    """Through Dagster: the landing sensor's view lists the windows, the ingest assets and the three
    drift checks run on the shifted window, and drift at ERROR there requests one retrain per
    labeled data version (the traffic itself is never training data)."""
    import dagster as dg

    from assets.drift import image_drift, prediction_drift, table_drift
    from assets.ingest import raw_shards, raw_table
    from assets.partitions import batches
    from jobs.automation import drift_retrain
    from jobs.ingest import ready_batches
    from resources.storage import LocalStorageResource

    storage = LocalStorageResource(root=str(traffic["store"].root), fsync=False)
    assert set(traffic["windows"]) <= set(ready_batches(storage))
    window = traffic["windows"][1]  # the shifted traffic
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(batches.name, [window])
        res = dg.materialize([raw_shards, raw_table, table_drift, image_drift, prediction_drift], partition_key=window,
                             instance=inst, resources={"storage": storage})
        assert res.success
        evals = {e.check_name: e for e in res.get_asset_check_evaluations()}
        assert evals["all_classes_present"].passed and evals["every_split_present"].passed  # unlabeled: nothing to check
        assert set(evals) >= {"table_drift", "image_drift", "prediction_drift"}
        assert not evals["image_drift"].passed and evals["image_drift"].severity == dg.AssetCheckSeverity.ERROR
        out = drift_retrain(dg.build_sensor_context(instance=inst, resources={"storage": storage}))
        (req,) = out.run_requests
        version = ds.collect(traffic["store"])["version"]
        assert req.tags["forgeline/trigger"] == "drift-traffic" and req.run_key == f"retrain-on-drift:traffic:{version}"
        assert f"image_drift@{window}" in req.tags["forgeline/drift"]
