"""forgeline's fast loader: safetensors weights into CPU memory or onto a CUDA device.

Usage::

    from pipeline.loading import load, load_with_report, LoadReport

    sd = load("model.safetensors")                               # CPU: zero-copy, memory-mapped
    sd = load("ckpt_dir/", device="cuda:0", dtype=torch.bfloat16)  # folder / index of shards
    sd = load("s3://bucket/models/digits/v1")                     # S3 prefix (published version)
    sd = load("digits-int8/latest", storage=store)                # published, dequantized on load
    sd, rep = load_with_report("digits/latest", "cuda", storage=store, verify=True)
    print(rep.summary())                                          # read/copy/total seconds and GB/s
    with torch.device("meta"):
        m = build_model(...)
    load(path, module=m)                                          # fill the meta module, no copies

Sources
-------
* a ``.safetensors`` file; a folder (its ``manifest.json`` when it is a published forgeline version,
  else its ``*.safetensors.index.json``, else every ``*.safetensors`` in it); an index file;
* ``s3://bucket/prefix`` (a file, an index, or a folder as above). Credentials come from boto3's usual
  chain (the environment); the endpoint from ``FORGELINE_S3_ENDPOINT_URL``, or from ``storage`` when
  it is an :class:`~pipeline.s3.S3Storage` (whose client, retries and pool are then reused when the
  bucket matches);
* ``<model>/<version>`` published in ``storage`` (``latest`` picks the newest). A quantized version
  (manifest metadata ``quantization``, or shards whose ``__metadata__`` carries ``forgeline.quant``) is
  dequantized on load unless ``dequantize=False``. ``verify=True`` checks each shard's sha256 against
  the manifest (plain files: against ``expected_sha256={file name: hex}``).
* Any other string, with ``storage`` given, is a key (file, index or folder) inside that storage.

Every header is read and validated before anything is allocated (:func:`parse_header`): a truncated
file, a header length past the end of the file, bad JSON, an unknown dtype, a shape that does not
match its byte span, offsets beyond the file or overlapping (gaps are allowed), an index naming a
missing shard or a tensor its shard lacks, the same tensor in two shards. All raise
:class:`LoadError` (a ``ValueError``) naming the file. An S3 object replaced while it is loaded is
detected through its ETag (``If-Match`` on every ranged GET) and raises ``LoadError(... "changed
during load")``; device memory already allocated is then released.

I/O strategy
------------
:func:`probe` classifies the file's filesystem from ``/proc/self/mountinfo`` (``tmpfs``; local:
ext4/xfs/btrfs/...; network: nfs*/cifs/smb*/ceph/glusterfs/lustre/gpfs/beegfs/9p/virtiofs/fuse.*)
and measures page-cache residency with ``mincore(2)`` over a sample of the file's pages.

Tuning by storage type (:func:`_tune`; ``threads``/``chunk_bytes`` override it):

==============================  ================================  ===========  ====================
storage (``probe``)             page cache (``mincore`` sample)   threads      chunk (request size)
==============================  ================================  ===========  ====================
tmpfs / ramfs                   (always resident)                 ``M``        4 MiB
local (ext4, xfs, btrfs, ...)   >= 50% resident                   ``M``        8 MiB
local                           < 50% (cold)                      8            16 MiB + FADV_SEQUENTIAL
network (nfs, cifs, ceph, ...)  -                                 16           16 MiB
S3                              -                                 16           8 MiB (ranged GETs)
==============================  ================================  ===========  ====================

Method by destination:

==================================  ==========================================================================
destination / source                method (``LoadReport.path``)
==================================  ==========================================================================
cpu, local (default)                ``mmap-zero-copy``: MAP_PRIVATE mapping + ``torch.frombuffer`` views, no
                                    copy, copy-on-write; ``MADV_WILLNEED`` read-ahead when not fully cached
cpu, local, ``owned=True``          ``pread-owned``: parallel ``preadv`` scattering each request straight
                                    into fresh per-tensor memory (threads release the GIL)
cuda, local                         ``pread-pinned-streams``: ``pread`` into a pinned ring (on tmpfs this is
                                    the memcpy out of shmem), ``copy_(non_blocking=True)`` on 4 streams into
                                    one device allocation per shard
cpu, S3 / other storage             ``s3-ranged`` / ``storage-ranged``: parallel ranged GETs, copied into
                                    per-tensor memory as they arrive
cuda, S3 / other storage            ``s3-ranged-pinned-streams``: GETs -> pinned ring -> async H2D
cpu, ``method="ring"``              ``pread-ring``: the GPU pipeline with a CPU destination (tests, benches)
==================================  ==========================================================================

The ring (and the number of requests in flight) is bounded by ``staging_bytes``: threads are capped
at ``staging_bytes // chunk_bytes`` slots (at least two; the chunk shrinks if the budget is smaller).

``M`` = ``min(16, max(2, cpu_count))``: copies out of the page cache are memory-bandwidth bound
(one thread ~6 GB/s, 16 threads ~18 GB/s on the reference H100 host). ``threads``/``chunk_bytes``
override the table. O_DIRECT is deliberately not used: it loses the page cache, and parallel
buffered ``pread`` with large requests reaches the disk's rate when cold (see ``ANCHORS.md``).
Registering the file mapping with ``cudaHostRegister`` was measured at 0.65-0.93 s per 16 GB before
any copy, so the pinned ring is used on tmpfs too.

Reads are planned by :func:`plan_reads`: adjacent tensors (gaps up to ``max_gap``) are merged into
requests of ``chunk_bytes`` and large tensors are split across requests. In flight at any time:
at most ``staging_bytes // chunk_bytes`` requests (the ring's slots); slot ``i % n`` is reused only
after the part that used it has been handed over and its copy event has completed, so host memory
stays bounded by ``staging_bytes`` and the model never exists twice in RAM. On the GPU: one device
allocation per shard (tensors are views into it) laid out as in the file when every tensor is
aligned, else packed at 256-byte alignment; the free memory is checked before anything is
allocated. Without a cast the GPU peak is the model itself (no device staging: copies land in
place). A dtype cast runs on the device per shard as soon as that shard has arrived (its raw buffer
is then freed), so the peak is the larger of the raw and the cast model plus one shard. Quantized
versions are dequantized on the device after the (small) quantized tensors have arrived: peak =
quantized + dequantized model.

CPU destinations are always one allocation per tensor (independent storages, like
``safetensors.torch.load_file``), so that saving or freeing one tensor does not drag a whole shard.
In the zero-copy path a tensor whose offset is not a multiple of its element size is copied into
fresh memory instead of being viewed (a misaligned view would break vectorized kernels); the
mapping stays alive as long as any tensor viewing it (each tensor holds a reference to a
``memoryview`` of the ``mmap``, which in turn blocks ``mmap.close``).

Timing (``LoadReport``): ``seconds_read`` is the wall-clock span from the first read issued to the
last completed; ``seconds_copy`` the span from the first copy into the destination (H2D on CUDA) to
the final synchronize; both overlap each other. The zero-copy path reads lazily on first touch, so
its read/copy times are ~0 and ``cached_fraction`` tells how much will come from RAM.

This module never imports dagster.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import mmap
import os
import re
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from pipeline import export as _export
from pipeline import quantize as _quantize
from pipeline._libc import libc_function
from pipeline.metrics import Latencies
from pipeline.storage import IntegrityError, ObjectNotFound, Storage, StorageError, check_key, join

MiB = 1 << 20
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
DEFAULT_STAGING_BYTES = 256 * MiB
DEFAULT_STREAMS = 4
DEVICE_ALIGN = 256  # alignment of tensors in a packed device layout (cudaMalloc gives 256+)
_MAX_PIECES = 500  # tensors per read request: preadv takes at most IOV_MAX (1024) buffers
_S3_HEADER_PROBE = 64 * 1024  # first ranged GET of a remote shard: the header usually fits
S3_ENDPOINT_ENV = "FORGELINE_S3_ENDPOINT_URL"

# safetensors dtype code -> (torch attribute, element size in bytes); None size = sub-byte
_DTYPE_TABLE: dict[str, tuple[str, int | None]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1),
    "F8_E5M2": ("float8_e5m2", 1), "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1), "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8), "C64": ("complex64", 8),
    "F4": ("", None), "F6_E2M3": ("", None), "F6_E3M2": ("", None),
}
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, attr) for code, (attr, size) in _DTYPE_TABLE.items() if size and hasattr(torch, attr)
}

_TMPFS = frozenset({"tmpfs", "ramfs", "hugetlbfs", "devtmpfs"})
_NETWORK = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "9p", "afs", "virtiofs", "fuse", "orangefs", "pvfs2", "ocfs2", "gfs2", "wekafs", "panfs",
})


# ---------------------------------------------------------------------------------------------
# Errors, header
# ---------------------------------------------------------------------------------------------


class LoadError(ValueError):
    """Bad input to the loader (or an S3 object changed mid-load). ``path`` names the file."""

    def __init__(self, path: Any, message: str):
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


class TensorInfo(NamedTuple):
    """One tensor of a safetensors file; ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: torch.dtype
    code: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        return _DTYPE_TABLE[self.code][1] or 1


