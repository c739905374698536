"""Weight-only quantization of a state dict: int8 per output channel, int4 group-wise.

Usage::

    qs = quantize_state_dict(model.state_dict(), "int4", group_size=128)
    safetensors.torch.save_file(qs.tensors, path, metadata=metadata_for_safetensors(qs))
    print(qs.ratio, qs.skipped)                      # size vs the original; what was kept and why

    with safe_open(path, "pt") as f:                 # load: dequantize while streaming ...
        md = parse_metadata(f.metadata())
        state = {n: dequantize_tensor(n, f.get_tensor, md) for n in md["tensors"]}
    # ... or all at once: dequantize_state_dict(tensors, f.metadata())

Conventions (format ``forgeline.quant/1``)
------------------------------------------
* **Names.** A quantized weight keeps its own name (``conv.weight``), so a shard's weight map still
  names the model's parameters; companions sit beside it as ``<name>.scale`` and, for asymmetric
  int4, ``<name>.zero``. Kept tensors are stored unchanged under their name. A state that already
  has a key ``<name>.scale``/``<name>.zero`` for a quantized ``<name>`` is refused (ValueError).
* **Eligible.** Floating point float32/float16/bfloat16 with ndim >= 2 and at least ``min_numel``
  elements (default 1024: below that the saving is a few hundred bytes, smaller than the companion
  tensors' header entries and metadata, and tiny layers — first convs, classifier heads — are where
  quantization error costs most accuracy). Dim 0 is the output channel; the rest is flattened to
  ``in_features`` (Conv ``[out, in, kh, kw]`` → ``[out, in*kh*kw]``). Everything else (biases, norms,
  integer buffers such as ``num_batches_tracked``, float64, fp8) is kept, with its reason in
  ``metadata["tensors"][name]["reason"]`` and in :attr:`QuantizedState.skipped`.
* **int8**, symmetric per output channel: ``scale[o] = max|w[o]| / 127`` (float32, shape ``[out]``),
  ``q = clamp(round(w / scale), -127, 127)`` stored as int8 in the *original shape*;
  ``w ≈ q * scale``. An all-zero channel gets scale 0 (dequantizes to exact zeros).
* **int4**, group-wise along the flattened input dim, ``group_size`` consecutive values per group
  (even, default 128), ``n_groups = ceil(in_features / group_size)``. Each value is an unsigned nibble
  ``u`` in [0, 15] and ``w ≈ (u - zero) * scale``:

  - symmetric: ``scale = max|w| / 7``, ``zero = 8`` implicit (no tensor), so ``u - 8`` is in [-7, 7]
    (code 0, i.e. -8, is never produced: the grid stays symmetric around zero);
  - asymmetric: the group's range is widened to include 0, ``scale = (max - min) / 15``,
    ``zero = round(-min / scale)`` in [0, 15], stored one per byte as uint8 ``[out, n_groups]``
    under ``<name>.zero`` (0 is then exactly representable; a one-sided group costs at most one bit).

  Packing: row-major per output channel, ``[out, ceil(in_features / 2)]`` uint8, element ``2k`` in the
  **low** nibble and ``2k+1`` in the high nibble; an odd ``in_features`` leaves the last high nibble 0.
  A last group shorter than ``group_size`` (``in_features`` not divisible) is simply short: its scale
  is computed over its real values only, and dequantization repeats each scale ``group_size`` times
  and truncates to ``in_features`` — exact, no padding stored, no per-tensor group size to track.
  Scales are float32 ``[out, n_groups]``: 4 bytes per group (+3.1% of fp32 size at group 128 versus
  +1.6% for fp16) buys the full fp32 range for any weight magnitude (fp16 scales overflow above
  ~4.6e5 and lose precision below ~6e-5).
* Every round trip is within half a quantization step: ``|w - deq| <= scale / 2`` per channel (int8)
  or per group (int4), up to float32 rounding. Dequantization computes in float32 and casts to the
  original dtype (or the ``dtype`` asked for); it is deterministic, so a file and memory agree bit
  for bit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pipeline.layout import QUANT_METADATA_KEY

FORMAT = "forgeline.quant/1"
METADATA_KEY = QUANT_METADATA_KEY  # how a quantized shard says how to dequantize it
SCHEMES = ("int8", "int4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_MIN_NUMEL = 1024
INT4_SYM_ZERO = 8
_KINDS = ("int8", "int4", "kept")

Source = Mapping[str, Tensor] | Callable[[str], Tensor]


@dataclass
class QuantizedState:
    tensors: dict[str, Tensor]  # ready for safetensors.torch.save_file
    metadata: dict[str, Any]  # JSON-serializable; see metadata_for_safetensors
    orig_size_bytes: int
    skipped: dict[str, str] = field(default_factory=dict)  # kept tensors → why
    tensor_seconds: list[float] = field(default_factory=list)  # per quantized tensor

    @property
    def size_bytes(self) -> int:
        return sum(_nbytes(t) for t in self.tensors.values())

    @property
    def ratio(self) -> float:
        """Stored bytes / original bytes (int8 ≈ 0.25, int4 ≈ 0.125 + scales for fp32 weights)."""
        return self.size_bytes / self.orig_size_bytes if self.orig_size_bytes else 1.0


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _dtype_from_name(name: Any, tensor: str) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"tensor {tensor!r}: malformed metadata: unknown dtype {name!r}")
    return dt


def scale_name(name: str) -> str:
    return f"{name}.scale"


def zero_name(name: str) -> str:
    return f"{name}.zero"


# --------------------------------------------------------------------------------------- packing


def pack_int4(u: Tensor) -> Tensor:
    """``[rows, n]`` integers in [0, 15] → ``[rows, ceil(n/2)]`` uint8, element 2k in the low nibble."""
    if u.ndim != 2:
        raise ValueError(f"pack_int4 expects a 2-d tensor, got shape {tuple(u.shape)}")
    u = u.to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_int4`: ``[rows, ceil(n/2)]`` uint8 → ``[rows, n]`` uint8 in [0, 15]."""
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != (n + 1) // 2:
        raise ValueError(f"cannot unpack {tuple(packed.shape)} {packed.dtype} into {n} int4 values per row")
    out = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    return out[:, :n]


