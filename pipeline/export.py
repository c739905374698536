"""Chunked safetensors export and publishing of trained weights.

A published model version lives under ``<root>/<model>/<version>/`` (``root`` defaults to
``models``) and is immutable::

    models/digits/20260101T120000Z-a1b2c3/
        model-00001-of-00003.safetensors      # shards (a single shard is ``model.safetensors``)
        model-00002-of-00003.safetensors
        model-00003-of-00003.safetensors
        model.safetensors.index.json          # Hugging Face style: metadata.total_size, weight_map
        golden.safetensors                    # optional: the model's outputs on a fixed input
        manifest.json                         # written LAST: its presence *is* the version

**Format.** Every shard is a standard safetensors file (8-byte little-endian header length, JSON
header padded with spaces to a multiple of 8, then the raw little-endian tensor bytes), loadable by
``safetensors.torch.load_file`` / ``safe_open`` and by Hugging Face loaders. Inside a shard the
tensors are laid out largest element size first (then in source order), as safetensors itself
does, so every tensor starts at an offset aligned to its element size. The index is always
written, even for a single shard, so a loader has one file to read for the weight map; Hugging
Face loaders prefer ``model.safetensors`` when it exists, so that stays compatible. Each shard's
``__metadata__`` carries ``format: pt`` and the forgeline model/version/run id/data version.

**Sharding.** :func:`plan_shards` fills shards greedily in source order and never splits a tensor.
``max_shard_bytes`` bounds the *file* size (header included, estimated conservatively), which is
stricter than Hugging Face's ``max_shard_size`` (tensor bytes only). A tensor that cannot fit in a
shard of that size on its own gets a shard to itself, which is then larger than the limit.

**Streaming.** Headers are computed from tensor metadata alone; tensor bytes are then written
one tensor at a time (in slices of :data:`pipeline.storage.CHUNK`) straight into the storage's
atomic writer, which hashes them on the way. No shard is ever assembled in memory. With
:func:`from_checkpoint` the checkpoint is memory-mapped and the pages of each tensor are handed
back to the kernel once written (``madvise(MADV_DONTNEED)``, Linux), so host memory stays near
one tensor plus the writer's buffers instead of the model size. Measured
(``tests/test_export.py``): a 200 MiB checkpoint exported in 32 MiB shards raises the peak RSS by
about 18 MiB; without the page release it is about 1.07x the model, all of it clean file-backed
pages of the mapping (never a copy).

**Publishing.** The version prefix is the staging area: shards are written there, then each is
checked against its recorded size (and, on S3, the sha256 recorded with the object), then the
index, and the manifest last. Readers only ever go through the manifest (:func:`list_versions`
ignores prefixes without one), so a half-written version is invisible. When an export fails
midway its partial files are deleted (best effort) and the error re-raised; leftovers of a crashed
export (no manifest) are removed by the next export of the same version. Exporting to a version
whose manifest exists raises :class:`VersionExists`. Do not export the *same explicit* version
from two processes at once: the default versions (UTC timestamp + random suffix) never collide.

**Golden outputs.** Given ``golden={"input", "output"}`` (see :func:`golden_outputs`), export writes
them as ``golden.safetensors`` (both float32; the input is :func:`golden_input`, a seeded batch of
8) and lists it as ``manifest["golden"] = {"file", "size", "sha256"}``; :func:`verify` covers it
and :func:`read_golden` reads it back. A server that swaps in a version checks its outputs on that
input against the recorded ones.

**Completeness and rejection.** :func:`version_problem` is the one answer to "is this published
version complete (every file its manifest lists, with its size) and not rejected": a version whose
gate failed carries ``manifest["rejected"]`` (:func:`record_gates`, the only rewrite a manifest
ever gets) and is never the :func:`latest_version`.

Usage::

    src = from_checkpoint(store, "checkpoints/run-7/epoch-0015.pt", model_name="digits_cnn")
    manifest = export(src, store, "digits", run_id="run-7", data_version="b1+b2")
    assert verify(store, "digits", manifest["version"]) == []
    module = build_from_version(store, "digits", manifest["version"])

This module never imports dagster; ``safetensors`` is needed only by the readers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from pipeline._libc import MADV_DONTNEED, advise_pages
from pipeline.safetensors_format import CODES as _ST_CODES
from pipeline.safetensors_format import itemsize as _itemsize
from pipeline.layout import DEFAULT_ROOT, FORMAT, GOLDEN_NAME, INDEX_NAME, MANIFEST_NAME, SINGLE_SHARD_NAME
from pipeline.storage import (CHUNK, Crc32, ObjectNotFound, Storage, StorageError, check_key, hash_stream, in_parallel,
                              join, parse_record)

if TYPE_CHECKING:
    from torch import nn

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
GOLDEN_BATCH = 8
GOLDEN_SEED = 0
# names under <root>/<model>/ that are not versions (refs and the promotion records)
RESERVED_VERSIONS = ("latest", "production", "promotions")

_FROM_CODE = {v: k for k, v in _ST_CODES.items()}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ExportError(Exception):
    """Base class for export/publishing failures."""


class VersionExists(ExportError, FileExistsError):
    """The version already has a manifest; published versions are immutable."""


class VersionNotFound(ExportError, FileNotFoundError):
    """No manifest for that model/version (never published, or a failed/partial export)."""


class CheckpointMismatch(ExportError, ValueError):
    """A checkpoint's tensors do not match the architecture it claims to be (names/shapes/dtypes)."""


