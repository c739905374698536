"""Shared fixtures: storage backends to test against.

S3 tests talk to a real S3 server: Ceph's RADOS Gateway on a one-node cluster bound to 127.0.0.1
(tests/rgw.py), started once per session, so requests, ranged GETs, multipart uploads, ETags and
streaming go through botocore's real network stack against a real implementation. Each test gets
a fresh bucket; the credentials are made for the session (``s3_credentials``). Without Debian's
ceph packages (``make system-deps``) every S3 test fails with one line saying so: CI has them.

moto's standalone server (``moto_server`` / ``moto_storage_factory``) remains only for fault
injection (tests/test_faults_storage.py), where a test rewrites answers in botocore's event hooks
and needs no real server behaviour.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pipeline.storage import LocalStorage
from pipeline.storage.s3 import MIN_PART_SIZE, S3Storage
from tests.rgw import RGWCluster, RGWError, install_hint, missing_programs

_SERVER_START_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers_http(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        pass  # an HTTP error status is still an answer
    except OSError:
        return False
    return True


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate a server subprocess, killing it if it does not exit in 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_moto_server(log_path: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start moto's S3 server as a subprocess on a free loopback port; return (process, endpoint).
    Used by the fixture below and by bench/loaders.py."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    if log_path:
        log.close()
    deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
    while not _answers_http(endpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            detail = open(log_path).read() if log_path else ""
            raise RuntimeError(f"moto server did not start on {endpoint}:\n{detail}")
        time.sleep(0.1)
    return proc, endpoint


@pytest.fixture(scope="session")
def rgw(tmp_path_factory) -> Iterator[RGWCluster]:
    """Ceph's RADOS Gateway on a one-node cluster (memstore OSD) for the whole session."""
    if missing_programs():
        pytest.fail(install_hint(), pytrace=False)
    cluster = RGWCluster(tmp_path_factory.mktemp("rgw"), memstore_bytes=8 << 30)
    try:
        cluster.start()
    except RGWError as e:
        pytest.fail(f"Ceph's RADOS Gateway did not start: {e}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def s3_server(rgw) -> str:
    """Endpoint URL of the session's S3 server (radosgw)."""
    return rgw.endpoint


@pytest.fixture(scope="session")
def s3_credentials(rgw) -> dict[str, str]:
    """``aws_access_key_id`` / ``aws_secret_access_key`` of the session's S3 user."""
    return dict(rgw.credentials)


def _bucket_factory(endpoint: str, credentials: dict[str, str], made: list[S3Storage]) -> Callable[..., S3Storage]:
    def factory(*, create: bool = True, **kw) -> S3Storage:
        kw = {"prefix": "data", "part_size": MIN_PART_SIZE, "multipart_threshold": MIN_PART_SIZE,
              "get_size": MIN_PART_SIZE, **kw}
        store = S3Storage(f"forgeline-test-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint,
                          region_name="us-east-1", **credentials, **kw)
        if create:
            store.client.create_bucket(Bucket=store.bucket)
            made.append(store)
        return store

    return factory


def _empty_buckets(stores: list[S3Storage]) -> None:
    """Delete what the test left (the OSD keeps objects in RAM); best effort."""
    for store in stores:
        try:
            c = store.client
            for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=store.bucket):
                for u in page.get("Uploads", []):
                    c.abort_multipart_upload(Bucket=store.bucket, Key=u["Key"], UploadId=u["UploadId"])
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=store.bucket):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    c.delete_objects(Bucket=store.bucket, Delete={"Objects": keys, "Quiet": True})
            c.delete_bucket(Bucket=store.bucket)
        except Exception:  # noqa: BLE001 - cleanup only
            pass


@pytest.fixture
def s3_storage_factory(s3_server, s3_credentials) -> Iterator[Callable[..., S3Storage]]:
    """``factory(*, create=True, **S3Storage kwargs)``: an S3Storage over a fresh bucket (created
    unless ``create=False``) on the session's radosgw, with S3's smallest part size (and GETs of
    that size), so that multipart and split-read paths run with objects of a few MiB. Buckets are
    emptied and removed afterwards."""
    made: list[S3Storage] = []
    yield _bucket_factory(s3_server, s3_credentials, made)
    _empty_buckets(made)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[str]:
    """Endpoint URL of a moto S3 server, for fault injection only (see the module docstring)."""
    proc, endpoint = start_moto_server(str(tmp_path_factory.mktemp("moto") / "server.log"))
    try:
        yield endpoint
    finally:
        stop_server(proc)


@pytest.fixture
def moto_storage_factory(moto_server) -> Callable[..., S3Storage]:
    """Like ``s3_storage_factory``, on moto (dummy credentials): for fault injection."""
    return _bucket_factory(moto_server, {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}, [])


@pytest.fixture
def s3_storage(s3_storage_factory) -> S3Storage:
    """An S3Storage over a fresh, empty bucket (objects under the prefix ``data/``)."""
    return s3_storage_factory()


