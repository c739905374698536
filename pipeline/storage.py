"""One storage interface for every tier: a local path (also NFS/Ceph mounts), /dev/shm, and S3.

Keys are relative POSIX paths (``raw/shards/batch-1/train-000000.tar``). Every write is atomic:
bytes go to a temporary name (local) or an unfinished multipart upload (S3), size and sha256 are
verified, and only then does the object appear under its key. A reader therefore sees either the
previous object or the complete new one, never a partial file.

Usage::

    store = LocalStorage("/data/forgeline")
    with store.open_write("a/b.bin") as w:   # commit on clean exit, abort on exception
        w.write(payload)
    store.read_range("a/b.bin", 10, 4)
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

CHUNK = 8 * 1024 * 1024  # streaming granularity: large enough for full disk/network rate, small for RSS
_TMP_MARK = ".tmp-"


class StorageError(Exception):
    """Base class for storage failures. Messages always name the object."""


class ObjectNotFound(StorageError, FileNotFoundError):
    pass


class IntegrityError(StorageError):
    """Size or sha256 of written/read bytes does not match what was expected."""


class StorageFull(StorageError):
    """No space left (disk full, tmpfs full, or a configured capacity reached)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None = None  # known without reading (recorded at write time), else None


def check_key(key: str) -> str:
    """Validate a storage key: relative, normalized, no ``..``, no temp-name marker."""
    if not key or key.startswith("/") or "\\" in key:
        raise ValueError(f"invalid storage key {key!r}: must be a relative POSIX path")
    parts = PurePosixPath(key).parts
    if any(p in ("", ".", "..") for p in parts) or str(PurePosixPath(*parts)) != key.rstrip("/"):
        raise ValueError(f"invalid storage key {key!r}: must be normalized (no '.', '..' or '//')")
    if any(p.startswith(".") and _TMP_MARK in p for p in parts):
        raise ValueError(f"invalid storage key {key!r}: reserved temporary name")
    return key


