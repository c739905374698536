"""Reading and validating a safetensors header: every problem with a file's layout is found here,
before the loader allocates anything, and raised as :class:`LoadError` naming the file.

The dtype codes come from the one table in :mod:`pipeline.safetensors_format`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from pipeline.safetensors_format import DTYPES, TABLE, itemsize

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces


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
        return itemsize(self.code)


class _DuplicateKey(Exception):
    pass


def _dup_check(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def header_length(first8: bytes, file_size: int, name: str) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against the file's size."""
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
    ``name``: a truncated file, bad JSON, an unknown dtype, a shape that does not match its byte
    span, offsets beyond the file or overlapping (gaps are allowed). Nothing is allocated beyond
    the header bytes.
    """
    read = _byte_reader(buf_or_file)
    try:
        n = header_length(read(0, 8), file_size, name)
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
    entries = [_entry(name, tname, e, data_start, data_size, file_size) for tname, e in header.items()]
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


def _entry(name: str, tname: str, e: Any, data_start: int, data_size: int, file_size: int) -> TensorInfo:
    """One header entry, validated."""
    what = f"tensor {tname!r}"
    if not isinstance(e, dict):
        raise LoadError(name, f"{what}: entry is not a JSON object")
    code, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if code not in TABLE:
        raise LoadError(name, f"{what}: unknown dtype {code!r}")
    if code not in DTYPES:
        raise LoadError(name, f"{what}: dtype {code} is not supported by torch {torch.__version__}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise LoadError(name, f"{what}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise LoadError(name, f"{what}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    expected = math.prod(shape) * itemsize(code)
    begin, end = offsets
    if end - begin != expected:
        raise LoadError(name, f"{what}: shape {shape} x {code} is {expected} bytes but data_offsets "
                              f"{offsets} span {end - begin} (shape/size mismatch)")
    if end > data_size:
        raise LoadError(name, f"{what}: data_offsets {offsets} out of range: the data section has "
                              f"{max(data_size, 0)} bytes (file of {file_size}; truncated?)")
    return TensorInfo(tname, DTYPES[code], code, tuple(shape), data_start + begin, data_start + end)


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


__all__ = ["MAX_HEADER_BYTES", "LoadError", "TensorInfo", "header_length", "parse_header"]
