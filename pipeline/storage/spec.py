"""Building a storage from a description: a :meth:`~pipeline.storage.base.Storage.spec` (to hand a
storage to another process) or a URI (``s3://bucket/key``).

Dispatch is on the spec's ``kind`` / the URI's scheme; the S3 backend (and boto3) is imported only
when one is asked for.
"""

from __future__ import annotations

from pipeline.storage.base import Storage
from pipeline.storage.local import LocalStorage
from pipeline.storage.shm import ShmStorage


def from_spec(spec: dict) -> Storage:
    """Rebuild a storage described by :meth:`Storage.spec` (credentials come from the environment)."""
    kw = {k: v for k, v in spec.items() if k != "kind"}
    kind = spec.get("kind")
    if kind == LocalStorage.kind:
        return LocalStorage(**kw)
    if kind == ShmStorage.kind:
        return ShmStorage(**kw)
    if kind == "s3":
        from pipeline.storage.s3 import S3Storage

        return S3Storage(kw.pop("bucket"), kw.pop("prefix", ""), **kw)
    raise ValueError(f"unknown storage kind {kind!r} in spec {spec}")


def configured(env=None) -> Storage:
    """The model store the ``FORGELINE_*`` settings describe (:func:`pipeline.settings.storage`):
    the one way code outside a Dagster run opens it (the CLI, ``forgeline serve``, node agents).
    S3 credentials come from boto3's chain, as a run's ``EnvVar`` config reads the same variables."""
    from pipeline import settings

    return from_spec(settings.storage(env).spec())


def from_uri(uri: str, reuse: Storage | None = None) -> tuple[Storage, str]:
    """The storage holding ``uri`` and the key (object or prefix) inside it.

    ``reuse`` serves the URI when its own :meth:`~Storage.uri` contains it (its client, retries
    and connection pool are then shared). Otherwise ``s3://bucket/key`` gets a new S3 client over
    the bucket (:func:`pipeline.storage.s3.for_bucket`). ``ValueError`` for anything else.
    """
    if reuse is not None:
        base = reuse.uri().rstrip("/")
        if uri.rstrip("/") == base:
            return reuse, ""
        if uri.startswith(base + "/"):
            return reuse, uri[len(base) + 1 :].strip("/")
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError("s3:// URI without a bucket")
        from pipeline.storage.s3 import for_bucket

        return for_bucket(bucket, like=reuse), key.strip("/")
    raise ValueError(f"{uri!r} is not a URI this project can open (s3://bucket/key)")


__all__ = ["configured", "from_spec", "from_uri"]
