"""Which filesystem holds a path, from the kernel's mount table: the loader tunes its reads by it,
and the shm tier checks that it really is in RAM."""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("forgeline.shm")
_warned: set[str] = set()

TMPFS = frozenset({"tmpfs", "ramfs", "hugetlbfs", "devtmpfs"})
NETWORK = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "9p", "afs", "virtiofs", "fuse", "orangefs", "pvfs2", "ocfs2", "gfs2", "wekafs", "panfs",
})


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


# st_dev -> (mount point, fstype, source): the mount table is read once per filesystem, not at
# every load (a serving swap-in probes its files; the read and parse cost ~0.5 ms each time).
_BY_DEV: dict[int, tuple[str, str, str]] = {}


def mount_of(path: str | os.PathLike) -> tuple[str, str, str]:
    """(mount point, fstype, source) of the filesystem holding ``path`` (which need not exist yet:
    the deepest mount containing it)."""
    real = os.path.realpath(path)
    try:
        dev: int | None = os.stat(real).st_dev
    except OSError:
        dev = None
    hit = _BY_DEV.get(dev) if dev is not None else None
    if hit is not None and (real == hit[0] or real.startswith(hit[0].rstrip("/") + "/")):
        return hit
    best = _scan(real)
    if dev is not None and best[1] != "unknown":
        _BY_DEV[dev] = best
    return best


def _scan(real: str) -> tuple[str, str, str]:
    best = ("/", "unknown", "")
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return best
    best_len = -1
    for line in lines:
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        mnt = _unescape(fields[4])
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= best_len:  # later lines shadow earlier mounts on the same point
            best, best_len = (mnt, tail[0], tail[1] if len(tail) > 1 else ""), len(mnt)
    return best


def classify_fstype(fstype: str) -> str:
    """``"tmpfs"``, ``"network"`` or ``"local"``."""
    if fstype in TMPFS:
        return "tmpfs"
    if fstype in NETWORK or fstype.startswith("fuse.") or fstype.startswith("nfs"):
        return "network"
    return "local"


def in_ram(path: str | os.PathLike, what: str) -> bool:
    """Whether ``path`` is on a RAM filesystem. When it is not, ``what`` still works there (a disk
    cache, not the RAM tier) and one warning per path says so and how to fix it."""
    mnt, fstype, _ = mount_of(path)
    if classify_fstype(fstype) == "tmpfs":
        return True
    message = (f"{what} {path} is on {fstype} ({mnt}), not a tmpfs: its copies are on disk, not in RAM "
               f"(set FORGELINE_SHM_ROOT to a directory under /dev/shm)")
    if message not in _warned:
        _warned.add(message)
        log.warning(message)
    return False
