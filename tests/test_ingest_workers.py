"""Image decoding on worker processes (pipeline.ingest: the pool that batches images to fresh
interpreters): the same verdicts and reasons as decoding in the ingesting process, the first
problem in archive order, the caller's bomb limit, a dead worker replaced."""

from __future__ import annotations

import os
import signal
import time

import pytest
from PIL import Image

from pipeline import datagen, ingest
from pipeline.ingest import ingest_shards, validate_shard
from tests.test_faults_data import B, _bad_images, _good, _img, _shard, store  # noqa: F401 — store: fixture
from tests.test_faults_data import test_bomb_limit_is_pillows_current_limit as _bomb_limit_test
from tests.test_faults_data import test_each_broken_image_quarantines_its_shard_naming_the_member as _broken_test


@pytest.fixture
def on_workers(monkeypatch):
    """Every ingest_shards call decodes on 2 workers (however small the batch), 2 images a batch."""
    monkeypatch.setattr(ingest, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(ingest, "IMAGE_BATCH_COUNT", 2)
    monkeypatch.setattr(ingest, "default_workers", lambda: 2)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_broken_images_quarantine_with_the_same_reasons_on_workers(store, on_workers):  # noqa: F811
    _broken_test(store)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_callers_bomb_limit_reaches_the_workers(store, on_workers, monkeypatch):  # noqa: F811
    _bomb_limit_test(store, monkeypatch)


@pytest.mark.parametrize("where", ["inline", "workers"])
def test_first_problem_in_archive_order(store, monkeypatch, where):  # noqa: F811
    """A bad image early and a truncated tar later: the image is the reason, as read in order; a
    bad image after several batches of good ones is named exactly."""
    monkeypatch.setattr(ingest, "IMAGE_BATCH_COUNT", 2)
    pool = ingest._image_pool(2) if where == "workers" else None
    bad = _bad_images()
    imgs = [("png", _img()) for _ in range(7)]
    _shard(store, "early.tar", [imgs[0], ("png", bad["truncated_png"][1]), *imgs[2:]])
    whole = store.read("early.tar")
    store.write_atomic("early-cut.tar", whole[: len(whole) - 3000])  # the tail of the archive is gone
    _shard(store, "late.tar", [*imgs[:6], ("jpg", bad["png_as_jpg"][1])])
    reasons = {}
    for key in ("early.tar", "early-cut.tar", "late.tar"):
        with pytest.raises(ingest.ShardInvalid) as e, store.open_read(key) as f:
            validate_shard(f, pool=pool)
        reasons[key] = str(e.value)
    assert reasons["early.tar"].startswith("member '000001.png': not a decodable image")
    assert reasons["early-cut.tar"] == reasons["early.tar"]
    assert reasons["late.tar"].startswith("member '000006.jpg': holds a PNG image")


def test_a_good_batch_publishes_the_same_on_workers_and_inline(tmp_path, on_workers):
    from pipeline.storage import LocalStorage

    digits = datagen.load_digits()
    results = {}
    for where, workers in (("inline", 0), ("workers", None)):
        st = LocalStorage(tmp_path / where, fsync=False)
        datagen.write_batch(st, f"incoming/{B}", digits, samples_per_shard=300)
        r = ingest_shards(st, B, workers=workers)
        results[where] = [(p.key, p.samples, p.classes) for p in r.published]
        assert not r.quarantined
        for p in r.published:  # the published bytes are the landed ones (tar mtimes differ per write)
            assert st.checksum(p.key) == p.sha256 == st.checksum(p.source)
    assert results["inline"] == results["workers"] and sum(s for _, s, _ in results["workers"]) == 1797


def _worker_pids() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{d}/status") as f:
                    ppid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
            except (OSError, StopIteration):
                continue
            if ppid == os.getpid() and b"serve_image_checks" in cmd:
                out.append(int(d))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_a_killed_worker_is_replaced(store, on_workers):  # noqa: F811
    _good(store)
    assert not ingest_shards(store, B).quarantined  # the pool is up
    pids = _worker_pids()
    assert len(pids) >= 2
    for pid in pids:  # the workers this test's process started, and only those
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    store.delete_prefix(f"raw/shards/{B}")
    r = ingest_shards(store, B)
    assert not r.quarantined and r.samples == 3


@pytest.mark.parametrize("cpus, expected", [(1, 0), (2, 0), (ingest.SHARD_THREADS, 0), (ingest.SHARD_THREADS + 1, ingest.SHARD_THREADS + 1), (16, 16)])
def test_default_workers_none_while_the_shard_threads_cover_the_cpus(monkeypatch, cpus, expected):
    """The PNG check runs outside the GIL (zlib, crc32): the shard threads keep up to SHARD_THREADS
    cores busy themselves, and a pool of processes only pays past that."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert ingest.default_workers() == expected
