"""One way to reach libc functions the standard library lacks (madvise, mincore, prctl)."""

from __future__ import annotations

import ctypes
import sys


def libc_function(name: str, argtypes: list, restype=ctypes.c_int):
    """The C function ``name`` from the running process's libc with the given signature, or None
    off Linux or when it is missing (callers then skip the optimization it enables)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn
