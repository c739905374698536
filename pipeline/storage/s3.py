"""The S3 tier: the :class:`~pipeline.storage.base.Storage` interface over an S3 bucket (AWS or any
S3-compatible server: MinIO, Ceph RGW, moto).

Writes are atomic the S3 way: small objects go up in one PUT, large ones as a multipart upload
that becomes visible only when it is completed. The sha256 of every object is kept in its user
metadata (``x-amz-meta-sha256``), so ``stat`` can report it without reading the bytes.

Reads are pinned to one version of the object: the first response's ETag is sent as ``If-Match``
with every later request for the same read, so a read that has to re-request (the next window of
a streaming read, or a resume after a dropped connection) fails loudly with ``ObjectChanged``
when the object was replaced meanwhile, instead of returning bytes of two different versions.
The ETag is also the object's ``stat(key).version``, so a caller can pin several ranged reads
(``read_range`` / ``read_into`` with ``version=``) to one version.

Transfers are parallel, so every caller gets line rate without asking: a streaming read
(``open_read``, hence ``copy_between``, reading landed shards) fetches the windows ahead of the
reader with up to ``concurrency`` ranged GETs in flight, all pinned to the first response's ETag;
a ``read_range`` / ``read_into`` / ``read_to_file`` longer than ``get_size`` is split in
``get_size`` ranged GETs fetched concurrently into their place (the loader and the shm tier's
pre-warm read this way); every GET's body is received from the socket straight into its
destination, or spliced into its file (:class:`_Body`);
a multipart upload (``open_write``, ``write_atomic``)
sends up to ``concurrency`` parts at once, holding at most that many parts in memory. Nothing
about atomicity changes: the object is visible only once CompleteMultipartUpload lists every
part, and a failed part aborts the whole upload.

Failures: every request has a connect and a read timeout, and is retried by ONE layer, this
module's (botocore's own retries are off): connection errors, timeouts, truncated bodies,
throttling and 5xx answers are retried with jittered exponential backoff, at most
``max_attempts`` times in a row and for at most ``retry_deadline`` seconds of stalled time (time
spent in failed attempts and backing off, see :class:`_Budget`). A streaming read that breaks
mid-body resumes from its last byte, which botocore cannot do. So an endpoint that accepts connections and never answers (or answers the
headers and stalls the body, or refuses connections) fails after at most about
``retry_deadline + read_timeout`` seconds (35 s with the defaults) with one line naming the
endpoint, the object and the cause.

Usage::

    store = S3Storage("my-bucket", "forgeline")            # credentials: boto3's usual chain
    store.write_atomic("raw/a.bin", payload)
    with store.open_read("raw/a.bin") as f:
        head = f.read(1024)
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import http.client
import io
import logging
import math
import os
import random
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import boto3
import urllib3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)
from botocore.response import StreamingBody

from pipeline import settings
from pipeline.keys import check_key
from pipeline.storage.base import (
    AtomicWriter,
    Crc32,
    IntegrityError,
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
    StorageFull,
    in_parallel,
    join,
    pwrite_all,
)

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
_MAX_COPY_OBJECT = 5 * 1024**3  # S3's limit for a single CopyObject
_NET_CHUNK = 1024 * 1024  # granularity of receiving a response body (progress kept across resumes)
_PIPE_BYTES = 1024 * 1024  # the splice pipe's capacity asked for (Linux default: 64 KiB)
_SPLICE = hasattr(os, "splice")  # Linux, Python >= 3.10
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})  # this socket or file takes no splice
_local = threading.local()  # per thread: the splice pipe, the buffer of a buffered write
_BACKOFF_BASE_S = 0.25
_BACKOFF_CAP_S = 8.0
log = logging.getLogger(__name__)

_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})  # HEAD answers a bare "404", no body
_FULL = frozenset({"QuotaExceeded", "XMinioStorageFull"})  # Ceph RGW quota, MinIO out of disk


# Answers worth another try: botocore's standard-mode list (throttling, transient 5xx), which
# this module now applies itself, botocore's retries being off.
_RETRY_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "TransactionInProgressException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled",
    "SlowDown", "PriorRequestNotComplete", "EC2ThrottledException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable",
})
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


# what a new user most often got wrong, for the codes that say the request was not allowed
_CREDENTIAL_HINTS = {
    "SignatureDoesNotMatch": ": the secret key does not match the access key (check AWS_SECRET_ACCESS_KEY)",
    "InvalidAccessKeyId": ": the endpoint does not know this access key (check AWS_ACCESS_KEY_ID, and "
                          "FORGELINE_S3_ENDPOINT_URL for a store other than AWS)",
    "AccessDenied": ": these credentials may not do this on the bucket (check the key's policy)",
}


def _unreachable(err: Exception) -> bool:
    """A refused/timed-out/dropped connection or a truncated body: the endpoint did not answer
    (in full). TLS certificate failures are connection errors too, but retrying cannot fix them."""
    if isinstance(err, SSLError):
        return False
    return isinstance(err, (BotoConnectionError, HTTPClientError, IncompleteReadError))


def _transient(err: Exception) -> bool:
    """Worth another try: the endpoint did not answer, or answered "slow down" / a 5xx."""
    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return _code(err) in _RETRY_CODES or status in _RETRY_STATUS
    return _unreachable(err)


def _code(err: ClientError) -> str:
    return err.response.get("Error", {}).get("Code", "")


def _backoff_s(attempt: int) -> float:
    """The pause before retry number ``attempt`` (1-based): exponential, capped, with jitter so
    many workers hitting the same hiccup do not retry in lockstep."""
    return min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class _Budget:
    """The retry budget of one request: at most ``max_attempts`` consecutive failures without
    progress, and at most ``deadline`` seconds of stalled time in all (each failed attempt's time
    since it started or last received bytes, plus the backoff pauses). Time spent receiving bytes
    is not counted, so a long streaming read that breaks once still resumes, while an endpoint
    that trickles a few bytes and stalls runs out of budget."""

    def __init__(self, max_attempts: int, deadline: float):
        self.max_attempts, self.deadline = max_attempts, deadline
        self.attempts = self.failures = 0
        self.stalled = 0.0
        self.started = self._mark = time.monotonic()

    def attempt(self) -> None:
        self.attempts += 1
        self._mark = time.monotonic()

    def progress(self) -> None:
        self.failures = 0
        self._mark = time.monotonic()

    def retry(self, err: Exception) -> bool:
        """After a failed attempt: sleep and return True when another attempt is due."""
        self.stalled += time.monotonic() - self._mark
        self.failures += 1
        if not _transient(err) or self.failures >= self.max_attempts:
            return False
        pause = _backoff_s(self.failures)
        if self.stalled + pause >= self.deadline:
            return False
        time.sleep(pause)
        self.stalled += pause
        return True

    def summary(self) -> str:
        return f"{self.attempts} attempt{'s' if self.attempts != 1 else ''} in {time.monotonic() - self.started:.1f} s"


class _Unspliceable(Exception):
    """The socket takes no splice (not an OSError, so no network error is made of it)."""


class _Pipe:
    """A pipe for splicing a socket into a file, one per thread (in ``_local``): its ends are
    closed when the thread ends (its locals are dropped) or when a failed splice may have left
    bytes in it (:func:`_drop_thread_pipe`)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)

    def close(self, _close=os.close) -> None:  # bound now: __del__ may run at interpreter exit
        if self.r >= 0:
            r, w, self.r, self.w = self.r, self.w, -1, -1
            _close(r)
            _close(w)

    __del__ = close


