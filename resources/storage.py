"""Storage resources: one interface (``client()`` → :class:`pipeline.storage.Storage`), three tiers.

Pick one in ``Definitions`` by configuration (see :func:`storage_from_env`); assets depend only on
``StorageResource`` so the same graph runs on a laptop disk, an NFS mount or S3.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Optional

import dagster as dg
from pydantic import Field, PrivateAttr

from pipeline import settings
from pipeline.storage import LocalStorage, ShmStorage, Storage


class StorageResource(dg.ConfigurableResource):
    """Base of every storage tier. ``client()`` returns the engine's storage object (cached)."""

    _client: Optional[Storage] = PrivateAttr(default=None)

    def client(self) -> Storage:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    @abstractmethod
    def _make_client(self) -> Storage: ...


class LocalStorageResource(StorageResource):
    """A directory on local disk or a shared POSIX mount (NFS, CephFS, Lustre)."""

    root: str = Field(description="Directory that holds every object; created if missing.")
    fsync: bool = Field(default=True, description="fsync objects and directories on publish (durability).")

    def _make_client(self) -> Storage:
        return LocalStorage(self.root, fsync=self.fsync)


class ShmStorageResource(StorageResource):
    """The RAM-backed /dev/shm tier, with an optional byte budget. ``client()`` is the raw storage;
    ``tier()`` manages whole model versions in it (pre-warm, LRU eviction, pins)."""

    root: str = Field(default=settings.DEFAULT_SHM_ROOT, description="Directory on a tmpfs mount.")
    capacity_bytes: Optional[int] = Field(default=None, description="Budget for this tier (bytes).")

    def _make_client(self) -> Storage:
        return ShmStorage(self.root, capacity_bytes=self.capacity_bytes)

    def tier(self):
        from pipeline.shm_tier import ShmTier

        return ShmTier(self.root, capacity_bytes=self.capacity_bytes)


class S3StorageResource(StorageResource):
    """An S3 bucket (AWS or any S3-compatible endpoint: MinIO, Ceph RGW, R2...).
    Credentials come from ``EnvVar`` config or boto3's default chain — never from code."""

    bucket: str
    prefix: str = ""
    endpoint_url: Optional[str] = None
    region_name: Optional[str] = None
    aws_access_key_id: Optional[str] = None
    aws_secret_access_key: Optional[str] = None
    aws_session_token: Optional[str] = None
    max_attempts: int = Field(default=5, ge=1, le=20,
                              description="Attempts per request, retried with jittered exponential backoff.")
    connect_timeout: float = Field(default=5.0, gt=0, le=300, description="Seconds to open a connection.")
    read_timeout: float = Field(default=15.0, gt=0, le=900, description="Seconds to wait for the next bytes of an answer.")
    retry_deadline: float = Field(default=20.0, gt=0, le=3600,
                                  description="Seconds of failed attempts and backoff one request may spend before it "
                                              "fails (a dead endpoint fails after about retry_deadline + read_timeout).")
    part_size: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024,
                           description="Multipart part size; also each ranged GET of a streaming read.")
    get_size: int = Field(default=32 * 1024 * 1024, ge=1024 * 1024,
                          description="Largest ranged GET of a read into memory or a file (the loader's and "
                                      "the shm pre-warm's requests; longer ranges go as several in parallel).")
    concurrency: int = Field(default=settings.S3_CONCURRENCY, ge=1, le=settings.S3_MAX_CONCURRENCY,
                             description="Requests in flight for one bulk transfer: a load's ranged GETs, a "
                                         "pre-warm's pieces, an upload's parts ($FORGELINE_S3_CONCURRENCY).")

    def _make_client(self) -> Storage:
        from pipeline.storage.s3 import S3Storage

        return S3Storage(
            self.bucket,
            self.prefix,
            endpoint_url=self.endpoint_url,
            region_name=self.region_name,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
            max_attempts=self.max_attempts,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retry_deadline=self.retry_deadline,
            part_size=self.part_size,
            multipart_threshold=self.part_size,
            get_size=self.get_size,
            concurrency=self.concurrency,
        )


def shm_from_env() -> ShmStorageResource:
    """The /dev/shm tier: ``FORGELINE_SHM_ROOT`` (default /dev/shm/forgeline) and
    ``FORGELINE_SHM_CAPACITY_BYTES`` (``64GiB``, ``512MB``, bytes; default: no budget beyond the
    filesystem's free space)."""
    return ShmStorageResource(root=settings.shm_root(), capacity_bytes=settings.shm_capacity_bytes())


def _credential(name: str) -> Optional[dg.EnvVar]:
    """An AWS credential as an ``EnvVar``, so its value never appears in resource config."""
    return dg.EnvVar(name) if settings.raw(name) else None


def storage_from_env() -> StorageResource:
    """The storage the code location uses, as :func:`pipeline.settings.storage` describes it:
    S3 when ``FORGELINE_S3_BUCKET`` is set (credentials ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
    ``AWS_SESSION_TOKEN`` as ``EnvVar``s, or boto3's chain), else a directory (``FORGELINE_STORAGE_ROOT``,
    default ``$FORGELINE_HOME/storage``)."""
    where = settings.storage()
    if where.kind == "s3":
        return S3StorageResource(
            bucket=where.bucket,
            prefix=where.prefix,
            endpoint_url=where.endpoint_url,
            region_name=where.region_name,
            aws_access_key_id=_credential("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=_credential("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=_credential("AWS_SESSION_TOKEN"),
            concurrency=where.concurrency,
        )
    return LocalStorageResource(root=str(where.root))


def open_storage(resource: StorageResource) -> Storage:
    """The engine storage behind a storage resource, outside a run (``EnvVar`` config resolves as it
    would in one). The store the settings describe: :func:`pipeline.storage.configured`."""
    with dg.build_resources({"storage": resource}) as res:
        return res.storage.client()
