"""Lock files: an exclusive ``flock`` held through an open file descriptor.

The kernel drops the lock when its process dies (kill -9 and the OOM killer included), so a
crashed holder never blocks the next one. flock locks belong to the open file description: a
second :func:`acquire` of the same file conflicts in the same process (another thread) as it does
between processes. The shm tier locks each version and the tier with them, the GPU pool each device.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

_BUSY = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})


def acquire(path: str | os.PathLike, *, blocking: bool = True) -> int | None:
    """A descriptor holding the exclusive lock on ``path`` (the file and its folder are made if
    missing); None when ``blocking=False`` and another holder has it. Other failures raise the
    OSError, for the caller to name what the lock guards."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError as e:
        os.close(fd)
        if not blocking and e.errno in _BUSY:
            return None
        raise
    except BaseException:  # interrupted while waiting
        os.close(fd)
        raise
    return fd


def release(fd: int) -> None:
    """Give up the lock of :func:`acquire` and close its descriptor."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def held(path: str | os.PathLike) -> Iterator[None]:
    """The lock on ``path`` for the block, waiting for it."""
    fd = acquire(path)
    assert fd is not None  # a blocking acquire returns a descriptor or raises
    try:
        yield
    finally:
        release(fd)