def join(*parts: str) -> str:
    """Join key parts, ignoring empty ones (``join("a", "", "b") == "a/b"``)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def sha256_stream(f: BinaryIO, chunk: int = CHUNK) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while b := f.read(chunk):
        h.update(b)
        n += len(b)
    return h.hexdigest(), n


class AtomicWriter(ABC):
    """Streaming writer whose object becomes visible only on :meth:`commit`.

    Tracks size and sha256 of what was written; ``expected_size`` / ``expected_sha256`` given to
    ``open_write`` are checked before publishing, so a short or corrupted copy never lands.
    """

    def __init__(self, key: str, expected_size: int | None, expected_sha256: str | None):
        self.key = key
        self.expected_size = expected_size
        self.expected_sha256 = expected_sha256
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False
        self.info: ObjectInfo | None = None  # set by commit()

    @property
    def sha256(self) -> str:
        """sha256 of the bytes written so far."""
        return self._hash.hexdigest()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.closed:
            raise StorageError(f"{self.key}: write after commit/abort")
        self._hash.update(data)
        self.size += len(data)
        self._write(data)
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
            self.info = self._commit(digest)
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
    rest are derived from them and may be overridden where a backend can do better."""

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streaming, sequential reader over the whole object."""

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from offset ``start``; raises if the object is shorter."""

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
    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
            return True
        except ObjectNotFound:
            return False

    def read(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def write_atomic(
        self,
        key: str,
        data: bytes | bytearray | memoryview | BinaryIO,
        *,
        expected_sha256: str | None = None,
    ) -> ObjectInfo:
        """Write a whole object atomically from bytes or a readable file object."""
        expected_size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else None
        src = io.BytesIO(data) if expected_size is not None else data
        with self.open_write(key, expected_size=expected_size, expected_sha256=expected_sha256) as w:
            while chunk := src.read(CHUNK):
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
        """A filesystem path for the object when the backend is a mounted filesystem, else None.
        Lets fast paths (mmap, polars scans, O_DIRECT) skip the streaming interface."""
        return None

    def spec(self) -> tuple[dict, dict[str, str]]:
        """``(spec, env)`` to rebuild this storage in another process with :func:`from_spec`: the
        JSON-safe ``spec`` holds no secrets; credentials, if any, are returned as environment
        variables for the child process."""
        raise NotImplementedError(f"{type(self).__name__} cannot be described for another process")

    def delete_prefix(self, prefix: str) -> int:
        objs = self.list(prefix)
        for o in objs:
            self.delete(o.key)
        return len(objs)


# ---------------------------------------------------------------------------------------------
# Local filesystem (local disk, NFS, Ceph, any POSIX mount)
# ---------------------------------------------------------------------------------------------


def _raise_os(err: OSError, what: str) -> None:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StorageFull(f"{what}: no space left on device ({err.strerror})") from err
    if err.errno == errno.ENOENT:
        raise ObjectNotFound(f"{what}: not found") from err
    raise StorageError(f"{what}: {err.strerror or err}") from err


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (tmpfs on old kernels, some NFS) refuse directory fsync
    finally:
        os.close(fd)


class _LocalWriter(AtomicWriter):
    def __init__(self, store: "LocalStorage", key: str, final: Path, verify: bool, **kw):
        super().__init__(key, **kw)
        self._store = store
        self._final = final
        self._verify_disk = verify
        self._tmp = final.parent / f".{final.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self._tmp, "wb")
        except OSError as e:
            _raise_os(e, store.uri(key))

    def _write(self, data) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            self.abort()
            _raise_os(e, self._store.uri(self.key))

    def _commit(self, sha256: str) -> ObjectInfo:
        where = self._store.uri(self.key)
        try:
            self._f.flush()
            if self._store.fsync:
                os.fsync(self._f.fileno())
            self._f.close()
            size = self._tmp.stat().st_size
            if size != self.size:
                raise IntegrityError(f"{where}: {size} bytes on disk, {self.size} written")
            if self._verify_disk:
                with open(self._tmp, "rb") as f:
                    on_disk, _ = sha256_stream(f)
                if on_disk != sha256:
                    raise IntegrityError(f"{where}: sha256 on disk {on_disk} != written {sha256}")
            os.replace(self._tmp, self._final)
            if self._store.fsync:
                _fsync_dir(self._final.parent)
        except OSError as e:
            _raise_os(e, where)
        return ObjectInfo(self.key, self.size, sha256)

    def _abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
        self._tmp.unlink(missing_ok=True)


class LocalStorage(Storage):
    """A directory on a POSIX filesystem. Publishing is ``write tmp → fsync → verify → rename``.

    ``verify`` re-reads the temporary file to check its sha256 before the rename (catches bad
    disks/NFS caches; costs one read, usually from the page cache). ``fsync`` makes published
    objects durable across a power loss.
    """

    def __init__(self, root: str | os.PathLike, *, verify: bool = True, fsync: bool = True):
        self.root = Path(root).expanduser().resolve()
        self.verify = verify
        self.fsync = fsync
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _raise_os(e, str(self.root))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def uri(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb", buffering=CHUNK)
        except IsADirectoryError as e:
            raise ObjectNotFound(f"{self.uri(key)}: is a directory, not an object") from e
        except OSError as e:
            _raise_os(e, self.uri(key))
            raise  # unreachable; keeps type checkers quiet

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"{self.uri(key)}: negative range start={start} length={length}")
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except OSError as e:
            _raise_os(e, self.uri(key))
        try:
            data = os.pread(fd, length, start)
        finally:
            os.close(fd)
        if len(data) != length:
            raise IntegrityError(
                f"{self.uri(key)}: range [{start}, {start + length}) past end of object "
                f"({start + len(data)} bytes available)"
            )
        return data

    def open_write(self, key, *, expected_size=None, expected_sha256=None) -> AtomicWriter:
        self._check_space(key, expected_size)
        return _LocalWriter(
            self,
            key,
            self._path(key),
            self.verify,
            expected_size=expected_size,
            expected_sha256=expected_sha256,
        )

    def _check_space(self, key: str, size: int | None) -> None:
        if not size:
            return
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if size > free:
            raise StorageFull(f"{self.uri(key)}: needs {size} bytes, {free} free on {self.root}")

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root / prefix if prefix else self.root
        if prefix:
            check_key(prefix)
        if base.is_file():
            return [ObjectInfo(prefix, base.stat().st_size)]
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(".") and _TMP_MARK in name:
                    continue
                p = Path(dirpath) / name
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    continue  # deleted while listing
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), size))
        out.sort(key=lambda o: o.key)
        return out

    def stat(self, key: str) -> ObjectInfo:
        p = self._path(key)
        try:
            st = p.stat()
        except OSError as e:
            _raise_os(e, self.uri(key))
        if not p.is_file():
            raise ObjectNotFound(f"{self.uri(key)}: not an object")
        return ObjectInfo(key, st.st_size)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            _raise_os(e, self.uri(key))

    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        src = self._path(src_key)
        if not src.is_file():
            raise ObjectNotFound(f"{self.uri(src_key)}: not found")
        with open(src, "rb") as f:
            return self.write_atomic(dst_key, f)

    def spec(self) -> tuple[dict, dict[str, str]]:
        return {"kind": "local", "root": str(self.root), "verify": self.verify, "fsync": self.fsync}, {}

    def stale_temporaries(self) -> list[Path]:
        """Temporary files left by writers that died (crash, kill -9) — safe to delete."""
        return [p for p in self.root.rglob(f".*{_TMP_MARK}*") if p.is_file()]