def _dup_check(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(Exception):
    pass


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _header_length(first8: bytes, file_size: int, name: str) -> int:
    if file_size < 8 or len(first8) < 8:
        raise LoadError(name, f"truncated: {min(file_size, len(first8))} bytes, a safetensors file starts "
                              "with an 8-byte header length")
    n = int.from_bytes(first8[:8], "little")
    if n > file_size - 8:
        raise LoadError(name, f"header length {n} runs past the end of the file ({file_size} bytes): "
                              "truncated, or not a safetensors file")
    if n > MAX_HEADER_BYTES:
        raise LoadError(name, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n < 2:
        raise LoadError(name, f"header length {n} is too small for a JSON object")
    return n


def parse_header(buf_or_file: Any, file_size: int, name: str) -> tuple[int, list[TensorInfo], dict[str, str]]:
    """Validate a safetensors header; returns ``(header_len, entries, metadata)``.

    ``buf_or_file``: the file's first bytes (at least ``8 + header_len`` of them), an open binary
    file, a file descriptor or a path. ``header_len`` is the JSON length (data starts at
    ``8 + header_len``); ``entries`` are sorted by offset with absolute ``start``/``end``;
    ``metadata`` is ``__metadata__`` (str -> str). Every problem raises :class:`LoadError` naming
    ``name``; nothing is allocated beyond the header bytes.
    """
    read = _byte_reader(buf_or_file)
    try:
        n = _header_length(read(0, 8), file_size, name)
        raw = read(8, n)
    finally:
        close = getattr(read, "close", None)
        if close:
            close()
    if len(raw) < n:
        raise LoadError(name, f"truncated: header of {n} bytes, only {len(raw)} available")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoadError(name, f"header is not valid UTF-8 ({e})") from None
    if not text.startswith("{"):
        raise LoadError(name, "header is not a JSON object (does not start with '{')")
    try:
        header = json.loads(text, object_pairs_hook=_dup_check)
    except _DuplicateKey as e:
        raise LoadError(name, f"header names {e.args[0]!r} twice") from None
    except json.JSONDecodeError as e:
        raise LoadError(name, f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise LoadError(name, "header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise LoadError(name, "__metadata__ must map strings to strings")
    data_start = 8 + n
    data_size = file_size - data_start
    entries: list[TensorInfo] = []
    for tname, e in header.items():
        what = f"tensor {tname!r}"
        if not isinstance(e, dict):
            raise LoadError(name, f"{what}: entry is not a JSON object")
        code, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if code not in _DTYPE_TABLE:
            raise LoadError(name, f"{what}: unknown dtype {code!r}")
        if code not in DTYPES:
            raise LoadError(name, f"{what}: dtype {code} is not supported by torch {torch.__version__}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise LoadError(name, f"{what}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise LoadError(name, f"{what}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
        expected = math.prod(shape) * _DTYPE_TABLE[code][1]
        begin, end = offsets
        if end - begin != expected:
            raise LoadError(name, f"{what}: shape {shape} x {code} is {expected} bytes but data_offsets "
                                  f"{offsets} span {end - begin} (shape/size mismatch)")
        if end > data_size:
            raise LoadError(name, f"{what}: data_offsets {offsets} out of range: the data section has "
                                  f"{max(data_size, 0)} bytes (file of {file_size}; truncated?)")
        entries.append(TensorInfo(tname, DTYPES[code], code, tuple(shape), data_start + begin, data_start + end))
    entries.sort(key=lambda t: (t.start, t.end))
    prev: TensorInfo | None = None
    for t in entries:
        if t.nbytes == 0:
            continue
        if prev is not None and t.start < prev.end:
            raise LoadError(name, f"tensors {prev.name!r} and {t.name!r} overlap (bytes "
                                  f"[{prev.start - data_start}, {prev.end - data_start}) and "
                                  f"[{t.start - data_start}, {t.end - data_start}))")
        prev = t
    return n, entries, dict(metadata)


def _byte_reader(src: Any) -> Callable[[int, int], bytes]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        mv = memoryview(src).cast("B") if isinstance(src, memoryview) else memoryview(src)
        return lambda off, n: bytes(mv[off : off + n])
    if isinstance(src, (str, os.PathLike)):
        fd = os.open(src, os.O_RDONLY)

        def read_path(off: int, n: int) -> bytes:
            return _pread_all(fd, n, off)

        read_path.close = lambda: os.close(fd)  # type: ignore[attr-defined]
        return read_path
    fd = src if isinstance(src, int) else src.fileno()
    return lambda off, n: _pread_all(fd, n, off)


def _pread_all(fd: int, n: int, off: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, off + got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# Read planning and the staging pipeline (pure / CPU-testable)
# ---------------------------------------------------------------------------------------------

Piece = tuple[str, int, int, int]  # (tensor name, offset in the read, offset in the tensor, bytes)
Read = tuple[int, int, list[Piece]]  # (file offset, length, pieces)


def plan_reads(
    entries: Sequence[Any],
    chunk_bytes: int,
    *,
    max_gap: int = 1 * MiB,
    max_pieces: int = _MAX_PIECES,
    cover: tuple[int, int] | None = None,
) -> list[Read]:
    """Plan the read requests for ``entries`` (objects with ``name``/``start``/``end`` or
    ``(name, start, end)`` tuples, absolute offsets, non-overlapping).

    Tensors separated by at most ``max_gap`` bytes are read in one request (the gap bytes come
    along); requests are at most ``chunk_bytes`` long, so large tensors are split over several and
    small ones share one; a request never carries more than ``max_pieces`` pieces. Each request is
    ``(offset, length, [(tensor, src_off, dst_off, n)])``: ``n`` bytes at ``src_off`` in the request
    belong at ``dst_off`` in the tensor. ``cover=(lo, hi)`` instead reads every byte of
    ``[lo, hi)`` (gaps and header included, e.g. to hash the file on the way).
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    items = []
    for e in entries:
        name, start, end = (e.name, e.start, e.end) if hasattr(e, "start") else e
        if end > start:
            items.append((start, end, name))
    items.sort()
    # The byte stream to read, as segments (pos, n, name or None for gap bytes, tensor start);
    # None separates runs that are not read together.
    segs: list[tuple[int, int, str | None, int] | None] = []
    if cover is not None:
        pos = cover[0]
        for start, end, name in items:
            if start < pos or end > cover[1]:
                raise ValueError(f"tensor {name!r} [{start}, {end}) is outside cover {cover} or overlaps")
            if start > pos:
                segs.append((pos, start - pos, None, 0))
            segs.append((start, end - start, name, start))
            pos = end
        if cover[1] > pos:
            segs.append((pos, cover[1] - pos, None, 0))
    else:
        prev_end = None
        for start, end, name in items:
            if prev_end is not None:
                if start < prev_end:
                    raise ValueError(f"tensor {name!r} overlaps the previous one")
                if start - prev_end > max_gap:
                    segs.append(None)
                elif start > prev_end:
                    segs.append((prev_end, start - prev_end, None, 0))
            segs.append((start, end - start, name, start))
            prev_end = end

    reads: list[Read] = []
    cur_off = cur_len = 0
    pieces: list[Piece] = []
    active = False

    def flush() -> None:
        nonlocal active, pieces
        if active and cur_len > 0 and (pieces or cover is not None):
            reads.append((cur_off, cur_len, pieces))
        active, pieces = False, []

    for seg in segs:
        if seg is None:
            flush()
            continue
        pos, n, name, tstart = seg
        if name is None and not active and cover is None:
            continue  # never start a request with gap bytes
        if name is not None and len(pieces) >= max_pieces:
            flush()
        while n > 0:
            if not active:
                cur_off, cur_len, active = pos, 0, True
            room = chunk_bytes - cur_len
            if room <= 0:
                flush()
                if name is None and cover is None:
                    break
                continue
            take = min(room, n)
            if name is not None:
                pieces.append((name, cur_len, pos - tstart, take))
            cur_len += take
            pos += take
            n -= take
    flush()
    return reads


def ring_slot(part_index: int, n_slots: int) -> int:
    """The staging slot of a part: ``i % n``. :func:`_pump` submits part ``i`` only after part
    ``i - n`` (the slot's previous user) has been handed over, so a slot is never written while
    its bytes are still wanted (the copy out of it is awaited through its event first)."""
    return part_index % n_slots


def _pump(parts: Sequence[Any], work: Callable[[int, Any], Any], on_done: Callable[[int, Any], None],
          *, threads: int, window: int) -> None:
    """Run ``work(i, part)`` on ``threads`` threads with at most ``window`` parts outstanding;
    ``on_done(i, result)`` is called in the calling thread in part order. On any error the
    remaining parts are cancelled, running ones awaited, and the error re-raised."""
    if not parts:
        return
    window = max(1, window)
    threads = max(1, min(threads, window, len(parts)))
    pending: deque = deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="forgeline-load")
    try:
        for i, part in enumerate(parts):
            if len(pending) >= window:
                j, f = pending.popleft()
                on_done(j, f.result())
            pending.append((i, pool.submit(work, i, part)))
        while pending:
            j, f = pending.popleft()
            on_done(j, f.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _tune(kind: str, cached: float | None, cpus: int | None = None) -> tuple[int, int]:
    """(threads, chunk_bytes) for a storage kind; see the table in the module docstring."""
    cpus = cpus or os.cpu_count() or 1
    mem_bound = min(16, max(2, cpus))
    if kind == "tmpfs":
        return mem_bound, 4 * MiB
    if kind == "network":
        return 16, 16 * MiB
    if kind == "s3":
        return 16, 8 * MiB
    if cached is not None and cached >= 0.5:
        return mem_bound, 8 * MiB
    return 8, 16 * MiB


# ---------------------------------------------------------------------------------------------
# Storage-type detection
# ---------------------------------------------------------------------------------------------


def _unescape_mount(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _mount_of(path: str) -> tuple[str, str, str]:
    """(mount point, fstype, source) of the filesystem holding ``path``."""
    real = os.path.realpath(path)
    best = ("/", "unknown", "")
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return best
    best_len = -1
    for line in lines:
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        mnt = _unescape_mount(fields[4])
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= best_len:  # later lines shadow earlier mounts on the same point
            best, best_len = (mnt, tail[0], tail[1] if len(tail) > 1 else ""), len(mnt)
    return best


def classify_fstype(fstype: str) -> str:
    """``"tmpfs"``, ``"network"`` or ``"local"``."""
    if fstype in _TMPFS:
        return "tmpfs"
    if fstype in _NETWORK or fstype.startswith("fuse.") or fstype.startswith("nfs"):
        return "network"
    return "local"


_MINCORE = libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)])


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
    """Where a file lives and how to read it: ``{"path", "mount", "fstype", "kind" (tmpfs/local/
    network), "size", "cached_fraction", "threads", "chunk_bytes"}`` (the last two from the table
    in the module docstring). ``residency=False`` skips the page-cache scan (``cached_fraction``
    None): the zero-copy CPU path does not need it, and it costs ~10 ms per GB."""
    path = os.fspath(path)
    mnt, fstype, src = _mount_of(path)
    kind = classify_fstype(fstype)
    try:
        size = os.stat(path).st_size
    except OSError:
        size = None
    cached = 1.0 if kind == "tmpfs" else (cached_fraction(path) if residency and size is not None else None)
    threads, chunk = _tune(kind, cached)
    return {"path": path, "mount": mnt, "fstype": fstype, "source": src, "kind": kind, "size": size,
            "cached_fraction": cached, "threads": threads, "chunk_bytes": chunk}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a load did and how fast. Pass one as ``report=`` to have it filled in."""

    tensors: int = 0
    bytes: int = 0  # tensor bytes read from the source (before any cast/dequantization)
    seconds_total: float = 0.0
    seconds_read: float = 0.0
    seconds_copy: float = 0.0
    gbps: float = 0.0  # bytes / seconds_total / 1e9
    source_kind: str = ""  # tmpfs / local / network / s3 / storage
    path: str = ""  # mmap-zero-copy / pread-owned / pread-pinned-streams / s3-ranged / ...
    threads: int = 0
    chunk_bytes: int = 0
    cached_fraction: float | None = None  # page-cache residency of local sources (None: remote)
    shards: int = 0
    device: str = "cpu"
    streams: int = 0
    staging_bytes: int = 0
    verified: int = 0  # shards whose sha256 was checked
    dequantized: bool = False
    seconds_header: float = 0.0
    seconds_verify: float = 0.0
    source: str = ""
    chunk_seconds: list[float] = field(default_factory=list)  # per read (a chunk, or a mapped shard)

    @property
    def read_gbps(self) -> float:
        return self.bytes / self.seconds_read / 1e9 if self.seconds_read > 0 else 0.0

    @property
    def copy_gbps(self) -> float:
        return self.bytes / self.seconds_copy / 1e9 if self.seconds_copy > 0 else 0.0

    def summary(self) -> str:
        cached = "" if self.cached_fraction is None else f", {self.cached_fraction:.0%} cached"
        return (f"{self.tensors} tensors, {self.bytes / 1e9:.3f} GB from {self.source_kind}{cached} "
                f"via {self.path} ({self.threads} threads, {self.chunk_bytes // MiB} MiB chunks) -> "
                f"{self.device}: read {self.seconds_read:.3f}s ({self.read_gbps:.2f} GB/s), copy "
                f"{self.seconds_copy:.3f}s ({self.copy_gbps:.2f} GB/s), total {self.seconds_total:.3f}s "
                f"({self.gbps:.2f} GB/s)")


class _Span:
    """Thread-safe wall-clock span: earliest start to latest end of many intervals."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self._lock = threading.Lock()

    def add(self, t0: float, t1: float) -> None:
        with self._lock:
            self.lo = min(self.lo, t0)
            self.hi = max(self.hi, t1)

    @property
    def seconds(self) -> float:
        return max(0.0, self.hi - self.lo) if self.hi >= self.lo else 0.0


# ---------------------------------------------------------------------------------------------
# Source resolution
# ---------------------------------------------------------------------------------------------


@dataclass
class _Shard:
    display: str  # path or uri, for messages
    file: str  # file name, for expected_sha256 lookups
    path: str | None = None  # local filesystem path
    store: Storage | None = None  # remote reader
    key: str | None = None
    sha256: str | None = None  # expected
    size: int | None = None  # expected (manifest), then actual
    names: list[str] | None = None  # tensors the index/manifest places here
    etag: str | None = None
    header_len: int = 0
    entries: list[TensorInfo] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    kind: str = ""  # tmpfs / local / network / s3 / storage
    cached: float | None = None


@dataclass
class _Source:
    display: str
    kind: str  # file / folder / index / published / s3 / storage
    shards: list[_Shard]
    quant: dict | None = None  # quantization metadata (manifest)
    complete: bool = True  # the shards are a whole model (strict dequantization)


def _is_s3(store: Any) -> bool:
    try:
        from pipeline.s3 import S3Storage
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    return isinstance(store, S3Storage)


def _s3_store_for(bucket: str, key: str, storage: Storage | None) -> tuple[Storage, str]:
    """An S3Storage reading ``s3://bucket/key`` and the key relative to it: ``storage`` itself when
    it is an S3Storage over that bucket whose prefix contains the key, else a new client
    (endpoint from ``storage`` or ``FORGELINE_S3_ENDPOINT_URL``, credentials from the environment)."""
    from pipeline.s3 import S3Storage

    if _is_s3(storage) and storage.bucket == bucket:  # type: ignore[union-attr]
        p = storage.prefix  # type: ignore[union-attr]
        if not p:
            return storage, key  # type: ignore[return-value]
        if key == p or key.startswith(p + "/"):
            return storage, key[len(p) + 1 :]  # type: ignore[return-value]
    kw: dict[str, Any] = {}
    if _is_s3(storage):
        spec, env = storage.spec()  # type: ignore[union-attr]
        kw = {"endpoint_url": spec.get("endpoint_url"), "region_name": spec.get("region_name"),
              "aws_access_key_id": env.get("AWS_ACCESS_KEY_ID"),
              "aws_secret_access_key": env.get("AWS_SECRET_ACCESS_KEY"),
              "aws_session_token": env.get("AWS_SESSION_TOKEN")}
    else:
        kw = {"endpoint_url": os.environ.get(S3_ENDPOINT_ENV) or None,
              "region_name": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None}
    return S3Storage(bucket, "", **kw), key


def _read_json(display: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(display, f"not valid JSON: {e}") from None


def _index_shards(display: str, index: Any) -> list[tuple[str, list[str]]]:
    """[(shard file, tensor names)] of a HF-style index, in first-appearance order."""
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise LoadError(display, "index has no weight_map (tensor name -> shard file)")
    files: dict[str, list[str]] = {}
    for tname, file in wm.items():
        if not isinstance(file, str) or not file or file.startswith("/") or ".." in file.split("/"):
            raise LoadError(display, f"weight_map[{tname!r}] = {file!r} is not a relative file name")
        files.setdefault(file, []).append(tname)
    return list(files.items())


def _manifest_shards(display: str, manifest: Any) -> list[dict]:
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not shards:
        raise LoadError(display, "manifest lists no shards")
    for s in shards:
        if not isinstance(s, dict) or not isinstance(s.get("file"), str) or "/" in s["file"] or ".." in s["file"]:
            raise LoadError(display, f"manifest shard entry {s!r} is malformed")
    return shards


def _quant_of(manifest: dict) -> dict | None:
    md = manifest.get("metadata") if isinstance(manifest, dict) else None
    q = md.get("quantization") if isinstance(md, dict) else None
    return q if isinstance(q, dict) else None


def _local_source(path: str) -> _Source:
    p = Path(path)
    if p.is_dir():
        manifest = p / _export.MANIFEST_NAME
        if manifest.is_file():
            m = _read_json(str(manifest), manifest.read_bytes())
            if isinstance(m, dict) and m.get("format") == _export.FORMAT:
                return _local_manifest_source(str(p), m, str(manifest))
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if indexes:
            pick = p / _export.INDEX_NAME if (p / _export.INDEX_NAME) in indexes else indexes[0]
            if len(indexes) > 1 and pick != p / _export.INDEX_NAME:
                raise LoadError(path, f"several index files ({', '.join(i.name for i in indexes)}); name one")
            return _local_index_source(str(pick))
        files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if not files:
            raise LoadError(path, "folder holds no manifest.json, no *.safetensors.index.json and no *.safetensors")
        return _Source(path, "folder", [_Shard(str(f), f.name, path=str(f)) for f in files])
    if not p.exists():
        raise LoadError(path, "no such file or directory")
    if p.name == _export.MANIFEST_NAME:
        m = _read_json(path, p.read_bytes())
        if not isinstance(m, dict) or m.get("format") != _export.FORMAT:
            raise LoadError(path, f"not a {_export.FORMAT} manifest")
        return _local_manifest_source(str(p.parent), m, path)
    if p.name.endswith(".json"):
        return _local_index_source(path)
    return _Source(path, "file", [_Shard(path, p.name, path=path)], complete=False)


def _local_index_source(index_path: str) -> _Source:
    p = Path(index_path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise LoadError(index_path, f"cannot read index: {e.strerror or e}") from None
    shards = []
    for file, names in _index_shards(index_path, _read_json(index_path, data)):
        sp = p.parent / file
        if not sp.is_file():
            raise LoadError(str(sp), f"shard {file!r} named by the index {index_path} is missing")
        shards.append(_Shard(str(sp), file, path=str(sp), names=names))
    return _Source(index_path, "index", shards)


def _local_manifest_source(folder: str, m: dict, display: str) -> _Source:
    shards = []
    for s in _manifest_shards(display, m):
        sp = Path(folder) / s["file"]
        if not sp.is_file():
            raise LoadError(str(sp), f"shard {s['file']!r} listed in {display} is missing")
        shards.append(_Shard(str(sp), s["file"], path=str(sp), sha256=s.get("sha256"), size=s.get("bytes"),
                             names=list(s.get("tensors") or []) or None))
    return _Source(folder, "published", shards, quant=_quant_of(m))


def _store_shard(store: Storage, key: str, file: str, **kw: Any) -> _Shard:
    """A shard inside a storage: a local path when the storage has one, else a remote reader
    (S3: the ETag of a HEAD pins every later read to this version of the object)."""
    display = store.uri(key)
    path = store.local_path(key)
    if path is not None:
        if not Path(path).is_file():
            raise LoadError(display, f"shard {file!r} is missing")
        return _Shard(str(path), file, path=str(path), **kw)
    try:
        if _is_s3(store):
            etag = store.etag(key)  # type: ignore[attr-defined]
            return _Shard(display, file, store=store, key=key, etag=etag, kind="s3", **kw)
        info = store.stat(key)
        kw["size"] = kw.get("size") or info.size
        return _Shard(display, file, store=store, key=key, kind="storage", **kw)
    except ObjectNotFound:
        raise LoadError(display, f"shard {file!r} is missing") from None


def _storage_source(store: Storage, key: str, display: str | None = None) -> _Source:
    """A file, index, manifest or folder inside a storage."""
    key = key.strip("/")
    display = display or store.uri(key)
    local = store.local_path(key) if key else None
    if local is not None and Path(local).exists():
        return _local_source(str(local))
    base = key.rsplit("/", 1)[0] if "/" in key else ""
    if key.endswith(".json"):
        try:
            data = store.read(key)
        except ObjectNotFound:
            raise LoadError(display, "no such object") from None
        doc = _read_json(display, data)
        if key.rsplit("/", 1)[-1] == _export.MANIFEST_NAME:
            if not isinstance(doc, dict) or doc.get("format") != _export.FORMAT:
                raise LoadError(display, f"not a {_export.FORMAT} manifest")
            return _store_manifest_source(store, base, doc, display)
        shards = [_store_shard(store, join(base, f), f, names=names) for f, names in _index_shards(display, doc)]
        return _Source(display, "index", shards)
    if key.endswith(".safetensors"):
        try:
            store.stat(key)
            return _Source(display, "s3" if _is_s3(store) else "storage",
                           [_store_shard(store, key, key.rsplit("/", 1)[-1])], complete=False)
        except (ObjectNotFound, LoadError):
            pass  # maybe a "folder" named *.safetensors; fall through
    try:
        objs = store.list(key) if key else store.list()
    except ValueError as e:
        raise LoadError(display, str(e)) from None
    children = {o.key[len(key) + 1 :] if key else o.key: o for o in objs}
    children = {n: o for n, o in children.items() if n and "/" not in n}
    if not children:
        raise LoadError(display, "no such object or prefix")
    if _export.MANIFEST_NAME in children:
        doc = _read_json(display, store.read(join(key, _export.MANIFEST_NAME)))
        if isinstance(doc, dict) and doc.get("format") == _export.FORMAT:
            return _store_manifest_source(store, key, doc, display)
    indexes = sorted(n for n in children if n.endswith(".safetensors.index.json"))
    if indexes:
        pick = _export.INDEX_NAME if _export.INDEX_NAME in indexes else indexes[0]
        if len(indexes) > 1 and pick != _export.INDEX_NAME:
            raise LoadError(display, f"several index files ({', '.join(indexes)}); name one")
        return _storage_source(store, join(key, pick))
    files = sorted(n for n in children if n.endswith(".safetensors"))
    if not files:
        raise LoadError(display, "no manifest.json, *.safetensors.index.json or *.safetensors under this prefix")
    return _Source(display, "folder", [_store_shard(store, join(key, f), f) for f in files])


def _store_manifest_source(store: Storage, prefix: str, m: dict, display: str) -> _Source:
    shards = [_store_shard(store, join(prefix, s["file"]), s["file"], sha256=s.get("sha256"), size=s.get("bytes"),
                           names=list(s.get("tensors") or []) or None) for s in _manifest_shards(display, m)]
    return _Source(display, "published", shards, quant=_quant_of(m))


_PUBLISHED_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._+-]*)/([A-Za-z0-9][A-Za-z0-9._+-]*)$")


def resolve(source: Any, storage: Storage | None = None) -> _Source:
    """Turn ``source`` into the list of shards to load (no tensor bytes are read)."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise LoadError(source, "source must be a path, an s3:// URI or <model>/<version>")
    if source.startswith("s3://"):
        rest = source[5:]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise LoadError(source, "s3:// URI without a bucket")
        try:
            store, rel = _s3_store_for(bucket, key.strip("/"), storage)
            if rel:
                check_key(rel.strip("/"))
        except ValueError as e:
            raise LoadError(source, str(e)) from None
        return _storage_source(store, rel, source)
    m = _PUBLISHED_RE.match(source)
    if storage is not None and m and not os.path.exists(source):
        model, version = m.groups()
        try:
            if version == "latest":
                latest = _export.latest_version(storage, model)
                if latest is None:
                    raise LoadError(f"{model}/latest", f"no published version of {model!r} in {storage.uri()}")
                version = latest
            manifest = _export.read_manifest(storage, model, version)
        except _export.VersionNotFound as e:
            manifest = None
            err = e
        except _export.ExportError as e:
            raise LoadError(f"{model}/{version}", str(e)) from None
        if manifest is not None:
            prefix = _export.version_prefix(model, version)
            src = _store_manifest_source(storage, prefix, manifest, f"{model}/{version}")
            return src
        if not storage.list(source):
            raise LoadError(source, str(err)) from None
    if os.path.exists(source):
        return _local_source(source)
    if storage is not None:
        try:
            check_key(source.strip("/"))
        except ValueError:
            raise LoadError(source, "no such file or directory") from None
        return _storage_source(storage, source)
    raise LoadError(source, "no such file or directory (pass storage= for <model>/<version> or storage keys)")


# ---------------------------------------------------------------------------------------------
# Headers
# ---------------------------------------------------------------------------------------------


def _remote_get(shard: _Shard, off: int, n: int, *, exact: bool = True) -> tuple[bytes, int]:
    """``n`` bytes at ``off`` of a remote shard and the object's size. S3: one version only
    (If-Match on the ETag), transient failures retried with backoff by S3Storage (and a dropped
    body resumed from the last byte)."""
    store, key = shard.store, shard.key
    assert store is not None and key is not None
    if n <= 0:
        return b"", shard.size or 0
    if shard.kind == "s3":
        try:
            data, _, size = store._get(key, off, off + n - 1, shard.etag)  # type: ignore[attr-defined]
        except IntegrityError as e:
            raise LoadError(shard.display, f"object changed during load (ETag {shard.etag}): {e}") from None
    else:
        data = _retry(lambda: store.read_range(key, off, n), shard.display)
        size = shard.size or 0
    if exact and len(data) != n:
        raise LoadError(shard.display, f"got {len(data)} of {n} bytes at offset {off}: object truncated "
                                       "or changed during load")
    return data, size


def _remote_get_into(shard: _Shard, off: int, out: Any) -> None:
    """Fill the writable buffer ``out`` with ``len(out)`` bytes at ``off`` of a remote shard. S3
    pieces land in place as they arrive (no assembled copy in between); other storages read the
    range and copy it once."""
    store, key = shard.store, shard.key
    assert store is not None and key is not None
    n = len(out)
    if shard.kind == "s3":
        try:
            got, _, _ = store.get_into(key, off, out, shard.etag)  # type: ignore[attr-defined]
        except IntegrityError as e:
            raise LoadError(shard.display, f"object changed during load (ETag {shard.etag}): {e}") from None
    else:
        data = _retry(lambda: store.read_range(key, off, n), shard.display)
        got = len(data)
        out[:got] = np.frombuffer(data, dtype=np.uint8)
    if got != n:
        raise LoadError(shard.display, f"got {got} of {n} bytes at offset {off}: object truncated "
                                       "or changed during load")


def _retry(fn: Callable[[], bytes], what: str, attempts: int = 4) -> bytes:
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (ObjectNotFound, IntegrityError):
            raise
        except StorageError:
            if attempt == attempts:
                raise
            time.sleep(min(4.0, 0.25 * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")  # pragma: no cover


def _read_header(shard: _Shard) -> None:
    if shard.path is not None:
        try:
            fd = os.open(shard.path, os.O_RDONLY)
        except OSError as e:
            raise LoadError(shard.display, f"cannot open: {e.strerror or e}") from None
        try:
            size = os.fstat(fd).st_size
            if shard.size is not None and size != shard.size:
                raise LoadError(shard.display, f"{size} bytes on disk, the manifest says {shard.size} "
                                               "(truncated or replaced)")
            shard.size = size
            shard.header_len, shard.entries, shard.metadata = parse_header(fd, size, shard.display)
        finally:
            os.close(fd)
        return
    probe_n = _S3_HEADER_PROBE if shard.kind == "s3" else min(_S3_HEADER_PROBE, shard.size or 0)
    first, size = _remote_get(shard, 0, probe_n, exact=False)
    if shard.size is not None and size != shard.size and shard.kind == "s3":
        raise LoadError(shard.display, f"object has {size} bytes, the manifest says {shard.size}")
    shard.size = size
    n = _header_length(first[:8], size, shard.display)
    if 8 + n > len(first):
        more, _ = _remote_get(shard, len(first), 8 + n - len(first))
        first += more
    shard.header_len, shard.entries, shard.metadata = parse_header(first, size, shard.display)


def _check_names(src: _Source) -> None:
    seen: dict[str, str] = {}
    for s in src.shards:
        have = {e.name for e in s.entries}
        if s.names is not None:
            missing = [n for n in s.names if n not in have]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise LoadError(s.display, f"tensor {missing[0]!r}{more} is placed in this shard by "
                                           f"{src.display} but the shard does not hold it")
            if src.kind == "published" and len(have) != len(s.names):
                extra = sorted(have - set(s.names))
                raise LoadError(s.display, f"holds tensors the manifest does not list: {extra[:3]}")
        for e in s.entries:
            if e.name in seen:
                raise LoadError(s.display, f"tensor {e.name!r} is also in {seen[e.name]}")
            seen[e.name] = s.display


# ---------------------------------------------------------------------------------------------
# sha256
# ---------------------------------------------------------------------------------------------


def _hash_file(path: str, chunk: int = 8 * MiB) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    mv = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while True:
            n = os.preadv(fd, [mv], off) if hasattr(os, "preadv") else os.readv(fd, [mv])
            if n <= 0:
                break
            h.update(mv[:n])  # hashlib releases the GIL for large updates: shards hash in parallel
            off += n
    finally:
        os.close(fd)
    return h.hexdigest()


def _expected_hash(shard: _Shard, expected: Mapping[str, str] | None) -> str | None:
    if expected:
        for k in (shard.file, shard.display, shard.path or "", shard.key or ""):
            if k and k in expected:
                return expected[k]
    return shard.sha256


def _mismatch(shard: _Shard, got: str, want: str) -> LoadError:
    return LoadError(shard.display, f"sha256 mismatch: the bytes hash to {got}, expected {want}")


# ---------------------------------------------------------------------------------------------
# Zero-copy CPU path
# ---------------------------------------------------------------------------------------------


def _u8(t: torch.Tensor) -> np.ndarray:
    """A writable numpy uint8 view of a contiguous CPU tensor's bytes."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)


def _mmap_shard(shard: _Shard, prefetch: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Tensors viewing a private (copy-on-write) mapping of the file; misaligned ones copied."""
    assert shard.path is not None
    fd = os.open(shard.path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size != shard.size:
            raise LoadError(shard.display, "file changed size since its header was read")
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # MAP_PRIVATE: writes never reach the file
    finally:
        os.close(fd)
    if prefetch and hasattr(mm, "madvise"):
        try:
            mm.madvise(mmap.MADV_WILLNEED)
        except OSError:
            pass
    mv = memoryview(mm)  # every tensor holds this export: the mapping lives (and cannot be
    out: dict[str, torch.Tensor] = {}  # closed) while any of them does
    copied = 0
    for e in shard.entries:
        numel = math.prod(e.shape)
        if numel == 0:
            out[e.name] = torch.empty(e.shape, dtype=e.dtype)
        elif e.start % e.itemsize == 0:
            out[e.name] = torch.frombuffer(mv, dtype=e.dtype, count=numel, offset=e.start).view(e.shape)
        else:
            t = torch.empty(e.shape, dtype=e.dtype)
            _u8(t)[:] = np.frombuffer(mv, dtype=np.uint8, count=e.nbytes, offset=e.start)
            out[e.name] = t
            copied += 1
    del mv, mm
    return out, copied


# ---------------------------------------------------------------------------------------------
# The staged pipeline (owned CPU reads, S3, CUDA)
# ---------------------------------------------------------------------------------------------


class _Copier:
    """Copies from a staging slot (or a fetched buffer) into destination memory. This one is
    synchronous (CPU destinations); :class:`_CudaCopier` issues async copies on CUDA streams."""

    streams = 0
    device = torch.device("cpu")

    def copy_part(self, i: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        for dst, src in pairs:
            dst.copy_(src)
        return None

    def wait_host(self, event: Any) -> None:
        pass

    def consumer_wait(self, events: Sequence[Any]) -> None:
        pass

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _CudaCopier(_Copier):
    def __init__(self, device: torch.device, n_streams: int):
        self.device = device
        self.streams = n_streams
        self._streams = [torch.cuda.Stream(device=device) for _ in range(n_streams)]

    def copy_part(self, i: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        s = self._streams[i % len(self._streams)]
        with torch.cuda.stream(s):  # the current stream is per thread
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)  # pinned source: cudaMemcpyAsync
            ev = torch.cuda.Event()
            ev.record(s)
        return ev

    def wait_host(self, event: Any) -> None:
        if event is not None:
            event.synchronize()  # releases the GIL

    def consumer_wait(self, events: Sequence[Any]) -> None:
        cur = torch.cuda.current_stream(self.device)
        for ev in events:
            if ev is not None:
                cur.wait_event(ev)

    def finish(self) -> None:
        cur = torch.cuda.current_stream(self.device)
        for s in self._streams:
            cur.wait_stream(s)
        torch.cuda.synchronize(self.device)

    def abort(self) -> None:
        try:
            torch.cuda.synchronize(self.device)  # no copy may still target memory about to be freed
        except Exception:  # pragma: no cover - a broken context: nothing more to do
            pass


@dataclass
class _Part:
    shard: int
    offset: int
    length: int
    copies: list[tuple[int, int, int, int]]  # (buffer index, dst offset, src offset in read, n)
    tensor_bytes: int  # bytes of tensors in this read (progress)


def _shard_layout(entries: Sequence[TensorInfo], per_tensor: bool) -> tuple[str, dict[str, tuple[int, int]], list[int], int]:
    """Destination layout of one shard: ``(kind, {name: (buffer, offset)}, buffer sizes, lo)``.

    ``per-tensor``: a buffer per tensor (CPU). ``bulk``: one buffer mirroring the file's data
    section from ``lo`` (every tensor aligned, little slack), so a read is copied in one piece.
    ``packed``: one buffer, tensors at 256-byte aligned offsets (misaligned files)."""
    live = [e for e in entries if e.nbytes]
    if per_tensor:
        return "per-tensor", {e.name: (i, 0) for i, e in enumerate(live)}, [e.nbytes for e in live], 0
    if not live:
        return "bulk", {}, [], 0
    lo, hi = min(e.start for e in live), max(e.end for e in live)
    used = sum(e.nbytes for e in live)
    if all((e.start - lo) % e.itemsize == 0 for e in live) and hi - lo - used <= max(MiB, used // 100):
        return "bulk", {e.name: (0, e.start - lo) for e in live}, [hi - lo], lo
    place, off = {}, 0
    for e in live:
        place[e.name] = (0, off)
        off += -(-e.nbytes // DEVICE_ALIGN) * DEVICE_ALIGN
    return "packed", place, [off], 0


def _part_copies(read: Read, layout: tuple[str, dict, list[int], int]) -> list[tuple[int, int, int, int]]:
    off, length, pieces = read
    kind, place, sizes, lo = layout
    if kind == "bulk" and sizes:
        a, b = max(off, lo), min(off + length, lo + sizes[0])
        return [(0, a - lo, a - off, b - a)] if b > a else []
    return [(place[name][0], place[name][1] + dst, src, n) for name, src, dst, n in pieces]


def _preadv_into(fd: int, bufs: list, off: int, display: str) -> None:
    """Fill ``bufs`` (writable buffers) from the file at ``off``; short reads continue."""
    views = [memoryview(b).cast("B") for b in bufs]
    total = sum(len(v) for v in views)
    done = 0
    while done < total:
        n = os.preadv(fd, views, off + done)
        if n <= 0:
            raise LoadError(display, f"file ended at offset {off + done} while reading (truncated during load?)")
        done += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _iovecs(copies: list[tuple[int, int, int, int]], length: int, dst: list[np.ndarray],
            scratch: np.ndarray) -> list:
    """Buffers for one preadv that scatters a read straight into the destinations; holes (gap
    bytes) go to ``scratch``."""
    out, pos = [], 0
    for b, d, s, n in sorted(copies, key=lambda c: c[2]):
        while s > pos:
            k = min(s - pos, len(scratch))
            out.append(scratch[:k])
            pos += k
        out.append(dst[b][d : d + n])
        pos = s + n
    while length > pos:
        k = min(length - pos, len(scratch))
        out.append(scratch[:k])
        pos += k
    return out


def _load_staged(
    src: _Source,
    device: torch.device,
    *,
    threads: int,
    chunk: int,
    staging: int,
    hash_remote: dict[int, str],
    direct: bool,
    per_tensor: bool,
    n_streams: int,
    progress: Callable[[int, int], None] | None,
    report: LoadReport,
    cast: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """Read every shard through the planned parts. ``direct``: local reads land straight in the
    destination (preadv scatter, CPU only); otherwise through a ring of ``staging // chunk``
    slots (pinned for CUDA) and ``copier`` copies (async on CUDA streams)."""
    cuda = device.type == "cuda"
    shards = src.shards
    slot_remote = cuda or not per_tensor  # remote parts go through the ring (else: straight to tensors)
    use_ring = not direct and (slot_remote or any(s.path is not None for s in shards))
    layouts = [_shard_layout(s.entries, per_tensor) for s in shards]
    parts: list[_Part] = []
    shard_parts: list[int] = []
    for si, s in enumerate(shards):
        cover = (0, s.size or 0) if si in hash_remote else None
        reads = plan_reads(s.entries, chunk, cover=cover)
        for r in reads:
            parts.append(_Part(si, r[0], r[1], _part_copies(r, layouts[si]), sum(pc[3] for pc in r[2])))
        shard_parts.append(len(reads))
    n_slots = max(1, staging // chunk)
    window = max(2 * threads, 4) if direct else n_slots
    total = sum(e.nbytes for s in shards for e in s.entries)

    if cuda:
        need = sum(sum(l[2]) for l in layouts)
        free, _total = torch.cuda.mem_get_info(device)
        reusable = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if need > free + reusable:
            raise LoadError(src.display, f"needs {need / 1e9:.2f} GB on {device}, {(free + reusable) / 1e9:.2f} GB free")
    copier: _Copier = _CudaCopier(device, n_streams) if cuda else _Copier()

    bufs: list[list[torch.Tensor]] = []
    out: dict[str, torch.Tensor] = {}
    ring: torch.Tensor | None = None
    sb: Any = None
    dst_np: Any = None
    fds: dict[int, int] = {}
    read_span, copy_span = _Span(), _Span()
    chunk_seconds = Latencies()
    try:
        for s, (kind, place, sizes, lo) in zip(shards, layouts):
            sb = [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]
            bufs.append(sb)
            for e in s.entries:
                if e.nbytes == 0:
                    out[e.name] = torch.empty(e.shape, dtype=e.dtype, device=device)
                    continue
                b, off = place[e.name]
                out[e.name] = sb[b][off : off + e.nbytes].view(e.dtype).view(e.shape)
        sb = None
        dst_np = [[_u8(b) for b in sb] for sb in bufs] if not cuda else None
        if use_ring:
            ring = torch.empty(n_slots * chunk, dtype=torch.uint8, pin_memory=cuda)
            ring_np = _u8(ring)
        slot_events: list[Any] = [None] * n_slots
        part_events: list[list[Any]] = [[] for _ in shards]
        for si, s in enumerate(shards):
            if s.path is not None:
                fds[si] = os.open(s.path, os.O_RDONLY)
                if s.kind == "local" and (s.cached or 0) < 0.5 and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fds[si], 0, 0, os.POSIX_FADV_SEQUENTIAL)
        local_scratch = threading.local()

        def work(i: int, p: _Part) -> Any:
            s = shards[p.shard]
            fd = fds.get(p.shard)
            if direct:
                scratch = getattr(local_scratch, "buf", None)
                if scratch is None:
                    scratch = local_scratch.buf = np.empty(min(chunk, 4 * MiB), np.uint8)
                t0 = time.perf_counter()
                assert fd is not None and dst_np is not None
                _preadv_into(fd, _iovecs(p.copies, p.length, dst_np[p.shard], scratch), p.offset, s.display)
                t1 = time.perf_counter()
                read_span.add(t0, t1)
                chunk_seconds.add(t1 - t0)
                return None
            slot = ring_slot(i, n_slots)
            sv: Any = None
            if use_ring:
                copier.wait_host(slot_events[slot])  # the slot's previous copy has left it
                sv = ring_np[slot * chunk : slot * chunk + p.length]
            t0 = time.perf_counter()
            keep: Any = None
            in_place = False
            if fd is not None:
                _preadv_into(fd, [sv], p.offset, s.display)
            elif slot_remote:
                _remote_get_into(s, p.offset, sv)  # network pieces land in the (pinned) slot
            else:
                # a part that is one tensor's bytes (large tensors span several parts) is read
                # straight into the tensor; others into a buffer, then scattered
                in_place = len(p.copies) == 1 and p.copies[0][2] == 0 and p.copies[0][3] == p.length
                if in_place:
                    b, d, _, n = p.copies[0]
                    keep = dst_np[p.shard][b][d : d + n]  # type: ignore[index]
                else:
                    keep = np.empty(p.length, np.uint8)
                _remote_get_into(s, p.offset, keep)
            t1 = time.perf_counter()
            read_span.add(t0, t1)
            chunk_seconds.add(t1 - t0)
            if keep is not None:  # CPU: copy a fetched buffer into the tensors (numpy: no GIL)
                for b, d, so, n in ([] if in_place else p.copies):
                    dst_np[p.shard][b][d : d + n] = keep[so : so + n]  # type: ignore[index]
                ev = None
            else:
                base = ring[slot * chunk : slot * chunk + p.length]  # type: ignore[index]
                pairs = [(bufs[p.shard][b][d : d + n], base[so : so + n]) for b, d, so, n in p.copies]
                ev = copier.copy_part(i, pairs)
                slot_events[slot] = ev
            copy_span.add(t1, time.perf_counter())
            return (keep, slot, ev)

        hashers = {si: hashlib.sha256() for si in hash_remote}
        left = list(shard_parts)
        done_bytes = 0

        def finish_shard(si: int) -> None:
            s = shards[si]
            if si in hashers:
                got = hashers[si].hexdigest()
                if got != hash_remote[si]:
                    raise _mismatch(s, got, hash_remote[si])
                report.verified += 1
            convert = [e for e in s.entries if e.dtype.is_floating_point and e.dtype != cast and e.nbytes]
            if cast is not None and convert:
                copier.consumer_wait(part_events[si])  # the cast kernels run after the copies
                for e in convert:
                    out[e.name] = out[e.name].to(cast)
                shard_bytes = sum(e.nbytes for e in s.entries)
                if layouts[si][0] == "per-tensor" or 2 * sum(e.nbytes for e in convert) >= shard_bytes:
                    # Release the raw shard buffer: what still views it (integer buffers, tensors
                    # already in ``cast``) gets its own copy. Otherwise (mostly unconverted) the
                    # buffer stays and the converted tensors' raw bytes are the only slack.
                    if layouts[si][0] != "per-tensor":
                        done = {e.name for e in convert}
                        for e in s.entries:
                            if e.name not in done and e.nbytes:
                                out[e.name] = out[e.name].clone()
                    bufs[si] = []
                    if dst_np is not None:
                        dst_np[si] = []
            part_events[si] = []

        def on_done(i: int, res: Any) -> None:
            nonlocal done_bytes
            p = parts[i]
            if res is not None:
                keep, slot, ev = res
                part_events[p.shard].append(ev)
                if p.shard in hashers:
                    hashers[p.shard].update(keep if keep is not None else ring_np[slot * chunk : slot * chunk + p.length])
            done_bytes += p.tensor_bytes
            left[p.shard] -= 1
            if left[p.shard] == 0:
                finish_shard(p.shard)
            if progress is not None:
                progress(min(done_bytes, total), total)

        for si, n in enumerate(shard_parts):
            if n == 0:
                finish_shard(si)
        _pump(parts, work, on_done, threads=threads, window=window)
        copier.finish()
        copy_span.add(copy_span.lo if copy_span.lo != math.inf else time.perf_counter(), time.perf_counter())
    except BaseException as exc:
        # Drop every reference to the destination memory, including those held by the frames of
        # the traceback (a worker's views of a device buffer), before the error propagates.
        copier.abort()
        out.clear()
        bufs.clear()
        sb = ring = dst_np = None  # noqa: F841
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
        ring = None
    report.seconds_read = read_span.seconds
    report.seconds_copy = copy_span.seconds if not direct else 0.0
    report.chunk_seconds = chunk_seconds.values
    report.streams = copier.streams
    report.staging_bytes = n_slots * chunk if use_ring else (0 if direct else window * chunk)
    return out


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def _parse_device(device: Any) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: only cpu and cuda are supported")
    return dev


def _dequantize(src: _Source, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor] | None:
    md: Any = src.quant
    if md is None:
        for s in src.shards:
            if _quantize.METADATA_KEY in s.metadata:
                md = s.metadata
                break
    if md is None:
        return None
    try:
        return _quantize.dequantize_state_dict(tensors, md, dtype=dtype, strict=src.complete)
    except ValueError as e:
        raise LoadError(src.display, f"cannot dequantize: {e}") from None


def _release_views(result: dict[str, torch.Tensor], raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On a device: after dequantization, results still viewing a shard buffer whose other
    tensors were replaced are cloned, so the raw shard buffers can be freed."""
    dropped = {raw[n].untyped_storage().data_ptr() for n in raw if n not in result or result[n] is not raw[n]}
    return {n: (t.clone() if n in raw and t is raw[n] and t.untyped_storage().data_ptr() in dropped else t)
            for n, t in result.items()}


def load(
    source: Any,
    device: Any = "cpu",
    *,
    storage: Storage | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = False,
    dequantize: bool = True,
    owned: bool = False,
    staging_bytes: int = DEFAULT_STAGING_BYTES,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    module: torch.nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
    report: LoadReport | None = None,
    expected_sha256: Mapping[str, str] | None = None,
    streams: int = DEFAULT_STREAMS,
    prefetch: bool | None = None,
    method: str | None = None,
) -> dict[str, torch.Tensor]:
    """Load every tensor of ``source`` onto ``device``; returns ``{name: tensor}`` in file order
    (dequantized order for quantized versions).

    ``dtype`` casts floating-point tensors (on the device); ``verify`` checks each shard's sha256
    against the manifest (``expected_sha256={file: hex}`` for other sources; given, it is always
    checked); ``owned`` gives CPU tensors their own memory instead of copy-on-write views of the
    file; ``staging_bytes`` bounds host staging (pinned ring / S3 parts in flight); ``threads`` and
    ``chunk_bytes`` override the tuning table; ``module`` (built on the meta device) is filled with
    ``load_state_dict(strict=True, assign=True)`` — its parameters *are* the returned tensors;
    ``progress(bytes_done, bytes_total)``; ``report`` (a :class:`LoadReport`) is filled in.
    ``streams``: CUDA copy streams (2-4). ``prefetch``: ``MADV_WILLNEED`` on zero-copy mappings
    (default off: plain faults with kernel readahead measured faster on cold files). ``method``
    forces a CPU strategy: ``"mmap"``,
    ``"pread"`` (owned), or ``"ring"`` (the GPU pipeline with a CPU destination — for tests and
    benchmarks of the pipeline itself).
    """
    t_start = time.perf_counter()
    rep = report if report is not None else LoadReport()
    rep.__dict__.update(LoadReport().__dict__)  # a reused report starts afresh
    dev = _parse_device(device)
    if staging_bytes < 1:
        raise ValueError(f"staging_bytes must be positive, got {staging_bytes}")
    if method not in (None, "mmap", "pread", "ring"):
        raise ValueError(f"method must be None, 'mmap', 'pread' or 'ring', got {method!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype cast must be a floating-point dtype, got {dtype}")
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("safetensors is little-endian; big-endian hosts are not supported")

    src = resolve(source, storage)
    for s in src.shards:
        _read_header(s)
    _check_names(src)
    t_header = time.perf_counter()

    local = [s for s in src.shards if s.path is not None]
    remote = any(s.path is None for s in src.shards)
    zero_copy = dev.type == "cpu" and not remote and (method == "mmap" or (method is None and not owned))
    cached_weighted = 0.0
    cached_known = True
    kind = ""
    for s in src.shards:
        if s.path is not None:
            info = probe(s.path, residency=not zero_copy)
            s.kind, s.cached = info["kind"], info["cached_fraction"]
            if s.cached is None:
                cached_known = False
            else:
                cached_weighted += s.cached * (s.size or 0)
        kind = kind or s.kind
    total_file = sum(s.size or 0 for s in local)
    cached = (cached_weighted / total_file if total_file else 1.0) if local and cached_known else None
    auto_threads, auto_chunk = _tune(kind, cached)
    n_threads = threads or auto_threads
    chunk = chunk_bytes or auto_chunk
    if n_threads < 1 or chunk < 1:
        raise ValueError("threads and chunk_bytes must be positive")

    # sha256: local files are hashed first (in parallel, before anything is allocated); remote
    # shards on the way, in order, from the parts as they arrive.
    wanted = {i: h for i, s in enumerate(src.shards)
              if (h := _expected_hash(s, expected_sha256)) and (verify or expected_sha256)}
    hash_remote = {i: h for i, h in wanted.items() if src.shards[i].path is None}
    local_hash = {i: h for i, h in wanted.items() if src.shards[i].path is not None}
    if local_hash:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(min(len(local_hash), os.cpu_count() or 1)) as pool:
            got = dict(zip(local_hash, pool.map(lambda i: _hash_file(src.shards[i].path), local_hash)))
        for i, h in local_hash.items():
            if got[i] != h:
                raise _mismatch(src.shards[i], got[i], h)
        rep.verified += len(local_hash)
        rep.seconds_verify = time.perf_counter() - t0

    quantized = dequantize and (src.quant is not None or any(_quantize.METADATA_KEY in s.metadata for s in src.shards))
    cast_now = None if quantized else dtype
    if zero_copy:
        path_name = "mmap-zero-copy"
        tensors: dict[str, torch.Tensor] = {}
        total = sum(e.nbytes for s in src.shards for e in s.entries)
        done = 0
        for s in src.shards:
            # No MADV_WILLNEED by default: on cold files the kernel's fault readahead measured ~3x
            # faster than asking for the whole mapping up front (bench/loaders.py, BENCHMARKS.md).
            t0 = time.perf_counter()
            part, _copied = _mmap_shard(s, bool(prefetch))
            rep.chunk_seconds.append(time.perf_counter() - t0)
            tensors.update(part)
            done += sum(e.nbytes for e in s.entries)
            if progress is not None:
                progress(done, total)
        if cast_now is not None:
            t0 = time.perf_counter()
            tensors = {n: (t.to(cast_now) if t.is_floating_point() else t) for n, t in tensors.items()}
            rep.seconds_copy = time.perf_counter() - t0
        n_threads, chunk = 0, 0
    else:
        direct = dev.type == "cpu" and not remote and method != "ring"
        if remote:
            n_threads, chunk = threads or 16, chunk_bytes or 8 * MiB
            path_name = "s3-ranged" if kind == "s3" else "storage-ranged"
            if dev.type == "cuda":
                path_name += "-pinned-streams"
        elif dev.type == "cuda":
            path_name = "pread-pinned-streams"
        else:
            path_name = "pread-owned" if direct else "pread-ring"
        if not direct:
            if staging_bytes < 2 * chunk:  # at least two slots, so reads and copies overlap
                chunk = max(4096, staging_bytes // 2)
            n_threads = max(1, min(n_threads, staging_bytes // chunk))
        tensors = _load_staged(
            src, dev, threads=n_threads, chunk=chunk, staging=staging_bytes, hash_remote=hash_remote,
            direct=direct, per_tensor=dev.type == "cpu" and method != "ring", n_streams=max(1, streams),
            progress=progress, report=rep, cast=cast_now,
        )

    rep.dequantized = False
    if quantized:
        deq = _dequantize(src, tensors, dtype)
        if deq is not None:
            tensors = _release_views(deq, tensors) if dev.type == "cuda" else deq
            rep.dequantized = True
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if module is not None:
        try:
            module.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as e:
            raise LoadError(src.display, f"does not fit {type(module).__name__}: {e}") from None
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if left:
            raise LoadError(src.display, f"{type(module).__name__}: {left[:3]} not in the checkpoint "
                                         "(non-persistent buffers?) and still on the meta device")

    rep.source = src.display
    rep.tensors = len(tensors)
    rep.bytes = sum(e.nbytes for s in src.shards for e in s.entries)
    rep.shards = len(src.shards)
    rep.source_kind = kind
    rep.path = path_name
    rep.threads = n_threads
    rep.chunk_bytes = chunk
    rep.cached_fraction = cached
    rep.device = str(dev)
    rep.seconds_header = t_header - t_start
    rep.seconds_total = time.perf_counter() - t_start
    rep.gbps = rep.bytes / rep.seconds_total / 1e9 if rep.seconds_total > 0 else 0.0
    return tensors


def load_with_report(source: Any, device: Any = "cpu", **options: Any) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """:func:`load`, returning ``(tensors, LoadReport)``."""
    rep = options.pop("report", None) or LoadReport()
    return load(source, device, report=rep, **options), rep


__all__ = [
    "DTYPES",
    "LoadError",
    "LoadReport",
    "TensorInfo",
    "cached_fraction",
    "classify_fstype",
    "load",
    "load_with_report",
    "parse_header",
    "plan_reads",
    "probe",
    "resolve",
    "ring_slot",
]