def _thread_pipe() -> _Pipe:
    pipe = getattr(_local, "pipe", None)
    if pipe is None:
        pipe = _local.pipe = _Pipe()
    return pipe


def _drop_thread_pipe() -> None:
    pipe = getattr(_local, "pipe", None)
    if pipe is not None:
        _local.pipe = None
        pipe.close()


class _Body:
    """A GET response body read into caller memory or written into a file:
    ``readinto(view)`` receives up to ``len(view)`` bytes into ``view``, ``write_to(fd, offset,
    n)`` writes up to ``n`` bytes into the file ``fd`` at ``offset``; both return how many (0: the
    connection ended).

    botocore's ``StreamingBody.read`` returns new bytes objects (http.client reads into a
    bytearray and copies it into bytes; the caller then copies them to their place: three
    copies of every byte). For a plain botocore body over urllib3/http.client, this receives
    from the socket straight into ``view`` (one copy, as few as a raw GET that drops its
    bytes), translating socket errors into botocore's so retries see the same exceptions; and
    over plain HTTP, ``write_to`` moves the bytes from the socket into the file with
    ``splice(2)`` through a pipe, so they never pass through this process (one copy, in the
    kernel, instead of a receive and a write). Any other body (a checksum-validating one, a test
    double, TLS) goes through ``read`` / ``readinto`` and ``pwrite``."""

    def __init__(self, body: Any, endpoint: str):
        self._body, self._endpoint = body, endpoint
        raw = getattr(body, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)
        direct = (type(body) is StreamingBody and isinstance(raw, urllib3.response.HTTPResponse)
                  and isinstance(fp, http.client.HTTPResponse))
        self._raw, self._fp = (raw, fp) if direct else (None, None)
        self._sock: socket.socket | None = None
        self._ahead: int | None = None  # body bytes http.client buffered with the headers, once known
        if direct and _SPLICE and not fp.chunked and isinstance(fp.length, int):
            sock = getattr(getattr(fp.fp, "raw", None), "_sock", None)  # SocketIO's socket
            if isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket):
                self._sock = sock

    def readinto(self, view: memoryview) -> int:
        if self._fp is None:
            data = self._body.read(len(view))
            view[: len(data)] = data
            return len(data)
        with self._network_errors():
            return self._fp.readinto(view)

    def write_to(self, fd: int, offset: int, n: int) -> int:
        fp = self._fp
        if self._sock is None or n <= 0 or fp.length <= 1:
            return self._write_buffered(fd, offset, n)
        if self._ahead is None:  # what http.client read past the headers comes first (< 8 KiB)
            with self._network_errors():
                self._ahead = len(fp.fp.peek(1))
        if self._ahead:
            got = self._write_buffered(fd, offset, min(n, self._ahead))
            self._ahead -= got
            return got
        # Leave the last byte to http.client, so its own accounting ends the response and the
        # connection goes back to the pool as after any read.
        n = min(n, fp.length - 1)
        pipe = _thread_pipe()
        try:
            try:
                with self._network_errors():
                    got = self._splice_from_socket(pipe.w, n)
            except _Unspliceable:
                self._sock = None
                return self._write_buffered(fd, offset, n)
            done = 0
            while done < got:  # the pipe's bytes into the file; the file's errors (ENOSPC) as they are
                try:
                    done += os.splice(pipe.r, fd, got - done, offset_dst=offset + done)
                except OSError as e:
                    if e.errno not in _NO_SPLICE:
                        raise
                    self._sock = None  # a file that takes no splice: the rest the plain way
                    while done < got:
                        chunk = os.read(pipe.r, got - done)
                        pwrite_all(fd, chunk, offset + done)
                        done += len(chunk)
        except BaseException:
            _drop_thread_pipe()  # it may hold bytes of this response
            raise
        fp.length -= got
        return got

    def _splice_from_socket(self, pipe_w: int, n: int) -> int:
        """Up to ``n`` bytes from the socket into the pipe (0: the peer closed the connection).
        A socket with a timeout is non-blocking: wait for it as ``socket.recv`` would."""
        sock = self._sock
        assert sock is not None
        timeout = sock.gettimeout()
        while True:
            try:
                return os.splice(sock.fileno(), pipe_w, min(n, _PIPE_BYTES))
            except BlockingIOError:
                poll = select.poll()
                poll.register(sock, select.POLLIN)
                if not poll.poll(None if timeout is None else timeout * 1000):
                    raise TimeoutError("timed out") from None
            except OSError as e:
                if e.errno in _NO_SPLICE:
                    raise _Unspliceable() from None
                raise

    def _write_buffered(self, fd: int, offset: int, n: int) -> int:
        buf = getattr(_local, "buf", None)
        if buf is None:
            buf = _local.buf = memoryview(bytearray(_NET_CHUNK))
        got = self.readinto(buf[: min(n, _NET_CHUNK)])
        pwrite_all(fd, buf[:got], offset)
        return got

    @contextlib.contextmanager
    def _network_errors(self):
        """Socket errors as botocore's, so the retry logic sees the same exceptions."""
        try:
            yield
        except TimeoutError as e:  # socket.timeout: read_timeout passed without a byte
            raise ReadTimeoutError(endpoint_url=self._endpoint, error=e) from None
        except (OSError, http.client.HTTPException) as e:
            raise ResponseStreamingError(error=e) from None

    def done(self) -> None:
        """The whole body was read: hand the connection back to urllib3's pool for the next
        request (what urllib3's own read does once http.client has closed the response)."""
        if self._raw is not None and self._fp.isclosed():
            self._raw.release_conn()

    def close(self) -> None:
        self._body.close()  # after done(): nothing left to close; else drops the connection


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix/``.

    Credentials are the explicit arguments when given, otherwise boto3's normal chain
    (environment, ``~/.aws``, instance/pod role). ``endpoint_url`` selects an S3-compatible server
    and switches to path-style addressing, which those servers expect.

    ``part_size`` is the multipart part size and also the size of each ranged GET of a streaming
    read. Objects smaller than ``multipart_threshold`` (and than one part) are sent in a single
    PUT. ``concurrency`` bounds the requests one read or one upload keeps in flight (ranged GETs
    of read-ahead, parts being uploaded), hence its memory: ``concurrency * part_size``.
    ``get_size`` is the largest ranged GET of a read into caller memory or a file (``read_into``,
    ``read_to_file``; the loader's and the shm tier's requests): those need no buffer of their
    own, so they can be larger than a part, and every GET has a fixed cost (~1.5 ms of client CPU
    in botocore, and the server's) that larger ones pay less often; a longer range is fetched as
    ``get_size`` pieces, ``concurrency`` at a time.

    Failures (see the module docstring): ``connect_timeout`` / ``read_timeout`` (seconds) bound
    opening a connection and each wait for bytes; a failed request is retried by this class
    alone (botocore's retries are off) at most ``max_attempts`` times in a row and while its
    stalled time stays under ``retry_deadline`` seconds; a read broken mid-body resumes from its
    last byte. Worst case for an endpoint that never answers: ``retry_deadline + read_timeout``.
    """

    kind = "s3"
    # A multipart upload of a key begun this long ago is a killed writer's (see _abort_stale_uploads).
    STALE_UPLOAD_S = 24 * 3600.0

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        max_attempts: int = 5,
        part_size: int = 8 * 1024 * 1024,
        multipart_threshold: int = 8 * 1024 * 1024,
        get_size: int = 32 * 1024 * 1024,
        max_pool_connections: int = settings.S3_MAX_CONCURRENCY,
        concurrency: int = settings.S3_CONCURRENCY,
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        retry_deadline: float = 20.0,
    ):
        settings.s3_bucket_name("bucket", bucket)  # a SettingError (ValueError) naming it, not boto3's regex
        if endpoint_url is not None:  # likewise, not boto3's "Invalid endpoint"
            endpoint_url = settings.http_url("endpoint_url", endpoint_url, implied=False,
                                             example=settings.S3_ENDPOINT_EXAMPLE)
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size {part_size} is below S3's minimum part size {MIN_PART_SIZE}")
        if get_size < 1024 * 1024:
            raise ValueError(f"get_size {get_size} is below 1 MiB")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if not 1 <= concurrency <= max_pool_connections:
            raise ValueError(f"concurrency must be between 1 and max_pool_connections={max_pool_connections}, "
                             f"got {concurrency}")
        for what, v in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout),
                        ("retry_deadline", retry_deadline)):
            if not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise ValueError(f"{what} must be a positive number of seconds, got {v!r}")
        self.connect_timeout, self.read_timeout, self.retry_deadline = connect_timeout, read_timeout, retry_deadline
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.max_attempts = max_attempts
        self.part_size = part_size
        self.multipart_threshold = multipart_threshold
        self.get_size = get_size
        self.concurrency = concurrency
        self.parallel_requests = max_pool_connections  # one connection each
        session = boto3.session.Session(
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
            region_name=region_name,
        )
        config = Config(
            # One retry layer: ours (_Budget), which also resumes broken bodies; botocore's is off.
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self.endpoint = self.client.meta.endpoint_url
        self._session = session
        self._spec = {
            "kind": self.kind, "bucket": bucket, "prefix": self.prefix, "endpoint_url": endpoint_url,
            "region_name": region_name, "max_attempts": max_attempts, "part_size": part_size,
            "multipart_threshold": multipart_threshold, "get_size": get_size,
            "max_pool_connections": max_pool_connections,
            "concurrency": concurrency,
            "connect_timeout": connect_timeout, "read_timeout": read_timeout, "retry_deadline": retry_deadline,
        }
        # Server-side copies: same part size as uploads; s3transfer grows it past 10,000 parts.
        self._transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=part_size,
            max_concurrency=min(10, max_pool_connections),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri()!r})"

    def spec(self) -> tuple[dict, dict[str, str]]:
        """See :meth:`Storage.spec`. Credentials travel as the standard AWS environment variables."""
        env: dict[str, str] = {}
        creds = self._session.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            env = {"AWS_ACCESS_KEY_ID": frozen.access_key, "AWS_SECRET_ACCESS_KEY": frozen.secret_key}
            if frozen.token:
                env["AWS_SESSION_TOKEN"] = frozen.token
        return dict(self._spec), env

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str = "") -> str:
        return "s3://" + join(self.bucket, self.prefix, key)

    # Requests -----------------------------------------------------------------------------
    def _error(self, err: Exception, key: str, op: str, budget: _Budget | None = None) -> StorageError:
        """The StorageError for a failed request on ``key``: one line naming its s3:// uri, the
        endpoint when it did not answer, the attempts and the cause. ``unreachable`` is set on it
        when the endpoint did not answer (then cleanup requests are not worth trying)."""
        where = self.uri(key)
        tries = f" after {budget.summary()}" if budget is not None and budget.attempts > 1 else ""
        if not isinstance(err, ClientError):
            if isinstance(err, HTTPClientError) and "timeout" in type(err).__name__.lower():
                why = f"no answer within read_timeout={self.read_timeout:g} s ({err})"
            elif "ConnectTimeout" in type(err).__name__:
                why = f"no connection within connect_timeout={self.connect_timeout:g} s ({err})"
            else:
                why = str(err)
            out = StorageError(f"{where}: {op} failed{tries} at endpoint {self.endpoint}: {why}")
            out.unreachable = _unreachable(err)  # type: ignore[attr-defined]
            return out
        code, message = _code(err), err.response.get("Error", {}).get("Message", "")
        if code == "NoSuchBucket":
            return StorageError(f"{where}: bucket {self.bucket!r} does not exist (endpoint {self.endpoint})")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404 and code in ("", "404", "NotFound") and not op.startswith("HEAD"):
            # An S3 server names what it did not find (NoSuchKey, NoSuchBucket) in an XML body on
            # every request but HEAD; a bare 404 is another server (a web server, a console's port).
            return StorageError(f"{where}: {op}: the endpoint {self.endpoint} answered HTTP 404 without an S3 error: "
                                "is it an S3 API's address (check FORGELINE_S3_ENDPOINT_URL)?")
        if code in _NOT_FOUND:
            return ObjectNotFound(f"{where}: not found")
        if code in _FULL:
            return StorageFull(f"{where}: {op} refused, storage full ({code}: {message})")
        hint = _CREDENTIAL_HINTS.get(code, "")
        return StorageError(f"{where}: {op} failed{tries} ({code or status}: {message or 'no message'}; "
                            f"endpoint {self.endpoint}){hint}")

    def _retrying(self, op: str, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` retried within the retry budget; a final failure is raised as a StorageError
        subclass whose message carries the cause (the botocore exception is not chained: the
        last line of the traceback is the whole story)."""
        budget = _Budget(self.max_attempts, self.retry_deadline)
        while True:
            budget.attempt()
            try:
                return fn()
            except (BotoCoreError, ClientError) as e:
                if not budget.retry(e):
                    raise self._error(e, key, op, budget) from None

    def _call(self, op: str, key: str, fn: Callable[..., Any], **kw: Any) -> Any:
        """``fn(Bucket=..., Key=<full key>, **kw)``, retried (:meth:`_retrying`)."""
        full = self._full(key)
        return self._retrying(op, key, lambda: fn(Bucket=self.bucket, Key=full, **kw))

    def _abort_stale_uploads(self, key: str) -> int:
        """Abort the multipart uploads of ``key`` begun more than ``STALE_UPLOAD_S`` ago: what a
        writer killed mid-upload (kill -9, OOM) left, invisible and billed until aborted. Done as
        the key is uploaded again, so a key rewritten (a batch ingested again) never piles them up;
        a bucket lifecycle rule (deploy/README.md) covers keys never written again. Best effort:
        a store that refuses the listing or the abort is left as it is. Returns how many."""
        full, aborted = self._full(key), 0
        try:
            uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full).get("Uploads", [])
        except (ClientError, BotoCoreError):
            return 0
        cutoff = time.time() - self.STALE_UPLOAD_S
        for u in uploads:
            if u.get("Key") == full and u["Initiated"].timestamp() < cutoff:
                with contextlib.suppress(ClientError, BotoCoreError):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=u["UploadId"])
                    aborted += 1
        return aborted

    def _head(self, key: str) -> dict:
        return self._call("HEAD", key, self.client.head_object)

    def _get(self, key: str, start: int, end: int, etag: str | None = None) -> tuple[bytearray, str | None, int]:
        """Bytes ``[start, end]`` (inclusive; ``end`` may lie past the object's end, then fewer
        come back) as ``(data, etag, object_size)``. See :meth:`_stream` for resume and ETag pinning."""
        held: list[bytearray] = []

        def dest(n: int) -> memoryview:
            held.append(bytearray(n))
            return memoryview(held[0])

        etag, size, _ = self._stream(key, start, end, etag, dest)
        return (held[0] if held else bytearray()), etag, size

    def get_into(self, key: str, start: int, out, etag: str | None = None) -> tuple[int, str | None, int]:
        """Read ``len(out)`` bytes at ``start`` straight into the writable buffer ``out`` (e.g. a
        pinned staging slot or the destination tensor's memory): the socket's bytes are received
        into their place, with no intermediate. Returns ``(bytes_read, etag, object_size)``;
        fewer bytes than ``len(out)`` only past the object's end. Same resume and ETag pinning as
        :meth:`_get`."""
        view = memoryview(out).cast("B")
        if len(view) == 0:
            return 0, etag, self.stat(key).size

        # Fresh destination pages are left to fault in during the receive. Allocating them first in
        # one madvise(MADV_POPULATE_WRITE) saved ~5% of the client's CPU with client and server on
        # the same two cores, but cost 15-20% of the rate with the client on a core of its own
        # (BENCHMARKS.md, session 16).
        etag, size, end = self._stream(key, start, start + len(view) - 1, etag, lambda n: view[:n])
        return end - start, etag, size

    def _stream(self, key: str, start: int, end: int, etag: str | None,
                dest: Callable[[int], memoryview] | tuple[int, int]) -> tuple[str | None, int, int]:
        """GET bytes ``[start, end]`` into ``dest(n)``, the buffer for the ``n`` bytes the server
        has of that range (asked once, at the first response), or, for ``dest=(fd, offset)``,
        into that file from ``offset`` on; returns ``(etag, object_size, offset after the last
        byte)``.

        A connection that breaks mid-body is resumed from the last byte received, with
        ``If-Match`` on the ETag of the first response (or the one given), so the bytes always
        belong to one version. ``max_attempts`` bounds consecutive failures without progress.
        """
        pos = start
        size: int | None = None
        view: memoryview | None = None
        budget = _Budget(self.max_attempts, self.retry_deadline)
        while True:
            conditions = {"IfMatch": etag} if etag else {}
            budget.attempt()
            try:
                resp = self.client.get_object(
                    Bucket=self.bucket, Key=self._full(key), Range=f"bytes={pos}-{end}", **conditions
                )
                etag = resp["ETag"]
                stop, size = self._answered_range(resp, key, pos, end)
                if view is None and callable(dest):
                    view = dest(stop - start)
                body = _Body(resp["Body"], self.endpoint)
                try:
                    while pos < stop:
                        want = min(stop - pos, _NET_CHUNK)
                        if view is not None:
                            n = body.readinto(view[pos - start : pos - start + want])
                        else:
                            n = body.write_to(dest[0], dest[1] + pos - start, want)
                        if n == 0:  # the server closed the connection early: resume
                            raise IncompleteReadError(actual_bytes=pos - start, expected_bytes=stop - start)
                        pos += n
                        budget.progress()
                    body.done()
                finally:
                    body.close()
                return etag, size, pos
            except ClientError as e:
                code = _code(e)
                if code == "InvalidRange":  # start at or past the end: no bytes, size is known
                    return etag, int(e.response["Error"].get("ActualObjectSize", start)), pos
                if etag and code in ("PreconditionFailed", *_NOT_FOUND):
                    raise ObjectChanged(
                        f"{self.uri(key)}: object changed during read (ETag {etag} no longer "
                        f"current: {code}); not mixing bytes of two versions"
                    ) from None
                if not budget.retry(e):
                    raise self._error(e, key, f"GET bytes={pos}-{end}", budget) from None
            except BotoCoreError as e:
                if size is not None and pos >= min(end + 1, size):
                    # The error came after the last byte; a range starting past it would be
                    # invalid, so there is nothing to resume.
                    return etag, size, pos
                if not budget.retry(e):
                    raise self._error(e, key, f"GET bytes={pos}-{end}", budget) from None

    def _answered_range(self, resp: dict, key: str, pos: int, end: int) -> tuple[int, int]:
        """``(offset after the last byte sent, object size)`` of a GET's answer to ``Range:
        bytes=pos-end``, from its Content-Range ("bytes 0-99/1234"). A 200 without one is the
        whole object: what was asked only from byte 0 and when the object ends within the range
        (a server may answer so); otherwise the server ignored the Range header, or answered
        another range, and reading on would put wrong bytes in place: one line says so."""
        got = resp.get("ContentRange")
        try:
            if got is None:
                length = int(resp["ContentLength"])
                if pos == 0 and length <= end + 1:
                    return length, length
                why = f"ignored the Range header (HTTP 200 with the whole object, {length} bytes)"
            else:
                sent, _, total = got.removeprefix("bytes ").rpartition("/")
                first, _, last = sent.partition("-")
                if int(first) == pos and pos <= int(last) <= end:
                    return int(last) + 1, int(total)
                why = f"answered another range than asked (Content-Range: {got})"
        except (KeyError, ValueError):
            why = f"sent an unreadable Content-Range ({got!r})"
        with contextlib.suppress(Exception):
            resp["Body"].close()  # unread bytes: the connection is not reused
        raise StorageError(f"{self.uri(key)}: GET bytes={pos}-{end}: the endpoint {self.endpoint} {why}; "
                           f"ranged reads need a server (and proxies) that honour Range")

    # Storage interface --------------------------------------------------------------------
    def open_read(self, key: str) -> "_S3Reader":
        return _S3Reader(self, key)

    def read_range(self, key: str, start: int, length: int, *, version: str | None = None) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"{self.uri(key)}: negative range start={start} length={length}")
        if length == 0:
            self.stat(key)  # like a local file: an empty range of a missing object is an error
            return b""
        if length <= self.part_size or self.concurrency == 1:
            data, _, size = self._get(key, start, start + length - 1, version)
            self._check_range(key, start, length, len(data), size)
            return bytes(data)
        out = bytearray(length)
        self.read_into(key, start, out, version=version)
        return bytes(out)

    def read(self, key: str) -> bytes:
        """The whole object: one GET of its first ``get_size`` bytes, which answers its size and
        ETag, then the rest received straight into one buffer by parallel ranged GETs pinned to
        that ETag (:meth:`read_into`): one copy fewer than through :meth:`open_read`'s windows
        (a 256 MiB object here: 0.37 s of CPU instead of 0.44 s; the rest is the kernel handing out
        new memory for the buffer and for the bytes returned)."""
        first, etag, size = self._get(key, 0, self.get_size - 1)
        if etag is None:  # an empty object: its range is invalid (a missing one raised already)
            return b"" if self.stat(key).size == 0 else self.read(key)  # (replaced meanwhile: again)
        if size <= len(first):
            return bytes(first)
        n, buf = len(first), bytearray(size)
        buf[:n] = first
        del first
        self.read_into(key, n, memoryview(buf)[n:], version=etag)
        return bytes(buf)

    def read_head(self, key: str, length: int) -> tuple[bytes, ObjectInfo]:
        """See :meth:`Storage.read_head`: one ranged GET, whose answer carries the object's size
        (``Content-Range``) and ETag along with the bytes, where a HEAD and a GET would take two
        round trips."""
        if length > 0:
            data, etag, size = self._get(key, 0, length - 1)
            if etag is not None:  # None: an empty object (its range is invalid); stat it
                return bytes(data), ObjectInfo(key, size, None, etag)
        return b"", self.stat(key)

    def read_into(self, key: str, start: int, out, *, version: str | None = None) -> None:
        """See :meth:`Storage.read_into`: the socket's bytes are received into their place. A
        range longer than ``get_size`` is fetched as ``get_size`` ranged GETs, ``concurrency``
        at a time, every one pinned to the same ETag: ``version``, else the first piece's (then
        that piece goes first, alone, to learn it)."""
        view = memoryview(out).cast("B")

        def piece(at: int, n: int, etag: str | None) -> tuple[int, str | None, int]:
            return self.get_into(key, start + at, view[at : at + n], etag)

        self._pieces(key, start, len(view), version, piece)

    def read_to_file(self, key: str, start: int, length: int, fd: int, offset: int, *,
                     version: str | None = None) -> None:
        """See :meth:`Storage.read_to_file`. Over plain HTTP the bytes go from the socket into
        the file by ``splice(2)`` and never enter this process (:class:`_Body`); pieces and
        pinning as :meth:`read_into`."""

        def piece(at: int, n: int, etag: str | None) -> tuple[int, str | None, int]:
            etag, size, stop = self._stream(key, start + at, start + at + n - 1, etag, (fd, offset + at))
            return stop - start - at, etag, size

        self._pieces(key, start, length, version, piece)

    def _pieces(self, key: str, start: int, length: int, version: str | None,
                piece: Callable[[int, int, str | None], tuple[int, str | None, int]]) -> None:
        """Bytes ``[start, start + length)`` as ``get_size`` pieces, ``piece(at, n, etag) ->
        (bytes_read, etag, object_size)`` each (``at`` relative to ``start``), ``concurrency``
        at a time, all pinned to ``version`` or else to the first piece's ETag (that piece goes
        first, alone, to learn it); an object shorter than the range raises IntegrityError."""
        if start < 0:
            raise ValueError(f"{self.uri(key)}: negative range start={start}")
        if length == 0:
            self.stat(key)  # like a local file: an empty range of a missing object is an error
            return
        step = self.get_size
        etag = version
        pieces = [(at, min(step, length - at)) for at in range(0, length, step)]
        if version is None or len(pieces) <= 1:
            first = min(step, length)
            got, etag, size = piece(0, first, version)
            if got != first or length <= step:
                self._check_range(key, start, length, got, size)
                return
            self._check_range(key, start, length, min(size - start, length), size)
            pieces = pieces[1:]

        def fetch(p: tuple[int, int]) -> None:
            at, n = p
            got, _, size = piece(at, n, etag)
            if got != n:  # the object (of the pinned version) ends before the range does
                self._check_range(key, start, length, at + got, size)

        in_parallel(fetch, pieces, "s3-get", self.concurrency, fail_fast=True)

    def _check_range(self, key: str, start: int, length: int, got: int, size: int) -> None:
        if got != length:
            raise IntegrityError(
                f"{self.uri(key)}: range [{start}, {start + length}) past end of object ({size} bytes)"
            )

    def open_write(self, key, *, expected_size=None, expected_sha256=None) -> AtomicWriter:
        self._full(key)  # reject a bad key now, not at the first network request
        return _S3Writer(self, key, expected_size=expected_size, expected_sha256=expected_sha256)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        prefix = check_key(prefix).rstrip("/") if prefix else ""
        # A prefix names an object or a "directory", as on a filesystem: "a" lists "a" and
        # "a/...", never "ab".
        base = join(self.prefix, prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        token: dict[str, str] = {}
        while True:  # one page per request, each retried on its own
            page = self._retrying("LIST", prefix, lambda: self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=base, **token))
            for obj in page.get("Contents", []):
                if self.prefix and not obj["Key"].startswith(self.prefix + "/"):
                    continue
                rel = obj["Key"][strip:]
                if prefix and rel != prefix and not rel.startswith(prefix + "/"):
                    continue
                out.append(ObjectInfo(rel, obj["Size"]))
            if not page.get("IsTruncated") or not page.get("NextContinuationToken"):
                break
            token = {"ContinuationToken": page["NextContinuationToken"]}
        out.sort(key=lambda o: o.key)
        return out

    def stat(self, key: str) -> ObjectInfo:
        """Size, recorded sha256 and the ETag as ``version`` (it changes whenever the object is
        replaced)."""
        head = self._head(key)
        return ObjectInfo(key, head["ContentLength"], head.get("Metadata", {}).get("sha256"), head["ETag"])

    def delete(self, key: str) -> None:
        self._call("DELETE", key, self.client.delete_object)

    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        """Server-side copy (multipart above ``multipart_threshold``, so objects > 5 GB work);
        metadata, the sha256 included, is carried over."""
        src = self._head(src_key)
        self._server_copy(src_key, dst_key, src["ETag"], size=src["ContentLength"])
        dst = self._head(dst_key)
        if dst["ContentLength"] != src["ContentLength"]:
            self.delete(dst_key)
            raise IntegrityError(
                f"{self.uri(dst_key)}: copy has {dst['ContentLength']} bytes, "
                f"source {self.uri(src_key)} has {src['ContentLength']}"
            )
        return ObjectInfo(dst_key, dst["ContentLength"], dst.get("Metadata", {}).get("sha256"))

    def _server_copy(self, src_key: str, dst_key: str, src_etag: str, metadata: dict | None = None,
                     *, size: int | None = None) -> None:
        """Copy ``src_key`` as of ``src_etag`` to ``dst_key``; ``metadata`` replaces the source's
        user metadata, else it is kept.

        One CopyObject request up to S3's 5 GiB limit for it: a single request is atomic, and Ceph
        RGW then shares the source's data instead of copying it (a multipart copy, UploadPartCopy,
        re-writes every byte: for the metadata-only copy after an upload that doubled the
        upload's cost). Larger objects go through s3transfer's multipart copy."""
        extra: dict[str, Any] = {"CopySourceIfMatch": src_etag}
        if metadata is not None:
            extra |= {"MetadataDirective": "REPLACE", "Metadata": metadata}
        source = {"Bucket": self.bucket, "Key": self._full(src_key)}

        def copy() -> None:
            try:
                if size is not None and size <= _MAX_COPY_OBJECT:
                    self.client.copy_object(Bucket=self.bucket, Key=self._full(dst_key), CopySource=source, **extra)
                    return
                self.client.copy(
                    {"Bucket": self.bucket, "Key": self._full(src_key)},
                    self.bucket,
                    self._full(dst_key),
                    ExtraArgs=extra,
                    Config=self._transfer_config,
                )
            except ClientError as e:
                # "412": the HEAD s3transfer issues first carries the condition too, and has no body.
                if _code(e) in ("PreconditionFailed", "412"):
                    raise ObjectChanged(f"{self.uri(src_key)}: object changed during copy") from None
                raise

        # Idempotent (If-Match on the source), so a failed copy is simply started again.
        self._retrying(f"COPY from {self.uri(src_key)}", dst_key, copy)


