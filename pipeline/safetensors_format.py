"""The safetensors dtype codes, in one table shared by the writer (:mod:`pipeline.export`) and the
reader (:mod:`pipeline.loading`): which torch dtype each code means and how many bytes an element
takes."""

from __future__ import annotations

import torch

# safetensors dtype code -> (torch attribute, element size in bytes); None size = sub-byte
TABLE: dict[str, tuple[str, int | None]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1),
    "F8_E5M2": ("float8_e5m2", 1), "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1), "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8), "C64": ("complex64", 8),
    "F4": ("", None), "F6_E2M3": ("", None), "F6_E3M2": ("", None),
}
# Read, never written: safetensors.torch (0.8) cannot load it back.
_READ_ONLY = frozenset({"F8_E8M0"})

DTYPES: dict[str, torch.dtype] = {  # code -> torch dtype, for the codes this torch can hold
    code: getattr(torch, attr) for code, (attr, size) in TABLE.items() if size and hasattr(torch, attr)
}
CODES: dict[torch.dtype, str] = {  # torch dtype -> the code the writer emits
    dt: code for code, dt in DTYPES.items() if code not in _READ_ONLY
}


def itemsize(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or a (byte-sized) safetensors code."""
    if isinstance(dtype, str):
        return TABLE[dtype][1] or 1
    return dtype.itemsize


__all__ = ["CODES", "DTYPES", "TABLE", "itemsize"]
