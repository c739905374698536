"""The /dev/shm tier: a :class:`~pipeline.storage.local.LocalStorage` on tmpfs (RAM), with an
optional byte budget on top of the filesystem's own free space."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.mounts import in_ram
from pipeline.settings import DEFAULT_SHM_ROOT
from pipeline.storage.base import StorageError, StorageFull
from pipeline.storage.local import LocalStorage


class ShmStorage(LocalStorage):
    """The /dev/shm (tmpfs) tier: RAM-backed, so writes are never fsynced and an optional
    ``capacity_bytes`` budget is enforced on top of the filesystem's own free space."""

    kind = "shm"

    def __init__(self, root: str | os.PathLike = DEFAULT_SHM_ROOT, *, capacity_bytes: int | None = None):
        parent = Path(root).expanduser().resolve().parent
        if not parent.exists():
            raise StorageError(f"shm tier {root}: {parent} does not exist (no /dev/shm on this host?)")
        super().__init__(root, verify=True, fsync=False)
        self.capacity_bytes = capacity_bytes
        self.in_ram = in_ram(self.root, "shm tier")

    def spec(self) -> tuple[dict, dict[str, str]]:
        return {"kind": self.kind, "root": str(self.root), "capacity_bytes": self.capacity_bytes}, {}

    def used_bytes(self) -> int:
        return sum(o.size for o in self.list())

    def _check_space(self, key: str, size: int | None) -> None:
        super()._check_space(key, size)
        if size and self.capacity_bytes is not None:
            used = self.used_bytes()
            if used + size > self.capacity_bytes:
                raise StorageFull(
                    f"{self.uri(key)}: needs {size} bytes; shm budget {self.capacity_bytes} "
                    f"has {self.capacity_bytes - used} left"
                )
