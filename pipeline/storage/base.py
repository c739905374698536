"""The storage interface every tier implements (:class:`Storage`), its errors and key helpers.

Keys are relative POSIX paths (``raw/shards/batch-1/train-000000.tar``). Every write is atomic: an
:class:`AtomicWriter` publishes the object only after its size and sha256 are verified, so a reader
sees either the previous object or the complete new one. The writer also records the CRC-32 of
what it wrote (:class:`Crc32`), a cheap check for later copies of the object. Reads can be pinned
to one version of an object (``stat(key).version``), so a multi-request read never mixes bytes of
two versions.

This module knows no backend; they subclass :class:`Storage` in ``local``, ``shm`` and ``s3``.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from isal.isal_zlib import crc32 as _crc32  # zlib.crc32's values at ~5x its speed (18 vs 3.8 GB/s on one core here)

CHUNK = 8 * 1024 * 1024  # streaming granularity: large enough for full disk/network rate, small for RSS


class StorageError(Exception):
    """Base class for storage failures. Messages always name the object."""


class ObjectNotFound(StorageError, FileNotFoundError):
    pass


class IntegrityError(StorageError):
    """Size or sha256 of written/read bytes does not match what was expected."""


class ObjectChanged(IntegrityError):
    """A read pinned to one version of an object found it replaced or deleted."""


class StorageFull(StorageError):
    """No space left (disk full, tmpfs full, or a configured capacity reached)."""


class CorruptObject(StorageError, ValueError):
    """An object whose bytes are not what it must hold (a JSON record that does not parse). Every
    write is atomic, so this is damage from outside: a truncated copy, a hand edit."""


def os_error(err: OSError, what: str) -> StorageError:
    """The storage error for ``err``, an OSError of a local filesystem at ``what`` (a path or
    URI): :class:`StorageFull` for a full disk or quota, :class:`ObjectNotFound` for a missing
    file, else :class:`StorageError` with the system's reason. Raise it ``from err``."""
    if err.errno == errno.ENOSPC:
        return StorageFull(f"{what}: no space left on device")
    if err.errno == errno.EDQUOT:
        return StorageFull(f"{what}: disk quota exceeded")
    if err.errno == errno.ENOENT:
        return ObjectNotFound(f"{what}: not found")
    return StorageError(f"{what}: {err.strerror or err}")


def parse_record(data: bytes, where: str, what: str) -> dict:
    """``data`` as a JSON object; else :class:`CorruptObject` naming ``where`` (the object's
    uri) and saying what is wrong with this ``what`` (``"manifest"``, ``"production alias"``)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptObject(f"{where}: not valid JSON ({e}): the {what} is corrupt or truncated") from None
    if not isinstance(doc, dict):
        raise CorruptObject(f"{where}: the {what} is a JSON {type(doc).__name__}, not an object")
    return doc


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None = None  # known without reading (recorded at write time), else None
    version: str | None = None  # pins reads to this content (S3: the ETag); None: not versioned
    crc32: str | None = None  # of the bytes written (set by AtomicWriter.commit), else None


def join(*parts: str) -> str:
    """Join key parts, ignoring empty ones (``join("a", "", "b") == "a/b"``)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def hash_stream(f: BinaryIO, *hashers, chunk: int = CHUNK) -> int:
    """Feed the rest of ``f`` to every hasher (one read of the bytes); returns the bytes read."""
    n = 0
    while b := f.read(chunk):
        for h in hashers:
            h.update(b)
        n += len(b)
    return n


def sha256_stream(f: BinaryIO, chunk: int = CHUNK) -> tuple[str, int]:
    h = hashlib.sha256()
    n = hash_stream(f, h, chunk=chunk)
    return h.hexdigest(), n


class Crc32:
    """CRC-32 (zlib's) behind hashlib's ``update``/``hexdigest`` (8 hex digits).

    sha256 is a version's content identity; this is the cheap check of a *copy* of it (a truncated,
    torn, swapped or corrupted transfer), about 10x faster than sha256 with SHA-NI: the shm tier
    checks landed bytes with it so that pre-warming is not bound by hashing."""

    name = "crc32"
    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._value = _crc32(data, self._value)

    def digest(self) -> bytes:
        """The 4 bytes, big-endian: S3's ``ChecksumCRC32`` is their base64."""
        return self._value.to_bytes(4, "big")

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