class ShmStorage(LocalStorage):
    """The /dev/shm (tmpfs) tier: RAM-backed, so writes are never fsynced and an optional
    ``capacity_bytes`` budget is enforced on top of the filesystem's own free space."""

    def __init__(self, root: str | os.PathLike = "/dev/shm/forgeline", *, capacity_bytes: int | None = None):
        parent = Path(root).expanduser().resolve().parent
        if not parent.exists():
            raise StorageError(f"shm tier {root}: {parent} does not exist (no /dev/shm on this host?)")
        super().__init__(root, verify=True, fsync=False)
        self.capacity_bytes = capacity_bytes

    def spec(self) -> tuple[dict, dict[str, str]]:
        return {"kind": "shm", "root": str(self.root), "capacity_bytes": self.capacity_bytes}, {}

    def used_bytes(self) -> int:
        return sum(o.size for o in self.list())

    def _check_space(self, key: str, size: int | None) -> None:
        super()._check_space(key, size)
        if size and self.capacity_bytes is not None:
            used = self.used_bytes()
            if used + size > self.capacity_bytes:
                raise StorageFull(
                    f"{self.uri(key)}: needs {size} bytes; shm budget {self.capacity_bytes} "
                    f"has {self.capacity_bytes - used} left"
                )


def from_spec(spec: dict) -> Storage:
    """Rebuild a storage described by :meth:`Storage.spec` (credentials come from the environment)."""
    kw = {k: v for k, v in spec.items() if k != "kind"}
    kind = spec.get("kind")
    if kind == "local":
        return LocalStorage(**kw)
    if kind == "shm":
        return ShmStorage(**kw)
    if kind == "s3":
        from pipeline.s3 import S3Storage

        return S3Storage(kw.pop("bucket"), kw.pop("prefix", ""), **kw)
    raise ValueError(f"unknown storage kind {kind!r} in spec {spec}")


def copy_between(src: Storage, src_key: str, dst: Storage, dst_key: str, *, expected_sha256: str | None = None) -> ObjectInfo:
    """Stream one object from one storage to another (e.g. S3 → shm), atomically at ``dst``."""
    with src.open_read(src_key) as f:
        return dst.write_atomic(dst_key, f, expected_sha256=expected_sha256)


__all__ = [
    "AtomicWriter",
    "IntegrityError",
    "LocalStorage",
    "ObjectInfo",
    "ObjectNotFound",
    "ShmStorage",
    "Storage",
    "StorageError",
    "StorageFull",
    "check_key",
    "copy_between",
    "from_spec",
    "join",
    "sha256_stream",
]
