"""Ingestion: validate landed WebDataset shards and Parquet tables, publish the good, quarantine the bad.

Shards are streamed exactly once: the bytes read from the source are validated (tar structure,
member names, sample grouping, every image checked in full, labels) and copied into an atomic
writer at the published key (which hashes them as they pass), which commits only if the shard is
valid. Checking images is most of the CPU; a PNG's check is zlib and crc32, which release the GIL,
so on a few cores the shard threads do it themselves; with more cores than shard threads the checks
run in a pool of worker processes, fed batches of image bytes with a bound on the bytes in flight,
while the calling process streams, parses the tar, hashes and writes. A corrupt shard is copied to
``quarantine/`` with a reason file; the source is never modified. A manifest, written last,
lists what is published for the batch.

Tables are checked with a polars lazy scan (schema, nulls, ranges, duplicate ids) on the streaming
engine, so memory stays flat whatever the file size; a table is published only if every file of
the batch passes, otherwise the error names the file and the column.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import BrokenExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

from pipeline.datagen import NUM_CLASSES, PIXEL_MAX, READY_MARKER, SPLITS
from pipeline.storage import CHUNK, AtomicWriter, ObjectNotFound, Storage, check_key, join, sha256_stream
from pipeline.webdataset import (
    IMAGE_EXTS,
    IMAGE_FORMATS,
    LABEL_EXT,
    WebDatasetError,
    group_samples,
    image_ext,
    image_problem,
    parse_label,
    sample_problem,
    split_key,
)

MAX_MEMBER_BYTES = 64 * 1024 * 1024  # larger members are rejected rather than read into memory
MANIFEST = "manifest.json"
# Image checks on worker processes (see ingest_shards): images go to a worker in batches of about
# IMAGE_BATCH_BYTES; at most IN_FLIGHT_BYTES of image bytes are queued or being checked at once (per
# ingest_shards call; at least one batch per worker twice over); a batch of shards smaller than
# POOL_MIN_BYTES is checked in the calling process (starting workers would cost more than it saves).
IMAGE_BATCH_BYTES = 2 * 1024 * 1024
IMAGE_BATCH_COUNT = 256
IN_FLIGHT_BYTES = 32 * 1024 * 1024
POOL_MIN_BYTES = 16 * 1024 * 1024
SHARD_THREADS = 4  # shards streamed at once in the calling process (overlaps reads, writes, waits)


class IngestError(Exception):
    """Bad input that stops ingestion. The message names the file (and column/member)."""


class ShardInvalid(IngestError):
    pass


class BadBatchName(IngestError, ValueError):
    """A batch (partition) name that cannot name a folder of its own."""


# ---------------------------------------------------------------------------------------------
# Batches: names, readiness, what landed
# ---------------------------------------------------------------------------------------------

MAX_BATCH_NAME = 128
_BATCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SHARDS_DIR = "shards"  # incoming/<batch>/shards/**.tar are the batch's shards
QUARANTINE = "quarantine/shards"  # <QUARANTINE>/<batch>/<name> (+ .reason.json): shards not published


def check_batch_name(name) -> str:
    """``name`` if it can name a batch, else :class:`BadBatchName` saying why. A batch name is one
    path segment of letters, digits, ``.``, ``_`` and ``-`` that starts with a letter or digit (so
    not ``''``, ``.``, ``..``, ``a/b``, ``-x``, whitespace or a hidden name), at most 128 characters.
    It becomes a storage folder (``incoming/<batch>/``, ``raw/shards/<batch>/``) and a Dagster
    partition key, so it is checked before either is written."""
    if not isinstance(name, str) or not name:
        raise BadBatchName(f"batch name {name!r}: empty")
    if len(name) > MAX_BATCH_NAME:
        raise BadBatchName(f"batch name {name[:40]!r}…: {len(name)} characters, at most {MAX_BATCH_NAME}")
    if not _BATCH_NAME.fullmatch(name):
        why = ("a path ('/' or '\\')" if "/" in name or "\\" in name
               else "whitespace" if any(c.isspace() for c in name)
               else "starts with '-' or '.'" if name[0] in "-."
               else "characters other than letters, digits, '.', '_', '-'")
        raise BadBatchName(f"batch name {name!r}: {why}; use letters, digits, '.', '_', '-', "
                           "starting with a letter or digit")
    return name


def batch_ready(store: Storage, batch: str, *, incoming: str = "incoming") -> bool:
    """Whether ``<incoming>/<batch>/_READY`` exists (the producer has finished landing it). Raises
    :class:`BadBatchName` for a name that is not a batch name."""
    return store.exists(join(incoming, check_batch_name(batch), READY_MARKER))


def require_ready(store: Storage, batch: str, *, incoming: str = "incoming") -> None:
    """Raise :class:`IngestError` (:class:`BadBatchName` for a bad name) unless ``batch`` has landed
    completely: what must hold before a ``batches`` partition is added or a batch ingested."""
    if not batch_ready(store, batch, incoming=incoming):
        prefix = join(incoming, batch)
        what = "has not finished landing (no _READY marker)" if store.list(prefix) else "does not exist"
        raise IngestError(f"batch {batch!r}: {store.uri(prefix)} {what}; land it first, e.g. "
                          f"`forgeline gen digits --batch {batch}`, or have the producer write {READY_MARKER} last")


def landed_links(store: Storage, prefix: str) -> dict[str, str]:
    """``{key: link target}`` of every symbolic link at or below ``prefix`` on filesystem storage,
    files and folders (never followed: a linked folder is not entered). Object stores (S3) have no
    links, so there it is always empty."""
    root = store.local_path(prefix)
    if root is None:
        return {}
    if root.is_symlink():
        return {prefix: os.readlink(root)}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if p.is_symlink():
                out[join(prefix, p.relative_to(root).as_posix())] = os.readlink(p)
    return out


def _link_reason(target: str) -> str:
    return (f"symbolic link (-> {target!r}): landed files must be regular files; "
            "links are not followed")


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------


TAR_BLOCK = 512
MAX_TAR_HEADER_BYTES = 1 << 20  # a pax or GNU long-name header larger than this is refused
_ZERO_BLOCK = bytes(TAR_BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # tar type flags of a regular file (7: contiguous, read as one)
_META = (b"x", b"X", b"g", b"L", b"K")  # pax extended / Solaris / pax global, GNU long name / link
# Numeric header fields (start, end); values are octal text or GNU base-256
_NUMBERS = (("mode", 100, 108), ("uid", 108, 116), ("gid", 116, 124), ("mtime", 136, 148), ("devmajor", 329, 337),
            ("devminor", 337, 345))  # besides size and checksum
_OCTAL_DIGITS = b"01234567"
_PAX_LENGTH = re.compile(rb"(\d+) ")
_SIGNED_SUM = struct.Struct("148b8x356b")


def _nts(field: bytes) -> str:
    """A NUL-terminated header string, decoded as tarfile does (so names are the loader's names)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


class _ShardReader:
    """A tar shard read once, sequentially, in :data:`CHUNK` pieces from ``src``: each piece is copied
    to ``sink`` (and hashed: by the sink when it is an :class:`AtomicWriter`, which hashes what it is
    given, else here) as it arrives, and :meth:`members` parses the tar from the same bytes.

    Replaces ``tarfile`` in stream mode, which costs ~3x more per member in Python, copies every byte
    twice more through its buffers, and ends the archive silently at a corrupt header (the members
    after it were never seen, yet the shard published). Checked here, as the DALI loader's index
    would fail them: each header's checksum (unsigned or signed sum, as tarfile) and numeric fields,
    member types and names (:func:`_check_member`), member data present in full, pax and GNU
    long-name headers well-formed and followed by a member, and an end-of-archive marker (two zero
    blocks) followed by nothing but zeros. Names come out exactly as ``tarfile`` (and so the loader)
    reads them: ustar prefix, pax ``path``, GNU long names. Sparse files and global pax headers that
    set a path or size are refused (a WebDataset shard has no use for them)."""

    def __init__(self, src: BinaryIO, sink=None):
        self._src, self._sink = src, sink
        self._sha = None if isinstance(sink, AtomicWriter) else hashlib.sha256()
        self.nbytes = 0  # read from src
        self._buf, self._pos = b"", 0  # read, not yet parsed: self._buf[self._pos:]
        self.offset = 0  # archive offset of self._buf[self._pos]
        self._checked: set[bytes] = set()  # header number fields already checked (see _header)

    @property
    def sha256(self) -> str:
        return self._sink.sha256 if self._sha is None else self._sha.hexdigest()

    def _read(self, n: int) -> bytes:
        data = self._src.read(n)
        if data:
            if self._sha is not None:
                self._sha.update(data)
            if self._sink is not None:
                self._sink.write(data)
            self.nbytes += len(data)
        return data

    def _take(self, n: int, keep: bool = True) -> bytes | None:
        """The next ``n`` bytes (``b""`` when not ``keep``: skipped, not copied), or None when the
        stream ends first (what there was still counts in :attr:`offset`, for the message). Sliced
        from the chunk read; only bytes that straddle two chunks are joined."""
        end = self._pos + n
        if end <= len(self._buf):
            data = self._buf[self._pos:end] if keep else b""
            self._pos = end
            self.offset += n
            return data
        got = len(self._buf) - self._pos
        parts = [self._buf[self._pos:]] if keep and got else []
        self.offset += got
        self._buf, self._pos = b"", 0
        while got < n:
            chunk = self._read(max(CHUNK, n - got))
            if not chunk:
                return None
            k = min(n - got, len(chunk))
            if keep:
                parts.append(chunk if k == len(chunk) else chunk[:k])
            got += k
            self.offset += k
            self._buf, self._pos = chunk, k
        return (parts[0] if len(parts) == 1 else b"".join(parts)) if keep else b""

    def _header(self, block: bytes, at: int) -> tuple[str, bytes, int, str]:
        """``(name, type, size, linkname)`` of the header ``block`` at archive offset ``at``."""
        def number(what: str, start: int, end: int) -> int:
            field = block[start:end]
            if field[0] in (0o200, 0o377):  # GNU base-256
                n = int.from_bytes(field[1:], "big")
                return n - 256 ** (end - start - 1) if field[0] == 0o377 else n
            digits = field.split(b"\0", 1)[0].strip()
            if digits.translate(None, _OCTAL_DIGITS):
                raise ShardInvalid(f"corrupt or truncated tar: invalid {what} field {field!r} "
                                   f"in the header at byte {at}")
            return int(digits or b"0", 8)

        chksum = number("checksum", 148, 156)
        if chksum != 256 + sum(block) - sum(block[148:156]) and chksum != 256 + sum(_SIGNED_SUM.unpack(block)):
            raise ShardInvalid(f"corrupt or truncated tar: bad header checksum at byte {at}")
        size = number("size", 124, 136)
        # mode, uid, gid, mtime, devmajor, devminor are only checked (tarfile, and so the loader,
        # refuses a header whose numbers do not parse); a shard's members mostly repeat them, so
        # each distinct run of those bytes is checked once
        static = block[100:124] + block[136:148] + block[329:345]
        if static not in self._checked:
            for what, start, end in _NUMBERS:
                number(what, start, end)
            if len(self._checked) < 1024:
                self._checked.add(static)
        kind, name = block[156:157], _nts(block[:100])
        if kind == b"\0" and name.endswith("/"):  # old V7 tar: a directory is a file named "x/"
            kind = b"5"
        if kind == b"5":
            name = name.rstrip("/")
        if block[345] and kind not in (b"L", b"K", b"S"):  # ustar: the name's leading directories
            prefix = _nts(block[345:500])
            if prefix:
                name = prefix + "/" + name
        return name, kind, size, _nts(block[157:257]) if block[157] else ""

    def _pax(self, data: bytes, at: int) -> dict[str, str]:
        """The records of the pax header data at ``at`` (``"%d %s=%s\n"``, framing checked as tarfile)."""
        out, pos = {}, 0
        while pos < len(data) and data[pos]:
            m = _PAX_LENGTH.match(data, pos)
            length = int(m.group(1)) if m else 0
            end = pos + length
            if length < 5 or end > len(data) or data[end - 1] != 0x0A:
                raise ShardInvalid(f"corrupt tar: invalid pax header record at byte {at + TAR_BLOCK + pos}")
            key, eq, value = data[m.end():end - 1].partition(b"=")
            if not key or not eq:
                raise ShardInvalid(f"corrupt tar: invalid pax header record at byte {at + TAR_BLOCK + pos}")
            out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
            pos = end
        return out

    def _padding(self, size: int) -> bool:
        return self._take(-size % TAR_BLOCK, keep=False) is not None

    def members(self, keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        """``(name, payload)`` of each regular member, in archive order; the payload is ``b""``
        unless ``keep(name)``. Raises :class:`ShardInvalid` naming the problem and where; after
        the last member, reads the whole stream (so the hash covers the file)."""
        meta: dict[str, str] = {}  # pax records and GNU long names for the next member: the first wins
        meta_at = None
        while True:
            at = self.offset
            block = self._take(TAR_BLOCK)
            if block is None:  # the stream ended at or inside a header (all of it was read)
                if not self.nbytes:
                    raise ShardInvalid("corrupt or truncated tar: empty file")
                raise ShardInvalid(f"truncated tar: no end-of-archive marker after {self.nbytes} bytes")
            if block == _ZERO_BLOCK:
                if meta_at is not None:
                    raise ShardInvalid(f"corrupt or truncated tar: the header at byte {meta_at} "
                                       "is not followed by a member")
                return self._end(at)
            name, kind, size, linkname = self._header(block, at)
            if kind in _META:
                if size > MAX_TAR_HEADER_BYTES or size < 0:
                    raise ShardInvalid(f"corrupt tar: a {size}-byte {kind.decode()!r} header at byte {at}")
                data = self._take(size)
                if data is None or not self._padding(size):
                    raise ShardInvalid(f"truncated tar: the {kind.decode()!r} header at byte {at} is cut")
                if meta_at is None:
                    meta_at = at
                if kind in (b"L", b"K"):
                    meta.setdefault("path" if kind == b"L" else "linkpath", _nts(data))
                    continue
                records = self._pax(data, at)
                if any(k.startswith("GNU.sparse.") for k in records):
                    raise ShardInvalid(f"corrupt or truncated tar: a sparse member (pax header at byte {at}): "
                                       "unsupported member type")
                if kind == b"g":  # global: every later member. Harmless (comment, mtime) or refused
                    for key in ("path", "linkpath", "size"):
                        if key in records:
                            raise ShardInvalid(f"corrupt tar: a global pax header at byte {at} sets {key!r} "
                                               "for every member (unsupported)")
                    continue
                if "path" in records:  # as tarfile: a pax path loses a trailing '/', a GNU long name does not
                    records["path"] = records["path"].rstrip("/")
                for key, value in records.items():
                    meta.setdefault(key, value)
                continue
            meta_at = None
            if meta:
                if "path" in meta:
                    name = meta["path"].rstrip("/") if kind == b"5" else meta["path"]
                if "linkpath" in meta:
                    linkname = meta["linkpath"]
                if "size" in meta:
                    if not meta["size"].isdigit() or not meta["size"].isascii():
                        raise ShardInvalid(f"corrupt tar: pax size {meta['size'][:20]!r} for member {name!r} "
                                           "is not a number")
                    size = int(meta["size"])
                meta = {}
            _check_member(name, kind, size, linkname)
            if kind == b"5":
                if size:
                    raise ShardInvalid(f"member {name!r}: a directory with {size} bytes of data")
                continue
            data = self._take(size, keep(name))
            if data is None:
                raise ShardInvalid(f"truncated tar: member {name!r} has {self.offset - at - TAR_BLOCK} of {size} bytes")
            if not self._padding(size):  # cut inside the padding to a whole block: no marker can follow
                raise ShardInvalid(f"truncated tar: no end-of-archive marker after {self.nbytes} bytes")
            yield name, data

    def _end(self, at: int) -> None:
        """After the zero block at ``at``: the rest of the stream must be zeros, at least one more
        block of them (the end-of-archive marker is two; writers pad to a record), whole blocks."""
        rest = self._buf[self._pos:]
        self._buf, self._pos = b"", 0
        while True:
            if rest.count(0) != len(rest):
                first = next(i for i, c in enumerate(rest) if c)
                raise ShardInvalid(f"corrupt tar: data after the end-of-archive marker at byte {at} "
                                   f"(a non-zero byte at {self.offset + first})")
            self.offset += len(rest)
            rest = self._read(CHUNK)
            if not rest:
                break
        if self.nbytes % TAR_BLOCK or self.nbytes - at < 2 * TAR_BLOCK:
            raise ShardInvalid(f"truncated tar: no end-of-archive marker after {self.nbytes} bytes")


@dataclass
class ShardReport:
    source: str  # storage key of the landed shard
    key: str | None  # published key (None when quarantined)
    bytes: int
    sha256: str
    samples: int = 0
    classes: dict[int, int] = field(default_factory=dict)
    reason: str | None = None  # why it was quarantined
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def labeled(self) -> bool:
        """Every sample has a label (an unlabeled shard has none: see :func:`validate_shard`)."""
        return sum(self.classes.values()) == self.samples


def _check_member(name: str, kind: bytes, size: int, linkname: str) -> None:
    """Raise :class:`ShardInvalid` for a member that may not be in a shard (``kind``: tar type flag)."""
    if name.startswith("/"):
        raise ShardInvalid(f"member {name!r}: absolute path")
    if ".." in name.split("/"):
        raise ShardInvalid(f"member {name!r}: path escapes the archive ('..')")
    if kind in (b"1", b"2"):
        raise ShardInvalid(f"member {name!r}: links are not allowed (-> {linkname!r})")
    if kind in (b"3", b"4", b"6"):
        raise ShardInvalid(f"member {name!r}: device/fifo members are not allowed")
    if kind not in _REGULAR and kind != b"5":
        raise ShardInvalid(f"member {name!r}: unsupported member type {kind!r}")
    if size > MAX_MEMBER_BYTES:
        raise ShardInvalid(f"member {name!r}: {size} bytes exceeds the {MAX_MEMBER_BYTES}-byte limit")
    if size < 0:
        raise ShardInvalid(f"member {name!r}: negative size {size}")


def _image_limit() -> int | None:
    """Pixels an image may have: Pillow's ``Image.MAX_IMAGE_PIXELS`` (read at each call, so a process
    that changes it is obeyed), the size past which Pillow itself calls an image a decompression bomb."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


# ---------------------------------------------------------------------------------------------
# Image checks on worker processes
# ---------------------------------------------------------------------------------------------


def default_workers() -> int:
    """Image-checking processes when ``workers`` is not given: none (the shard threads check their own
    images) while the CPUs this process may run on are no more than :data:`SHARD_THREADS`, else one
    per CPU. The PNG check spends ~95% of its time in zlib and crc32, outside the GIL, so the shard
    threads already keep that many cores busy, and a pool only adds pickling and pipe copies (on 2
    CPUs, 1 or 2 workers measured 0.6-0.8x the speed of none); past that, threads would leave cores idle."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return 0 if cpus <= SHARD_THREADS else cpus


class _WorkerPool:
    """``workers`` image-checking processes, each a fresh interpreter running
    :func:`pipeline.webdataset.serve_image_checks` (Pillow, nothing else), fed over a pipe by a
    thread of ours. :meth:`submit` returns a :class:`~concurrent.futures.Future` of
    :func:`pipeline.webdataset.check_images`. Fresh interpreters rather than ``multiprocessing``:
    no fork of a process full of threads (Dagster's, ours), and no re-import of the caller's
    ``__main__`` (a script without a main guard would run again in every worker). A worker that
    dies fails its batch with :class:`BrokenExecutor` and is started again for the next one; the
    workers exit when this process does (their input pipe closes)."""

    def __init__(self, workers: int):
        import queue

        self.workers = workers
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(workers):
            threading.Thread(target=self._serve, name=f"forgeline-image-worker-{i}", daemon=True).start()

    def submit(self, images: list, limit: int | None):
        from concurrent.futures import Future

        fut: Future = Future()
        self._tasks.put((fut, images, limit))
        return fut

    @staticmethod
    def _spawn():
        import subprocess
        import sys

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # where `pipeline` is importable from
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return subprocess.Popen(
            [sys.executable, "-c", "from pipeline.webdataset import serve_image_checks; serve_image_checks()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def _serve(self) -> None:
        import pickle
        import struct

        proc = self._spawn()  # at once: the interpreter starts while the first shard is parsed
        while True:
            fut, images, limit = self._tasks.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if proc is None or proc.poll() is not None:
                    proc = self._spawn()
                data = pickle.dumps((images, limit), protocol=pickle.HIGHEST_PROTOCOL)
                proc.stdin.write(struct.pack("<Q", len(data)))
                proc.stdin.write(data)
                proc.stdin.flush()
                head = proc.stdout.read(8)
                answer = proc.stdout.read(struct.unpack("<Q", head)[0]) if len(head) == 8 else b""
                ok, value = pickle.loads(answer)
            except Exception as e:  # noqa: BLE001 — the worker died (killed, crashed in a decoder)
                status = None
                if proc is not None:
                    proc.kill()
                    status = proc.wait()
                fut.set_exception(BrokenExecutor(f"image worker died (exit status {status}; {type(e).__name__}: {e})"))
                proc = None
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(RuntimeError(f"image worker: {value}"))


_pools: dict[int, tuple[int, _WorkerPool]] = {}  # workers -> (pid that made it, pool)
_pools_lock = threading.Lock()


def _image_pool(workers: int) -> _WorkerPool:
    """The pool of ``workers`` image checkers, made once per process and size, then reused (a
    worker costs an interpreter start and a Pillow import, ~0.1 s)."""
    with _pools_lock:
        made = _pools.get(workers)
        if made is None or made[0] != os.getpid():  # a forked child cannot use its parent's pipes
            made = (os.getpid(), _WorkerPool(workers))
            _pools[workers] = made
        return made[1]


class _Budget:
    """Bytes in flight to the workers, at most ``limit`` (a single larger batch may go alone)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class _ImageChecks:
    """A shard's image checks, first failure in archive order. Without a pool each image is
    checked at once, in the calling thread; with one, images go to the workers in batches and
    :meth:`add` raises as soon as the earliest batch still unseen has failed, :meth:`finish` waits
    for all."""

    def __init__(self, pool: _WorkerPool | None, budget: _Budget | None = None):
        self.pool = pool
        self.budget = budget or _Budget(IN_FLIGHT_BYTES)
        self.limit = _image_limit()  # the caller's limit, passed to the workers with each batch
        self.batch: list[tuple[str, str, bytes]] = []
        self.batch_bytes = 0
        self.pending: deque = deque()  # (future, images), in archive order
        self.failed = False

    def add(self, name: str, ext: str, data: bytes) -> None:
        if self.pool is None:
            problem = image_problem(name, ext, data, self.limit)
            if problem:
                self.failed = True
                raise ShardInvalid(problem)
            return
        self.batch.append((name, ext, data))
        self.batch_bytes += len(data)
        if self.batch_bytes >= IMAGE_BATCH_BYTES or len(self.batch) >= IMAGE_BATCH_COUNT:
            self._submit()
        while self.pending and self.pending[0][0].done():
            self._result(*self.pending.popleft())

    def _submit(self) -> None:
        images, n = self.batch, self.batch_bytes
        self.batch, self.batch_bytes = [], 0
        self.budget.acquire(n)
        try:
            fut = self.pool.submit(images, self.limit)
        except BaseException:
            self.budget.release(n)
            raise
        fut.add_done_callback(lambda _f: self.budget.release(n))  # also when cancelled
        self.pending.append((fut, images))

    def _result(self, fut, images) -> None:
        try:
            bad = fut.result()
        except BrokenExecutor:  # a worker died (killed, or a decoder crashed): once more, on a new one
            try:
                bad = self.pool.submit(images, self.limit).result()
            except BrokenExecutor as e:
                self.failed = True
                raise ShardInvalid(
                    f"members {images[0][0]!r} … {images[-1][0]!r}: the image decoder crashed twice on "
                    f"these images ({e})") from None
        if bad is not None:
            self.failed = True
            raise ShardInvalid(bad[1])

    def finish(self) -> None:
        """Check every image added; raise the first failure. Nothing after a failure is checked."""
        if self.failed:
            return
        if self.batch:
            self._submit()
        while self.pending:
            self._result(*self.pending.popleft())

    def cancel(self) -> None:
        for fut, _ in self.pending:
            fut.cancel()
        self.pending.clear()
        self.batch, self.batch_bytes = [], 0


def _check_label(name: str, data: bytes, num_classes: int) -> int:
    label = parse_label(data)
    if label is None:
        raise ShardInvalid(f"member {name!r}: label {data[:20]!r} is not an integer in [0, {num_classes})")
    if label >= num_classes:
        raise ShardInvalid(f"member {name!r}: label {label} outside [0, {num_classes})")
    return label


def validate_shard(
    stream: BinaryIO, *, num_classes: int = NUM_CLASSES, sink=None, pool: _WorkerPool | None = None,
    _budget: _Budget | None = None,
) -> tuple[int, Counter, str, int]:
    """Validate one WebDataset tar from a sequential stream, copying its bytes to ``sink``.

    Returns ``(samples, class_histogram, sha256, bytes)``; raises :class:`ShardInvalid` with the
    member and problem. Members are named and grouped by :mod:`pipeline.webdataset`; every sample
    needs one image the loader decodes. Labels are optional, but per shard: either every sample has
    a ``.cls`` label (a labeled shard, training data) or none has (an *unlabeled* shard, e.g. sampled
    serving traffic: ``samples - sum(class_histogram)`` samples without a label); a mix is refused,
    as training reads a label from every sample of a shard it uses. The tar is parsed by
    :class:`_ShardReader` (what it checks is there); the whole stream is read, so sha256 covers the
    full file, and after the end-of-archive marker only zeros may follow.

    Images are checked in this thread, or with ``pool`` (:func:`_image_pool`) on its workers, in batches
    while the stream goes on; either way the problem reported is the first in archive order.
    """
    reader = _ShardReader(stream, sink)

    def keep(name: str) -> bool:
        """Images and labels are read; other fields (json, txt, npy, ...) and hidden members are
        carried (written and hashed), not kept."""
        split = split_key(name)
        return bool(split) and (split[1] in IMAGE_EXTS or split[1] == LABEL_EXT)

    def members() -> Iterator[tuple[str, tuple[str, bytes]]]:
        # the end-of-archive check runs inside reader.members(), before the last sample is closed,
        # so a cut after a whole sample reads as "truncated", not as a good shorter shard
        for name, data in reader.members(keep):
            yield name, (name, data)

    classes: Counter = Counter()
    samples = 0
    first: tuple[str, bool] | None = None  # (key, labeled) of the first sample: the shard's kind
    images = _ImageChecks(pool, _budget)
    try:
        try:
            try:
                for key, fields in group_samples(members()):
                    labeled = LABEL_EXT in fields
                    # a sample without a label is checked as if it had one: the image rules stay the same
                    problem = sample_problem(list(fields) if labeled else [*fields, LABEL_EXT])
                    if problem:
                        raise ShardInvalid(f"sample {key!r}: {problem} (has {sorted(fields)})")
                    if first is None:
                        first = (key, labeled)
                    elif labeled != first[1]:
                        raise ShardInvalid(
                            f"sample {key!r} has {'a' if labeled else 'no'} .{LABEL_EXT} label but sample "
                            f"{first[0]!r} {'has' if first[1] else 'has none'}: a shard is labeled or "
                            "unlabeled as a whole")
                    ext = image_ext(fields)
                    image_name, image_data = fields[ext]
                    images.add(image_name, ext, image_data)
                    if labeled:
                        classes[_check_label(*fields[LABEL_EXT], num_classes)] += 1
                    samples += 1
            except WebDatasetError as e:
                raise ShardInvalid(str(e)) from None
        except ShardInvalid:
            images.finish()  # an image before this problem that does not decode is the first problem
            raise
        images.finish()
    finally:
        images.cancel()
    if samples == 0:
        raise ShardInvalid("no samples (empty archive)")
    return samples, classes, reader.sha256, reader.nbytes


@dataclass
class ShardIngestResult:
    batch: str
    published: list[ShardReport]
    quarantined: list[ShardReport]
    manifest_key: str
    seconds: float

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.published)

    @property
    def shard_seconds(self) -> list[float]:
        """Per shard: validate + publish (or quarantine), published and quarantined alike."""
        return [r.seconds for r in self.published + self.quarantined]

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.published) + sum(r.bytes for r in self.quarantined)

    @property
    def unlabeled(self) -> int:
        """Published samples without a label (never training data)."""
        return sum(r.samples for r in self.published if not r.labeled)

    @property
    def classes(self) -> dict[int, int]:
        c: Counter = Counter()
        for r in self.published:
            c.update(r.classes)
        return dict(sorted(c.items()))


def _read_manifest(store: Storage, key: str) -> dict | None:
    try:
        return store.read_record(key, "published manifest")
    except ObjectNotFound:
        return None


def _note(store: Storage, src_key: str, qkey: str, reason: str) -> None:
    note = {"source": store.uri(src_key), "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_atomic(qkey + ".reason.json", json.dumps(note, indent=1).encode())


def _quarantine(store: Storage, src_key: str, qkey: str, reason: str) -> None:
    store.copy(src_key, qkey)
    _note(store, src_key, qkey, reason)


def _shard_name(src_prefix: str, key: str) -> tuple[str | None, str | None]:
    """``(name, None)``: the name a landed ``.tar`` is published under, its path below
    ``<batch>/shards/`` (``shards/a/x.tar`` → ``a/x.tar``, so same-named files in two folders stay
    two shards); or ``(None, reason)`` when it cannot be a shard."""
    rel = key[len(src_prefix) + 1:]
    if not rel.startswith(SHARDS_DIR + "/"):
        return None, f"not under {SHARDS_DIR}/: a batch's shards land as <batch>/{SHARDS_DIR}/**.tar"
    name = rel[len(SHARDS_DIR) + 1:]
    try:
        check_key(name)
    except ValueError as e:  # object stores accept keys such as 'a//x.tar' or '../x.tar'
        return None, f"landed key is not a plain relative path ({e})"
    return name, None


def ingest_shards(
    store: Storage,
    batch: str,
    *,
    incoming: str = "incoming",
    published: str = "raw/shards",
    quarantine: str = QUARANTINE,
    num_classes: int = NUM_CLASSES,
    workers: int | None = None,
    on_shard: Callable[[ShardReport], None] | None = None,
) -> ShardIngestResult:
    """Ingest every ``*.tar`` under ``<incoming>/<batch>/shards/`` into ``<published>/<batch>/``,
    each under its path below ``shards/`` (``shards/a/x.tar`` → ``<published>/<batch>/a/x.tar``).

    Rejected with a reason, never read: a symbolic link (file or folder), a ``.tar`` outside
    ``shards/``, a file under ``shards/`` not named ``*.tar``. A corrupt shard is quarantined with
    a reason file; the others still publish.
    Published shards are immutable: a shard whose name is already published with other content is
    quarantined ("conflicts with published shard"), never overwritten. The manifest is rewritten
    last and keeps earlier entries, so a re-run never drops what was published before.

    ``workers``: processes that check the images (None: :func:`default_workers`: none on up to
    :data:`SHARD_THREADS` CPUs, else one per CPU; 0: none, images are checked in the calling
    process). Up to :data:`SHARD_THREADS` shards stream at once in the calling process (read once,
    tar parsed, hashed, written) and check their images or send them to the workers; at most
    :data:`IN_FLIGHT_BYTES` of image bytes are in flight. A batch of under :data:`POOL_MIN_BYTES` is
    checked in the calling process whatever ``workers`` says.
    """
    t0 = time.perf_counter()
    check_batch_name(batch)
    workers = default_workers() if workers is None else max(0, workers)
    src_prefix, dst_prefix, q_prefix = join(incoming, batch), join(published, batch), join(quarantine, batch)
    links = landed_links(store, src_prefix)
    if src_prefix in links:
        raise IngestError(f"{store.uri(src_prefix)}: the batch folder is a {_link_reason(links[src_prefix])}")
    shards_prefix = join(src_prefix, SHARDS_DIR) + "/"
    listed = [o for o in store.list(src_prefix) if o.key not in links]
    landed_objects = [o for o in listed if o.key.endswith(".tar")]
    landed = [o.key for o in landed_objects]
    # anything else under shards/ was meant as a shard: refused with a reason, never passed over
    strays = [o.key for o in listed if o.key.startswith(shards_prefix) and not o.key.endswith(".tar")]
    if not landed and not links:
        found = f" (under {SHARDS_DIR}/: {', '.join(k[len(shards_prefix):] for k in strays[:5])})" if strays else ""
        raise IngestError(f"{store.uri(src_prefix)}: no .tar shards to ingest{found}")
    manifest_key = join(dst_prefix, MANIFEST)
    previous = {s["key"]: s for s in (_read_manifest(store, manifest_key) or {}).get("shards", [])}

    rejected: list[ShardReport] = []  # refused without reading their bytes

    def reject(src_key: str, reason: str) -> None:
        r = ShardReport(src_key, None, 0, "", reason=reason)
        name, _ = _shard_name(src_prefix, src_key)
        # the note sits where the shard would be quarantined; no copy (a link is not followed)
        _note(store, src_key, join(q_prefix, name or join("_rejected", src_key[len(src_prefix) + 1:])), reason)
        if on_shard:
            on_shard(r)
        rejected.append(r)

    for key, target in sorted(links.items()):
        if key.endswith(".tar") or (store.local_path(key) or Path()).is_dir():
            reject(key, _link_reason(target) + (" (a linked folder is not entered)" if not key.endswith(".tar") else ""))
    for key in strays:
        reject(key, "not a shard: shards are uncompressed tar files named *.tar (lower case)")
    sources = []
    for key in landed:
        name, why = _shard_name(src_prefix, key)
        if why:
            reject(key, why)
        else:
            sources.append((key, name))

    landed_bytes = sum(o.size or 0 for o in landed_objects)
    pool = _image_pool(workers) if workers and landed_bytes >= POOL_MIN_BYTES else None
    budget = _Budget(max(IN_FLIGHT_BYTES, 2 * workers * IMAGE_BATCH_BYTES))

    def one(src: tuple[str, str]) -> ShardReport:
        src_key, name = src
        t = time.perf_counter()
        dst_key = join(dst_prefix, name)
        report = ShardReport(src_key, dst_key, 0, "")
        with store.open_read(src_key) as f, store.open_write(dst_key) as w:
            try:
                report.samples, classes, report.sha256, report.bytes = validate_shard(
                    f, num_classes=num_classes, sink=w, pool=pool, _budget=budget
                )
                report.classes = dict(sorted(classes.items()))
                old = previous.get(dst_key)
                if old and old["sha256"] != report.sha256:
                    raise ShardInvalid(
                        f"conflicts with published shard {store.uri(dst_key)} (sha256 {old['sha256'][:12]}…)"
                    )
            except ShardInvalid as e:
                w.abort()  # nothing is published under dst_key
                report.reason, report.key = str(e), None
        if not report.ok:
            qkey = join(q_prefix, name)
            _quarantine(store, src_key, qkey, report.reason)
            if not report.sha256:  # stopped before the end of the stream: record the whole file
                report.sha256, report.bytes = store.checksum(qkey), store.stat(qkey).size
        report.seconds = time.perf_counter() - t
        if on_shard:
            on_shard(report)
        return report

    with ThreadPoolExecutor(max(1, min(SHARD_THREADS, len(sources)))) as threads:
        reports = list(threads.map(one, sources))
    good = [r for r in reports if r.ok]
    bad = rejected + [r for r in reports if not r.ok]
    entries = dict(previous)
    for r in good:
        entries[r.key] = {"key": r.key, "bytes": r.bytes, "sha256": r.sha256, "samples": r.samples,
                          "classes": {str(k): v for k, v in r.classes.items()}, "labeled": r.labeled}
    manifest = {
        "format": "forgeline.shards/1",
        "batch": batch,
        "source": store.uri(src_prefix),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shards": [entries[k] for k in sorted(entries)],
        "samples": sum(e["samples"] for e in entries.values()),
        # samples of unlabeled shards (serving traffic): never training data (pipeline.dataset.collect)
        "unlabeled": sum(e["samples"] for e in entries.values() if not shard_labeled(e)),
        "quarantined": [{"source": r.source, "reason": r.reason} for r in bad],
    }
    store.write_atomic(manifest_key, json.dumps(manifest, indent=1).encode())
    return ShardIngestResult(batch, good, bad, manifest_key, time.perf_counter() - t0)


def shard_labeled(entry: dict) -> bool:
    """Whether a shard manifest entry is labeled (entries written before labels were optional are)."""
    return entry.get("labeled", True) is not False


def batch_unlabeled(store: Storage, batch: str, published: str = "raw/shards") -> bool:
    """Whether the published ``batch`` has no labeled shard (e.g. a window of serving traffic)."""
    shards = read_shard_manifest(store, batch, published)["shards"]
    return bool(shards) and not any(shard_labeled(e) for e in shards)


def read_shard_manifest(store: Storage, batch: str, published: str = "raw/shards") -> dict:
    key = join(published, batch, MANIFEST)
    m = _read_manifest(store, key)
    if m is None:
        raise IngestError(f"{store.uri(key)}: batch {batch!r} has no published shard manifest")
    return m


# ---------------------------------------------------------------------------------------------
# Withdrawal: taking published data back out of training
# ---------------------------------------------------------------------------------------------

WITHDRAWN = "withdrawn"  # <WITHDRAWN>/<batch>/<time>-<id>.json: one record per withdrawal


def _who() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name (some containers)
        user = f"uid-{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def withdraw(
    store: Storage,
    batch: str,
    shard: str | None = None,
    *,
    reason: str,
    by: str | None = None,
    published: str = "raw/shards",
    records: str = WITHDRAWN,
) -> dict:
    """Take a published batch (or one of its shards) out of training, for bad data that got through.

    Writes a record ``<records>/<batch>/<time>-<id>.json`` (batch, shard key, the sha256 of what is
    withdrawn, reason, who, when) and returns it; :func:`pipeline.dataset.collect`, where training
    finds its shards, skips what the records name. Nothing published is deleted or rewritten: the
    shards stay for inspection, the record is the audit trail. ``shard`` is the shard's name in the
    batch (``train-000003.tar``, ``a/x.tar``) or its full key. A withdrawn batch stays withdrawn for
    shards published into it later. Raises :class:`IngestError` for an unknown batch or shard or an
    empty reason.
    """
    check_batch_name(batch)
    reason = (reason or "").strip()
    if not reason:
        raise IngestError("a withdrawal needs a reason (what is wrong with the data)")
    entries = {e["key"]: e for e in read_shard_manifest(store, batch, published)["shards"]}
    if shard is not None:
        prefix = join(published, batch)
        key = shard if shard in entries else join(prefix, shard.strip("/"))
        if key not in entries:
            by_base = [k for k in entries if PurePosixPath(k).name == shard]
            if len(by_base) != 1:
                names = ", ".join(k[len(prefix) + 1:] for k in sorted(entries)[:8])
                raise IngestError(f"batch {batch!r} has {'several' if by_base else 'no'} published shard(s) named "
                                  f"{shard!r} (published: {names}{', …' if len(entries) > 8 else ''})")
            key = by_base[0]
        withdrawn = [entries[key]]
    else:
        key, withdrawn = None, list(entries.values())
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    record = {
        "format": "forgeline.withdrawal/1",
        "batch": batch,
        "shard": key,  # None: the whole batch
        "shards": [{"key": e["key"], "sha256": e["sha256"], "samples": e["samples"]} for e in withdrawn],
        "reason": reason,
        "by": by or _who(),
        "time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    rkey = join(records, batch, f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{os.urandom(4).hex()}.json")
    store.write_atomic(rkey, json.dumps(record, indent=1).encode())
    return {**record, "record": rkey}


def withdrawals(store: Storage, *, records: str = WITHDRAWN) -> list[dict]:
    """Every withdrawal record, oldest first (each with ``record``: its key). A record that is not
    valid JSON raises :class:`IngestError` naming it: training must not silently use what someone
    withdrew."""
    out = []
    for o in store.list(records):
        if not o.key.endswith(".json"):
            continue
        rec = store.read_record(o.key, "withdrawal record")
        if not isinstance(rec.get("batch"), str):
            raise IngestError(f"{store.uri(o.key)}: withdrawal record without a 'batch'")
        out.append({**rec, "record": o.key})
    return sorted(out, key=lambda r: PurePosixPath(r["record"]).name)  # names start with the UTC time


def withdrawn(store: Storage, *, records: str = WITHDRAWN) -> tuple[set[str], set[str]]:
    """``(batches, shard keys)`` taken out of training by :func:`withdraw`."""
    batches, shards = set(), set()
    for rec in withdrawals(store, records=records):
        if rec.get("shard"):
            shards.add(rec["shard"])
        else:
            batches.add(rec["batch"])
    return batches, shards


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def digits_schema() -> dict:
    import polars as pl

    schema = {"id": pl.Int64}
    schema.update({f"px_{j:02d}": pl.UInt8 for j in range(64)})
    schema.update({"label": pl.Int64, "split": pl.String})
    return schema


DIGITS_RANGES = {**{f"px_{j:02d}": (0, PIXEL_MAX) for j in range(64)}, "label": (0, NUM_CLASSES - 1)}


def predictions_schema() -> dict:
    """The table of a window of sampled serving traffic (:mod:`pipeline.serving.traffic`): one row
    per sample, ``key`` its sample in the window's shard; no label and no split (unlabeled)."""
    import polars as pl

    return {"id": pl.Int64, "key": pl.String, "model": pl.String, "model_version": pl.String,
            "prediction": pl.Int64, "confidence": pl.Float64, "latency_ms": pl.Float64,
            "time": pl.Datetime("us", "UTC")}


PREDICTION_RANGES = {"prediction": (0, 2**62), "confidence": (0.0, 1.0), "latency_ms": (0.0, float("inf"))}
TABLE_KINDS = ("features", "predictions")  # a landed (labeled) feature table, or served predictions


def table_kind(columns) -> str:
    """``predictions`` for a table of served predictions (a ``prediction`` column, no ``label``),
    else ``features`` (the landed digits layout)."""
    cols = set(columns)
    return "predictions" if "prediction" in cols and "label" not in cols else "features"


@dataclass
class TableReport:
    source: str
    rows: int
    bytes: int
    sha256: str
    columns: dict[str, dict]  # per column: null_count, min, max, mean
    extra_columns: list[str]
    splits: dict[str, int]
    labels: dict[int, int]


@contextmanager
def _local_file(store: Storage, key: str) -> Iterator[Path]:
    """A local path for ``key``: the file itself on filesystem storage, else a streamed temp copy
    (bounded memory; polars then scans it lazily)."""
    path = store.local_path(key)
    if path is not None:
        if not path.is_file():
            raise ObjectNotFound(f"{store.uri(key)}: not found")
        yield path
        return
    fd, tmp = tempfile.mkstemp(suffix=".parquet", prefix="forgeline-")
    try:
        with os.fdopen(fd, "wb") as out, store.open_read(key) as f:
            while b := f.read(CHUNK):
                out.write(b)
        yield Path(tmp)
    finally:
        os.unlink(tmp)


def validate_table(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    schema: dict | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
    id_column: str = "id",
    allowed_splits: tuple[str, ...] = SPLITS,
) -> TableReport:
    """Check one Parquet file lazily; raise :class:`IngestError` naming the file and column."""
    import polars as pl

    where = name or str(path)
    schema = digits_schema() if schema is None else schema
    ranges = DIGITS_RANGES if ranges is None else ranges
    try:
        lf = pl.scan_parquet(path)
        actual = lf.collect_schema()
    except Exception as e:  # polars raises several types for non-Parquet / truncated files
        raise IngestError(f"{where}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    for col, dtype in schema.items():
        if col not in actual:
            raise IngestError(f"{where}: column {col!r} is missing (expected {dtype})")
        if actual[col] != dtype:
            raise IngestError(f"{where}: column {col!r} has dtype {actual[col]}, expected {dtype}")
    extra = [c for c in actual.names() if c not in schema]

    cols = list(schema)
    numeric = [c for c in cols if schema[c].is_numeric()]
    exprs = [pl.len().alias("__rows"), pl.col(id_column).n_unique().alias("__ids")]
    exprs += [pl.col(c).null_count().alias(f"{c}__nulls") for c in cols]
    exprs += [pl.col(c).min().cast(pl.Float64).alias(f"{c}__min") for c in numeric]
    exprs += [pl.col(c).max().cast(pl.Float64).alias(f"{c}__max") for c in numeric]
    exprs += [pl.col(c).mean().cast(pl.Float64).alias(f"{c}__mean") for c in numeric]
    try:
        stats = lf.select(exprs).collect(engine="streaming").row(0, named=True)
        # a table without split/label columns in its schema (served predictions) has neither
        splits = dict(lf.group_by("split").len().collect(engine="streaming").iter_rows()) if "split" in schema else {}
        labels = dict(lf.group_by("label").len().collect(engine="streaming").iter_rows()) if "label" in schema else {}
    except Exception as e:
        raise IngestError(f"{where}: unreadable data ({type(e).__name__}: {e})") from None
    rows = stats["__rows"]
    for c in cols:
        if stats[f"{c}__nulls"]:
            raise IngestError(f"{where}: column {c!r} has {stats[f'{c}__nulls']} null value(s)")
    for c, (lo, hi) in ranges.items():
        mn, mx = stats[f"{c}__min"], stats[f"{c}__max"]
        if rows and (mn < lo or mx > hi):
            raise IngestError(f"{where}: column {c!r} has values in [{mn:g}, {mx:g}], allowed [{lo:g}, {hi:g}]")
    if stats["__ids"] != rows:
        dup = (
            lf.group_by(id_column).len().filter(pl.col("len") > 1).sort(id_column).head(3)
            .collect(engine="streaming")[id_column].to_list()
        )
        raise IngestError(f"{where}: column {id_column!r} has {rows - stats['__ids']} duplicate id(s), e.g. {dup}")
    bad_splits = sorted(set(splits) - set(allowed_splits), key=str)
    if bad_splits:
        raise IngestError(f"{where}: column 'split' has values {bad_splits}, allowed {list(allowed_splits)}")
    with open(path, "rb") as f:
        sha, size = sha256_stream(f)
    columns = {
        c: {"null_count": stats[f"{c}__nulls"], **({k: stats[f"{c}__{k}"] for k in ("min", "max", "mean")} if c in numeric else {})}
        for c in cols
    }
    return TableReport(where, rows, size, sha, columns, extra, splits, dict(sorted(labels.items())))


def _file_kind(path) -> str:
    import polars as pl

    try:
        return table_kind(pl.read_parquet_schema(path))
    except Exception:  # noqa: BLE001 - not Parquet: validate_table says so, naming the file
        return "features"


@dataclass
class TableIngestResult:
    batch: str
    files: list[TableReport]
    published: list[str]
    manifest_key: str
    seconds: float
    file_seconds: list[float] = field(default_factory=list)  # per file: validate + publish
    kind: str = "features"  # "features" (landed, labeled) | "predictions" (served traffic, unlabeled)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def splits(self) -> dict[str, int]:
        c: Counter = Counter()
        for f in self.files:
            c.update(f.splits)
        return dict(sorted(c.items()))

    @property
    def labels(self) -> dict[int, int]:
        c: Counter = Counter()
        for f in self.files:
            c.update(f.labels)
        return dict(sorted(c.items()))


def ingest_table(
    store: Storage,
    batch: str,
    *,
    incoming: str = "incoming",
    published: str = "raw/table",
    schema: dict | None = None,
    ranges: dict | None = None,
) -> TableIngestResult:
    """Validate every ``*.parquet`` under ``<incoming>/<batch>/``; publish them all (manifest last)
    only if every file passes. Any bad file raises :class:`IngestError` and publishes nothing; so
    does a file whose published copy holds other bytes (a published batch does not change, as its
    shards do not: table and shards stay one landing).

    Without ``schema``, each file is checked against the layout its columns say it has
    (:func:`table_kind`): the digits feature table (:func:`digits_schema`), or the served
    predictions of a serving-traffic window (:func:`predictions_schema`, unlabeled); a batch's files
    must all be of one kind, which the manifest records (``kind``)."""
    t0 = time.perf_counter()
    check_batch_name(batch)
    src_prefix, dst_prefix = join(incoming, batch), join(published, batch)
    links = landed_links(store, src_prefix)
    for key, target in sorted(links.items()):  # the table is all or nothing: a link stops it
        if key == src_prefix or key.endswith(".parquet") or (store.local_path(key) or Path()).is_dir():
            what = "the batch folder" if key == src_prefix else "this file" if key.endswith(".parquet") else "this folder"
            raise IngestError(f"{store.uri(key)}: {what} is a {_link_reason(target)}")
    sources = [o.key for o in store.list(src_prefix) if o.key.endswith(".parquet")]
    if not sources:
        raise IngestError(f"{store.uri(src_prefix)}: no .parquet files to ingest")
    names = {}
    for key in sources:  # published under its path below the batch: a/t.parquet and b/t.parquet are two files
        names[key] = key[len(src_prefix) + 1:]
        try:
            check_key(names[key])
        except ValueError as e:
            raise IngestError(f"{store.uri(key)}: landed key is not a plain relative path ({e})") from None
    reports, file_seconds, kinds = [], [], {}
    for key in sources:
        t = time.perf_counter()
        with _local_file(store, key) as path:
            file_schema, file_ranges = schema, ranges
            if schema is None:
                kinds[key] = _file_kind(path)
                if kinds[key] == "predictions":
                    file_schema, file_ranges = predictions_schema(), PREDICTION_RANGES if ranges is None else ranges
            reports.append(validate_table(path, name=store.uri(key), schema=file_schema, ranges=file_ranges))
        file_seconds.append(time.perf_counter() - t)
    if len(set(kinds.values())) > 1:
        which = ", ".join(f"{store.uri(k)} ({v})" for k, v in sorted(kinds.items()))
        raise IngestError(f"{store.uri(src_prefix)}: tables of different kinds in one batch: {which}")
    if not any(r.rows for r in reports):  # a schema with no data: an export that went wrong upstream
        which = ", ".join(r.source for r in reports)
        raise IngestError(f"{store.uri(src_prefix)}: the batch's tables hold no rows ({which})")
    manifest_key = join(dst_prefix, MANIFEST)
    published_sha = {f["key"]: f.get("sha256") for f in (_read_manifest(store, manifest_key) or {}).get("files", [])}
    for key, rep in zip(sources, reports):  # as its shards: a published batch's table never changes
        dst = join(dst_prefix, names[key])
        if published_sha.get(dst) not in (None, rep.sha256):
            raise IngestError(f"{store.uri(key)}: conflicts with published table {store.uri(dst)} (sha256 "
                              f"{published_sha[dst][:12]}…): a published batch does not change; land changed data "
                              "as a new batch")
    kind = next(iter(kinds.values()), "features")
    keys = []
    for i, (key, rep) in enumerate(zip(sources, reports)):
        t = time.perf_counter()
        dst = join(dst_prefix, names[key])
        with store.open_read(key) as f:
            store.write_atomic(dst, f, expected_sha256=rep.sha256)  # source changed since validation → error
        keys.append(dst)
        file_seconds[i] += time.perf_counter() - t
    manifest = {
        "format": "forgeline.table/1",
        "batch": batch,
        "source": store.uri(src_prefix),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": [{"key": k, **{f: v for f, v in asdict(r).items() if f != "source"}} for k, r in zip(keys, reports)],
        "rows": sum(r.rows for r in reports),
        "kind": kind,
        "labeled": kind != "predictions",
    }
    store.write_atomic(manifest_key, json.dumps(manifest, indent=1, default=str).encode())
    return TableIngestResult(batch, reports, keys, manifest_key, time.perf_counter() - t0, file_seconds, kind)


__all__ = [
    "BadBatchName",
    "IngestError",
    "ShardIngestResult",
    "ShardInvalid",
    "ShardReport",
    "TableIngestResult",
    "TableReport",
    "ingest_shards",
    "ingest_table",
    "batch_ready",
    "batch_unlabeled",
    "check_batch_name",
    "default_workers",
    "predictions_schema",
    "shard_labeled",
    "table_kind",
    "landed_links",
    "read_shard_manifest",
    "require_ready",
    "validate_shard",
    "validate_table",
    "withdraw",
    "withdrawals",
    "withdrawn",
]
