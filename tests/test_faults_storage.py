"""Storage faults a user meets in the first hour, against real sockets: an S3 endpoint that accepts
connections and never answers, one that answers the headers and stalls the body, one that refuses
connections, and answers injected into a real (moto) server's traffic. Each fails fast (within
``retry_deadline + read_timeout``), with one line naming the endpoint, the object and the cause,
and requests are retried by exactly one layer."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import pytest
from botocore.awsrequest import AWSResponse

from pipeline.storage import ObjectNotFound, StorageError
from pipeline.storage.s3 import MIN_PART_SIZE, S3Storage

MiB = 1024 * 1024
FAST = {"connect_timeout": 0.5, "read_timeout": 0.3, "retry_deadline": 1.0, "max_attempts": 5}
BOUND_S = FAST["retry_deadline"] + FAST["read_timeout"] + 1.5  # + slack for backoff jitter and a slow CI


class FakeEndpoint:
    """A TCP server on 127.0.0.1 whose every connection is handed to ``respond(n, request_head)``
    (n counts requests from 1); what it returns is sent, then the connection stays open and
    silent until the test ends (``None``: send nothing at all), or is closed with ``close``."""

    def __init__(self, respond: Callable[[int, bytes], bytes | None], close: bool = False):
        self.respond = respond
        self.close_after_answer = close  # close the connection once the answer is sent
        self.requests: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            self.requests.append(head)
            out = self.respond(len(self.requests), head)
            if out:
                conn.sendall(out)
            if self.close_after_answer:
                conn.close()
                return
            self._stop.wait()  # then stall: never another byte
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for c in self._conns:
            c.close()


@pytest.fixture
def endpoint() -> Iterator[Callable[..., FakeEndpoint]]:
    made: list[FakeEndpoint] = []

    def make(respond: Callable[[int, bytes], bytes | None] = lambda n, head: None, close: bool = False) -> FakeEndpoint:
        made.append(FakeEndpoint(respond, close))
        return made[-1]

    yield make
    for e in made:
        e.close()


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connections are refused


def store_at(url: str, **kw) -> S3Storage:
    return S3Storage("bkt", "data", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing", part_size=MIN_PART_SIZE,
                     multipart_threshold=MIN_PART_SIZE, **{**FAST, **kw})


def headers_then_stall(n: int, head: bytes) -> bytes:
    """An answer's status and headers (a 100-byte object; a GET gets the range it asked), and 10
    bytes of its body at most."""
    if head.startswith(b"HEAD "):
        return (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"e1\"\r\n\r\n")
    first, last = 0, 99  # a request without a range (a PUT, a listing) gets the same headers
    if b"ange: bytes=" in head:
        first, last = (int(x) for x in head.split(b"ange: bytes=")[1].split(b"\r\n")[0].split(b"-"))
        last = min(last, 99)
    return (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {last - first + 1}\r\n"
            f"Content-Range: bytes {first}-{last}/100\r\nETag: \"e1\"\r\n\r\n").encode() + b"x" * 10


def _read_to_temp_file(store: S3Storage, key: str, n: int) -> None:
    with tempfile.TemporaryFile() as f:
        store.read_to_file(key, 0, n, f.fileno(), 0)


OPS: dict[str, Callable[[S3Storage], object]] = {
    "stat": lambda s: s.stat("models/m/v1/model.safetensors"),
    "read_range": lambda s: s.read_range("models/m/v1/model.safetensors", 0, 100),
    "open_read": lambda s: s.open_read("models/m/v1/model.safetensors").read(),
    "read_to_file": lambda s: _read_to_temp_file(s, "models/m/v1/model.safetensors", 100),
    "write_atomic": lambda s: s.write_atomic("models/m/v1/model.safetensors", b"w" * 1000),
    "write_multipart": lambda s: s.write_atomic("models/m/v1/model.safetensors", b"w" * (MIN_PART_SIZE + 1)),
    "list": lambda s: s.list("models/m"),
}


def assert_one_clear_line(err: BaseException, store: S3Storage, *, key: str | None = "models/m/v1/model.safetensors"):
    msg = str(err)
    assert "\n" not in msg, msg
    assert store.endpoint in msg, msg
    assert (store.uri(key) if key else store.uri()) in msg, msg
    # the traceback's last line is the root cause: nothing chained after (or in front of) it
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), msg
    assert traceback.format_exception_only(err)[-1].strip().endswith(msg)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("server", ["silent", "headers-then-stall", "refused"])
def test_dead_endpoint_fails_fast_naming_endpoint_and_object(endpoint, server, op):
    if server == "headers-then-stall" and op == "stat":
        pytest.skip("a HEAD answer is its headers: nothing to stall")
    if server == "refused":
        url = refused_url()
    else:
        url = endpoint(headers_then_stall if server == "headers-then-stall" else lambda n, head: None).url
    store = store_at(url)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as ei:
        OPS[op](store)
    took = time.monotonic() - t0
    assert took < BOUND_S, f"{server}/{op}: {took:.1f} s"
    assert_one_clear_line(ei.value, store, key="models/m" if op == "list" else "models/m/v1/model.safetensors")
    if server == "refused":
        assert "Could not connect to the endpoint URL" in str(ei.value)
    else:
        assert "no answer within read_timeout=0.3 s" in str(ei.value)


@pytest.mark.parametrize("op", list(OPS))
def test_an_endpoint_that_is_not_s3_is_named_not_taken_for_a_missing_object(endpoint, op):
    """A web server (or a console's port) at the endpoint answers 404 with a page, not an S3 error:
    one line says the endpoint is not S3, where "not found" sent users looking for their object.
    A HEAD's 404 has no body even from S3: that one can only say the object is not there."""
    page = b"<html><body>404 Not Found</body></html>"
    ep = endpoint(lambda n, head: b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(page), page), close=True)
    store = store_at(ep.url)
    with pytest.raises(StorageError) as info:
        OPS[op](store)
    if op == "stat":
        assert isinstance(info.value, ObjectNotFound)
        return
    assert not isinstance(info.value, ObjectNotFound)
    assert "answered HTTP 404 without an S3 error" in str(info.value) and "FORGELINE_S3_ENDPOINT_URL" in str(info.value)
    assert_one_clear_line(info.value, store, key="models/m" if op == "list" else "models/m/v1/model.safetensors")


