"""Reading and validating a safetensors header: every problem with a file's layout is found here,
before the loader allocates anything, and raised as :class:`LoadError` naming the file.

The dtype codes come from the one table in :mod:`pipeline.safetensors_format`.
"""

from __future__ import annotations

import json
import math
import os
import re
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
    if n > MAX_HEADER_BYTES:
        raise LoadError(name, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit: "
                              "not a safetensors file, or a corrupted one")
    if n > file_size - 8:
        raise LoadError(name, f"header length {n} runs past the end of the file ({file_size} bytes): "
                              "truncated, or not a safetensors file")
    if n < 2:
        raise LoadError(name, f"header length {n} is too small for a JSON object")
    return n


def parse_header(buf_or_file: Any, file_size: int, name: str) -> tuple[int, list[TensorInfo], dict[str, str]]:
    """Validate a safetensors header; returns ``(header_len, entries, metadata)``.

    ``buf_or_file``: the file's first bytes (at least ``8 + header_len`` of them), an open binary
    file, a file descriptor or a path. ``header_len`` is the JSON length (data starts at
    ``8 + header_len``); ``entries`` are sorted by offset with absolute ``start``/``end``;
    ``metadata`` is ``__metadata__`` (str -> str). Nothing is allocated beyond the header bytes.

    Every file the ``safetensors`` library (0.8) rejects is rejected here, as :class:`LoadError`
    naming ``name`` (never another exception type), and a few more (see docs/loading.md,
    "Validation"): a truncated file, a header that is not UTF-8 or not one JSON object, nesting
    deeper than safetensors' JSON parser allows, duplicate keys, NaN/Infinity, an unknown dtype,
    shapes/offsets that are not unsigned 64-bit integers, a shape that does not match its byte
    span, and tensors that do not tile the data section exactly (no overlap, no gap, no trailing
    bytes).
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
    header = _parse_json(bytes(raw), name)

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoadError(name, f"__metadata__ must map strings to strings, got {_short(metadata)}")
    data_start = 8 + n
    data_size = file_size - data_start
    entries = [_entry(name, tname, e, data_start, data_size, file_size) for tname, e in header.items()]
    entries.sort(key=lambda t: (t.start, t.end))
    # safetensors' rule: sorted by (begin, end), each tensor starts where the previous one ends,
    # the first at 0 and the last ends at the end of the file. Zero-size tensors included.
    at, prev = data_start, None
    for t in entries:
        if t.start < at:
            raise LoadError(name, f"tensors {prev.name!r} and {t.name!r} overlap (bytes "
                                  f"[{prev.start - data_start}, {prev.end - data_start}) and "
                                  f"[{t.start - data_start}, {t.end - data_start}))")
        if t.start > at:
            after = f"after tensor {prev.name!r}" if prev else "at the start of the data section"
            raise LoadError(name, f"gap of {t.start - at} unreferenced bytes {after} (tensor {t.name!r} "
                                  f"starts at byte {t.start - data_start}, expected {at - data_start}): "
                                  "safetensors requires tensors to be contiguous")
        at, prev = t.end, t
    if at != file_size:
        raise LoadError(name, f"{file_size - at} trailing bytes after the last tensor (the tensors end at "
                              f"byte {at - data_start} of a {data_size}-byte data section): safetensors "
                              "rejects this; a corrupted, concatenated or overwritten file?")
    return n, entries, dict(metadata)


_MAX_U64 = 2**64 - 1
# serde_json (safetensors' parser) refuses nesting deeper than this; Python's json would recurse
# until RecursionError, so the depth is checked before parsing.
MAX_JSON_DEPTH = 127
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _short(v: Any, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _json_depth(raw: bytes) -> int:
    """Maximum nesting of ``[``/``{`` outside strings (for valid JSON; invalid JSON fails later)."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, delete=_NOT_BRACKETS)
    if len(brackets) < 2 * MAX_JSON_DEPTH:
        depth = top = 0
        for c in brackets:
            depth += 1 if c in b"[{" else -1
            top = max(top, depth)
        return top
    t = torch.frombuffer(bytearray(brackets), dtype=torch.uint8)
    step = ((t == ord("[")) | (t == ord("{"))).to(torch.int64) * 2 - 1
    return int(step.cumsum(0).max())


_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def _bad_constant(name: str):
    def refuse(token: str) -> Any:
        raise _Refused(f"{token} is not valid JSON")
    return refuse


class _Refused(Exception):
    pass


def _parse_float(s: str) -> float:
    v = float(s)
    if math.isinf(v):
        raise _Refused(f"number {s[:40]} is out of range")
    return v


def _parse_int(s: str) -> int:
    if len(s.lstrip("-")) > 20:  # beyond any 64-bit integer; serde_json parses it as a float
        return _parse_float(s)  # type: ignore[return-value]
    return int(s)


def _check_strings(v: Any, name: str) -> None:
    """Lone surrogates (``"\\ud800"``) parse in Python but are not Unicode text: serde_json refuses them."""
    stack = [v]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            items: Any = (v,)
        elif isinstance(v, dict):
            items = v.keys()
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
            continue
        else:
            continue
        for s in items:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise LoadError(name, f"header string {_short(s)} holds an unpaired UTF-16 surrogate") from None


def _parse_json(raw: bytes, name: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoadError(name, f"header is not valid UTF-8 ({e})") from None
    if not text.startswith("{"):
        raise LoadError(name, "header is not a JSON object (does not start with '{')")
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise LoadError(name, f"header nests {depth} levels deep, more than the {MAX_JSON_DEPTH} "
                              "safetensors allows")
    try:
        header = json.loads(text, object_pairs_hook=_dup_check, parse_constant=_bad_constant(name),
                            parse_float=_parse_float, parse_int=_parse_int)
    except _DuplicateKey as e:
        raise LoadError(name, f"header names {_short(e.args[0])} twice") from None
    except _Refused as e:
        raise LoadError(name, f"header is not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise LoadError(name, f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise LoadError(name, "header is not a JSON object")
    _check_strings(header, name)
    return header


def _u64(v: Any) -> bool:
    return _is_int(v) and 0 <= v <= _MAX_U64


def _entry(name: str, tname: str, e: Any, data_start: int, data_size: int, file_size: int) -> TensorInfo:
    """One header entry, validated."""
    what = f"tensor {tname!r}"
    if not isinstance(e, dict):
        raise LoadError(name, f"{what}: entry is not a JSON object but {_short(e)}")
    code, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(code, str) or code not in TABLE:
        raise LoadError(name, f"{what}: unknown dtype {_short(code)}")
    if code not in DTYPES:
        raise LoadError(name, f"{what}: dtype {code} is not supported by torch {torch.__version__}")
    if not isinstance(shape, list) or not all(_u64(s) for s in shape):
        raise LoadError(name, f"{what}: shape {_short(shape)} is not a list of non-negative 64-bit integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_u64(o) for o in offsets)
            or not offsets[0] <= offsets[1]):
        raise LoadError(name, f"{what}: data_offsets {_short(offsets)} is not [begin, end] with "
                              "0 <= begin <= end < 2**64")
    elements = math.prod(shape)
    expected = elements * itemsize(code)
    if elements > _MAX_U64 or expected > _MAX_U64:
        raise LoadError(name, f"{what}: shape {_short(shape)} x {code} overflows 64 bits")
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


__all__ = ["MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "LoadError", "TensorInfo", "header_length", "parse_header"]
