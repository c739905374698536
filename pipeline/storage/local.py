"""The local tier: a directory on any POSIX filesystem (local disk, NFS, Ceph and other mounts).

Publishing is ``write a temporary name -> fsync -> verify sha256 -> rename``, so an object appears
complete or not at all. Temporaries are hidden (:meth:`LocalStorage.stale_temporaries` lists
them); one left by a killed writer is removed by the next writer into its folder
(:meth:`LocalStorage.remove_dead_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO, NoReturn

from pipeline.keys import TMP_MARK, check_key, is_temporary
from pipeline.storage.base import (
    CHUNK,
    AtomicWriter,
    IntegrityError,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
    StorageFull,
    os_error,
    sha256_stream,
)


def _raise_os(err: OSError, what: str) -> NoReturn:
    raise os_error(err, what) from err


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


def make_dir(path: str | os.PathLike, what: str = "") -> Path:
    """The directory ``path``, made with its parents when missing; else the StorageError naming
    it, ``what`` it is (e.g. ``"the storage root"``, ``"FORGELINE_HOME"``) and why: a file in the
    way, a read-only or full filesystem, no permission."""
    p = Path(path)
    where = f"{what} {p}" if what else str(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
        return p
    except FileExistsError:  # exist_ok: something that is not a directory is there
        raise StorageError(f"{where}: exists and is not a directory") from None
    except NotADirectoryError:
        raise StorageError(f"{where}: part of the path is a file, not a directory") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise os_error(e, where) from e
        raise StorageError(f"{where}: cannot create it ({e.strerror or e})") from e


def temp_path(final: Path) -> Path:
    """The unpublished temporary beside ``final`` (a hidden name with TMP_MARK: never a valid key,
    listed by :meth:`LocalStorage.stale_temporaries`), renamed onto ``final`` once verified."""
    return final.parent / f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}"


# A writer's temporary is live while its writer holds an flock on it (the kernel drops the lock
# when the process dies: kill -9, OOM) and, in this process, while it is in _live (the POSIX
# record locks NFS clients emulate flock with never exclude the process's own threads).
# A temporary younger than _SETTLING_S is never taken: its writer may be between create and lock.
_live: set[str] = set()
_live_guard = threading.Lock()
_SETTLING_S = 60.0


def create_temp(final: Path, mode: int = 0o666) -> tuple[int, Path]:
    """A new temporary for ``final`` (:func:`temp_path`; its folder must exist), open for reading
    and writing, live until :func:`release_temp`: :meth:`LocalStorage.remove_dead_temporaries`
    takes only the temporaries of writers that died."""
    tmp = temp_path(final)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with _live_guard:
        _live.add(str(tmp))
    with contextlib.suppress(OSError):  # a filesystem without locks: only the age tells
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd, tmp


def release_temp(tmp: Path, fd: int | None = None) -> None:
    """A temporary of :func:`create_temp` is renamed or removed: close ``fd`` (never before the
    rename: closing drops the lock; pass None when a file object owns it and is closed)."""
    try:
        if fd is not None:
            os.close(fd)
    finally:
        with _live_guard:
            _live.discard(str(tmp))


def _dead(path: str) -> bool:
    """Whether the temporary at ``path`` was left by a writer that died."""
    with _live_guard:
        if path in _live:
            return False
    try:
        # read-write: NFS emulates flock with a POSIX write lock, which needs a file open for writing
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if time.time() - os.fstat(fd).st_mtime < _SETTLING_S:
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its writer's lock is gone with its process
        return True
    except OSError:  # held (a writer at work), or no locks here: cannot tell, so not taken
        return False
    finally:
        os.close(fd)


def write_file_atomic(path: str | os.PathLike, data: bytes | str, *, mode: int | None = None,
                      durable: bool = True) -> None:
    """Publish ``data`` as the file ``path`` (any path; objects of a store go through its
    ``write_atomic``): written to :func:`temp_path` beside it and renamed over it, so a reader,
    a crash or a full disk finds the old file or the new one, never part of one. ``mode``: the
    file's exact permissions (default: 0o666 less the umask, as ``open`` gives); ``durable``:
    fsynced before the rename. A failure removes the temporary and raises the StorageError
    naming ``path`` (StorageFull for a full disk)."""
    final = Path(path)
    view = memoryview(data.encode() if isinstance(data, str) else data)
    try:
        fd, tmp = create_temp(final)
    except OSError as e:
        _raise_os(e, str(final))
    try:
        while view:
            view = view[os.write(fd, view):]
        if mode is not None:
            os.fchmod(fd, mode)
        if durable:
            os.fsync(fd)
        os.replace(tmp, final)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        _raise_os(e, str(final))
    finally:
        release_temp(tmp, fd)


class _LocalWriter(AtomicWriter):
    def __init__(self, store: "LocalStorage", key: str, final: Path, verify: bool, **kw):
        super().__init__(key, **kw)
        self._store = store
        self._final = final
        self._verify_disk = verify
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            store._sweep_once(final.parent)
            fd, self._tmp = create_temp(final)
        except OSError as e:
            _raise_os(e, store.uri(key))
        self._f = os.fdopen(fd, "wb")

    def _write(self, data) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            _raise_os(e, self._store.uri(self.key))

    def _commit(self, sha256: str) -> ObjectInfo:
        where = self._store.uri(self.key)
        try:
            self._f.flush()
            if self._store.fsync:
                os.fsync(self._f.fileno())
            size = os.fstat(self._f.fileno()).st_size
            if size != self.size:
                raise IntegrityError(f"{where}: {size} bytes on disk, {self.size} written")
            if self._verify_disk:
                with open(self._tmp, "rb") as f:
                    on_disk, _ = sha256_stream(f)
                if on_disk != sha256:
                    raise IntegrityError(f"{where}: sha256 on disk {on_disk} != written {sha256}")
            os.replace(self._tmp, self._final)  # still open: its lock keeps it live until here
            self._f.close()
            release_temp(self._tmp)
            if self._store.fsync:
                _fsync_dir(self._final.parent)
        except OSError as e:
            _raise_os(e, where)
        return ObjectInfo(self.key, self.size, sha256)

    def _abort(self) -> None:
        with contextlib.suppress(OSError):
            self._tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a buffered flush into a full disk
            self._f.close()
        release_temp(self._tmp)


class LocalStorage(Storage):
    """A directory on a POSIX filesystem. Publishing is ``write tmp → fsync → verify → rename``.

    ``verify`` re-reads the temporary file to check its sha256 before the rename (catches bad
    disks/NFS caches; costs one read, usually from the page cache). ``fsync`` makes published
    objects durable across a power loss.
    """

    kind = "local"

    def __init__(self, root: str | os.PathLike, *, verify: bool = True, fsync: bool = True):
        self.root = Path(root).expanduser().resolve()
        self.verify = verify
        self.fsync = fsync
        self._swept: set[Path] = set()  # folders whose dead writers' temporaries this store removed
        make_dir(self.root)

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

    def read_range(self, key: str, start: int, length: int, *, version: str | None = None) -> bytes:
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
                if is_temporary(name):
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
        return {"kind": self.kind, "root": str(self.root), "verify": self.verify, "fsync": self.fsync}, {}

    def stale_temporaries(self, prefix: str = "") -> list[Path]:
        """Every unpublished temporary under ``prefix``: of writers at work, and of writers that
        died (crash, kill -9), which :meth:`remove_dead_temporaries` removes."""
        base = self._path(prefix) if prefix else self.root
        return [p for p in base.rglob(f"*{TMP_MARK}*") if is_temporary(p.name) and p.is_file()]

    def remove_dead_temporaries(self, folder: Path) -> int:
        """Remove the temporaries in ``folder`` (not below it) whose writer died; returns how
        many. A writer of this store does it once per folder it writes to, so what a killed
        writer left is gone the next time that folder is written (once a minute has passed
        since its last write: see :func:`create_temp`)."""
        removed = 0
        try:
            entries = [e.path for e in os.scandir(folder) if is_temporary(e.name)]
        except OSError:
            return 0
        for path in entries:
            if _dead(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed += 1
        return removed

    def _sweep_once(self, folder: Path) -> None:
        if folder not in self._swept:
            self._swept.add(folder)
            self.remove_dead_temporaries(folder)