def test_trickling_body_cannot_hold_a_read_forever(endpoint):
    """10 bytes per attempt, then a stall: progress each time, but the stalled time adds up."""
    ep = endpoint(headers_then_stall)
    store = store_at(ep.url, max_attempts=100)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="read_timeout"):
        store.read_range("k", 0, 100)
    assert time.monotonic() - t0 < BOUND_S
    assert 2 <= len(ep.requests) <= 5


def _ranged(data: bytes, first_cut: int):
    """A ranged-GET responder (ETag "e1") whose first answer's body stops after ``first_cut`` bytes."""

    def respond(n: int, head: bytes) -> bytes:
        first, last = (int(x) for x in head.split(b"ange: bytes=")[1].split(b"\r\n")[0].split(b"-"))
        last = min(last, len(data) - 1)
        body = data[first : last + 1]
        answer = (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
                  f"Content-Range: bytes {first}-{last}/{len(data)}\r\nETag: \"e1\"\r\n\r\n").encode()
        return answer + (body[:first_cut] if n == 1 else body)

    return respond


def test_body_stall_is_resumed_from_the_last_byte(endpoint):
    """The first GET stalls after 1 MiB + a bit of its body; the resume asks for the rest from the
    last byte handed over, pinned to the ETag, and the bytes come out whole."""
    data = bytes(range(256)) * (3 * MiB // 256)
    ep = endpoint(_ranged(data, first_cut=MiB + 1000))
    assert store_at(ep.url).read_range("k", 0, 3 * MiB) == data
    second = ep.requests[1].lower()
    assert f"range: bytes={MiB}-{3 * MiB - 1}".encode() in second and b'if-match: "e1"' in second


def test_body_cut_short_is_resumed_from_the_last_byte(endpoint):
    """The server closes the connection 2 MiB + a bit into a body (no error, just EOF): the bytes
    received so far are kept and the rest is asked for, pinned to the ETag."""
    data = bytes(range(256)) * (3 * MiB // 256)
    ep = endpoint(_ranged(data, first_cut=2 * MiB + 1000), close=True)
    out = bytearray(3 * MiB)
    store_at(ep.url).read_into("k", 0, out)
    assert out == data and len(ep.requests) == 2
    second = ep.requests[1].lower()
    assert f"range: bytes={2 * MiB + 1000}-{3 * MiB - 1}".encode() in second and b'if-match: "e1"' in second


@pytest.mark.parametrize("close", [False, True], ids=["stall", "cut"])
def test_body_spliced_into_a_file_is_resumed_from_the_last_byte(endpoint, tmp_path, close):
    """The same two breaks while the body is spliced from the socket into a file: the bytes
    written so far stay, the rest is asked for from the last byte, pinned to the ETag."""
    data = bytes(range(256)) * (3 * MiB // 256)
    cut = 2 * MiB + 1000
    ep = endpoint(_ranged(data, first_cut=cut), close=close)
    path = tmp_path / "dst"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        store_at(ep.url).read_to_file("k", 0, len(data), fd, 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == data and len(ep.requests) == 2
    second = ep.requests[1].lower()
    assert f"range: bytes={cut}-{3 * MiB - 1}".encode() in second and b'if-match: "e1"' in second


def test_one_retry_layer(endpoint):
    """botocore's retries are off: every HTTP request on the wire is one of ours."""
    store = store_at(refused_url(), max_attempts=3, retry_deadline=60)
    assert store.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 1}
    sends = []
    store.client.meta.events.register("before-send.s3", lambda request, **kw: sends.append(request.method))
    with pytest.raises(StorageError, match="after 3 attempts"):
        store.stat("k")
    assert sends == ["HEAD"] * 3
    ep = endpoint()
    store = store_at(ep.url, max_attempts=3, retry_deadline=60)
    with pytest.raises(StorageError, match="after 3 attempts"):
        store.read_range("k", 0, 10)
    assert len(ep.requests) == 3


def test_defaults_bound_a_hang_well_under_a_minute():
    store = S3Storage("b", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                      aws_access_key_id="x", aws_secret_access_key="x")
    cfg = store.client.meta.config
    assert (cfg.connect_timeout, cfg.read_timeout) == (store.connect_timeout, store.read_timeout)
    assert store.retry_deadline + store.read_timeout <= 40
    spec, _ = store.spec()
    assert {k: spec[k] for k in ("connect_timeout", "read_timeout", "retry_deadline")} == {
        "connect_timeout": 5.0, "read_timeout": 15.0, "retry_deadline": 20.0}
    for bad in ({"read_timeout": 0}, {"connect_timeout": -1}, {"retry_deadline": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            S3Storage("b", endpoint_url="http://127.0.0.1:9", region_name="us-east-1", **bad)


# -- Answers injected into a real server's traffic (moto) --------------------------------------
# These stay on moto, not the suite's radosgw: the faults are answers written into botocore's
# before-send hook, so no server behaviour is under test, and moto (a Python process, no cluster)
# is the cheapest real endpoint for the requests let through.


class _Raw:
    def __init__(self, body: bytes):
        self._body = body

    def stream(self, **kw):
        yield self._body


def inject(store: S3Storage, operation: str, status: int, code: str, times: int | None = None) -> list[int]:
    """Answer ``operation`` with ``status``/``code`` (the first ``times`` requests, or all) instead
    of sending it to the server; returns a list that counts the requests seen."""
    seen: list[int] = []

    def answer(request, **kw):
        seen.append(1)
        if times is None or len(seen) <= times:
            body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                    f"<Message>injected {code}</Message></Error>").encode()
            return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Raw(body))
        return None

    store.client.meta.events.register(f"before-send.s3.{operation}", answer)
    return seen


def test_throttling_and_5xx_are_retried(moto_storage_factory):
    # Two retries pause up to 0.75 s (backoff with jitter) on top of the failed attempts' own time:
    # FAST's 1 s deadline left a loaded 2-core machine ~0.25 s for two round trips to moto, and a
    # fresh clone's run once ran out of it. This test is about the retries, not the deadline.
    store = moto_storage_factory(**{**FAST, "retry_deadline": 10.0})
    seen = inject(store, "PutObject", 503, "SlowDown", times=2)
    store.write_atomic("k", b"hello")
    assert len(seen) == 3 and store.read("k") == b"hello"
    seen = inject(store, "GetObject", 500, "InternalError", times=1)
    assert store.read_range("k", 1, 3) == b"ell" and len(seen) == 2


def test_failed_upload_shows_its_root_cause_not_the_abort(moto_storage_factory, caplog):
    # a deadline past the two attempts: FAST's 1 s once ran out after the first on a loaded machine
    store = moto_storage_factory(**{**FAST, "max_attempts": 2, "retry_deadline": 10.0})
    parts = inject(store, "UploadPart", 500, "InternalError")
    aborts = inject(store, "AbortMultipartUpload", 403, "AccessDenied")
    with pytest.raises(StorageError) as ei:
        store.write_atomic("models/m/v1/model.safetensors", b"p" * (2 * MIN_PART_SIZE))
    assert "UploadPart 1 failed after 2 attempts" in str(ei.value) and "InternalError" in str(ei.value)
    assert "AccessDenied" not in str(ei.value)
    # both parts were in flight at once (concurrent part uploads), each tried twice; the abort:
    assert len(parts) == 4 and len(aborts) == 1  # one best-effort attempt ...
    assert "could not abort multipart upload" in caplog.text  # ... whose failure is only logged
    assert_one_clear_line(ei.value, store)
    assert not store.exists("models/m/v1/model.safetensors")


@pytest.mark.parametrize("wrong,hint", [
    ("aws_secret_access_key", r"SignatureDoesNotMatch.*check AWS_SECRET_ACCESS_KEY"),
    ("aws_access_key_id", r"InvalidAccessKeyId.*check AWS_ACCESS_KEY_ID"),
])
def test_wrong_credentials_say_which_setting(s3_storage, s3_server, s3_credentials, wrong, hint):
    """Keys a real server (radosgw) refuses: one line naming the object, the endpoint, the code and
    the setting to check; not retried."""
    s3_storage.write_atomic("models/m/v1/model.safetensors", b"x")
    creds = {**s3_credentials, wrong: "WRONG" + s3_credentials[wrong][5:]}
    store = S3Storage(s3_storage.bucket, prefix=s3_storage.prefix, endpoint_url=s3_server, region_name="us-east-1",
                      **creds, **FAST)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=hint) as ei:
        store.read("models/m/v1/model.safetensors")
    assert_one_clear_line(ei.value, store)
    assert time.monotonic() - t0 < 1


def test_access_denied_is_not_retried(moto_storage_factory):
    store = moto_storage_factory(**FAST)
    seen = inject(store, "HeadObject", 403, "AccessDenied")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"HEAD failed \(AccessDenied: injected AccessDenied"):
        store.stat("k")
    assert len(seen) == 1 and time.monotonic() - t0 < 1


def test_a_shm_root_not_on_tmpfs_is_warned_about_once(tmp_path, caplog):
    import logging

    from pipeline.shm_tier import ShmTier
    from pipeline.storage import ShmStorage

    caplog.set_level(logging.WARNING, logger="forgeline.shm")
    on_disk = tmp_path / "tier"  # pytest's tmp_path is on disk here
    assert ShmTier(on_disk).in_ram is False and ShmStorage(on_disk).in_ram is False
    ShmTier(on_disk)
    lines = [r.getMessage() for r in caplog.records if r.name == "forgeline.shm"]
    assert len(lines) == 1 and str(on_disk) in lines[0] and "not a tmpfs" in lines[0]
    assert "FORGELINE_SHM_ROOT" in lines[0]
    import shutil
    import tempfile

    ram = tempfile.mkdtemp(dir="/dev/shm", prefix="forgeline-test-")
    try:
        assert ShmTier(ram).in_ram is True  # the real tier: no warning
    finally:
        shutil.rmtree(ram, ignore_errors=True)
    assert len([r for r in caplog.records if r.name == "forgeline.shm"]) == 1
