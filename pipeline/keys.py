"""Storage keys: what a valid key is, and the mark that names unpublished temporaries.

The rules every backend applies to the keys it is given (:mod:`pipeline.storage`), and that the
settings apply to ``FORGELINE_S3_PREFIX``; this module imports nothing, so both can use it."""

TMP_MARK = ".tmp-"  # in the names of unpublished temporaries (never valid keys)


def is_temporary(name: str) -> bool:
    """Whether the file or key segment ``name`` is an unpublished temporary's (hidden, with TMP_MARK)."""
    return name.startswith(".") and TMP_MARK in name


def check_key(key: str) -> str:
    """Validate a storage key: relative, normalized, no ``..``, no temp-name marker."""
    if not key or key.startswith("/") or "\\" in key:
        raise ValueError(f"invalid storage key {key!r}: must be a relative POSIX path")
    parts = key.rstrip("/").split("/")  # str ops, not pathlib: every load checks a few dozen keys
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}: must be normalized (no '.', '..' or '//')")
    if any(is_temporary(p) for p in parts):
        raise ValueError(f"invalid storage key {key!r}: reserved temporary name")
    return key