class AtomicWriter(ABC):
    """Streaming writer whose object becomes visible only on :meth:`commit`.

    Tracks size, sha256 and CRC-32 of what was written; ``expected_size`` / ``expected_sha256``
    given to ``open_write`` are checked before publishing, so a short or corrupted copy never lands.
    """

    def __init__(self, key: str, expected_size: int | None, expected_sha256: str | None):
        self.key = key
        self.expected_size = expected_size
        self.expected_sha256 = expected_sha256
        self._hash = hashlib.sha256()
        self._crc = Crc32()
        self.size = 0
        self.closed = False
        self.info: ObjectInfo | None = None  # set by commit()
        self._failure: BaseException | None = None  # the error of a failed write

    @property
    def sha256(self) -> str:
        """sha256 of the bytes written so far."""
        return self._hash.hexdigest()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.closed:
            if self._failure is not None:  # a write after a failed one (a file object flushing as it
                raise self._failure  # unwinds, e.g. tarfile's): the failure again, not an error hiding it
            raise StorageError(f"{self.key}: write after commit/abort")
        self._hash.update(data)
        self._crc.update(data)
        self.size += len(data)
        try:
            self._write(data)
        except BaseException as e:  # nothing of it is published: the writer is aborted
            self._failure = e
            self.abort()
            raise
        return len(data)

    def _verify_stream(self) -> str:
        digest = self.sha256
        if self.expected_size is not None and self.size != self.expected_size:
            raise IntegrityError(f"{self.key}: wrote {self.size} bytes, expected {self.expected_size}")
        if self.expected_sha256 is not None and digest != self.expected_sha256:
            raise IntegrityError(f"{self.key}: sha256 {digest} != expected {self.expected_sha256}")
        return digest

    def commit(self) -> ObjectInfo:
        if self.closed:
            raise StorageError(f"{self.key}: already committed or aborted")
        try:
            digest = self._verify_stream()
            self.info = dataclasses.replace(self._commit(digest), crc32=self._crc.hexdigest())
        except BaseException:
            self.abort()
            raise
        self.closed = True
        return self.info

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._abort()

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self.closed:
                self.commit()
        else:
            self.abort()

    @abstractmethod
    def _write(self, data) -> None: ...

    @abstractmethod
    def _commit(self, sha256: str) -> ObjectInfo: ...

    @abstractmethod
    def _abort(self) -> None: ...


