"""One storage interface for every tier: a local path (also NFS/Ceph mounts), /dev/shm, and S3.

Usage::

    store = LocalStorage("/data/forgeline")
    with store.open_write("a/b.bin") as w:   # commit on clean exit, abort on exception
        w.write(payload)
    store.read_range("a/b.bin", 10, 4)

The interface and its errors are in ``base``; the backends in ``local``, ``shm`` and ``s3`` (import
``pipeline.storage.s3`` for :class:`S3Storage`: it needs boto3, so it is not loaded here);
``from_spec`` / ``from_uri`` in ``spec`` build a storage from a description.
"""

from pipeline.keys import check_key
from pipeline.storage.base import (
    CHUNK,
    AtomicWriter,
    CorruptObject,
    Crc32,
    IntegrityError,
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
    StorageFull,
    copy_between,
    hash_stream,
    in_parallel,
    join,
    parse_record,
    ranged_read_size,
    sha256_stream,
)
from pipeline.storage.local import LocalStorage, make_dir, write_file_atomic
from pipeline.storage.shm import ShmStorage
from pipeline.storage.spec import configured, from_spec, from_uri

__all__ = [
    "CHUNK",
    "AtomicWriter",
    "CorruptObject",
    "Crc32",
    "IntegrityError",
    "LocalStorage",
    "ObjectChanged",
    "ObjectInfo",
    "ObjectNotFound",
    "ShmStorage",
    "Storage",
    "StorageError",
    "StorageFull",
    "check_key",
    "configured",
    "copy_between",
    "from_spec",
    "from_uri",
    "hash_stream",
    "in_parallel",
    "join",
    "make_dir",
    "parse_record",
    "ranged_read_size",
    "sha256_stream",
    "write_file_atomic",
]