# ---------------------------------------------------------------------------------- quantization


def _skip_reason(t: Tensor, min_numel: int) -> str | None:
    if t.dtype == torch.bool:
        return "dtype bool not quantizable"
    if not t.is_floating_point():
        if t.is_complex():
            return f"complex dtype {_dtype_name(t.dtype)} not quantizable"
        return f"integer dtype {_dtype_name(t.dtype)} not quantizable"
    if t.dtype not in FLOAT_DTYPES:
        return f"dtype {_dtype_name(t.dtype)} not supported (float32/float16/bfloat16 only)"
    if t.ndim == 0:
        return "0-d tensor (scalar) kept in full precision"
    if t.ndim == 1:
        return "1-d tensor (bias/norm) kept in full precision"
    if t.numel() == 0:
        return "empty tensor kept"
    if t.numel() < min_numel:
        return f"{t.numel()} elements < min_numel {min_numel}: no size win, kept in full precision"
    return None


def _as_rows(name: str, w: Tensor) -> Tensor:
    w2 = w.detach().reshape(w.shape[0], -1).to(torch.float32)
    if not torch.isfinite(w2).all():
        raise ValueError(f"tensor {name!r}: non-finite values (nan/inf) cannot be quantized")
    return w2


def _safe(scale: Tensor) -> Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _quantize_int8(name: str, w: Tensor) -> tuple[Tensor, Tensor]:
    w2 = _as_rows(name, w)
    scale = w2.abs().amax(dim=1) / 127.0
    q = torch.round(w2 / _safe(scale)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def _quantize_int4(name: str, w: Tensor, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    w2 = _as_rows(name, w)
    out, n = w2.shape
    n_groups = -(-n // group_size)
    pad = n_groups * group_size - n
    # Pad the short last group by repeating its last real value: min/max/max|w| stay those of the real values.
    wg = torch.cat((w2, w2[:, -1:].expand(out, pad)), dim=1) if pad else w2
    wg = wg.reshape(out, n_groups, group_size)
    if symmetric:
        scale = wg.abs().amax(dim=2) / 7.0
        q = torch.round(wg / _safe(scale)[..., None]).clamp_(-7, 7) + INT4_SYM_ZERO
        zero = None
    else:
        lo = wg.amin(dim=2).clamp(max=0.0)
        hi = wg.amax(dim=2).clamp(min=0.0)
        scale = (hi - lo) / 15.0
        safe = _safe(scale)
        zero = torch.round(-lo / safe).clamp_(0, 15)
        q = (torch.round(wg / safe[..., None]) + zero[..., None]).clamp_(0, 15)
        zero = zero.to(torch.uint8)
    u = q.reshape(out, n_groups * group_size)[:, :n]
    return pack_int4(u), scale, zero


def quantize_state_dict(
    state: Mapping[str, Tensor],
    scheme: str,
    *,
    group_size: int = 128,
    symmetric: bool = True,
    min_numel: int = DEFAULT_MIN_NUMEL,
) -> QuantizedState:
    """Quantize every eligible weight of ``state`` (see the module docstring for the format)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {list(SCHEMES)}")
    bad_group = isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2
    if scheme == "int4" and bad_group:
        raise ValueError(f"int4 group_size must be an even integer >= 2 (two values per byte), got {group_size!r}")
    if scheme == "int8" and not symmetric:
        raise ValueError("int8 is symmetric per output channel only; asymmetric is supported for int4")
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"min_numel must be an integer >= 0, got {min_numel!r}")

    tensors: dict[str, Tensor] = {}
    infos: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    tensor_seconds: list[float] = []
    orig = 0
    with torch.no_grad():
        for name, t in state.items():
            if not isinstance(t, Tensor):
                raise ValueError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
            orig += _nbytes(t)
            info: dict[str, Any] = {"orig_dtype": _dtype_name(t.dtype), "orig_shape": list(t.shape)}
            reason = _skip_reason(t, min_numel)
            if reason is not None:
                info.update(kind="kept", reason=reason)
                skipped[name] = reason
                tensors[name] = t.detach().contiguous()
            else:
                for companion in (scale_name(name), zero_name(name)):
                    if companion in state:
                        raise ValueError(
                            f"tensor {name!r}: its companion name {companion!r} is already a key of the state dict"
                        )
                t0 = time.perf_counter()
                if scheme == "int8":
                    q, scale = _quantize_int8(name, t)
                    info.update(kind="int8")
                    tensors[name], tensors[scale_name(name)] = q.contiguous(), scale.contiguous()
                else:
                    packed, scale, zero = _quantize_int4(name, t, group_size, symmetric)
                    in_features = t.numel() // t.shape[0]
                    info.update(
                        kind="int4", in_features=in_features, group_size=group_size,
                        n_groups=scale.shape[1], symmetric=symmetric,
                    )
                    tensors[name], tensors[scale_name(name)] = packed.contiguous(), scale.contiguous()
                    if zero is not None:
                        tensors[zero_name(name)] = zero.contiguous()
                tensor_seconds.append(time.perf_counter() - t0)
            infos[name] = info
    metadata = {
        "format": FORMAT,
        "scheme": scheme,
        "group_size": group_size if scheme == "int4" else None,
        "symmetric": symmetric,
        "min_numel": min_numel,
        "scale_dtype": "float32",
        "int4_packing": "uint8 [out, ceil(in/2)], element 2k in the low nibble; "
        "w = (u - zero) * scale, zero = 8 if symmetric",
        "tensors": infos,
    }
    return QuantizedState(tensors=tensors, metadata=metadata, orig_size_bytes=orig, skipped=skipped,
                          tensor_seconds=tensor_seconds)


def metadata_for_safetensors(qs: QuantizedState) -> dict[str, str]:
    """safetensors ``__metadata__`` (str → str): the JSON metadata under :data:`METADATA_KEY`."""
    return {METADATA_KEY: json.dumps(qs.metadata, separators=(",", ":"))}


# -------------------------------------------------------------------------------- dequantization


def parse_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Accept :attr:`QuantizedState.metadata` or a safetensors ``metadata()`` dict; validate the header."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"malformed quantization metadata: expected a mapping, got {type(metadata).__name__}")
    if METADATA_KEY in metadata:
        raw = metadata[METADATA_KEY]
        try:
            md = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed quantization metadata under {METADATA_KEY!r}: {e}") from None
    else:
        md = metadata
    if not isinstance(md, Mapping) or md.get("format") != FORMAT:
        got = md.get("format") if isinstance(md, Mapping) else type(md).__name__
        raise ValueError(f"not {FORMAT} metadata (format={got!r})")
    if md.get("scheme") not in SCHEMES or not isinstance(md.get("tensors"), Mapping):
        raise ValueError(f"malformed {FORMAT} metadata: needs a known 'scheme' and a 'tensors' mapping")
    return dict(md)


def _info(md: Mapping[str, Any], name: str) -> dict[str, Any]:
    info = md["tensors"].get(name)
    if not isinstance(info, Mapping):
        raise ValueError(f"tensor {name!r}: not described in the quantization metadata")
    kind = info.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"tensor {name!r}: malformed metadata: unknown kind {kind!r}")
    shape = info.get("orig_shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r}: malformed metadata: orig_shape {shape!r}")
    _dtype_from_name(info.get("orig_dtype"), name)
    if kind == "int4":
        for key in ("in_features", "group_size", "n_groups"):
            v = info.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"tensor {name!r}: malformed metadata: {key} {v!r}")
        if not isinstance(info.get("symmetric"), bool):
            raise ValueError(f"tensor {name!r}: malformed metadata: symmetric {info.get('symmetric')!r}")
        if (len(shape) < 2 or shape[0] * info["in_features"] != math.prod(shape)
                or info["n_groups"] != -(-info["in_features"] // info["group_size"])):
            raise ValueError(f"tensor {name!r}: malformed metadata: int4 layout does not match orig_shape {shape}")
    if kind == "int8" and len(shape) < 2:
        raise ValueError(f"tensor {name!r}: malformed metadata: int8 tensor with orig_shape {shape}")
    return dict(info)


def _getter(source: Source) -> Callable[[str], Tensor]:
    return source.__getitem__ if isinstance(source, Mapping) else source


def _fetch(get: Callable[[str], Tensor], key: str, owner: str) -> Tensor:
    try:
        return get(key)
    except KeyError:
        raise ValueError(f"tensor {owner!r}: missing {key!r} in the quantized tensors") from None
    except Exception as e:  # e.g. safetensors' SafetensorError("File does not contain tensor ...")
        raise ValueError(f"tensor {owner!r}: cannot read {key!r}: {e}") from e


def _expect(name: str, what: str, t: Tensor, dtype: torch.dtype | None, shape: tuple[int, ...]) -> None:
    if (dtype is not None and t.dtype != dtype) or tuple(t.shape) != shape:
        want = f"{_dtype_name(dtype)} " if dtype is not None else ""
        raise ValueError(f"tensor {name!r}: {what} is {_dtype_name(t.dtype)} {tuple(t.shape)}, expected {want}{shape}")


def dequantize_tensor(
    name: str, source: Source, metadata: Mapping[str, Any], *, dtype: torch.dtype | None = None
) -> Tensor:
    """Rebuild one tensor from ``source`` (a mapping, or a getter such as ``safe_open(...).get_tensor``).

    Returns the original shape in the original dtype, or ``dtype`` if given (kept floating-point
    tensors are cast too; kept integer/bool tensors never are).
    """
    md = parse_metadata(metadata)
    info = _info(md, name)
    get = _getter(source)
    stored = _fetch(get, name, name)
    shape = tuple(info["orig_shape"])
    orig_dtype = _dtype_from_name(info["orig_dtype"], name)
    target = dtype or orig_dtype
    if info["kind"] == "kept":
        _expect(name, "kept tensor", stored, orig_dtype, shape)
        return stored.to(dtype) if dtype is not None and stored.is_floating_point() else stored
    out = shape[0]
    scale = _fetch(get, scale_name(name), name)
    if not scale.is_floating_point():
        raise ValueError(f"tensor {name!r}: scale has non-float dtype {_dtype_name(scale.dtype)}")
    scale = scale.to(torch.float32)
    if info["kind"] == "int8":
        _expect(name, "int8 weight", stored, torch.int8, shape)
        _expect(name, "scale", scale, None, (out,))
        w = stored.reshape(out, -1).to(torch.float32) * scale[:, None]
        return w.reshape(shape).to(target)
    n, gs, ng = info["in_features"], info["group_size"], info["n_groups"]
    _expect(name, "packed int4 weight", stored, torch.uint8, (out, (n + 1) // 2))
    _expect(name, "scale", scale, None, (out, ng))
    if info["symmetric"]:
        zero: Tensor | float = float(INT4_SYM_ZERO)
    else:
        z = _fetch(get, zero_name(name), name)
        _expect(name, "zero point", z, torch.uint8, (out, ng))
        zero = z.to(torch.float32).repeat_interleave(gs, dim=1)[:, :n]
    u = unpack_int4(stored, n).to(torch.float32)
    w = (u - zero) * scale.repeat_interleave(gs, dim=1)[:, :n]
    return w.reshape(shape).to(target)


def dequantize_state_dict(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, Any], *, dtype: torch.dtype | None = None, strict: bool = True
) -> dict[str, Tensor]:
    """Rebuild the original state dict (names, shapes, dtypes — or ``dtype``) from stored tensors.

    ``strict`` (default): every tensor named in the metadata must be present and every stored tensor
    must be a described tensor or one of its companions. ``strict=False`` rebuilds what is present
    (one shard of a chunked export).
    """
    md = parse_metadata(metadata)
    described = md["tensors"]
    companions = {c for n in described for c in (scale_name(n), zero_name(n))}
    for key in tensors:
        if key not in described and key not in companions:
            raise ValueError(f"tensor {key!r}: not described in the quantization metadata")
    result: dict[str, Tensor] = {}
    for name in described:
        if name not in tensors:
            if strict:
                raise ValueError(f"tensor {name!r}: missing from the quantized tensors")
            continue
        result[name] = dequantize_tensor(name, tensors, md, dtype=dtype)
    return result