class VerificationFailed(ExportError):
    """A published version failed verification; ``problems`` names each bad shard."""

    def __init__(self, what: str, problems: list[str]):
        super().__init__(f"{what}: " + "; ".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------------------------
# safetensors, written by hand and streamed
# ---------------------------------------------------------------------------------------------


class TensorEntry(NamedTuple):
    """What is known of a tensor before its bytes are read."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def entry_for(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> TensorEntry:
    dt = dtype or t.dtype
    itemsize = torch.empty((), dtype=dt).element_size() if dt != t.dtype else t.element_size()
    return TensorEntry(name, dt, tuple(int(s) for s in t.shape), t.numel() * itemsize)


def st_dtype(dtype: torch.dtype | str) -> str:
    """The safetensors dtype code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    if isinstance(dtype, str):
        if dtype in _FROM_CODE:
            return dtype
        raise ExportError(f"unknown safetensors dtype code {dtype!r}")
    try:
        return _ST_CODES[dtype]
    except KeyError:
        raise ExportError(f"dtype {dtype} has no safetensors encoding; supported: "
                          f"{sorted(str(d).removeprefix('torch.') for d in _ST_CODES)}") from None


def _entry_json(e: TensorEntry, begin: int, end: int) -> str:
    return json.dumps({e.name: {"dtype": st_dtype(e.dtype), "shape": list(e.shape), "data_offsets": [begin, end]}},
                      separators=(",", ":"), ensure_ascii=False)[1:-1]


def _metadata_json(metadata: Mapping[str, str] | None) -> str:
    if not metadata:
        return ""
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ExportError(f"safetensors __metadata__ must map str to str, got {k!r}: {v!r}")
    return json.dumps({"__metadata__": dict(metadata)}, separators=(",", ":"), ensure_ascii=False)[1:-1]


def shard_layout(entries: Sequence[TensorEntry]) -> list[TensorEntry]:
    """Data order inside one file: largest element size first, then the given order, so that
    every tensor's offset is a multiple of its element size (sizes are powers of two)."""
    return [e for _, e in sorted(enumerate(entries), key=lambda ie: (-_itemsize(ie[1].dtype), ie[0]))]


def encode_header(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None) -> bytes:
    """The first bytes of a safetensors file holding ``entries`` in this order: the u64 length
    prefix and the JSON header, space-padded to a multiple of 8 bytes."""
    names: set[str] = set()
    parts = [_metadata_json(metadata)] if metadata else []
    offset = 0
    for e in entries:
        if e.name in names or e.name == "__metadata__":
            raise ExportError(f"tensor name {e.name!r} is duplicated or reserved")
        names.add(e.name)
        expected = _itemsize(e.dtype)
        for s in e.shape:
            expected *= s
        if expected != e.nbytes:
            raise ExportError(f"tensor {e.name!r}: {e.nbytes} bytes do not match {e.dtype} {list(e.shape)}")
        parts.append(_entry_json(e, offset, offset + e.nbytes))
        offset += e.nbytes
    header = ("{" + ",".join(parts) + "}").encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def safetensors_size(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None) -> int:
    """Exact size of the file :func:`write_safetensors` produces for ``entries``."""
    return len(encode_header(shard_layout(entries), metadata)) + sum(e.nbytes for e in entries)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` (a view when it is a contiguous CPU tensor)."""
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in use
        raise ExportError("safetensors is little-endian; exporting on a big-endian host is not supported")
    t = t.detach()
    if t.layout != torch.strided:
        raise ExportError(f"cannot export a {t.layout} tensor; convert it to a dense tensor first")
    if t.is_meta:
        raise ExportError("tensor is on the meta device (no data); export from a checkpoint instead")
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # the array keeps ``t`` alive


def write_safetensors(
    out,
    entries: Sequence[TensorEntry],
    get_tensor: Callable[[str], torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    after_tensor: Callable[[TensorEntry], None] | None = None,
) -> int:
    """Stream a safetensors file into ``out`` (anything with ``write``: an ``AtomicWriter``, a
    file). The header comes from ``entries``; then ``get_tensor(name)`` is called for one tensor
    at a time, checked against its entry, and its bytes written. Returns the bytes written."""
    layout = shard_layout(entries)
    header = encode_header(layout, metadata)
    out.write(header)
    written = len(header)
    for e in layout:
        t = get_tensor(e.name)
        if t.dtype != e.dtype or tuple(t.shape) != e.shape:
            raise ExportError(f"tensor {e.name!r} is {t.dtype} {list(t.shape)} now, "
                              f"but {e.dtype} {list(e.shape)} when the header was written")
        data = tensor_bytes(t)
        if len(data) != e.nbytes:  # pragma: no cover - guarded by the dtype/shape check
            raise ExportError(f"tensor {e.name!r}: {len(data)} bytes, expected {e.nbytes}")
        for i in range(0, len(data), CHUNK):
            out.write(data[i : i + CHUNK])
        written += len(data)
        del data, t
        if after_tensor is not None:
            after_tensor(e)
    return written


def plan_shards(
    entries: Sequence[tuple[str, Any, Sequence[int], int]],
    max_shard_bytes: int,
    *,
    header_reserve: int = 0,
) -> list[list[str]]:
    """Group tensors into shards whose files stay within ``max_shard_bytes``.

    ``entries`` are ``(name, dtype, shape, nbytes)`` in export order; shards are filled greedily in
    that order and a tensor is never split. Each tensor costs its bytes plus its (conservatively
    estimated) header entry; every shard also pays the length prefix, braces, padding and
    ``header_reserve`` (the ``__metadata__`` JSON). A tensor that does not fit in an empty shard
    gets a shard of its own (larger than the limit: tensors are never split).
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    fixed = 8 + 2 + 7 + header_reserve + (1 if header_reserve else 0)
    budget = max_shard_bytes - fixed
    bound = max(max_shard_bytes, 1)  # offsets inside a conforming shard are at most this
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, dtype, shape, nbytes in entries:
        e = TensorEntry(name, dtype if isinstance(dtype, torch.dtype) else _FROM_CODE[st_dtype(dtype)],
                        tuple(shape), int(nbytes))
        cost = e.nbytes + len(_entry_json(e, bound, bound).encode()) + 1
        if current and used + cost > budget:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += cost
    if current:
        shards.append(current)
    return shards


def shard_file_names(n: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-00001-of-0000N.safetensors`` (as HF)."""
    if n == 1:
        return [SINGLE_SHARD_NAME]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


# ---------------------------------------------------------------------------------------------
# Tensor sources
# ---------------------------------------------------------------------------------------------


def _release_pages(t: torch.Tensor) -> None:
    """Give the pages of a tensor that lives in a private, read-only-used file mapping back to
    the kernel (they are re-read from the file if touched again). Linux only; best effort."""
    if t.numel():
        advise_pages(t.data_ptr(), t.numel() * t.element_size(), MADV_DONTNEED)


class TensorSource:
    """Tensors to export, produced lazily in a stable order, with their metadata known first.

    ``entries`` lists ``(name, dtype, shape, nbytes)`` as they will be exported (after any dtype
    cast) without touching tensor data; :meth:`tensor` produces one tensor; iterating yields
    ``(name, tensor)`` pairs in ``entries`` order. ``config`` describes the architecture
    (``{"architecture", "kwargs", "dtype"}``) and ``info`` where the weights came from.
    """

    def __init__(
        self,
        state: Mapping[str, torch.Tensor],
        *,
        dtype: torch.dtype | None = None,
        config: dict | None = None,
        info: dict | None = None,
        mapped: bool = False,
    ):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype cast must be a floating-point dtype, got {dtype}")
        self._state = state
        self._cast = dtype
        self._mapped = mapped
        self.entries: list[TensorEntry] = []
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise ExportError(f"state entry {name!r} is a {type(t).__name__}, not a tensor")
            if t.is_meta:
                raise ExportError(f"tensor {name!r} is on the meta device (no data); "
                                  "export from a checkpoint with from_checkpoint() instead")
            self.entries.append(entry_for(name, t, self._cast_to(t)))
        self.config = {"architecture": None, "kwargs": {}, "dtype": _main_dtype(self.entries), **(config or {})}
        self.info = info or {}

    def _cast_to(self, t: torch.Tensor) -> torch.dtype | None:
        """Casts apply to floating-point tensors only (integer buffers and masks keep theirs)."""
        return self._cast if self._cast is not None and t.is_floating_point() else None

    def tensor(self, name: str) -> torch.Tensor:
        t = self._state[name].detach()
        cast = self._cast_to(t)
        return t.to(cast) if cast is not None else t

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for e in self.entries:
            yield e.name, self.tensor(e.name)

    def release(self, name: str) -> None:
        """The exporter is done with ``name``: drop its memory-mapped pages if it has any."""
        if self._mapped:
            _release_pages(self._state[name])


def _main_dtype(entries: Sequence[TensorEntry]) -> str | None:
    """The floating dtype holding most bytes (HF's ``torch_dtype``), else the overall one."""
    by: dict[torch.dtype, int] = {}
    for e in entries:
        by[e.dtype] = by.get(e.dtype, 0) + e.nbytes
    floats = {d: n for d, n in by.items() if d.is_floating_point}
    pool = floats or by
    return str(max(pool, key=lambda d: pool[d])).removeprefix("torch.") if pool else None


def from_module(
    module: "nn.Module",
    *,
    architecture: str | None = None,
    model_kwargs: dict | None = None,
    dtype: torch.dtype | None = None,
) -> TensorSource:
    """Export a live module's ``state_dict()`` (references, no copies; GPU tensors are copied to
    the host one at a time while writing). ``architecture``/``model_kwargs`` name the registered
    architecture (:func:`pipeline.models.build_model`) so the version can be rebuilt;
    ``dtype`` casts floating-point tensors (e.g. ``torch.bfloat16``), one at a time."""
    config = {"architecture": architecture, "kwargs": dict(model_kwargs or {})}
    return TensorSource(module.state_dict(), dtype=dtype, config=config,
                        info={"source": "module", "class": type(module).__qualname__})


def from_checkpoint(
    store: Storage,
    key: str,
    *,
    model_name: str,
    model_kwargs: dict | None = None,
    state_key: str | None = "model",
    dtype: torch.dtype | None = None,
    expected_sha256: str | None = None,
    tmp_dir: str | os.PathLike | None = None,
) -> TensorSource:
    """Export the weights of a training checkpoint (``torch.save`` dict; its ``state_key`` entry
    is the state dict, or the whole file when ``state_key`` is None) without materializing them.

    The architecture is built on the meta device to learn the expected names, shapes and dtypes;
    the checkpoint is then memory-mapped (``torch.load(mmap=True, weights_only=True)``) from its
    local path, or, for storage without one (S3), from a temporary copy streamed into
    ``tmp_dir`` and unlinked at once (the mapping keeps it readable). Every tensor is checked
    against the architecture before anything is exported; :class:`CheckpointMismatch` names the
    first mismatching tensor. ``expected_sha256`` (e.g. from ``latest.json``) is verified first.
    """
    from pipeline.models import build_model

    kwargs = dict(model_kwargs or {})
    with torch.device("meta"):
        meta = build_model(model_name, **kwargs)
    expected = meta.state_dict()
    del meta
    uri = store.uri(key)
    store.stat(key)  # a missing checkpoint fails here, naming it

    path = store.local_path(key)
    tmp: str | None = None
    try:
        if path is None:
            fd, tmp = tempfile.mkstemp(prefix="forgeline-ckpt-", suffix=".pt", dir=tmp_dir)
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as f, store.open_read(key) as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    f.write(chunk)
            digest = h.hexdigest()
            path = Path(tmp)
        else:
            digest = store.checksum(key) if expected_sha256 else ""
        if expected_sha256 and digest != expected_sha256:
            raise CheckpointMismatch(f"checkpoint {uri}: sha256 {digest} != expected {expected_sha256}")
        ckpt = torch.load(str(path), mmap=True, weights_only=True, map_location="cpu")
    finally:
        if tmp is not None:
            os.unlink(tmp)

    if state_key is None:
        state = ckpt
    else:
        state = ckpt.get(state_key) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointMismatch(f"checkpoint {uri}: no state dict under {state_key!r}"
                                 if state_key else f"checkpoint {uri}: not a state dict")
    arch = f"{model_name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    problems = []
    for name, want in expected.items():
        got = state.get(name)
        if not isinstance(got, torch.Tensor):
            problems.append(f"tensor {name!r} is missing from the checkpoint")
        elif tuple(got.shape) != tuple(want.shape):
            problems.append(f"tensor {name!r} has shape {list(got.shape)} in the checkpoint, "
                            f"{list(want.shape)} in the model")
        elif got.dtype != want.dtype:
            problems.append(f"tensor {name!r} is {got.dtype} in the checkpoint, {want.dtype} in the model")
    problems += [f"tensor {name!r} in the checkpoint is not part of the model" for name in state if name not in expected]
    if problems:
        more = f" ({len(problems)} mismatches in all)" if len(problems) > 1 else ""
        raise CheckpointMismatch(f"checkpoint {uri} does not match {arch}: {problems[0]}{more}")

    ordered = {name: state[name] for name in expected}  # the architecture's (stable) order
    info: dict[str, Any] = {"source": "checkpoint", "checkpoint": uri}
    if isinstance(ckpt, Mapping):
        for k in ("format", "epoch"):
            if isinstance(ckpt.get(k), (str, int)):
                info[f"checkpoint_{k}"] = ckpt[k]
    if expected_sha256:
        info["checkpoint_sha256"] = expected_sha256
    return TensorSource(ordered, dtype=dtype, config={"architecture": model_name, "kwargs": kwargs},
                        info=info, mapped=True)


# ---------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value) or ".tmp-" in value:
        raise ValueError(f"invalid {what} {value!r}: use letters, digits and . _ + - "
                         "(starting with a letter or digit, no '/')")
    return value


def version_prefix(model: str, version: str, root: str = DEFAULT_ROOT) -> str:
    """``<root>/<model>/<version>``: where a version's files live."""
    return check_key(join(root, _check_name(model, "model name"), _check_name(version, "version")))


def new_version(now: datetime | None = None) -> str:
    """``YYYYMMDDTHHMMSSZ-xxxxxx``: sorts by creation time; the random suffix avoids collisions."""
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def export(
    source: TensorSource | Mapping[str, torch.Tensor],
    store: Storage,
    model: str,
    version: str | None = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    root: str = DEFAULT_ROOT,
    run_id: str | None = None,
    data_version: str | None = None,
    config: dict | None = None,
    header_metadata: Mapping[str, str] | None = None,
    golden: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """Publish ``source`` as ``<root>/<model>/<version>/`` and return its manifest.

    ``golden`` (``{"input", "output"}``, from :func:`golden_outputs`) is written as
    ``golden.safetensors`` and listed in the manifest under ``"golden"``.

    ``header_metadata`` (str → str) is added to every shard's safetensors ``__metadata__`` — e.g.
    the quantization scheme, so a reader of any single file knows how to dequantize it.

    ``metadata`` (JSON-serializable) is stored in the manifest under ``"metadata"``; ``run_id`` and
    ``data_version`` record where the weights came from; ``config`` overrides/extends the
    source's architecture description. ``progress(bytes_done, bytes_total)`` is called after every
    tensor. Raises :class:`VersionExists` if the version is already published; on any failure the
    files written so far are deleted (best effort) and no manifest exists.
    """
    if isinstance(source, Mapping):
        source = TensorSource(source)
    version = version or new_version()
    if version in RESERVED_VERSIONS:
        raise ValueError(f"version {version!r} of {model!r}: {RESERVED_VERSIONS} name references, not versions")
    prefix = version_prefix(model, version, root)
    manifest_key = join(prefix, MANIFEST_NAME)
    index_key = join(prefix, INDEX_NAME)
    if store.exists(manifest_key):
        raise VersionExists(f"{store.uri(manifest_key)} exists: version {version!r} of {model!r} is "
                            "published and immutable; export to a new version")
    entries = list(source.entries)
    if not entries:
        raise ExportError(f"nothing to export for {model!r}: the source has no tensors")
    cfg = {**source.config, **(config or {})}
    extra = dict(metadata or {})
    json.dumps([cfg, extra, source.info])  # not serializable -> fail now, before writing anything
    golden_tensors = _golden_tensors(golden) if golden is not None else None
    header_meta = {"format": "pt", "forgeline.model": model, "forgeline.version": version}
    if run_id is not None:
        header_meta["forgeline.run_id"] = str(run_id)
    if data_version is not None:
        header_meta["forgeline.data_version"] = str(data_version)
    header_meta.update(header_metadata or {})

    by_name = {e.name: e for e in entries}
    if len(by_name) != len(entries):
        raise ExportError("the source yields a tensor name twice")
    plan = plan_shards(entries, max_shard_bytes, header_reserve=len(_metadata_json(header_meta).encode()))
    files = shard_file_names(len(plan))
    total = sum(e.nbytes for e in entries)

    stale = store.list(prefix)  # a crashed earlier attempt at this version (it has no manifest)
    for obj in stale:
        _delete_quietly(store, obj.key)

    written: list[str] = []
    shards: list[dict] = []
    done = 0

    def after(e: TensorEntry) -> None:
        nonlocal done
        source.release(e.name)
        done += e.nbytes
        if progress is not None:
            progress(done, total)

    cleanup = True
    try:
        for file, names in zip(files, plan):
            key = join(prefix, file)
            shard_entries = [by_name[n] for n in names]
            size = safetensors_size(shard_entries, header_meta)
            written.append(key)
            t0 = time.perf_counter()
            with store.open_write(key, expected_size=size) as w:
                write_safetensors(w, shard_entries, source.tensor, metadata=header_meta, after_tensor=after)
            assert w.info is not None
            shards.append({"file": file, "bytes": w.info.size, "sha256": w.info.sha256, "crc32": w.info.crc32,
                           "tensors": names,
                           "seconds": time.perf_counter() - t0})  # read, write and commit of the shard

        for s in shards:  # what is stored is what was written, before anything points at it
            key = join(prefix, s["file"])
            info = store.stat(key)
            if info.size != s["bytes"]:
                raise StorageError(f"{store.uri(key)}: stored {info.size} bytes, wrote {s['bytes']}")
            if info.sha256 is not None and info.sha256 != s["sha256"]:
                raise StorageError(f"{store.uri(key)}: stored sha256 {info.sha256}, wrote {s['sha256']}")

        index = {"metadata": {"total_size": total},
                 "weight_map": {n: s["file"] for s in shards for n in s["tensors"]}}
        written.append(index_key)
        index_info = store.write_atomic(index_key, json.dumps(index, indent=1).encode())
        golden_entry = None
        if golden_tensors is not None:
            golden_key = join(prefix, GOLDEN_NAME)
            entries_g = [entry_for(n, t) for n, t in golden_tensors.items()]
            written.append(golden_key)
            with store.open_write(golden_key, expected_size=safetensors_size(entries_g, header_meta)) as w:
                write_safetensors(w, entries_g, golden_tensors.__getitem__, metadata=header_meta)
            assert w.info is not None
            golden_entry = {"file": GOLDEN_NAME, "size": w.info.size, "sha256": w.info.sha256,
                            "crc32": w.info.crc32}

        dtypes: dict[str, int] = {}
        for e in entries:
            dtypes[str(e.dtype).removeprefix("torch.")] = dtypes.get(str(e.dtype).removeprefix("torch."), 0) + 1
        manifest = {
            "format": FORMAT,
            "model": model,
            "version": version,
            "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "config": cfg,
            "run_id": run_id,
            "data_version": data_version,
            "total_size": total,
            "bytes": sum(s["bytes"] for s in shards),
            "tensors": len(entries),
            "dtypes": dtypes,
            "max_shard_bytes": max_shard_bytes,
            "index": {"file": INDEX_NAME, "bytes": index_info.size, "sha256": index_info.sha256,
                      "crc32": index_info.crc32},
            "shards": shards,
            "source": source.info,
            "metadata": extra,
        }
        if golden_entry is not None:
            manifest["golden"] = golden_entry
        if store.exists(manifest_key):  # someone published this version meanwhile: theirs stands
            cleanup = False  # (same file names: deleting "ours" would delete theirs)
            raise VersionExists(f"{store.uri(manifest_key)} appeared during the export; version "
                                f"{version!r} of {model!r} was published by another writer")
        store.write_atomic(manifest_key, manifest_bytes(manifest))
        return manifest
    except BaseException:
        if cleanup:
            for key in written:
                _delete_quietly(store, key)
        raise


def _delete_quietly(store: Storage, key: str) -> None:
    try:
        store.delete(key)
    except Exception:  # best effort: without a manifest the files are invisible anyway
        pass


# ---------------------------------------------------------------------------------------------
# Reading published versions
# ---------------------------------------------------------------------------------------------


def list_versions(store: Storage, model: str, root: str = DEFAULT_ROOT) -> list[str]:
    """Published versions of ``model`` (those with a manifest), sorted by name (the default
    version names sort by creation time)."""
    base = join(root, _check_name(model, "model name"))
    out = []
    for obj in store.list(base):
        parts = obj.key[len(base) + 1 :].split("/")
        if len(parts) == 2 and parts[1] == MANIFEST_NAME:
            out.append(parts[0])
    return sorted(out)


class ListedFile(NamedTuple):
    """One file a manifest lists. ``crc32`` is None in manifests written before it was recorded."""

    file: str
    bytes: int
    sha256: str | None
    crc32: str | None


def manifest_files(manifest: dict) -> list[ListedFile]:
    """Every file a manifest lists: shards, index, golden outputs."""
    entries = [(s, "bytes") for s in manifest["shards"]]
    if manifest.get("index"):
        entries.append((manifest["index"], "bytes"))
    if manifest.get("golden"):
        entries.append((manifest["golden"], "size"))
    return [ListedFile(e["file"], int(e[size]), e.get("sha256"), e.get("crc32")) for e, size in entries]


def version_problem(
    store: Storage, model: str, version: str, *, root: str = DEFAULT_ROOT, allow_rejected: bool = False,
    manifest: dict | None = None, files: bool = True, known_sizes: Mapping[str, int] | None = None,
) -> str | None:
    """Why ``model/version`` in ``store`` is not a complete, usable published version, or None when
    it is: its manifest is there in the supported format, unless ``allow_rejected`` no gate
    rejected it, and every file it lists (shards, index, golden outputs) is present with the
    listed size. Sizes only (a stat per file, all at once): :func:`verify` recomputes the hashes.
    ``manifest``: the version's manifest when the caller has already read it (one read less). ``files=False``:
    the manifest alone (well-formed, not rejected), no stat (for a caller that reads the bytes
    from elsewhere and checks them against the manifest's sha256s). ``known_sizes``: the sizes
    of listed files (by name) the caller has just learned from ``store`` itself, not asked again
    (the loader's first read of each shard answers its size)."""
    what = f"{model}/{version}"
    try:
        if manifest is None:
            manifest = read_manifest(store, model, version, root=root)
        listed = manifest_files(manifest)
        prefix = version_prefix(model, version, root)
    except (ExportError, StorageError) as e:
        return str(e)
    except (KeyError, TypeError, ValueError) as e:
        return f"{what}: unreadable or malformed manifest ({type(e).__name__}: {e})"
    rejected = manifest.get("rejected")  # before the stats: it costs no round trip
    if rejected and not allow_rejected:
        return f"{what} is rejected: {rejected.get('reason') if isinstance(rejected, dict) else rejected}"

    known = dict(known_sizes or {})

    def size_of(entry: ListedFile) -> int | str:
        try:
            return store.stat(join(prefix, entry.file)).size
        except StorageError as e:
            return f"{what}: {entry.file} is missing or unreadable ({e})"

    # the stats in parallel: on S3 one round trip for the version, not one per file
    todo = [e for e in listed if e.file not in known] if files else []
    known.update(zip((e.file for e in todo), in_parallel(size_of, todo, "forgeline-stat", store.parallel_requests)))
    for entry in listed if files else ():
        got = known[entry.file]
        if isinstance(got, str):
            return got
        if got != entry.bytes:
            return f"{what}: {entry.file} has {got} bytes, the manifest says {entry.bytes}"
    return None


def latest_version(store: Storage, model: str, root: str = DEFAULT_ROOT) -> str | None:
    """The most recently created (by the manifests' ``created``) published version that is
    complete and not rejected (:func:`version_problem`), or None."""
    found = latest_manifest(store, model, root)
    return found[0] if found else None


def latest_manifest(store: Storage, model: str, root: str = DEFAULT_ROOT, *,
                    candidates: list[tuple[str, dict]] | None = None) -> tuple[str, dict] | None:
    """:func:`latest_version` and its manifest: the newest of :func:`newest_manifests` (or of
    ``candidates``, what it gave the caller) that passes :func:`version_problem`, usually after
    one round of stats, however many versions."""
    for v, m in candidates if candidates is not None else newest_manifests(store, model, root):
        if version_problem(store, model, v, root=root, manifest=m) is None:
            return v, m
    return None


def newest_manifests(store: Storage, model: str, root: str = DEFAULT_ROOT) -> list[tuple[str, dict]]:
    """``[(version, manifest)]`` of every published version of ``model`` whose manifest reads,
    newest first (by the manifests' ``created``): the candidates for ``latest``, whole or rejected
    or not. One list and one round of manifest reads (in parallel), however many versions."""

    def manifest_of(v: str) -> dict | None:
        try:
            return read_manifest(store, model, v, root=root)
        except (ExportError, StorageError, ValueError):
            return None  # unreadable: not a usable version (version_problem would say why)

    versions = list_versions(store, model, root)
    manifests = in_parallel(manifest_of, versions, "forgeline-manifest", store.parallel_requests)
    newest_first = sorted(((str(m.get("created", "")), v, m) for v, m in zip(versions, manifests)
                           if isinstance(m, dict)), key=lambda c: c[:2], reverse=True)
    return [(v, m) for _created, v, m in newest_first]


def record_gates(store: Storage, model: str, version: str, gates: Mapping[str, dict], *,
                 root: str = DEFAULT_ROOT) -> dict:
    """Record gate results (``{name: {"passed", "value", "limit", ...}}``) in the manifest of a
    published version, rewritten atomically; a failed gate marks the version rejected
    (``manifest["rejected"] = {"at", "reason"}``), a passing re-evaluation clears that. The files
    of the version are untouched. Returns the new manifest."""
    manifest = read_manifest(store, model, version, root=root)
    gates = {name: dict(g) for name, g in gates.items()}
    manifest["gates"] = {**(manifest.get("gates") or {}), **gates}
    failed = sorted(name for name, g in manifest["gates"].items() if not g.get("passed"))
    if failed:
        manifest["rejected"] = {"at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                                "reason": "failed gate(s): " + ", ".join(failed)}
    else:
        manifest.pop("rejected", None)
    store.write_atomic(join(version_prefix(model, version, root), MANIFEST_NAME), manifest_bytes(manifest))
    return manifest


def find_version(store: Storage, model: str, source: dict, *, root: str = DEFAULT_ROOT) -> str | None:
    """The newest published version of ``model`` whose manifest records exactly this ``source``
    (``metadata.source``, e.g. the checkpoint sha256 and export options), or None. Lets a re-run on
    the same weights reuse the version instead of publishing an identical one."""
    for v in sorted(list_versions(store, model, root), reverse=True):
        if (read_manifest(store, model, v, root=root).get("metadata") or {}).get("source") == source:
            return v
    return None


def manifest_bytes(manifest: dict) -> bytes:
    """A manifest as it is stored (export, gate records, and the shm tier's copy of a manifest it
    was handed rather than read: the same bytes as the published one)."""
    return json.dumps(manifest, indent=1).encode()


def read_manifest(store: Storage, model: str, version: str, *, root: str = DEFAULT_ROOT) -> dict:
    key = join(version_prefix(model, version, root), MANIFEST_NAME)
    try:
        raw = store.read(key)
    except ObjectNotFound:
        raise VersionNotFound(f"{store.uri(key)}: no such published version {version!r} of {model!r}") from None
    return parse_manifest(raw, store.uri(key))


def parse_manifest(raw: bytes, where: str) -> dict:
    """A stored manifest's bytes (from ``where``, its uri) as a manifest of this format, else
    :class:`~pipeline.storage.CorruptObject` or :class:`ExportError` naming ``where``."""
    manifest = parse_record(raw, where, "manifest")
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{where}: unsupported manifest format {manifest.get('format')!r}")
    return manifest


def verify(store: Storage, model: str, version: str, *, root: str = DEFAULT_ROOT) -> list[str]:
    """Problems with a published version, each naming its file: a missing shard, a size, sha256 or
    crc32 mismatch (recomputed from the stored bytes), an index that disagrees with the
    manifest. An empty list means every byte is as published."""
    manifest = read_manifest(store, model, version, root=root)
    prefix = version_prefix(model, version, root)
    problems = []
    for s in manifest["shards"]:
        problems += _shard_problems(store, join(prefix, s["file"]), s)
    if g := manifest.get("golden"):
        problems += _file_problems(store, join(prefix, g["file"]), f"golden {g['file']}", g["size"], g)
    idx = manifest.get("index") or {"file": INDEX_NAME}
    try:
        index = store.read_record(join(prefix, idx["file"]), "index")
        want = {n: s["file"] for s in manifest["shards"] for n in s["tensors"]}
        if index.get("weight_map") != want or index.get("metadata", {}).get("total_size") != manifest["total_size"]:
            problems.append(f"{idx['file']}: weight map or total_size disagrees with the manifest")
    except ObjectNotFound:
        problems.append(f"{idx['file']}: missing")
    except (StorageError, ValueError) as e:
        problems.append(f"{idx['file']}: unreadable ({e})")
    return problems


def _shard_problems(store: Storage, key: str, shard: dict, data: bytes | None = None) -> list[str]:
    return _file_problems(store, key, f"shard {shard['file']}", shard["bytes"], shard, data)


def _file_problems(store: Storage, key: str, what: str, want_size: int, entry: dict,
                   data: bytes | None = None) -> list[str]:
    """Size, sha256 and (when the manifest ``entry`` records it) crc32 of one stored file, both
    hashes from one read of its bytes (``data`` when the caller has read them already)."""
    try:
        size = store.stat(key).size
    except ObjectNotFound:
        return [f"{what}: missing ({store.uri(key)})"]
    if size != want_size:
        return [f"{what}: {size} bytes stored, manifest says {want_size}"]
    sha, crc = hashlib.sha256(), Crc32()
    try:
        if data is None:
            with store.open_read(key) as f:
                hash_stream(f, sha, crc)
        else:
            sha.update(data)
            crc.update(data)
    except StorageError as e:
        return [f"{what}: unreadable ({e})"]
    for h, want in ((sha, entry["sha256"]), (crc, entry.get("crc32"))):
        if want is not None and h.hexdigest() != want:
            return [f"{what}: {h.name} mismatch (stored bytes hash to {h.hexdigest()}, manifest says {want})"]
    return []


# ---------------------------------------------------------------------------------------------
# Golden outputs
# ---------------------------------------------------------------------------------------------


def golden_input(shape: Sequence[int], *, batch: int = GOLDEN_BATCH, seed: int = GOLDEN_SEED) -> torch.Tensor:
    """The fixed input golden outputs are recorded on: ``batch`` samples of ``shape`` (one sample,
    e.g. ``(1, 28, 28)``), float32, standard normal from a generator seeded with ``seed``."""
    return torch.randn(batch, *(int(s) for s in shape), generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float32)


@torch.no_grad()
def golden_outputs(module: "nn.Module", inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"input", "output"}`` for :func:`export`'s ``golden``: ``module``'s eval-mode output on
    the CPU for ``inputs`` (cast to the module's floating dtype on the way in), both float32."""
    module = module.eval().cpu()
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    out = module(inputs.to(dtype))
    return {"input": inputs.detach().to(torch.float32).contiguous(), "output": out.detach().to(torch.float32).contiguous()}


def _golden_tensors(golden: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if set(golden) != {"input", "output"}:
        raise ExportError(f"golden outputs are {{'input', 'output'}}, got {sorted(golden)}")
    out = {}
    for name in ("input", "output"):
        t = golden[name]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise ExportError(f"golden {name!r} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        out[name] = t.detach().cpu().contiguous()
    return out


def read_golden(store: Storage, model: str, version: str, *, root: str = DEFAULT_ROOT,
                manifest: dict | None = None) -> dict[str, torch.Tensor] | None:
    """The golden ``{"input", "output"}`` of a published version (sha256 checked against the
    manifest, read here unless the caller passes it), or None when it has none."""
    from safetensors.torch import load as st_load

    if manifest is None:
        manifest = read_manifest(store, model, version, root=root)
    g = manifest.get("golden")
    if not g:
        return None
    key = join(version_prefix(model, version, root), g["file"])
    data = store.read(key)
    if len(data) != g["size"] or hashlib.sha256(data).hexdigest() != g["sha256"]:
        raise VerificationFailed(f"{model}/{version}", [f"golden {g['file']}: size or sha256 differs from the manifest"])
    return st_load(data)


def load_state_dict(
    store: Storage, model: str, version: str, *, root: str = DEFAULT_ROOT, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Every tensor of a published version, on the CPU, via ``safetensors`` (the simple, correct
    loader). With ``verify`` each shard's size and sha256 are checked first and
    :class:`VerificationFailed` names the bad shards."""
    from safetensors.torch import load as st_load
    from safetensors.torch import load_file

    manifest = read_manifest(store, model, version, root=root)
    prefix = version_prefix(model, version, root)
    out: dict[str, torch.Tensor] = {}
    for s in manifest["shards"]:
        key = join(prefix, s["file"])
        path = store.local_path(key)
        if path is not None:
            if verify and (problems := _shard_problems(store, key, s)):
                raise VerificationFailed(f"{model}/{version}", problems)
            tensors = load_file(str(path))
        else:
            try:
                data = store.read(key)
            except ObjectNotFound:
                raise VerificationFailed(f"{model}/{version}", [f"shard {s['file']}: missing ({store.uri(key)})"]) from None
            if verify and (problems := _shard_problems(store, key, s, data)):
                raise VerificationFailed(f"{model}/{version}", problems)
            tensors = st_load(data)
            del data
        if set(tensors) != set(s["tensors"]):
            raise VerificationFailed(f"{model}/{version}", [f"shard {s['file']}: holds other tensors than the manifest lists"])
        out.update(tensors)
    return {n: out[n] for s in manifest["shards"] for n in s["tensors"]}


def module_from_state(manifest: dict, state: dict[str, torch.Tensor]) -> "nn.Module":
    from pipeline.models import build_model

    cfg = manifest.get("config") or {}
    arch = cfg.get("architecture")
    if not arch:
        raise ExportError(f"{manifest['model']}/{manifest['version']}: the manifest names no architecture "
                          "(export with from_module(..., architecture=...) or from_checkpoint)")
    with torch.device("meta"):
        module = build_model(arch, **(cfg.get("kwargs") or {}))
    module.load_state_dict(state, strict=True, assign=True)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_meta:
            raise ExportError(f"{arch}: {name!r} is not in the state dict (a non-persistent buffer?) "
                              "and stays on the meta device")
    return module.eval()


def build_from_version(
    store: Storage, model: str, version: str, *, root: str = DEFAULT_ROOT, verify: bool = True
) -> "nn.Module":
    """The published model as a CPU module in eval mode: built on the meta device from the
    manifest's config, then the loaded tensors assigned (no second copy, no random init)."""
    manifest = read_manifest(store, model, version, root=root)
    return module_from_state(manifest, load_state_dict(store, model, version, root=root, verify=verify))


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def check_version(
    store: Storage,
    model: str,
    version: str,
    reference: "nn.Module",
    batch: torch.Tensor | None = None,
    *,
    root: str = DEFAULT_ROOT,
    atol: float = 0.0,
    rtol: float = 0.0,
) -> list[str]:
    """The asset check: problems (empty = pass) with a published version compared with the trained
    module it came from. Files are verified first (a corrupt shard is reported by name); then every
    tensor must equal the reference's bit for bit (after the export's dtype cast, if any), and,
    given a ``batch``, the rebuilt model's outputs must match the reference's (exactly, unless
    ``atol``/``rtol`` allow otherwise)."""
    problems = verify(store, model, version, root=root)
    if problems:
        return problems
    manifest = read_manifest(store, model, version, root=root)
    state = load_state_dict(store, model, version, root=root, verify=False)
    ref = reference.state_dict()
    for name in ref.keys() - state.keys():
        problems.append(f"tensor {name!r} of the trained model is missing from the published version")
    for name in state.keys() - ref.keys():
        problems.append(f"tensor {name!r} in the published version is not in the trained model")
    for name, t in state.items():
        r = ref.get(name)
        if r is None:
            continue
        r = r.detach().cpu()
        if r.dtype != t.dtype and r.is_floating_point():
            r = r.to(t.dtype)
        if not _bitwise_equal(r, t):
            problems.append(f"tensor {name!r} differs from the trained model "
                            f"({r.dtype} {list(r.shape)} vs {t.dtype} {list(t.shape)})")
    if problems or batch is None:
        return problems
    module = module_from_state(manifest, state)
    was_training = reference.training
    reference.eval()
    try:
        with torch.no_grad():
            device = next((p.device for p in reference.parameters()), torch.device("cpu"))
            want = reference(batch.to(device)).detach().cpu()
            got = module(batch.cpu())
    finally:
        reference.train(was_training)
    if want.shape != got.shape or want.dtype != got.dtype:
        problems.append(f"outputs on the check batch are {got.dtype} {list(got.shape)}, "
                        f"the trained model gives {want.dtype} {list(want.shape)}")
    elif want.is_floating_point() and not torch.isfinite(want).all():
        # NaN never equals NaN: not an export fault, a model that is no model (training diverged)
        bad = sum(1 for _, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all())
        problems.append(f"the trained model's outputs on the check batch are not finite (NaN or inf; {bad} of "
                        f"{len(state)} tensors hold such values): its training diverged")
    elif not (torch.equal(want, got) if atol == rtol == 0 else torch.allclose(want, got, atol=atol, rtol=rtol)):
        diff = (want.double() - got.double()).abs().max().item()
        problems.append(f"outputs on the check batch differ from the trained model (max |diff| {diff:.3g})")
    return problems


__all__ = [
    "CheckpointMismatch",
    "DEFAULT_MAX_SHARD_BYTES",
    "ExportError",
    "FORMAT",
    "GOLDEN_NAME",
    "INDEX_NAME",
    "ListedFile",
    "MANIFEST_NAME",
    "TensorEntry",
    "TensorSource",
    "VerificationFailed",
    "VersionExists",
    "VersionNotFound",
    "build_from_version",
    "check_version",
    "encode_header",
    "export",
    "from_checkpoint",
    "from_module",
    "golden_input",
    "golden_outputs",
    "latest_manifest",
    "latest_version",
    "list_versions",
    "load_state_dict",
    "manifest_bytes",
    "manifest_files",
    "new_version",
    "newest_manifests",
    "parse_manifest",
    "plan_shards",
    "read_golden",
    "read_manifest",
    "record_gates",
    "safetensors_size",
    "shard_file_names",
    "shard_layout",
    "st_dtype",
    "tensor_bytes",
    "verify",
    "version_prefix",
    "version_problem",
    "write_safetensors",
]
