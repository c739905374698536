"""The /dev/shm tier on a serving node: published model versions pre-warmed into RAM.

A tier is a directory (``/dev/shm/forgeline`` by default) laid out like published storage, so the
readers of :mod:`pipeline.export` work on it unchanged (``LocalStorage(root)`` sees normal
published versions), plus the tier's own bookkeeping in ``.tier/``::

    /dev/shm/forgeline/
        models/<model>/<version>/...         # shards, index, manifest.json (copied LAST)
        .tier/tier.lock                      # tier-wide lock: space reservation and eviction
        .tier/locks/<model>/<version>.lock   # per-version lock: one copier per version
        .tier/used/<model>/<version>         # last-used stamp (its mtime)
        .tier/pins/<model>/<version>         # present = pinned (never evicted by LRU)
        .tier/reserve/<model>/<version>      # bytes reserved by a copy in progress

**Complete.** A version is in the tier when its ``manifest.json`` is there and every file it lists
(shards, index, golden outputs) is present with the listed size (:func:`pipeline.export.version_problem`
on the tier, the same test as everywhere). The manifest is copied last (atomically, by
rename), and every other file is copied to a temporary name, checked against the manifest
(crc32 when the manifest records it, else sha256: see :func:`_land_files`) and renamed, so a crash
at any point leaves a version that is *not* complete; the next prewarm of that version (or any
prewarm's garbage collection, once no process holds its lock) removes it.

**Concurrency.** :meth:`ShmTier.prewarm` takes an exclusive ``flock`` on the version's lock file
before copying; a second process prewarming the same version waits, then finds it complete and
reports a hit. Space is reserved under the tier-wide lock (lock order: version, then tier; other
versions' locks are only ever *tried*, never waited for, while the tier lock is held), so two
copies of different versions never overcommit the budget, and a version being copied or evicted
by one process is never evicted by another. Locks are released by the kernel when a process dies.

**Budget.** ``capacity_bytes`` bounds the bytes of versions in the tier (complete ones plus the
reservations of copies in progress); the filesystem's free space is checked too. To make room,
complete, unpinned, idle versions are evicted least recently used first (:meth:`ShmTier.resolve`
and prewarm hits refresh recency). If the version cannot fit even after evicting everything
evictable, :class:`~pipeline.storage.StorageFull` names what is needed and what is available, and
nothing is evicted. A filesystem that fills up anyway mid-copy (ENOSPC) raises ``StorageFull`` and
the partial copy is removed.

Caveat: a loader that still has an evicted version's files open or memory-mapped keeps reading
them (unlinking does not invalidate them), but tmpfs frees their RAM only when it lets go.

Usage::

    tier = ShmTier("/dev/shm/forgeline", capacity_bytes=64 * 2**30)
    report = tier.prewarm(store, "digits", "production")   # or "latest", or a version id
    report.hit, report.bytes, report.seconds, report.gbps, report.evicted
    source, where = resolve_source("digits", "production", tier=tier, local_cache=None, remote=store)
    tensors = load(source)                                  # where == "shm": read from the tier

This module never imports dagster.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pipeline import locks
from pipeline.export import (
    DEFAULT_ROOT,
    ExportError,
    INDEX_NAME,
    MANIFEST_NAME,
    ListedFile,
    VersionNotFound,
    manifest_bytes,
    manifest_files,
    newest_manifests,
    parse_manifest,
    read_manifest,
    version_prefix,
    version_problem,
)
from pipeline.mounts import in_ram
from pipeline.promotion import ALIAS, LATEST, PromotionError
from pipeline.promotion import resolve_manifest
from pipeline.storage import (
    Crc32,
    IntegrityError,
    LocalStorage,
    ObjectNotFound,
    Storage,
    StorageError,
    StorageFull,
    copy_between,
    join,
    ranged_read_size,
)
from pipeline.storage.base import WHOLE_READ_BYTES, os_error, pwrite_all
from pipeline.storage.local import create_temp, make_dir, release_temp, write_file_atomic

if TYPE_CHECKING:
    from pipeline.loading.sources import Source

DEFAULT_TIER_ROOT = "/dev/shm/forgeline"
_META = ".tier"
_DONE: Future = Future()  # a piece already landed (a small file's first GET)
_DONE.set_result(None)


class VersionPinned(StorageError):
    """Evicting a pinned version without ``force``."""


@dataclass
class PrewarmReport:
    """What one :meth:`ShmTier.prewarm` did. ``bytes`` are the bytes copied into the tier by this
    call (0 on a hit); ``version_bytes`` is the version's size in the tier; ``seconds`` is the
    whole call (lock waits included); ``gbps`` is ``bytes / seconds`` in GB/s (0 on a hit);
    ``file_seconds``: per file copied (verified copy of a shard or the index; empty on a hit)."""

    model: str
    version: str
    hit: bool
    bytes: int
    seconds: float
    gbps: float
    evicted: list[str] = field(default_factory=list)
    version_bytes: int = 0
    path: str = ""
    file_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class TierEntry:
    model: str
    version: str
    bytes: int
    last_used: float  # epoch seconds
    pinned: bool


# ---------------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------------


def _lock(path: Path, *, blocking: bool = True) -> int | None:
    """:func:`pipeline.locks.acquire`, a failure as the StorageError naming the lock file."""
    try:
        return locks.acquire(path, blocking=blocking)
    except OSError as e:
        raise StorageError(f"cannot lock {path}: {e.strerror or e}") from e


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = _lock(path)
    try:
        yield
    finally:
        locks.release(fd)  # type: ignore[arg-type]


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


# ---------------------------------------------------------------------------------------------
# Landing remote files in the tier
# ---------------------------------------------------------------------------------------------


class _Cancelled(Exception):
    """Another file of the same prewarm failed: this one stops (that failure is what is raised)."""


def _lands_in_place(store: Storage) -> bool:
    """Whether ``store`` lands ranged reads in place (it overrides ``read_to_file``, as S3 does:
    ranged GETs pinned to one version, spliced or received straight into the file): then the
    tier fetches a file's pieces in parallel instead of streaming it through one reader."""
    return type(store).read_to_file is not Storage.read_to_file


