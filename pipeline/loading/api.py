"""The loader's entry points: :func:`load` / :func:`load_with_report` and the :class:`LoadReport`.

A load resolves the source into shards (:mod:`.sources`), validates every header (:mod:`.header`),
probes where the files live (:mod:`.probe`), verifies local shards' sha256, then either maps local
files zero-copy (CPU) or runs the staged copy pipeline (:mod:`.staged`); quantized versions are
dequantized at the end. How each path works and why is in docs/loading.md.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.layout import QUANT_METADATA_KEY
from pipeline.loading.header import LoadError
from pipeline.loading.probe import probe, tune
from pipeline.loading.sources import Shard, Source, hash_file, resolve

if TYPE_CHECKING:
    from pipeline.storage import Storage

# What a load does not always need is imported where it is needed: the staged copy pipeline
# (:mod:`.staged`, GPU and owned loads), dequantization (:mod:`pipeline.quantize`), the storage
# backends, export/promotion (published versions). A fresh process that maps a local file to CPU
# (a serving cold start) imports torch and this package only (tests/test_loading.py checks).

MiB = 1 << 20
DEFAULT_STAGING_BYTES = 256 * MiB
DEFAULT_STREAMS = 4
# Local sources up to this size load owned to CPU with one read per file into memory that the
# tensors then view, hashed there when asked: no thread pool to start, no second pass over the
# file for the sha256. A serving swap-in of a small model is dominated by such fixed costs.
SMALL_OWNED_BYTES = 16 * MiB  # one request of the cold-disk path: parallel reads cannot help


@dataclass
class LoadReport:
    """What a load did and how fast. Pass one as ``report=`` to have it filled in."""

    tensors: int = 0
    bytes: int = 0  # tensor bytes read from the source (before any cast/dequantization)
    seconds_total: float = 0.0
    seconds_read: float = 0.0  # first read issued to last completed
    seconds_copy: float = 0.0  # first copy into the destination to the final synchronize
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
        """One line: what was loaded, from where, how, and each stage's seconds and rate (stages a
        path does not have, such as the read of a zero-copy mapping, are left out)."""
        from pipeline.metrics import human_bytes  # for display only: a load does not import it

        cached = "" if self.cached_fraction is None else f", {self.cached_fraction:.0%} cached"
        how = self.path
        if self.chunk_bytes:
            how += f" ({self.threads} threads, {human_bytes(self.chunk_bytes)} requests)"
        stages = [f"{name} {s:.3f}s ({gbps:.2f} GB/s)" for name, s, gbps in
                  (("read", self.seconds_read, self.read_gbps), ("copy", self.seconds_copy, self.copy_gbps)) if s > 0]
        if self.verified:
            stages.append(f"sha256 of {self.verified} shard{'s' if self.verified > 1 else ''} checked")
        stages.append(f"total {self.seconds_total:.3f}s ({self.gbps:.2f} GB/s)")
        return (f"{self.tensors} tensors, {human_bytes(self.bytes)} from {self.source_kind}{cached} via {how} -> "
                f"{self.device}: " + ", ".join(stages))


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
    allow_rejected: bool = False,
) -> dict[str, torch.Tensor]:
    """Load every tensor of ``source`` onto ``device``; returns ``{name: tensor}`` in file order
    (dequantized order for quantized versions). Bad input raises :class:`LoadError` naming the
    file, before anything is allocated; a failure mid-load frees what was allocated.

    source: a ``.safetensors`` file, a folder (published version, index or ``*.safetensors``), an
        index file, ``s3://bucket/prefix``, ``<model>/<version>`` (``latest`` and ``production``
        too: :func:`pipeline.promotion.resolve`) in ``storage``,
        or a key inside ``storage``; or a :class:`~pipeline.loading.sources.Source` already
        resolved (:func:`~pipeline.loading.sources.published_version`).
    device: ``"cpu"`` or a CUDA device.
    storage: where ``<model>/<version>`` and keys are looked up; an S3 storage is also reused for
        ``s3://`` URIs inside it (its client, retries and pool).
    dtype: cast floating-point tensors to this dtype (on the device).
    verify: check each shard's sha256 against the manifest.
    dequantize: dequantize quantized versions (int8/int4) on load.
    owned: CPU tensors get their own memory instead of copy-on-write views of the file.
    staging_bytes: bound on host staging (pinned ring / remote parts in flight; up to twice that
        while parts that finished early wait for their shard's in-order sha256).
    threads: parallel reads (default: by storage kind, see docs/loading.md).
    chunk_bytes: size of each read request (default: by storage kind).
    module: a module built on the meta device, filled with ``load_state_dict(strict=True,
        assign=True)``: its parameters *are* the returned tensors.
    progress: called as ``progress(bytes_done, bytes_total)``.
    report: a :class:`LoadReport` to fill in.
    expected_sha256: ``{file name: hex}`` to check for sources without a manifest; when given,
        always checked.
    streams: CUDA copy streams (2-4).
    prefetch: ``MADV_WILLNEED`` on zero-copy mappings (default off: plain faults with kernel
        readahead measured faster on cold files).
    method: force a CPU strategy: ``"mmap"``, ``"pread"`` (owned), or ``"ring"`` (the GPU
        pipeline with a CPU destination, for tests and benchmarks of the pipeline itself).
    allow_rejected: load a published version a gate rejected (only by its version id, a key or a
        path: ``production`` and ``latest`` never name a rejected version).
    """
    # a Source resolved before: its resolving counts too (header and total seconds)
    t_start = time.perf_counter() - (source.seconds if isinstance(source, Source) else 0.0)
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

    src = resolve(source, storage, allow_rejected=allow_rejected)
    # the sha256 each shard is checked against (manifest or expected_sha256), by shard index
    wanted = {i: h for i, s in enumerate(src.shards)
              if (h := s.expected_sha256(expected_sha256)) and (verify or expected_sha256)}
    _read_headers(src, wanted)
    src.check_names()
    t_header = time.perf_counter()

    remote = any(s.path is None for s in src.shards)
    zero_copy = dev.type == "cpu" and not remote and (method == "mmap" or (method is None and not owned))
    kind, cached = _probe_shards(src, residency=not zero_copy)
    auto_threads, auto_chunk = tune(kind, cached)
    store = next((s.store for s in src.shards if s.path is None), None)
    # A remote store's own setting (S3: concurrency) is how many requests a load keeps in flight,
    # as for its pre-warms and uploads; the request size then fits that many in the staging.
    in_flight = getattr(store, "concurrency", None) if threads is None else None
    n_threads = threads or in_flight or auto_threads
    if remote and chunk_bytes is None:  # the store's largest GET while every thread has requests
        from pipeline.storage.base import ranged_read_size

        auto_chunk = ranged_read_size(store, sum(s.size or 0 for s in src.shards), n_threads, auto_chunk)
        if in_flight:
            auto_chunk = min(auto_chunk, max(MiB, staging_bytes // in_flight))
    chunk = chunk_bytes or auto_chunk
    if n_threads < 1 or chunk < 1:
        raise ValueError("threads and chunk_bytes must be positive")

    # sha256: local files are hashed first (in parallel, before anything is allocated); remote
    # shards on the way, in order, from the parts as they arrive.
    hash_remote = {i: h for i, h in wanted.items() if src.shards[i].path is None}
    small_owned = (dev.type == "cpu" and not remote and not zero_copy and method is None and threads is None
                   and chunk_bytes is None and sum(s.size or 0 for s in src.shards) <= SMALL_OWNED_BYTES)
    if not small_owned:  # the small path hashes the bytes it read
        _verify_local(src, {i: h for i, h in wanted.items() if src.shards[i].path is not None}, rep)

    quantized = dequantize and (src.quant is not None or any(QUANT_METADATA_KEY in s.metadata for s in src.shards))
    cast_now = None if quantized else dtype
    pending: Callable[[], None] | None = None  # sha256 checks still running (small owned path)
    if zero_copy:
        path_name = "mmap-zero-copy"
        tensors = _load_mapped(src, bool(prefetch), cast_now, progress, rep)
        n_threads, chunk = 0, 0
    elif small_owned:
        path_name = "read-owned"
        tensors, pending = _load_read(src, wanted, cast_now, progress, rep)
        n_threads, chunk = 1, 0
    else:
        direct = dev.type == "cpu" and not remote and method != "ring"
        if remote:
            path_name = f"{kind}-ranged" + ("-pinned-streams" if dev.type == "cuda" else "")
        elif dev.type == "cuda":
            path_name = "pread-pinned-streams"
        else:
            path_name = "pread-owned" if direct else "pread-ring"
        from pipeline.loading.staged import StagedCopy

        if not direct:
            if staging_bytes < 2 * chunk:  # at least two slots, so reads and copies overlap
                chunk = max(4096, staging_bytes // 2)
            n_threads = max(1, min(n_threads, staging_bytes // chunk))
        staged = StagedCopy(
            src, dev, threads=n_threads, chunk=chunk, staging=staging_bytes, hash_remote=hash_remote,
            direct=direct, per_tensor=dev.type == "cpu" and method != "ring", n_streams=max(1, streams),
            progress=progress, cast=cast_now,
        )
        tensors = staged.run()
        rep.seconds_read = staged.read_span.seconds
        rep.seconds_copy = staged.copy_span.seconds if not direct else 0.0
        rep.chunk_seconds = staged.chunk_seconds.values
        rep.streams = staged.copier.streams
        rep.staging_bytes = staged.staging_bytes
        rep.verified += staged.verified

    rep.dequantized = False
    if quantized and pending is not None:  # dequantize verified bytes only
        pending()
        pending = None
    if quantized:
        deq = _dequantize(src, tensors, dtype)
        if deq is not None:
            tensors = _release_views(deq, tensors) if dev.type == "cuda" else deq
            rep.dequantized = True
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if module is not None:
        _fill_module(module, tensors, src.display)
    if pending is not None:  # nothing is returned before every hash matched
        pending()
    for i, h in wanted.items():  # every one matched (or the load raised)
        src.shards[i].remember_verified(h)

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


# ---------------------------------------------------------------------------------------------
# Steps of a load
# ---------------------------------------------------------------------------------------------


def _read_headers(src: Source, wanted: dict[int, str]) -> None:
    """Every shard's header: local files one after the other; remote shards from the bytes read
    with their size (a header longer than that takes one more GET, in parallel across shards:
    a model of many shards would otherwise wait one round trip per shard)."""
    for i, s in enumerate(src.shards):
        if s.path is not None:
            s.read_header(verified_as=wanted.get(i))
    remote = [i for i, s in enumerate(src.shards) if s.path is None]
    if remote:  # a local load imports no storage code
        from pipeline.storage import in_parallel

        in_parallel(lambda i: src.shards[i].read_header(verified_as=wanted.get(i)), remote, "forgeline-header",
                    max(s.store.parallel_requests for s in src.shards if s.store is not None))


def _parse_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ValueError(f"device {device!r}: this host has {n} CUDA device{'s' if n != 1 else ''}")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: only cpu and cuda are supported")
    return dev


def _probe_shards(src: Source, *, residency: bool) -> tuple[str, float | None]:
    """Probe every local shard (sets ``kind``/``cached``); returns the source's kind and the
    size-weighted page-cache residency of its local shards (None when unknown or remote)."""
    local = [s for s in src.shards if s.path is not None]
    cached_weighted = 0.0
    cached_known = True
    kind = ""
    for s in src.shards:
        if s.path is not None:
            info = probe(s.path, residency=residency)
            s.kind, s.cached = info["kind"], info["cached_fraction"]
            if s.cached is None:
                cached_known = False
            else:
                cached_weighted += s.cached * (s.size or 0)
        kind = kind or s.kind
    total_file = sum(s.size or 0 for s in local)
    cached = (cached_weighted / total_file if total_file else 1.0) if local and cached_known else None
    return kind, cached


def _verify_local(src: Source, want: dict[int, str], rep: LoadReport) -> None:
    """Hash the local shards in ``want`` (in parallel) and compare."""
    if not want:
        return
    t0 = time.perf_counter()
    if len(want) == 1 or sum(src.shards[i].size or 0 for i in want) <= SMALL_OWNED_BYTES:
        got = {i: hash_file(src.shards[i].path) for i in want}  # less than starting threads costs
    else:
        with ThreadPoolExecutor(min(len(want), os.cpu_count() or 1)) as pool:
            got = dict(zip(want, pool.map(lambda i: hash_file(src.shards[i].path), want)))
    for i, h in want.items():
        if got[i] != h:
            raise src.shards[i].mismatch(got[i], h)
    rep.verified += len(want)
    rep.seconds_verify = time.perf_counter() - t0


def _load_mapped(src: Source, prefetch: bool, cast: torch.dtype | None,
                 progress: Callable[[int, int], None] | None, rep: LoadReport) -> dict[str, torch.Tensor]:
    """The zero-copy CPU path: every local shard mapped, its tensors viewing the mapping."""
    tensors: dict[str, torch.Tensor] = {}
    total = sum(e.nbytes for s in src.shards for e in s.entries)
    done = 0
    for s in src.shards:
        # No MADV_WILLNEED by default: on cold files the kernel's fault readahead measured ~3x
        # faster than asking for the whole mapping up front (bench/loaders.py, BENCHMARKS.md).
        t0 = time.perf_counter()
        tensors.update(_map_shard(s, prefetch))
        rep.chunk_seconds.append(time.perf_counter() - t0)
        done += sum(e.nbytes for e in s.entries)
        if progress is not None:
            progress(done, total)
    if cast is not None:
        t0 = time.perf_counter()
        tensors = {n: (t.to(cast) if t.is_floating_point() else t) for n, t in tensors.items()}
        rep.seconds_copy = time.perf_counter() - t0
    return tensors


_HASHER: ThreadPoolExecutor | None = None


def _hasher() -> ThreadPoolExecutor:
    global _HASHER
    if _HASHER is None:  # started once per process: a thread start costs about what a small hash does
        _HASHER = ThreadPoolExecutor(2, thread_name_prefix="forgeline-sha256")
    return _HASHER


def _load_read(src: Source, wanted: dict[int, str], cast: torch.dtype | None,
               progress: Callable[[int, int], None] | None,
               rep: LoadReport) -> tuple[dict[str, torch.Tensor], Callable[[], None] | None]:
    """The small owned CPU path: each local shard read whole, in one call, into memory of its own,
    its tensors viewing that memory. Shards whose sha256 is wanted are hashed there on a worker
    thread (hashlib releases the GIL) while the tensors are made and bound; the second value
    waits for those hashes and raises on a mismatch, and :func:`load` calls it before it returns
    anything (None: nothing to check)."""
    import hashlib

    def check(i: int, buf: bytearray) -> tuple[int, str, float]:
        t = time.perf_counter()
        return i, hashlib.sha256(buf).hexdigest(), time.perf_counter() - t

    futures = []
    tensors: dict[str, torch.Tensor] = {}
    total = sum(e.nbytes for s in src.shards for e in s.entries)
    done = 0
    t_read = time.perf_counter()
    for i, s in enumerate(src.shards):
        assert s.path is not None
        t0 = time.perf_counter()
        buf = bytearray(s.size or 0)
        try:
            with open(s.path, "rb", buffering=0) as f:
                got = f.readinto(buf) if buf else 0
                while got < len(buf) and (n := f.readinto(memoryview(buf)[got:])):
                    got += n
        except OSError as e:
            raise LoadError(s.display, f"cannot read: {e.strerror or e}") from None
        if got != len(buf):
            raise LoadError(s.display, f"file changed size since its header was read ({got} of {len(buf)} bytes)")
        if i in wanted:
            futures.append(_hasher().submit(check, i, buf))
        tensors.update(_views(s, memoryview(buf)))
        rep.chunk_seconds.append(time.perf_counter() - t0)
        done += sum(e.nbytes for e in s.entries)
        if progress is not None:
            progress(done, total)
    rep.seconds_read = time.perf_counter() - t_read
    if cast is not None:
        t0 = time.perf_counter()
        tensors = {n: (t.to(cast) if t.is_floating_point() else t) for n, t in tensors.items()}
        rep.seconds_copy = time.perf_counter() - t0
    if not futures:
        return tensors, None

    def wait() -> None:
        for f in futures:
            i, h, seconds = f.result()
            rep.seconds_verify += seconds
            if h != wanted[i]:
                raise src.shards[i].mismatch(h, wanted[i])
            rep.verified += 1

    return tensors, wait


def _map_shard(shard: Shard, prefetch: bool) -> dict[str, torch.Tensor]:
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
    out = _views(shard, memoryview(mm))
    del mm
    return out


def _views(shard: Shard, mv: memoryview) -> dict[str, torch.Tensor]:
    """The shard's tensors viewing ``mv`` (the whole file's bytes); misaligned ones copied. Every
    tensor holds the buffer's export, so the memory lives (a mapping cannot be closed) while any
    of them does."""
    out: dict[str, torch.Tensor] = {}
    for e in shard.entries:
        numel = math.prod(e.shape)
        if numel == 0:
            out[e.name] = torch.empty(e.shape, dtype=e.dtype)
        elif e.start % e.itemsize == 0:
            out[e.name] = torch.frombuffer(mv, dtype=e.dtype, count=numel, offset=e.start).view(e.shape)
        else:
            from pipeline.loading.staged import u8

            t = torch.empty(e.shape, dtype=e.dtype)
            u8(t)[:] = np.frombuffer(mv, dtype=np.uint8, count=e.nbytes, offset=e.start)
            out[e.name] = t
    return out


def _dequantize(src: Source, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor] | None:
    from pipeline import quantize as _quantize

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


def _assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> bool:
    """What ``load_state_dict(strict=True, assign=True)`` does, for the modules whose loading is
    the default (no hooks, no custom ``_load_from_state_dict`` beyond BatchNorm's, no extra
    state): each tensor becomes the parameter (requires_grad kept) or buffer it names. Its
    per-module machinery is most of a small model's fill (~0.4 of ~1 ms for a serving swap-in).
    False, with nothing changed, when any of that does not hold: the caller then runs
    ``load_state_dict``, which also words every error."""
    from torch.nn.modules.batchnorm import _NormBase

    if torch.__future__.get_swap_module_params_on_conversion():
        return False
    plain = (torch.nn.Module._load_from_state_dict, _NormBase._load_from_state_dict)
    slots: dict[str, tuple[torch.nn.Module, str, torch.Tensor]] = {}
    for prefix, mod in _walk(module):
        cls = type(mod)
        if (cls._load_from_state_dict not in plain or mod._load_state_dict_pre_hooks
                or mod._load_state_dict_post_hooks or cls.set_extra_state is not torch.nn.Module.set_extra_state):
            return False
        for name, p in mod._parameters.items():
            if p is not None:
                slots[prefix + name] = (mod, name, p)
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                slots[prefix + name] = (mod, name, b)
    if slots.keys() != tensors.keys() or any(t.shape != tensors[k].shape for k, (_, _, t) in slots.items()):
        return False
    from torch.nn.modules import module as nn_module

    # straight into the module's dicts (what setattr ends in) unless registration hooks are set
    direct = not (nn_module._global_parameter_registration_hooks or nn_module._global_buffer_registration_hooks)
    with torch.no_grad():
        for key, (mod, name, old) in slots.items():
            new = tensors[key]
            is_param = isinstance(old, torch.nn.Parameter)
            if is_param:
                new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            if not direct:
                setattr(mod, name, new)
            elif is_param:
                mod._parameters[name] = new
            else:
                mod._buffers[name] = new
    return True


def module_slots(module: torch.nn.Module) -> list[tuple[str, dict, str]]:
    """Every parameter and buffer of ``module`` (non-persistent buffers too) as ``(qualified
    name, the owning module's dict, key)``, read straight from the module dicts:
    ``named_parameters``' generators cost a small model's swap-in more than its bytes do."""
    out: list[tuple[str, dict, str]] = []
    for prefix, mod in _walk(module):
        out += [(prefix + n, mod._parameters, n) for n, t in mod._parameters.items() if t is not None]
        out += [(prefix + n, mod._buffers, n) for n, t in mod._buffers.items() if t is not None]
    return out


def _walk(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``module`` and every submodule with its name prefix (``"features.0."``), from the module
    dicts (no ``named_modules`` generators)."""
    out, todo = [], [("", module)]
    while todo:
        prefix, mod = todo.pop()
        out.append((prefix, mod))
        todo.extend((f"{prefix}{n}.", c) for n, c in mod._modules.items() if c is not None)
    return out


def _fill_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], display: str) -> None:
    try:
        if not _assign(module, tensors):
            module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise LoadError(display, f"does not fit {type(module).__name__}: {e}") from None
    left = [n for n, d, k in module_slots(module) if d[k].is_meta]
    if left:
        raise LoadError(display, f"{type(module).__name__}: {left[:3]} not in the checkpoint "
                                 "(non-persistent buffers?) and still on the meta device")


__all__ = ["LoadReport", "load", "load_with_report", "module_slots"]
