"""Open Inference Protocol v2 (KServe / Triton) request and response codec, plain Python + numpy.

A request body is either one JSON object, or — Triton's binary tensor-data extension — a JSON
header of ``Inference-Header-Content-Length`` bytes followed by the raw bytes of every input whose
``parameters.binary_data_size`` is set, in input order::

    {"id": "7", "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                            "parameters": {"binary_data_size": 32}}],
     "outputs": [{"name": "y", "parameters": {"binary_data": true}}],
     "parameters": {"binary_data_output": true}}<32 raw little-endian bytes>

JSON tensors carry ``data``: the elements in row-major order, flat or nested to the shape. An
output is sent as raw bytes when its request entry says ``parameters.binary_data`` (that wins), or
else when the request says ``parameters.binary_data_output``; the response then starts with its
JSON header, whose length is the ``Inference-Header-Content-Length`` response header, and has
``Content-Type: application/octet-stream`` — what ``tritonclient.http`` expects.

Every way a body can be wrong raises :class:`ProtocolError` with a one-line message and the HTTP
status to answer with (400, or 413 for a body over the limit). Nothing here knows about models:
which inputs a model takes is the registry's business.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
DEFAULT_MAX_BODY_BYTES = 64 * 2**20

# OIP datatype → numpy dtype (little-endian, as the binary extension sends them). BYTES is a
# sequence of 4-byte-length-prefixed elements (numpy object arrays of ``bytes``).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
# Valid in the protocol, not decodable here (numpy has no bfloat16).
UNSUPPORTED_DATATYPES = {"BF16"}


class ProtocolError(Exception):
    """A request the protocol cannot accept; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def datatype_of(dtype: np.dtype) -> str:
    """The OIP datatype of a numpy dtype (``ValueError`` when there is none)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    for name, dt in DATATYPES.items():
        if dt.kind == dtype.kind and dt.itemsize == dtype.itemsize and name != "BYTES":
            return name
    raise ValueError(f"no Open Inference Protocol datatype for numpy {dtype}")


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


@dataclass
class InferRequest:
    """A decoded inference request: the input arrays (shaped, in request order) and what the
    response should look like."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    # Requested outputs in order (None: all the model has) → explicit binary choice or None.
    outputs: dict[str, bool | None] | None = None
    binary_data_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    def wants_binary(self, name: str) -> bool:
        explicit = (self.outputs or {}).get(name)
        return self.binary_data_output if explicit is None else explicit


def read_body_limit(content_length: str | None, max_body_bytes: int) -> None:
    """413 before reading anything when the declared length is already over the limit."""
    if content_length is None:
        return
    try:
        n = int(content_length)
    except ValueError:
        raise ProtocolError(f"bad Content-Length header {content_length!r}") from None
    if n > max_body_bytes:
        raise ProtocolError(f"request body of {n} bytes is over the server's limit of {max_body_bytes} bytes", 413)


