"""One way to reach libc functions the standard library lacks (madvise, mincore, prctl)."""

from __future__ import annotations

import ctypes
import mmap
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


MADV_DONTNEED = 4

_MADVISE = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])


def advise_pages(address: int, nbytes: int, advice: int) -> bool:
    """``madvise(advice)`` on the whole pages inside ``[address, address + nbytes)`` (the partial
    pages at either end are left alone: they share memory with something else). Best effort:
    False where libc or the kernel does not take it."""
    if _MADVISE is None:
        return False
    page = mmap.PAGESIZE
    lo, hi = -(-address // page) * page, (address + nbytes) // page * page
    return hi > lo and _MADVISE(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), advice) == 0
