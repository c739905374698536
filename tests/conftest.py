"""Shared fixtures: storage backends to test against.

S3 tests talk to a real HTTP server — moto's standalone server, started once per session as a
subprocess on a free local port — so requests, retries and streaming go through botocore's
real network stack. Each test gets a fresh bucket with dummy credentials.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import pytest

from pipeline.s3 import MIN_PART_SIZE, S3Storage
from pipeline.storage import LocalStorage

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
def s3_server(tmp_path_factory) -> Iterator[str]:
    """Endpoint URL of a moto S3 server running in a subprocess for the whole session."""
    proc, endpoint = start_moto_server(str(tmp_path_factory.mktemp("moto") / "server.log"))
    try:
        yield endpoint
    finally:
        stop_server(proc)


@pytest.fixture
def s3_storage_factory(s3_server) -> Callable[..., S3Storage]:
    """``factory(*, create=True, **S3Storage kwargs)``: an S3Storage over a fresh bucket (created
    unless ``create=False``) on the test server, with dummy credentials and S3's smallest part
    size, so that multipart paths run with objects of a few MiB."""

    def factory(*, create: bool = True, **kw) -> S3Storage:
        kw = {"prefix": "data", "part_size": MIN_PART_SIZE, "multipart_threshold": MIN_PART_SIZE, **kw}
        store = S3Storage(
            f"forgeline-test-{uuid.uuid4().hex[:12]}",
            endpoint_url=s3_server,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            **kw,
        )
        if create:
            store.client.create_bucket(Bucket=store.bucket)
        return store

    return factory


@pytest.fixture
def s3_storage(s3_storage_factory) -> S3Storage:
    """An S3Storage over a fresh, empty bucket (objects under the prefix ``data/``)."""
    return s3_storage_factory()


@pytest.fixture
def local_storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")