def _land_files(store: Storage, dst: LocalStorage, files: list[ListedFile]) -> list[float]:
    """Copy ``files`` (manifest entries whose ``file`` is the storage key) from ``store`` to the
    same keys in ``dst``; returns the seconds each file took, in order.

    Each file is fetched in ranged reads pinned to the version its ``stat`` saw (an object
    replaced meanwhile fails with ObjectChanged; a file of 1 MiB or less is one GET, whose answer
    carries the size and version: ``Storage.read_head``), ``concurrency`` (S3) at a time in one pool
    shared by all files, each as large as the store's ``get_size`` allows while every request in
    flight still has one (fewer requests: less of the client's and the server's CPU). Each read
    is written at its offset into a temporary tmpfs file (``Storage.read_to_file``: S3 over plain
    HTTP splices the socket's bytes into the file in the kernel, else they land in a reused
    buffer and are ``pwrite``-n; both cheaper on tmpfs than receiving into a mapping of the file,
    whose pages would be faulted in and zeroed one by one). The file's
    checksum is computed in order, in the file's own thread, from the landed bytes while later
    pieces are still in flight (both hashes release the GIL): so it checks what is in the tier,
    not what was received. A file queues up to twice ``concurrency`` pieces past the oldest one
    not yet checked, so one slow request does not hold back the pieces after it. The checksum is
    the manifest's crc32 (:class:`Crc32`, ~10x cheaper
    than sha256, which bound the copy on a busy core: it catches truncated, torn, swapped and
    corrupted transfers; sha256 stays the content identity, checked again when a server first
    loads the version); manifests written before crc32 was recorded are checked by sha256.
    Several files land at once (up to the CPU count, at most 4, so their hashes run on different
    cores; more when many files are small, up to the store's ``parallel_requests``, so they are
    not fetched a few at a time). A file is published (renamed) only once its size and checksum
    are checked; on any failure every temporary is removed. Memory, besides the destination
    files: none per request when spliced, else a 1 MiB buffer (S3) or one piece (other stores)
    per request in flight, and up to 1 MiB per small file landing."""
    if not files:
        return []
    inflight = max(1, int(getattr(store, "concurrency", 0) or 8))
    piece = ranged_read_size(store, sum(f.bytes for f in files), inflight)
    failed = threading.Event()

    def fetch(key: str, version: str | None, fd: int, at: int, n: int) -> None:
        store.read_to_file(key, at, n, fd, at, version=version)

    gets = ThreadPoolExecutor(inflight, thread_name_prefix="shm-get")
    try:
        # Big files a few at a time, so their hashes spread over the cores (more at once only
        # interleave their pieces: measured slower); small ones, each one GET (in its own
        # thread, not through the pool) and little to hash, as many at once as the store takes
        # requests in parallel (S3: its connection pool), so many of them are not fetched in turns.
        small = sum(1 for f in files if f.bytes <= WHOLE_READ_BYTES)
        at_once = max(inflight, store.parallel_requests)
        workers = min(len(files), max(min(os.cpu_count() or 1, 4), min(small, at_once)))
        with ThreadPoolExecutor(workers, thread_name_prefix="shm-land") as pool:
            futures = [pool.submit(_land_one, store, dst, f, gets, fetch, piece, inflight, failed) for f in files]
            try:
                errors = [f.exception() for f in futures]
            except BaseException:
                failed.set()  # interrupted while waiting: the files stop at their next piece
                raise
    finally:
        gets.shutdown(wait=True, cancel_futures=True)
    first = next((e for e in errors if e is not None and not isinstance(e, _Cancelled)), None)
    if first is not None:
        raise first
    return [f.result() for f in futures]


