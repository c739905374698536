"""Where a file lives and how to read it fast: the filesystem kind (from the mount table), how much
of it is in the page cache (``mincore``), and the thread count / request size that suits both
(:func:`tune`; the table and its measurements are in docs/loading.md)."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

from pipeline._libc import libc_function
from pipeline.mounts import classify_fstype, mount_of

MiB = 1 << 20

_MINCORE = libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)])


def tune(kind: str, cached: float | None, cpus: int | None = None) -> tuple[int, int]:
    """``(threads, chunk_bytes)`` for a source: ``kind`` is a filesystem kind from :func:`probe`
    (tmpfs / local / network) or, for ranged reads through a storage, the backend's kind (s3)."""
    cpus = cpus or os.cpu_count() or 1
    mem_bound = min(16, max(2, cpus))  # copies out of the page cache are memory-bandwidth bound
    if kind == "tmpfs":
        return mem_bound, 4 * MiB
    if kind == "network":
        return 16, 16 * MiB
    if kind != "local":  # an object store: many ranged GETs in flight
        return 16, 8 * MiB
    if cached is not None and cached >= 0.5:
        return mem_bound, 8 * MiB
    return 8, 16 * MiB


def cached_fraction(path: str | os.PathLike, *, max_pages: int = 1 << 16, windows: int = 64) -> float | None:
    """Fraction of the file's pages resident in the page cache (``mincore`` on a read-only
    mapping; files above ``max_pages`` pages are sampled in ``windows`` evenly spaced windows).
    None where it cannot be measured."""
    if _MINCORE is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        os.close(fd)
        return None
    os.close(fd)
    page = mmap.PAGESIZE
    pages = -(-size // page)
    arr = np.frombuffer(mm, dtype=np.uint8)
    try:
        base = arr.ctypes.data
        if pages <= max_pages:
            spans = [(0, pages)]
        else:
            per = max(1, max_pages // windows)
            step = (pages - per) / max(1, windows - 1)
            spans = [(int(round(i * step)), per) for i in range(windows)]
        resident = total = 0
        for first, count in spans:
            count = min(count, pages - first)
            vec = (ctypes.c_ubyte * count)()
            length = min(count * page, size - first * page)
            if _MINCORE(ctypes.c_void_p(base + first * page), ctypes.c_size_t(length), vec) != 0:
                return None
            resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
            total += count
        return resident / total if total else 1.0
    finally:
        del arr
        mm.close()


def probe(path: str | os.PathLike, *, residency: bool = True) -> dict:
    """Where a file lives and how to read it: ``{"path", "mount", "fstype", "source", "kind"
    (tmpfs/local/network), "size", "cached_fraction", "threads", "chunk_bytes"}`` (the last two
    from :func:`tune`). ``residency=False`` skips the page-cache scan (``cached_fraction`` None):
    the zero-copy CPU path does not need it, and it costs ~10 ms per GB."""
    path = os.fspath(path)
    mnt, fstype, src = mount_of(path)
    kind = classify_fstype(fstype)
    try:
        size = os.stat(path).st_size
    except OSError:
        size = None
    cached = 1.0 if kind == "tmpfs" else (cached_fraction(path) if residency and size is not None else None)
    threads, chunk = tune(kind, cached)
    return {"path": path, "mount": mnt, "fstype": fstype, "source": src, "kind": kind, "size": size,
            "cached_fraction": cached, "threads": threads, "chunk_bytes": chunk}


__all__ = ["cached_fraction", "classify_fstype", "probe", "tune"]