class Storage(ABC):
    """The interface every backend implements. Subclasses implement the abstract methods; the
    rest are derived from them and may be overridden where a backend can do better.

    Backends retry transient failures (dropped connections) themselves; an error that reaches the
    caller is final."""

    kind = "storage"  # the backend's name in specs and reports ("local", "shm", "s3")
    # Small requests worth sending at once (stats, header reads: see in_parallel). 1: one after
    # the other, as on a filesystem, where a stat costs microseconds and a thread more.
    parallel_requests = 1

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streaming, sequential reader over the whole object."""

    @abstractmethod
    def read_range(self, key: str, start: int, length: int, *, version: str | None = None) -> bytes:
        """``length`` bytes from offset ``start``; raises IntegrityError if the object is shorter.
        ``version`` (from :meth:`stat`) pins the read: :class:`ObjectChanged` when the object was
        replaced since. Backends whose ``stat`` reports no version are only given None."""

    @abstractmethod
    def open_write(
        self, key: str, *, expected_size: int | None = None, expected_sha256: str | None = None
    ) -> AtomicWriter: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under ``prefix`` (recursive), sorted by key. Temporary files are hidden."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; a missing object is not an error."""

    @abstractmethod
    def uri(self, key: str = "") -> str: ...

    # Derived operations -------------------------------------------------------------------
    def read_into(self, key: str, start: int, out, *, version: str | None = None) -> None:
        """Fill the writable buffer ``out`` with ``len(out)`` bytes from offset ``start`` (same
        errors and ``version`` pinning as :meth:`read_range`). Backends that can land network
        bytes in place, without an assembled intermediate, override it (S3)."""
        view = memoryview(out).cast("B")
        view[:] = self.read_range(key, start, len(view), version=version)

    def read_to_file(self, key: str, start: int, length: int, fd: int, offset: int, *,
                     version: str | None = None) -> None:
        """Write ``length`` bytes from offset ``start`` into the open file descriptor ``fd`` at
        ``offset`` (positional writes: the descriptor's position is not used; same errors and
        ``version`` pinning as :meth:`read_range`; the file's own errors, such as ENOSPC, are
        raised as the ``OSError`` they are). Backends that can move network bytes into a file
        without passing them through this process override it (S3 over plain HTTP)."""
        buf = bytearray(length)
        self.read_into(key, start, buf, version=version)
        pwrite_all(fd, buf, offset)

    def read_head(self, key: str, length: int) -> tuple[bytes, ObjectInfo]:
        """The object's first ``length`` bytes (all of it when shorter) and its :class:`ObjectInfo`
        (``size``, ``version``), the bytes of that version: what a reader needs before its first
        ranged read (a safetensors header), in one request where the backend can (S3: one
        ranged GET answers size, ETag and bytes; here a ``stat`` and a pinned read). The info's
        ``sha256``/``crc32`` may be None even where :meth:`stat` knows them."""
        info = self.stat(key)
        return self.read_range(key, 0, min(length, info.size), version=info.version), info

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
            return True
        except ObjectNotFound:
            return False

    def read(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def read_record(self, key: str, what: str) -> dict:
        """The JSON object stored at ``key`` (a manifest, an alias, a record): :func:`parse_record`."""
        return parse_record(self.read(key), self.uri(key), what)

    def write_atomic(
        self,
        key: str,
        data: bytes | bytearray | memoryview | BinaryIO,
        *,
        expected_sha256: str | None = None,
    ) -> ObjectInfo:
        """Write a whole object atomically from bytes or a readable file object."""
        in_memory = isinstance(data, (bytes, bytearray, memoryview))
        expected_size = memoryview(data).nbytes if in_memory else None
        with self.open_write(key, expected_size=expected_size, expected_sha256=expected_sha256) as w:
            if in_memory:
                view = memoryview(data).cast("B")
                for at in range(0, len(view), CHUNK):
                    w.write(view[at : at + CHUNK])
            elif hasattr(data, "readinto"):  # one buffer, reused: no new memory per chunk
                buf = memoryview(bytearray(CHUNK))
                while n := data.readinto(buf):
                    w.write(buf[:n])
            else:
                while chunk := data.read(CHUNK):
                    w.write(chunk)
        assert w.info is not None
        return w.info

    def checksum(self, key: str) -> str:
        """sha256 of the stored bytes, computed by reading them (never trusted from metadata)."""
        with self.open_read(key) as f:
            return sha256_stream(f)[0]

    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        """Copy within this storage, atomically at the destination."""
        with self.open_read(src_key) as f:
            return self.write_atomic(dst_key, f)

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for the object when the backend is a mounted filesystem, else None
        (then :meth:`read_range` / :meth:`read_into` are the way to its bytes). Lets fast paths
        (mmap, polars scans, preadv) skip the streaming interface."""
        return None

    def spec(self) -> tuple[dict, dict[str, str]]:
        """``(spec, env)`` to rebuild this storage in another process with ``from_spec``: the
        JSON-safe ``spec`` holds no secrets; credentials, if any, are returned as environment
        variables for the child process."""
        raise NotImplementedError(f"{type(self).__name__} cannot be described for another process")

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix`` (``parallel_requests`` at a time); returns how many."""
        objs = self.list(prefix)
        in_parallel(lambda o: self.delete(o.key), objs, "delete", self.parallel_requests)
        return len(objs)


# An object this small is read whole by the GET that learns its size and version
# (Storage.read_head): the bytes cost little more than that request, a second one costs a round trip.
WHOLE_READ_BYTES = 1 << 20


def in_parallel(fn: Callable[[Any], Any], items: list, name: str, workers: int, *, fail_fast: bool = False) -> list:
    """``fn(item)`` for each item, results in order, on up to ``workers`` threads named ``name``
    (a storage's ``parallel_requests``): per-object round trips to a remote store (a stat, a
    header GET, a manifest) overlap instead of adding up. Every call started runs to its end; the
    first failure in ``items`` order is then raised. ``fail_fast``: a failure stops the items not
    started yet (the pieces of one bulk transfer, which fails as a whole)."""
    if len(items) <= 1 or workers <= 1:
        return [fn(item) for item in items]
    import threading
    from concurrent.futures import ThreadPoolExecutor

    failed = threading.Event()

    def guarded(item: Any) -> Any:  # fail_fast: no item starts after a failure
        if failed.is_set():
            return None  # a failure before it is raised below
        try:
            return fn(item)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(min(len(items), workers), thread_name_prefix=name) as pool:
        futures = [pool.submit(guarded if fail_fast else fn, item) for item in items]
    return [f.result() for f in futures]


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` into the file ``fd`` at ``offset`` (``pwrite`` may write less)."""
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def ranged_read_size(store: Storage, total: int, in_flight: int, smallest: int = 8 * 1024 * 1024) -> int:
    """The size of each ranged read when ``total`` bytes are fetched from ``store`` with
    ``in_flight`` reads at a time (the loader's requests, the shm tier's pieces): as large as the
    store's largest GET allows (``get_size``, S3), since every request has a fixed cost on both
    sides, but small enough that every read in flight has one, and never below ``smallest``
    (unless the store's largest is)."""
    largest = int(getattr(store, "get_size", 0) or smallest)
    return min(largest, max(min(smallest, largest), -(-total // max(1, in_flight))))


def copy_between(src: Storage, src_key: str, dst: Storage, dst_key: str, *, expected_sha256: str | None = None) -> ObjectInfo:
    """Stream one object from one storage to another (e.g. S3 → shm), atomically at ``dst``."""
    with src.open_read(src_key) as f:
        return dst.write_atomic(dst_key, f, expected_sha256=expected_sha256)


