"""Dagster resources: typed, configurable handles on storage tiers (and later GPU pools, caches).
Each wraps an engine object from ``pipeline/`` so assets never construct backends themselves."""

from resources.gpu import GpuPoolResource
from resources.storage import (
    LocalStorageResource,
    S3StorageResource,
    ShmStorageResource,
    StorageResource,
    open_storage,
    storage_from_env,
)

__all__ = [
    "LocalStorageResource",
    "S3StorageResource",
    "ShmStorageResource",
    "StorageResource",
    "open_storage",
    "storage_from_env",
    "GpuPoolResource",
]