def decompress(body: bytes, encoding: str | None, max_body_bytes: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (what tritonclient's request compression sends),
    refusing anything that inflates past the limit."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    enc = encoding.strip().lower()
    if enc not in ("gzip", "deflate"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r} (use gzip, deflate or none)", 415)
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, max_body_bytes + 1)
    except zlib.error as e:
        raise ProtocolError(f"body is not valid {enc} data: {e}") from None
    if len(out) > max_body_bytes or d.unconsumed_tail:
        raise ProtocolError(f"decompressed request body is over the server's limit of {max_body_bytes} bytes", 413)
    return out


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def load_json(raw: bytes | memoryview, what: str) -> Any:
    """JSON as RFC 8259 has it: no NaN or Infinity (Python's json takes them); a client's mistake,
    so a 400, as is nesting too deep for the parser. (A number too large for a float, 1e400, reads
    as infinity: the tensor's decoding refuses it.)"""
    try:
        return json.loads(bytes(raw), parse_constant=_not_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{what} is not valid JSON: {e}") from None
    except ValueError as e:
        raise ProtocolError(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise ProtocolError(f"{what} is not accepted: JSON nested too deep") from None


def _header_length(value: str | None, body_len: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ProtocolError(f"bad {HEADER_LENGTH} header {value!r}: not an integer") from None
    if n < 0 or n > body_len:
        raise ProtocolError(f"{HEADER_LENGTH} is {n} but the body has {body_len} bytes")
    return n


def _check_shape(shape: Any, where: str) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(f"{where}: 'shape' must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"{where}: 'shape' {shape} has a negative dimension")
    return shape


def _parameters(obj: Mapping, where: str) -> dict:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(f"{where}: 'parameters' must be an object")
    return params


def _bool_param(params: Mapping, key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}: parameter {key!r} must be true or false, got {value!r}")
    return value


def _json_array(data: Any, datatype: str, shape: list[int], where: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        flat = _flatten(data, where)
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"{where}: BYTES data must be strings")
        arr = np.empty(len(flat), dtype=object)
        arr[:] = [v.encode() for v in flat]
    else:
        try:
            arr = np.asarray(data)
        except ValueError:
            raise ProtocolError(f"{where}: 'data' is ragged (nested lists of different lengths)") from None
        arr = arr.reshape(-1)
        want = DATATYPES[datatype]
        kind = arr.dtype.kind
        if arr.size == 0:
            arr = arr.astype(want)
        elif want.kind == "b":
            if kind != "b":
                raise ProtocolError(f"{where}: BOOL data must be true/false values")
        elif want.kind in "iu":
            if kind in "fO":
                # Integers past int64 (UINT64's upper half) make numpy pick float64 or object:
                # decide on the Python values themselves.
                flat = _flatten(data, where)
                if not all(type(v) is int for v in flat):
                    raise ProtocolError(f"{where}: {datatype} data must be integers")
                try:
                    arr = np.array(flat, dtype=want)
                except OverflowError:
                    info = np.iinfo(want)
                    raise ProtocolError(f"{where}: value out of range for {datatype} ({info.min}..{info.max})") from None
                kind = want.kind
            if kind not in "iu":
                raise ProtocolError(f"{where}: {datatype} data must be integers")
            info = np.iinfo(want)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise ProtocolError(f"{where}: value out of range for {datatype} ({info.min}..{info.max})")
        elif want.kind == "f":
            if kind == "O":  # integers past int64 among them: numpy keeps Python objects
                flat = _flatten(data, where)
                if all(type(v) in (int, float) for v in flat):
                    try:
                        arr, kind = np.array(flat, dtype=np.float64), "f"
                    except OverflowError:
                        raise ProtocolError(f"{where}: value out of range for {datatype}") from None
            if kind not in "iuf":
                raise ProtocolError(f"{where}: {datatype} data must be numbers")
            if kind == "f" and not np.isfinite(arr).all():  # 1e400 in the JSON: no JSON number is infinite
                raise ProtocolError(f"{where}: value {arr[~np.isfinite(arr)][0].item()!r} out of range for a number")
            if want.itemsize < arr.dtype.itemsize or kind != "f":  # a number may not fit: say so, not inf
                with np.errstate(over="ignore"):
                    narrow = arr.astype(want)
                over = np.isinf(narrow) & ~np.isinf(arr)
                if over.any():
                    raise ProtocolError(f"{where}: value {arr[over][0].item()!r} out of range for {datatype} "
                                        f"(largest {np.finfo(want).max.item():g})")
                arr = narrow
        if arr.dtype != want:
            arr = arr.astype(want)
    if arr.size != count:
        raise ProtocolError(f"{where}: shape {shape} needs {count} elements, 'data' has {arr.size}")
    return arr.reshape(shape)


def _flatten(data: Any, where: str) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _bytes_elements(raw: memoryview, count: int, where: str) -> np.ndarray:
    out = np.empty(count, dtype=object)
    off, n = 0, len(raw)
    for i in range(count):
        if off + 4 > n:
            raise ProtocolError(f"{where}: BYTES data ends after {i} of {count} elements")
        (length,) = struct.unpack_from("<I", raw, off)
        off += 4
        if off + length > n:
            raise ProtocolError(f"{where}: BYTES element {i} claims {length} bytes, {n - off} left")
        out[i] = bytes(raw[off:off + length])
        off += length
    if off != n:
        raise ProtocolError(f"{where}: {n - off} bytes left over after {count} BYTES elements")
    return out


def decode_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Parse and validate an inference request body (JSON, or JSON + binary tensor data).

    A bad request raises a new :class:`ProtocolError` with none of the decoding's frames behind
    it: their locals are the decoded JSON (a 60 MB body: ~0.75 GB of Python numbers), which a
    traceback caught in a reference cycle would otherwise keep alive until a full collection."""
    try:
        return _decode_request(body, header_length)
    except ProtocolError as e:
        said = (str(e), e.status)
    raise ProtocolError(*said)


def _decode_request(body: bytes, header_length: str | None) -> InferRequest:
    hlen = _header_length(header_length, len(body))
    view = memoryview(body)
    head = load_json(view if hlen is None else view[:hlen], "request")
    if not isinstance(head, dict):
        raise ProtocolError("request must be a JSON object")
    inputs = head.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("request needs 'inputs': a non-empty list of tensors")
    req_id = head.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise ProtocolError("'id' must be a string")
    params = _parameters(head, "request")
    for key in params:
        if key.startswith("shared_memory"):
            raise ProtocolError("the shared-memory extension is not supported: send the data in the body")
    binary_out = bool(_bool_param(params, "binary_data_output", "request"))

    offset = 0 if hlen is None else hlen
    decoded: dict[str, np.ndarray] = {}
    for i, t in enumerate(inputs):
        where = f"input {i}"
        if not isinstance(t, dict):
            raise ProtocolError(f"{where}: must be a JSON object")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"{where}: needs a 'name' string")
        where = f"input {name!r}"
        if name in decoded:
            raise ProtocolError(f"{where}: given twice")
        datatype = t.get("datatype")
        if not isinstance(datatype, str):
            raise ProtocolError(f"{where}: needs a 'datatype' string")
        if datatype in UNSUPPORTED_DATATYPES:
            raise ProtocolError(f"{where}: datatype {datatype} is not supported")
        if datatype not in DATATYPES:
            raise ProtocolError(f"{where}: unknown datatype {datatype!r} (one of {', '.join(DATATYPES)})")
        if "shape" not in t:
            raise ProtocolError(f"{where}: needs a 'shape'")
        shape = _check_shape(t["shape"], where)
        tparams = _parameters(t, where)
        if any(k.startswith("shared_memory") for k in tparams):
            raise ProtocolError(f"{where}: the shared-memory extension is not supported")
        size = tparams.get("binary_data_size")
        if size is not None:
            if "data" in t:
                raise ProtocolError(f"{where}: has both 'data' and parameters.binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
            if hlen is None:
                raise ProtocolError(f"{where}: binary_data_size given but the request has no {HEADER_LENGTH} header")
            if offset + size > len(body):
                raise ProtocolError(f"{where}: binary_data_size {size} runs past the end of the body "
                                    f"({len(body) - offset} bytes left)")
            raw = view[offset:offset + size]
            offset += size
            count = math.prod(shape)
            if datatype == "BYTES":
                arr = _bytes_elements(raw, count, where).reshape(shape)
            else:
                dt = DATATYPES[datatype]
                if size != count * dt.itemsize:
                    raise ProtocolError(f"{where}: shape {shape} x {datatype} is {count * dt.itemsize} bytes, "
                                        f"binary_data_size says {size}")
                # A copy: the request body must not stay alive behind (or be mutated through) the array.
                arr = np.frombuffer(raw, dtype=dt).reshape(shape).copy()
        else:
            if "data" not in t:
                raise ProtocolError(f"{where}: needs 'data' (or parameters.binary_data_size with binary data)")
            arr = _json_array(t["data"], datatype, shape, where)
        decoded[name] = arr
    if hlen is not None and offset != len(body):
        raise ProtocolError(f"binary data is {len(body) - hlen} bytes but the inputs' binary_data_size add up "
                            f"to {offset - hlen}")

    outputs = head.get("outputs")
    wanted: dict[str, bool | None] | None = None
    if outputs is not None:
        if not isinstance(outputs, list):
            raise ProtocolError("'outputs' must be a list")
        wanted = {}
        for i, o in enumerate(outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ProtocolError(f"output {i}: needs a 'name' string")
            oparams = _parameters(o, f"output {o['name']!r}")
            if any(k.startswith("shared_memory") for k in oparams):
                raise ProtocolError(f"output {o['name']!r}: the shared-memory extension is not supported")
            if oparams.get("classification"):
                raise ProtocolError(f"output {o['name']!r}: the classification extension is not supported")
            wanted[o["name"]] = _bool_param(oparams, "binary_data", f"output {o['name']!r}")
    return InferRequest(decoded, id=req_id, outputs=wanted, binary_data_output=binary_out, parameters=params)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def _serialize_bytes(arr: np.ndarray) -> bytes:
    parts = []
    for v in arr.reshape(-1):
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _json_data(arr: np.ndarray, datatype: str) -> list:
    flat = arr.reshape(-1)
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    if datatype in ("FP16", "FP32", "FP64") and not np.isfinite(flat).all():
        # JSON has no NaN/Infinity: strict parsers reject them.
        raise ProtocolError("output has NaN or infinite values, which JSON cannot carry: ask for binary data", 500)
    return flat.tolist()


def encode_response(model_name: str, model_version: str | None, outputs: Mapping[str, np.ndarray],
                    request: InferRequest) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (``Content-Type``, and ``Inference-Header-Content-Length``
    when any output goes as binary). Raises ``ProtocolError`` (400) for a requested output the
    model did not produce."""
    names = list(outputs) if request.outputs is None else list(request.outputs)
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ProtocolError(f"unknown output {missing[0]!r}: the model produces {', '.join(outputs) or 'none'}")
    head: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        head["model_version"] = str(model_version)
    if request.id is not None:
        head["id"] = request.id
    tensors, blobs = [], []
    for name in names:
        arr = np.ascontiguousarray(outputs[name])
        try:
            datatype = datatype_of(arr.dtype)
        except ValueError as e:
            raise ProtocolError(f"output {name!r}: {e}", 500) from None
        t: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if request.wants_binary(name):
            blob = _serialize_bytes(arr) if datatype == "BYTES" else arr.astype(arr.dtype.newbyteorder("<"),
                                                                                 copy=False).tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = _json_data(arr, datatype)
        tensors.append(t)
    head["outputs"] = tensors
    header = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": JSON_CONTENT_TYPE}
    return b"".join([header, *blobs]), {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}


def error_body(message: str) -> bytes:
    """The protocol's error object, ``{"error": "..."}``, on one line."""
    return json.dumps({"error": " ".join(str(message).split()) or "error"}).encode()