def _land_one(store: Storage, dst: LocalStorage, listed: ListedFile,
              gets: ThreadPoolExecutor, fetch, piece: int, window: int, failed: threading.Event) -> float:
    """One file of :func:`_land_files` (in its own thread); returns its seconds."""
    key, size = listed.file, listed.bytes
    h, want = (Crc32(), listed.crc32) if listed.crc32 is not None else (hashlib.sha256(), listed.sha256)
    if failed.is_set():
        raise _Cancelled()
    t0 = time.perf_counter()
    head = b""
    try:
        if 0 < size <= min(piece, WHOLE_READ_BYTES):  # one GET (through a buffer), no stat: larger files spliced
            head, info = store.read_head(key, size)
        else:
            info = store.stat(key)
        if info.size != size:
            raise IntegrityError(f"{store.uri(key)}: {info.size} bytes, the manifest says {size}")
        final = dst.local_path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temp(final, 0o644)
    except BaseException as e:
        failed.set()
        _reraise(e, dst.uri(key))
    mm: mmap.mmap | None = None
    pending: deque[tuple[int, int, Future]] = deque()
    try:
        os.ftruncate(fd, size)  # sparse: pages are allocated by the writes (ENOSPC there)
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None

        def hash_oldest() -> None:
            at, n, fut = pending.popleft()
            fut.result()
            h.update(memoryview(mm)[at : at + n])  # in order; the next pieces keep arriving meanwhile

        if head:
            pwrite_all(fd, head, 0)
            pending.append((0, len(head), _DONE))
        for at in range(len(head), size, piece):
            if failed.is_set():
                raise _Cancelled()
            while len(pending) >= 2 * window:
                hash_oldest()
            n = min(piece, size - at)
            pending.append((at, n, gets.submit(fetch, key, info.version, fd, at, n)))
        while pending:
            hash_oldest()
        digest = h.hexdigest()
        if want is not None and digest != want:
            raise IntegrityError(f"{store.uri(key)}: {h.name} {digest} != expected {want}")
        if os.fstat(fd).st_size != size:
            raise IntegrityError(f"{dst.uri(key)}: {os.fstat(fd).st_size} bytes in the tier, expected {size}")
        if mm is not None:
            mm.close()
            mm = None
        os.rename(tmp, final)
        release_temp(tmp, fd)
        fd = -1
        return time.perf_counter() - t0
    except BaseException as e:
        failed.set()
        for _, _, fut in pending:
            fut.cancel()
        for _, _, fut in pending:  # none may still write to the file once it is closed
            if not fut.cancelled():
                fut.exception()
        pending.clear()
        if mm is not None:
            with contextlib.suppress(BufferError):  # a traceback still views it: freed with it
                mm.close()
        if fd >= 0:
            tmp.unlink(missing_ok=True)
            release_temp(tmp, fd)
        _reraise(e, dst.uri(key))


def _reraise(e: BaseException, where: str) -> NoReturn:
    """Raise ``e``; an OSError of the tier's filesystem as the StorageError callers expect
    (ENOSPC: StorageFull), anything else as it is."""
    if isinstance(e, OSError) and not isinstance(e, StorageError):
        raise os_error(e, where) from e
    raise e


# ---------------------------------------------------------------------------------------------
# The tier
# ---------------------------------------------------------------------------------------------