class S3Requests:
    """Every S3 request of a client, by kind (HEAD, LIST, header = a GET from byte 0, GET), each
    delayed by 20 ms as a round trip to a real object store is; ``peak`` is the most of a kind
    seen in flight at once; :meth:`together` says whether two objects were asked for at once."""

    def __init__(self, client, monkeypatch):
        self.lock, self.now = threading.Lock(), {}
        self.peak: dict[str, int] = {}
        self.flying: dict[str, int] = {}  # objects in flight (short names), how many requests each
        self.met: set[frozenset[str]] = set()
        self.calls: list[tuple[str, str]] = []
        for name in ("head_object", "get_object", "list_objects_v2"):
            monkeypatch.setattr(client, name, self._slowed(name, getattr(client, name)))

    def _slowed(self, name, real):
        def call(**kw):
            kind = {"head_object": "HEAD", "list_objects_v2": "LIST"}.get(name) or (
                "header" if kw.get("Range", "").startswith("bytes=0-") else "GET")
            key = kw.get("Key") or kw.get("Prefix", "")
            with self.lock:
                self.calls.append((kind, key))
                self.now[kind] = self.now.get(kind, 0) + 1
                self.peak[kind] = max(self.peak.get(kind, 0), self.now[kind])
                self.met |= {frozenset((self._short(key), other)) for other, n in self.flying.items() if n}
                self.flying[self._short(key)] = self.flying.get(self._short(key), 0) + 1
            try:
                time.sleep(0.02)
                return real(**kw)
            finally:
                with self.lock:
                    self.now[kind] -= 1
                    self.flying[self._short(key)] -= 1
        return call

    @staticmethod
    def _short(key: str) -> str:
        return key.rsplit("/", 2)[-2] + "/" + key.rsplit("/", 1)[-1]

    def of(self, kind: str) -> list[str]:
        return [self._short(key) for k, key in self.calls if k == kind]

    def together(self, a: str, *others: str) -> bool:
        """Whether object ``a`` (as :meth:`of` names it) was asked for while one of ``others`` was."""
        return any(frozenset((a, b)) in self.met for b in others)


@pytest.fixture
def s3_requests(monkeypatch) -> Callable[[Any], S3Requests]:
    """``s3_requests(client)``: an :class:`S3Requests` recording that client's requests."""
    return lambda client: S3Requests(client, monkeypatch)


@pytest.fixture
def local_storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


# ---------------------------------------------------------------------------------------------
# A drift world: real digits split in two disjoint random halves, and a trained production model
# ---------------------------------------------------------------------------------------------

DRIFT_MODEL_KW = {"width": 8}


def _train_small_cnn(shards: list[str], spec: dict, epochs: int = 4):
    """A few epochs of a small DigitsCNN, in-process, on real shards (the production model of the
    drift tests: real predictions, not random weights)."""
    import torch

    from pipeline.evaluate import eval_loader
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model("digits_cnn", **DRIFT_MODEL_KW)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    with eval_loader(shards, spec, 64, "cpu") as loader:
        for epoch in range(epochs):
            for x, y in loader.epoch(epoch):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def drift_world(tmp_path_factory) -> dict:
    """Storage with three ingested batches — ``ref`` (a random half of the digits), ``fresh`` (the
    other half: a fresh held-out sample of the same data), ``shifted`` (that half made brighter,
    rotated and noisier) — and model ``digits`` published with ``ref`` as its training data."""
    import numpy as np

    from pipeline import dataset as ds
    from pipeline import datagen, export, ingest, promotion

    root = tmp_path_factory.mktemp("drift")
    store = LocalStorage(root / "store", fsync=False)
    d = datagen.load_digits()
    perm = np.random.default_rng(7).permutation(len(d))
    halves = [np.sort(perm[: len(d) // 2]), np.sort(perm[len(d) // 2 :])]
    a, b = (datagen.Digits(d.images[i], d.labels[i], d.splits[i], d.ids[i]) for i in halves)
    for batch, data in (("ref", a), ("fresh", b), ("shifted", datagen.shift(b))):
        datagen.write_batch(store, f"incoming/{batch}", data)
    for batch in ("ref", "fresh", "shifted"):
        ingest.ingest_shards(store, batch)
        ingest.ingest_table(store, batch)
    spec = {"resize_shorter": 32, "crop": 28, "channels": 1, "mean": [0.3], "std": [0.4],
            "random_crop": False, "random_flip": False, "half": False}
    data = ds.collect(store, batches=["ref"])
    train_paths = ds.stage(store, data["splits"]["train"], root / "cache")
    model = _train_small_cnn(train_paths, spec)
    manifest = export.export(
        export.from_module(model, architecture="digits_cnn", model_kwargs=DRIFT_MODEL_KW), store, "digits",
        data_version=data["version"],
        metadata={"spec": spec, "dataset": {"version": data["version"], "batches": ["ref"]}},
    )
    promotion.promote(store, "digits", manifest["version"])  # the drift reference follows production
    return {"root": root, "store": store, "version": manifest["version"], "spec": spec, "cache": root / "cache"}


@pytest.fixture
def in_flight(monkeypatch) -> Callable[..., dict]:
    """``watch(client, name, delay=0.05)``: wrap ``client.<name>`` (e.g. a boto3 client's
    ``get_object``) to record each call's kwargs (``"calls"``) and the most calls ever in flight
    (``"max"``); each call first sleeps ``delay``, long enough for the others to start."""

    def watch(client: Any, name: str, delay: float = 0.05) -> dict:
        real, lock = getattr(client, name), threading.Lock()
        seen: dict = {"now": 0, "max": 0, "calls": []}

        def wrapper(**kw):
            with lock:
                seen["now"] += 1
                seen["max"] = max(seen["max"], seen["now"])
                seen["calls"].append(kw)
            try:
                time.sleep(delay)
                return real(**kw)
            finally:
                with lock:
                    seen["now"] -= 1

        monkeypatch.setattr(client, name, wrapper)
        return seen

    return watch