class _S3Reader(io.RawIOBase):
    """Sequential reader over one version of an object, fetched in ranged GETs of ``part_size``.

    The first GET (issued on open, so a missing object fails there) pins the ETag and tells the
    size; every later window is requested with ``If-Match`` on that ETag. Once the reader goes
    past the first window it reads ahead: up to ``concurrency`` windows are fetched in parallel,
    each straight into its own buffer, and handed out in order. Bounded windows keep memory flat
    (``concurrency * part_size``) and make every window an independent, resumable request. A
    reader that only peeks at the head of an object costs one GET. A window's buffer is reused
    for a later window once the caller has taken its bytes (``read`` and ``readinto`` copy out
    of it): memory never touched before costs more CPU than receiving into it.
    """

    def __init__(self, store: S3Storage, key: str):
        super().__init__()
        self._store = store
        self.key = key
        self._window = store.part_size
        data, self._etag, self.size = store._get(key, 0, self._window - 1)
        self._buf = memoryview(data)
        self._held = data  # the current window's buffer, reused once its bytes are taken
        self._spare: list[bytearray] = []
        self._offset = 0  # bytes handed to the caller so far
        self._fetched = len(data)  # bytes requested from S3 so far (fetched or in flight)
        self._ahead: deque[tuple[Future, bytearray]] = deque()  # windows in flight, in order
        self._pool: ThreadPoolExecutor | None = None

    def readable(self) -> bool:
        return True

    def _fetch(self, start: int, view: memoryview) -> memoryview:
        got, _, _ = self._store.get_into(self.key, start, view, self._etag)
        if got != len(view):
            raise IntegrityError(
                f"{self._store.uri(self.key)}: got {got} bytes at offset {start}, "
                f"expected {len(view)} (object size {self.size})"
            )
        return view

    def _next_window(self) -> None:
        if len(self._held) == self._window:  # the window just emptied: its buffer takes a later one
            self._spare.append(self._held)
        self._held = bytearray()
        workers = self._store.concurrency
        if workers > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="s3-read-ahead")
        while self._fetched < self.size and len(self._ahead) < max(1, workers):
            n = min(self._window, self.size - self._fetched)
            buf = self._spare.pop() if self._spare else bytearray(self._window)
            view = memoryview(buf)[:n]
            if self._pool is None:
                done: Future = Future()
                try:
                    done.set_result(self._fetch(self._fetched, view))
                except BaseException as e:  # noqa: BLE001 - re-raised by result() below
                    done.set_exception(e)
                self._ahead.append((done, buf))
            else:
                self._ahead.append((self._pool.submit(self._fetch, self._fetched, view), buf))
            self._fetched += n
        if not self._ahead:
            raise IntegrityError(f"{self._store.uri(self.key)}: read past the end ({self.size} bytes)")
        fut, self._held = self._ahead.popleft()
        self._buf = fut.result()

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all that remain if ``size`` is negative or None); fewer only
        at the end of the object."""
        self._checkClosed()
        remaining = self.size - self._offset
        want = remaining if size is None or size < 0 else min(size, remaining)
        if want and not self._buf:  # at a window's end: a read of the next window alone is one copy too
            self._next_window()
        if want <= len(self._buf):  # within the current window: one copy
            piece = self._buf[:want]
            self._buf = self._buf[want:]
            self._offset += want
            return bytes(piece)
        out = bytearray(want)
        self._fill(memoryview(out))  # not views of the windows: their buffers are reused
        return bytes(out)

    def _fill(self, view: memoryview) -> int:
        at = 0
        while at < len(view):
            if not self._buf:
                self._next_window()
            n = min(len(self._buf), len(view) - at)
            view[at : at + n] = self._buf[:n]
            self._buf = self._buf[n:]
            at += n
            self._offset += n
        return at

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b) -> int:
        self._checkClosed()
        view = memoryview(b).cast("B")
        return self._fill(view[: min(len(view), self.size - self._offset)])

    def tell(self) -> int:
        return self._offset

    def close(self) -> None:
        self._buf = memoryview(b"")
        self._held, self._spare = bytearray(), []
        for f, _ in self._ahead:
            f.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        super().close()


class _S3Writer(AtomicWriter):
    """Buffers up to one part; switches to a multipart upload once the object outgrows
    ``multipart_threshold``. Nothing is visible under the key until PUT / CompleteMultipartUpload.

    Parts go up concurrently: each full part is handed to a pool of ``concurrency`` uploads, and
    :meth:`write` waits for the oldest one when that many are in flight, so at most
    ``concurrency`` parts (plus the one being filled) are held in memory. The first failed part
    fails the writer (at the next write or at commit) and aborts the upload.

    Bytes are copied once, into part-sized buffers that are reused once their part is up: a
    new buffer per part (and a copy to make it) cost more CPU than the upload itself, most of it
    the kernel handing out and zeroing memory never touched before.
    """

    def __init__(self, store: S3Storage, key: str, **kw):
        super().__init__(key, **kw)
        self._store = store
        self._part: bytearray | None = None  # the part being filled ...
        self._fill = 0  # ... up to here
        self._full: deque[bytearray] = deque()  # full parts waiting for the multipart upload to start
        self._spare: list[bytearray] = []  # buffers of parts already up, for the next ones
        self._upload_id: str | None = None
        self._parts: list[dict] = []
        self._next_part = 1
        self._inflight: deque[tuple[Future, bytearray]] = deque()  # part uploads in flight, oldest first
        self._pool: ThreadPoolExecutor | None = None
        self._unreachable = False  # the last request failed because the endpoint did not answer
        self._part_size = store.part_size
        if self.expected_size is not None:
            # Big enough that the declared size fits in S3's 10,000 parts.
            self._part_size = max(self._part_size, math.ceil(self.expected_size / MAX_PARTS))
        self._multipart_at = max(store.multipart_threshold, self._part_size)

    def _request(self, op: str, fn: Callable[..., Any], **kw: Any) -> Any:
        try:
            return self._store._call(op, self.key, fn, **kw)
        except StorageError as e:
            self._unreachable = getattr(e, "unreachable", False)
            raise

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            if self._part is None:
                self._part = self._spare.pop() if self._spare else bytearray(self._part_size)
            n = min(len(view), self._part_size - self._fill)
            self._part[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill < self._part_size:
                break
            self._full.append(self._part)
            self._part, self._fill = None, 0
            if self._upload_id is None and len(self._full) * self._part_size >= self._multipart_at:
                self._start_multipart()
            while self._upload_id is not None and self._full:
                self._upload_part(self._full.popleft())

    def _buffered(self) -> bytes:
        """Every byte written and not yet sent (at commit: the last part, or a small object)."""
        tail = memoryview(self._part)[: self._fill] if self._part is not None else b""
        return b"".join([*self._full, tail])

    def _start_multipart(self) -> None:
        self._store._abort_stale_uploads(self.key)
        # Metadata can only be set when the upload starts; the sha256 is known then only if the
        # caller declared it (it is verified before completing). Otherwise see _commit.
        metadata = {"sha256": self.expected_sha256} if self.expected_sha256 else {}
        # CRC32 per part, declared up front, so S3 checks every part on arrival and the
        # completion request can list the part checksums it then requires.
        resp = self._request(
            "CreateMultipartUpload",
            self._store.client.create_multipart_upload,
            Metadata=metadata,
            ChecksumAlgorithm="CRC32",
        )
        self._upload_id = resp["UploadId"]

    def _upload_part(self, data: bytes | bytearray) -> None:
        """Send part number ``_next_part``: at once with ``concurrency`` 1, else in the pool once
        fewer than ``concurrency`` parts are in flight. A part-sized buffer is reused for a later
        part once its upload is done."""
        number = self._next_part
        if number > MAX_PARTS:
            raise StorageError(
                f"{self._store.uri(self.key)}: more than {MAX_PARTS} parts of {self._part_size} bytes; "
                "pass expected_size to open_write or raise part_size"
            )
        self._next_part += 1
        workers = self._store.concurrency
        if workers <= 1:
            self._parts.append(self._send_part(number, data))
            self._reuse(data)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="s3-upload")
        while len(self._inflight) >= workers:
            self._finish_oldest()
        self._inflight.append((self._pool.submit(self._send_part, number, data), data))

    def _finish_oldest(self) -> None:
        fut, data = self._inflight[0]
        self._parts.append(fut.result())  # a failure is raised here, in part order
        self._inflight.popleft()
        self._reuse(data)

    def _reuse(self, data: bytes | bytearray) -> None:
        if isinstance(data, bytearray) and len(data) == self._part_size:
            self._spare.append(data)

    def _drain(self) -> None:
        """Wait for every part in flight (the first failure, in part order, is raised)."""
        while self._inflight:
            self._finish_oldest()

    def _send_part(self, number: int, data: bytes) -> dict:
        crc = Crc32()  # ISA-L's: botocore would compute the same with zlib, ~5x slower
        crc.update(data)
        resp = self._request(
            f"UploadPart {number}",
            self._store.client.upload_part,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
            ChecksumAlgorithm="CRC32",
            ChecksumCRC32=base64.b64encode(crc.digest()).decode(),
        )
        part = {"PartNumber": number, "ETag": resp["ETag"]}
        if "ChecksumCRC32" in resp:  # servers without checksum support return none
            part["ChecksumCRC32"] = resp["ChecksumCRC32"]
        return part

    def _commit(self, sha256: str) -> ObjectInfo:
        store, where = self._store, self._store.uri(self.key)
        if self._upload_id is None:
            self._request(
                "PUT",
                store.client.put_object,
                Body=self._buffered(),
                Metadata={"sha256": sha256},
                # S3 recomputes this and rejects the PUT on mismatch: end-to-end integrity.
                ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode(),
            )
        else:
            if self._fill:
                self._upload_part(self._buffered())
            self._drain()
            self._stop_pool()
            self._parts.sort(key=lambda p: p["PartNumber"])
            self._request(
                "CompleteMultipartUpload",
                store.client.complete_multipart_upload,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
            self._upload_id = None  # completed: nothing left for _abort to clean up
        self._drop_buffers()
        head = store._head(self.key)
        if head["ContentLength"] != self.size:
            store.delete(self.key)
            raise IntegrityError(
                f"{where}: published {head['ContentLength']} bytes, wrote {self.size}; deleted it"
            )
        if head.get("Metadata", {}).get("sha256") != sha256:
            # A multipart upload whose sha256 was not declared up front: set the metadata with
            # a server-side copy onto itself (no bytes through this host). The content was
            # already published atomically; only the metadata arrives a moment later, and a
            # reader that opened in between sees a new ETag. If-Match makes sure we only touch
            # our own object, not one a concurrent writer published since.
            try:
                store._server_copy(self.key, self.key, head["ETag"], {"sha256": sha256}, size=self.size)
            except ObjectChanged:
                pass  # replaced by another writer meanwhile: theirs wins, as with a later write
        return ObjectInfo(self.key, self.size, sha256)

    def _drop_buffers(self) -> None:
        self._part, self._fill = None, 0
        self._full.clear()
        self._spare.clear()

    def _stop_pool(self) -> None:
        """Cancel the parts not yet started and wait for the ones in flight (each within its
        retry budget), so that no part lands after the upload is aborted."""
        for f, _ in self._inflight:
            f.cancel()
        self._inflight.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _abort(self) -> None:
        self._drop_buffers()
        self._stop_pool()
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        store = self._store
        # Best effort, one attempt, and never an exception: this runs while the real failure is
        # on its way to the caller, and must neither mask it nor delay it by another retry
        # budget. The parts stay invisible either way; a bucket lifecycle rule
        # (AbortIncompleteMultipartUpload) reclaims them.
        if self._unreachable:
            log.warning("%s: endpoint %s did not answer; multipart upload %s left for the bucket's "
                        "lifecycle rule to reclaim", store.uri(self.key), store.endpoint, upload_id)
            return
        try:
            store.client.abort_multipart_upload(Bucket=store.bucket, Key=store._full(self.key), UploadId=upload_id)
        except Exception as e:  # noqa: BLE001 - see above
            log.warning("%s: could not abort multipart upload %s (%s); the bucket's lifecycle rule "
                        "reclaims its parts", store.uri(self.key), upload_id, e)


def for_bucket(bucket: str, like: Storage | None = None) -> S3Storage:
    """An S3Storage over the whole of ``bucket``: the endpoint, region and credentials of ``like``
    when it is an S3Storage too (another bucket on the same server), else the endpoint from
    ``FORGELINE_S3_ENDPOINT_URL`` and the region and credentials from the AWS environment."""
    if isinstance(like, S3Storage):
        spec, env = like.spec()
        tuning = {k: spec[k] for k in ("max_attempts", "connect_timeout", "read_timeout", "retry_deadline",
                                       "max_pool_connections", "concurrency") if k in spec}
        return S3Storage(
            bucket, "", endpoint_url=spec.get("endpoint_url"), region_name=spec.get("region_name"), **tuning,
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=env.get("AWS_SESSION_TOKEN"),
        )
    region = settings.raw("AWS_REGION") or settings.raw("AWS_DEFAULT_REGION")
    return S3Storage(bucket, "", endpoint_url=settings.s3_endpoint(), region_name=region)


__all__ = ["MIN_PART_SIZE", "S3Storage", "for_bucket"]