def reader_tier(root: str | os.PathLike, *, capacity_bytes: int | None = None,
                warn: Callable[[str], None]) -> "ShmTier | None":
    """The tier for a reader (a load, a model server), which can always read the store instead:
    the :class:`ShmTier` at ``root``, or ``None`` after one ``warn`` line naming the root and why
    when it cannot be opened here (read-only, not writable, a file in the way). Pre-warming, whose
    whole point is the tier, opens it directly and fails instead."""
    try:
        return ShmTier(root, capacity_bytes=capacity_bytes)
    except StorageError as e:
        warn(f"the shm tier is not used, versions are read from the store: {e} "
             "(FORGELINE_SHM_ROOT; --no-shm skips the tier)")
        return None


class ShmTier:
    """Published model versions copied into a RAM-backed directory, within a byte budget."""

    def __init__(self, root: str | os.PathLike = DEFAULT_TIER_ROOT, *, capacity_bytes: int | None = None):
        root = Path(root).expanduser()
        if str(root).startswith("/dev/shm") and not Path("/dev/shm").is_dir():
            raise StorageError(f"shm tier {root}: /dev/shm does not exist on this host")
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        make_dir(root, "shm tier")
        self.store = LocalStorage(root, fsync=False)  # RAM: nothing to make durable
        self.root: Path = self.store.root
        self.in_ram = in_ram(self.root, "shm tier")
        self.capacity_bytes = capacity_bytes
        self.meta = make_dir(self.root / _META, "shm tier")  # a read-only root: a StorageError naming it

    def __repr__(self) -> str:
        return f"ShmTier({str(self.root)!r}, capacity_bytes={self.capacity_bytes})"

    # Paths ------------------------------------------------------------------------------------
    def _dir(self, model: str, version: str) -> Path:
        return self.root / version_prefix(model, version)

    def version_holding(self, model: str, path: str | os.PathLike) -> str | None:
        """The version of ``model`` whose folder in the tier holds the file ``path``, if any."""
        models = self._dir(model, "v").parent
        rel = Path(path).relative_to(models) if Path(path).is_relative_to(models) else None
        return rel.parts[0] if rel is not None and len(rel.parts) > 1 else None

    def _bk(self, kind: str, model: str, version: str, suffix: str = "") -> Path:
        version_prefix(model, version)  # validates both names
        return self.meta / kind / model / f"{version}{suffix}"

    def _version_lock(self, model: str, version: str) -> Path:
        return self._bk("locks", model, version, ".lock")

    def _tier_lock(self) -> Path:
        return self.meta / "tier.lock"

    def _versions_on_disk(self) -> list[tuple[str, str]]:
        base = self.root / DEFAULT_ROOT
        out = []
        if not base.is_dir():
            return out
        for mdir in sorted(base.iterdir()):
            if not mdir.is_dir():
                continue
            for vdir in sorted(mdir.iterdir()):
                if not vdir.is_dir():
                    continue
                try:
                    version_prefix(mdir.name, vdir.name)
                except ValueError:
                    continue  # not something the tier wrote
                out.append((mdir.name, vdir.name))
        return out

    # State ------------------------------------------------------------------------------------
    def _state(self, model: str, version: str) -> tuple[bool, int]:
        """``(complete, bytes on disk)`` of a version directory."""
        return self.complete(model, version), _tree_bytes(self._dir(model, version))

    def complete(self, model: str, version: str) -> bool:
        """The version is in the tier: manifest present and every listed file has its size (a
        version rejected after it was copied still counts: it holds the bytes)."""
        return version_problem(self.store, model, version, allow_rejected=True) is None

    def _touch(self, model: str, version: str) -> None:
        stamp = self._bk("used", model, version)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        now = time.time_ns()
        fd = os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            os.utime(fd, ns=(now, now))
        finally:
            os.close(fd)

    def _last_used(self, model: str, version: str) -> float:
        for p in (self._bk("used", model, version), self._dir(model, version) / MANIFEST_NAME):
            try:
                return p.stat().st_mtime
            except OSError:
                continue
        return 0.0

    def pinned(self, model: str, version: str) -> bool:
        return self._bk("pins", model, version).exists()

    def pin(self, model: str, version: str) -> None:
        """Never evict this version to make room (it may be pinned before it is prewarmed)."""
        p = self._bk("pins", model, version)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()

    def unpin(self, model: str, version: str) -> None:
        self._bk("pins", model, version).unlink(missing_ok=True)

    def _reserved(self, model: str, version: str) -> int:
        try:
            return int(self._bk("reserve", model, version).read_text())
        except (OSError, ValueError):
            return 0

    def list(self) -> list[TierEntry]:
        """Complete versions in the tier, least recently used first."""
        out = []
        for m, v in self._versions_on_disk():
            ok, size = self._state(m, v)
            if ok:
                out.append(TierEntry(m, v, size, self._last_used(m, v), self.pinned(m, v)))
        return sorted(out, key=lambda e: (e.last_used, e.model, e.version))

    def used_bytes(self) -> int:
        """Bytes under ``models/`` right now (complete versions and copies in progress)."""
        return _tree_bytes(self.root / DEFAULT_ROOT)

    def _fs_free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _fs_block(self) -> int:
        return os.statvfs(self.root).f_bsize or 4096

    def storage(self) -> LocalStorage:
        """The tier as a storage: ``pipeline.export`` readers load versions from it directly."""
        return self.store

    # Lookups ----------------------------------------------------------------------------------
    def _latest_here(self, model: str) -> str | None:
        best = None
        for m, v in self._versions_on_disk():
            if m != model:
                continue
            try:  # read once: for the completeness check and the recency
                manifest = read_manifest(self.store, m, v)
            except (ExportError, StorageError, ValueError):
                continue
            if version_problem(self.store, m, v, manifest=manifest) is not None:
                continue
            created = manifest.get("created", "")
            if best is None or (created, v) > best:
                best = (created, v)
        return best[1] if best else None

    def resolve(self, model: str, version: str = "latest") -> Path | None:
        """The version's folder in the tier when it is complete (its recency is refreshed), else
        None. ``"latest"`` is the most recently created version present in the tier and not rejected."""
        if version == "latest":
            found = self._latest_here(model)
            if found is None:
                return None
            version = found
        if not self.complete(model, version):
            return None
        self._touch(model, version)
        return self._dir(model, version)

    # Removal ----------------------------------------------------------------------------------
    def _remove_version(self, model: str, version: str) -> None:
        """Delete a version's files, manifest first (so it stops being complete at once). The
        caller holds the version's lock."""
        vdir = self._dir(model, version)
        (vdir / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(vdir, ignore_errors=True)
        self._bk("used", model, version).unlink(missing_ok=True)
        self._bk("reserve", model, version).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            vdir.parent.rmdir()  # only when empty

    def evict(self, model: str, version: str, *, force: bool = False) -> bool:
        """Remove a version from the tier (waits for a copy of it in progress). A pinned version
        is refused (:class:`VersionPinned`) unless ``force``, which also unpins it. Returns
        whether anything was there."""
        if self.pinned(model, version) and not force:
            raise VersionPinned(f"shm tier {self.root}: {model}/{version} is pinned; unpin it or evict with force=True")
        with _locked(self._version_lock(model, version)), _locked(self._tier_lock()):
            existed = self._dir(model, version).exists()
            self._remove_version(model, version)
            if force:
                self.unpin(model, version)
        return existed

    def _collect_garbage(self, own: tuple[str, str]) -> None:
        """Remove leftovers of copies that died (incomplete, nobody holds their lock) and stale
        reservations. Caller holds the tier lock (and the lock of ``own``)."""
        for m, v in self._versions_on_disk():
            if (m, v) == own or self.complete(m, v):
                continue
            fd = _lock(self._version_lock(m, v), blocking=False)
            if fd is None:
                continue  # a copy in progress
            try:
                self._remove_version(m, v)
            finally:
                locks.release(fd)
        rdir = self.meta / "reserve"
        if rdir.is_dir():
            for p in rdir.glob("*/*"):
                m, v = p.parent.name, p.name
                if (m, v) == own:
                    continue
                try:
                    fd = _lock(self._version_lock(m, v), blocking=False)
                except (StorageError, ValueError):
                    continue
                if fd is not None:
                    p.unlink(missing_ok=True)
                    locks.release(fd)

    def _make_room(self, model: str, version: str, need: int, fs_need: int,
                   keep: frozenset[tuple[str, str]] = frozenset()) -> list[str]:
        """Reserve room for ``need`` bytes (``fs_need`` on the filesystem, block-rounded),
        evicting LRU unpinned idle versions not in ``keep``. Caller holds the tier lock and the
        version's lock. Raises StorageFull, evicting nothing, when it cannot fit."""
        cap = self.capacity_bytes
        what = f"shm tier {self.root}: {model}/{version} needs {need} bytes"
        if cap is not None and need > cap:
            raise StorageFull(f"{what}, more than the whole budget of {cap} bytes (capacity_bytes, "
                              "FORGELINE_SHM_CAPACITY_BYTES); "
                              "nothing was evicted")
        used, pending = 0, 0  # budget bytes of others; bytes others' copies will still write
        pinned_b, busy_b = 0, 0
        candidates: list[tuple[float, str, str, int]] = []
        for m, v in self._versions_on_disk():
            if (m, v) == (model, version):
                continue
            ok, size = self._state(m, v)
            if ok:
                used += size
                if self.pinned(m, v) or (m, v) in keep:
                    pinned_b += size
                else:
                    candidates.append((self._last_used(m, v), m, v, size))
            else:  # a copy in progress elsewhere (dead ones were collected)
                res = self._reserved(m, v)
                used += max(size, res)
                pending += max(0, res - size)
                busy_b += max(size, res)
        candidates.sort()
        held: list[tuple[int, str, str, int]] = []
        try:
            for _, m, v, size in candidates:
                fd = _lock(self._version_lock(m, v), blocking=False)
                if fd is None:
                    busy_b += size  # being evicted/checked by another process
                else:
                    held.append((fd, m, v, size))
            evictable = sum(size for *_, size in held)
            fs_free = self._fs_free() - pending
            if cap is not None and used - evictable + need > cap:
                raise StorageFull(
                    f"{what}; the budget is {cap} bytes with {max(cap - used, 0)} free and {evictable} "
                    f"evictable ({pinned_b} pinned{' or pre-warmed with it' if keep else ''}, {busy_b} in use by "
                    "copies in progress); nothing was evicted")
            if fs_need > fs_free + evictable:
                raise StorageFull(
                    f"{what} ({fs_need} in filesystem blocks); {self.root} has {max(fs_free, 0)} bytes free "
                    f"and {evictable} evictable: /dev/shm is full (raise its size or free RAM); "
                    "nothing was evicted")
            evicted = []
            for fd, m, v, size in held:
                fits_budget = cap is None or used + need <= cap
                if fits_budget and fs_need <= self._fs_free() - pending:
                    break
                self._remove_version(m, v)
                used -= size
                evicted.append(f"{m}/{v}")
            if (cap is not None and used + need > cap) or fs_need > self._fs_free() - pending:
                raise StorageFull(  # files still open/mapped elsewhere keep their RAM
                    f"{what}; after evicting {evicted} only {self._fs_free() - pending} bytes are free on "
                    f"{self.root} (evicted files still open by a loader keep their memory)")
            return evicted
        finally:
            for fd, *_ in held:
                locks.release(fd)

    # Prewarm ----------------------------------------------------------------------------------
    def prewarm(self, store: Storage, model: str, version: str = LATEST, *, pin: bool = False,
                keep: Iterable[tuple[str, str]] = ()) -> PrewarmReport:
        """Make ``model``/``version`` (``"latest"``: the newest complete, non-rejected version
        published in ``store``; ``"production"``: the promoted one) complete in the tier, copying
        it from ``store``, every file checked against the manifest, if it is not there yet.
        Idempotent; concurrent calls for one version copy it once (the others report a hit).
        ``keep``: ``(model, version)`` pairs not to evict to make room (what the same request
        pre-warmed just before: a base version and its quantized variants go in together or fail)."""
        t0 = time.perf_counter()
        version, manifest = _version_for(store, model, version, "to prewarm",
                                         whole_here=lambda v: self.complete(model, v))
        prefix = version_prefix(model, version)
        created_pin = pin and not self.pinned(model, version)
        if pin:
            self.pin(model, version)
        try:
            if self.complete(model, version):
                return self._hit(model, version, t0)
            with _locked(self._version_lock(model, version)):
                if self.complete(model, version):  # another process copied it while we waited
                    return self._hit(model, version, t0)
                copied, evicted, file_seconds = self._fill(store, model, version, prefix, manifest, frozenset(keep))
                self._touch(model, version)
        except BaseException:
            if created_pin:
                self.unpin(model, version)
            raise
        seconds = time.perf_counter() - t0
        _, size = self._state(model, version)
        return PrewarmReport(model, version, False, copied, seconds, copied / seconds / 1e9 if seconds else 0.0,
                             evicted, size, str(self._dir(model, version)), file_seconds)

    def _hit(self, model: str, version: str, t0: float) -> PrewarmReport:
        self._touch(model, version)
        _, size = self._state(model, version)
        return PrewarmReport(model, version, True, 0, time.perf_counter() - t0, 0.0, [], size,
                             str(self._dir(model, version)))

    def _fill(self, store: Storage, model: str, version: str, prefix: str, manifest: dict | None,
              keep: frozenset[tuple[str, str]] = frozenset()) -> tuple[int, list[str], list[float]]:
        """Copy the version (caller holds its lock; ``manifest``: as resolving the reference read
        it, else read here). Returns ``(bytes copied, evicted, seconds per file)``."""
        manifest_key = join(prefix, MANIFEST_NAME)
        if manifest is not None:
            raw = manifest_bytes(manifest)
        else:
            try:
                raw = store.read(manifest_key)
            except ObjectNotFound:
                raise VersionNotFound(f"{store.uri(manifest_key)}: no such published version {version!r} "
                                      f"of {model!r}") from None
            manifest = parse_manifest(raw, store.uri(manifest_key))
        files = manifest_files(manifest)
        if not manifest.get("index"):  # manifests before the index was listed: copy it if it is there
            try:
                files.append(ListedFile(INDEX_NAME, store.stat(join(prefix, INDEX_NAME)).size, None, None))
            except ObjectNotFound:
                pass
        need = sum(f.bytes for f in files) + len(raw)
        block = self._fs_block()
        fs_need = sum(_round_up(f.bytes, block) for f in files) + _round_up(len(raw), block)
        vdir = self._dir(model, version)

        with _locked(self._tier_lock()):
            self._collect_garbage(own=(model, version))
            shutil.rmtree(vdir, ignore_errors=True)  # our own leftover from a copy that died
            evicted = self._make_room(model, version, need, fs_need, keep)
            res = self._bk("reserve", model, version)
            res.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomic(res, str(need), durable=False)
            vdir.mkdir(parents=True, exist_ok=True)  # under the tier lock: its model dir stays

        copied, file_seconds = 0, []
        try:
            if _lands_in_place(store):
                # A remote store (S3): parallel ranged reads straight into the tmpfs files.
                file_seconds = _land_files(store, self.store, [f._replace(file=join(prefix, f.file)) for f in files])
                copied = sum(f.bytes for f in files)
            else:
                for file, size, sha, _ in files:  # the writer checks the sha256 of what it copies
                    key = join(prefix, file)
                    t0 = time.perf_counter()
                    info = copy_between(store, key, self.store, key, expected_sha256=sha)
                    file_seconds.append(time.perf_counter() - t0)
                    if info.size != size:
                        raise IntegrityError(f"{store.uri(key)}: {info.size} bytes, the manifest says {size}")
                    copied += info.size
            self.store.write_atomic(manifest_key, raw)  # last: now the version is complete
            copied += len(raw)
        except BaseException as e:
            shutil.rmtree(vdir, ignore_errors=True)
            what = f"prewarm of {model}/{version} from {store.uri(prefix)} into shm tier {self.root}"
            if isinstance(e, StorageFull):
                raise StorageFull(f"{what}: the filesystem filled up after {copied} of {need} bytes "
                                  f"({self._fs_free()} bytes free now): {e}. The partial copy was removed; "
                                  "the tier is otherwise unchanged") from e
            if isinstance(e, IntegrityError):
                raise IntegrityError(f"{what}: {e} (corrupt or changed source). The partial copy was "
                                     "removed; the tier is otherwise unchanged") from e
            raise
        finally:
            self._bk("reserve", model, version).unlink(missing_ok=True)
        return copied, evicted, file_seconds


# ---------------------------------------------------------------------------------------------
# The loader's choice of source
# ---------------------------------------------------------------------------------------------


def _version_for(store: Storage, model: str, ref: str, purpose: str,
                 whole_here: Callable[[str], bool] | None = None) -> tuple[str, dict | None]:
    """``(ref, None)`` when ``ref`` is a version id, else what ``"latest"``/``"production"`` names
    in ``store`` and the manifest read to check it. ``whole_here(version)``: whether a copy at
    hand (the tier) holds a version whole; then ``latest``, when it is the newest candidate not
    rejected, is chosen from the manifests alone, without the stats that check its files."""
    if ref not in (LATEST, ALIAS):
        return ref, None
    try:  # the files are checked by whoever reads them (each landed file's size and checksum)
        if ref == LATEST and whole_here is not None:
            candidates = newest_manifests(store, model)
            newest = next(((v, m) for v, m in candidates if not m.get("rejected")), None)
            if newest is not None and whole_here(newest[0]):
                return newest  # whole here already: nothing to stat in the store to choose it
            return resolve_manifest(store, model, ref, candidates=candidates)
        return resolve_manifest(store, model, ref, files=False)
    except PromotionError as e:
        raise VersionNotFound(f"{store.uri(join(DEFAULT_ROOT, model))}: no {ref} version of {model!r} "
                              f"{purpose} ({e})") from None


class TierView(LocalStorage):
    """A read view of a copy of published versions (the shm tier, a local cache), as
    :func:`resolve_source` hands it to the loader: files are read here, but ``production``,
    ``latest`` and rejection are those of ``authority``, the storage the copy came from (a copy has
    no production alias, and its manifests predate a later rejection); ``pinned_refs``
    (``{"<model>/<ref>": version}``) is what resolve_source resolved, so ``load("digits/production",
    storage=view)`` reads exactly the version found in the copy even if the alias moves meanwhile;
    ``authority_manifests`` (``{version: manifest}``) are the authority's manifests as the caller
    has just read them, so rejection is checked without reading them again
    (:mod:`pipeline.loading.sources`)."""

    def __init__(self, root: str | os.PathLike, *, authority: Storage, pinned_refs: dict[str, str] | None = None,
                 authority_manifests: dict[str, dict] | None = None):
        super().__init__(root, fsync=False)
        self.authority = authority
        self.pinned_refs = dict(pinned_refs or {})
        self.authority_manifests = dict(authority_manifests or {})


def resolve_source(
    model: str,
    version: str = "latest",
    *,
    tier: ShmTier | None,
    local_cache: LocalStorage | None,
    remote: Storage,
    allow_rejected: bool = False,
) -> tuple[Source, str]:
    """``model``/``version`` resolved for the loader (``load(source)``) and where its bytes are
    read: the shm tier when the version is complete there (``"shm"``; recency refreshed), else the
    local cache when it holds the whole version (``"local"``), else ``remote`` (``"remote"``).
    ``"latest"`` and ``"production"`` are what ``remote`` names, rejection is ``remote``'s, and a
    version read from ``remote`` is resolved once: the manifest read to choose it is the one
    loaded. ``latest`` is the newest candidate that is not rejected and is whole in a copy or on
    ``remote`` (:func:`pipeline.loading.sources.latest_source`). ``allow_rejected``: as for
    :func:`pipeline.loading.load`, by version id only."""
    t0 = time.perf_counter()
    found = _resolve_source(model, version, tier, local_cache, remote, allow_rejected)
    found[0].seconds = time.perf_counter() - t0  # all of it, for the load's report
    return found


def _resolve_source(model: str, version: str, tier: ShmTier | None, local_cache: LocalStorage | None,
                    remote: Storage, allow_rejected: bool) -> tuple[Source, str]:
    from pipeline.loading.sources import latest_source, published_version, resolve

    ref, where = version, "remote"

    def copy(v: str, manifest: dict | None = None) -> Source | None:  # from a whole copy, by a view pinned to v
        nonlocal where
        if tier is not None and tier.resolve(model, v) is not None:
            root, where = tier.root, "shm"
        elif local_cache is not None and version_problem(local_cache, model, v, allow_rejected=True) is None:
            root, where = local_cache.root, "local"
        else:
            return None
        view = TierView(root, authority=remote, pinned_refs={f"{model}/{ref}": v} if ref != v else {},
                        authority_manifests={v: manifest} if manifest is not None else None)
        return resolve(f"{model}/{ref}", view, allow_rejected=allow_rejected)

    if ref == LATEST:
        found = latest_source(remote, model, copy=copy)  # sets where
        return found, where
    if ref == ALIAS:
        v, manifest = _version_for(remote, model, ref, "to load")
        found = copy(v, manifest)
        if found is None:
            found = published_version(remote, model, v, manifest, ref=ref)
        return found, where
    version_prefix(model, ref)  # a valid version id
    found = copy(ref)
    if found is None:
        found = resolve(f"{model}/{ref}", remote, allow_rejected=allow_rejected)
    return found, where


__all__ = [
    "DEFAULT_TIER_ROOT",
    "PrewarmReport",
    "ShmTier",
    "TierEntry",
    "TierView",
    "VersionPinned",
    "resolve_source",
]
