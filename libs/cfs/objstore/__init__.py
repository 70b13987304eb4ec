"""The object-storage port (STYLE.md #2): S3 behind a small Protocol, for the backup
service (journal archive, metadata snapshots) and the s3-tierer.

    settings = S3Settings()                       # flags, CFS_S3_*, cluster.json
    async with open_store("s3://backups/site-a", settings) as store:
        await store.ensure_bucket()
        await store.put_file("snapshots/2024-06-01.tar.gz", path)
        async for info in store.list("snapshots/"):
            ...

`S3ObjectStore` is the real one (aioboto3, SSE AES256 on every PUT, one retry policy
with a deadline); `MemoryObjectStore` and `FaultyObjectStore` are for tests. Errors
are `ObjectStoreError` and its subclasses, each one line for a human.
"""

from __future__ import annotations

from cfs.objstore.base import ObjectInfo, ObjectStore
from cfs.objstore.errors import (
    NoSuchBucket,
    ObjectNotFound,
    ObjectStoreDenied,
    ObjectStoreError,
    ObjectStoreUnavailable,
)
from cfs.objstore.memory import FaultyObjectStore, MemoryObjectStore
from cfs.objstore.s3 import S3ObjectStore, is_temporary
from cfs.objstore.settings import (
    S3Credentials,
    S3Settings,
    ServiceS3Settings,
    load_credentials,
    s3_settings,
    write_credentials_file,
)
from cfs.objstore.url import S3Url, is_s3_url
from cfs.retry import RetryPolicy


def open_store(
    url: str | S3Url, settings: S3Settings | None = None, *, policy: RetryPolicy | None = None
) -> ObjectStore:
    """The S3 store for `url` (a string is parsed: ValueError with the reason if bad);
    settings default to what flags-less commands find (CFS_S3_*, cluster.json)."""
    root = url if isinstance(url, S3Url) else S3Url.parse(url)
    return S3ObjectStore(root, settings if settings is not None else S3Settings(), policy=policy)


__all__ = [
    "FaultyObjectStore",
    "MemoryObjectStore",
    "NoSuchBucket",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectStoreDenied",
    "ObjectStoreError",
    "ObjectStoreUnavailable",
    "S3Credentials",
    "S3ObjectStore",
    "S3Settings",
    "S3Url",
    "ServiceS3Settings",
    "is_s3_url",
    "is_temporary",
    "load_credentials",
    "open_store",
    "s3_settings",
    "write_credentials_file",
]
