"""Compile-artifact cache resources: one interface (``cache()`` → :class:`ArtifactCache`), three
backends — a local directory (default), the storage resource (S3 or a shared mount), Redis."""

from abc import abstractmethod
from typing import Optional

import dagster as dg
from pydantic import Field

from pipeline import settings
from pipeline.compile_cache import ArtifactCache, LocalDirCache, RedisCache, StorageCache
from resources.storage import StorageResource


class CompileCacheResource(dg.ConfigurableResource):
    @abstractmethod
    def cache(self) -> ArtifactCache: ...


class LocalCompileCacheResource(CompileCacheResource):
    """A directory on this host (default ``$FORGELINE_HOME/compile-cache``)."""

    path: str = Field(default_factory=lambda: str(settings.compile_cache_dir()))

    def cache(self) -> ArtifactCache:
        return LocalDirCache(self.path)


class StorageCompileCacheResource(CompileCacheResource):
    """Entries as objects in the storage resource (S3, NFS): shared by every node."""

    storage: dg.ResourceDependency[StorageResource]
    prefix: str = "compile-cache"

    def cache(self) -> ArtifactCache:
        return StorageCache(self.storage.client(), self.prefix)


class RedisCompileCacheResource(CompileCacheResource):
    """Redis (``redis://[:password@]host:port/db``; pass the URL as an ``EnvVar`` when it holds a secret)."""

    url: str
    prefix: str = "forgeline:compile:"
    ttl_s: Optional[int] = Field(default=None, description="Expire entries after this many seconds.")

    def cache(self) -> ArtifactCache:
        return RedisCache(self.url, prefix=self.prefix, ttl_s=self.ttl_s)


def compile_cache_from_env(storage: StorageResource) -> CompileCacheResource:
    """``FORGELINE_COMPILE_CACHE``: ``local`` (default), ``storage``, or ``redis`` (URL in
    ``FORGELINE_COMPILE_CACHE_URL``, passed as an ``EnvVar``: it may hold a password)."""
    kind, _url = settings.compile_cache()
    if kind == "redis":
        return RedisCompileCacheResource(url=dg.EnvVar("FORGELINE_COMPILE_CACHE_URL"))
    if kind == "storage":
        return StorageCompileCacheResource(storage=storage)
    return LocalCompileCacheResource()
