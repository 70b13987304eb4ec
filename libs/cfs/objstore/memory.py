"""In-process object stores for tests: a dict that behaves like S3, and a wrapper that
fails on demand.

    store = FaultyObjectStore(MemoryObjectStore())
    store.fail_next(3, "unavailable", ops={"put", "put_file"})
    with pytest.raises(ObjectStoreUnavailable):
        await backup.ship_segment(store, ...)
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from cfs.objstore.base import ObjectInfo, ObjectStore, check_key, check_prefix
from cfs.objstore.base import write_file_atomically as _write_atomically
from cfs.objstore.errors import (
    NoSuchBucket,
    ObjectNotFound,
    ObjectStoreDenied,
    ObjectStoreError,
    ObjectStoreUnavailable,
)
from cfs.objstore.url import S3Url

FaultKind = Literal["unavailable", "denied"]
OPS = frozenset({"put", "put_file", "get", "get_file", "head", "delete", "list", "ensure_bucket"})


@dataclass(frozen=True)
class _Stored:
    data: bytes
    metadata: Mapping[str, str]
    modified_ms: int
    etag: str


class MemoryObjectStore:
    """An `ObjectStore` in a dict, with S3's semantics: keys sorted as UTF-8 bytes,
    idempotent delete, encryption reported as AES256. `bucket_exists=False` makes
    every call but `ensure_bucket` fail with NoSuchBucket, as S3 would."""

    def __init__(self, url: S3Url | None = None, *, bucket_exists: bool = True) -> None:
        self.url = url or S3Url("memory")
        self.objects: dict[str, _Stored] = {}
        self.bucket_exists = bucket_exists
        self.closed = False

    def __repr__(self) -> str:
        return f"<MemoryObjectStore {self.url} objects={len(self.objects)}>"

    async def put(
        self, key: str, data: bytes, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        self._check("PUT", key)
        self.objects[key] = _Stored(
            data=bytes(data),
            metadata=dict(metadata or {}),
            modified_ms=time.time_ns() // 1_000_000,
            etag=hashlib.md5(data, usedforsecurity=False).hexdigest(),
        )

    async def put_file(
        self, key: str, path: Path, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        self._check("PUT", key)
        await self.put(key, await asyncio.to_thread(Path(path).read_bytes), metadata=metadata)

    async def get(self, key: str) -> bytes:
        return self._get("GET", key).data

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        data = self._get("GET", key).data
        return data[start:] if start < 0 else data[start : start + length]

    async def get_file(self, key: str, path: Path) -> None:
        data = self._get("GET", key).data
        await asyncio.to_thread(_write_atomically, Path(path), data)

    async def head(self, key: str) -> ObjectInfo | None:
        self._check("HEAD", key)
        stored = self.objects.get(key)
        return None if stored is None else _info(key, stored, with_metadata=True)

    async def delete(self, key: str) -> None:
        self._check("DELETE", key)
        self.objects.pop(key, None)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        self._check_bucket("LIST", check_prefix(prefix))
        for key in sorted((k for k in self.objects if k.startswith(prefix)), key=str.encode):
            stored = self.objects.get(key)
            if stored is not None:  # deleted while the caller iterated
                yield _info(key, stored, with_metadata=False)

    async def ensure_bucket(self) -> None:
        self.bucket_exists = True

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check(self, op: str, key: str) -> None:
        self._check_bucket(op, check_key(key))

    def _check_bucket(self, op: str, key: str) -> None:
        if self.closed:
            raise ObjectStoreError(f"object store {self.url} is closed", bucket=self.url.bucket)
        if not self.bucket_exists:
            full = full_key(self.url, key)
            raise NoSuchBucket(
                f"{op} s3://{self.url.bucket}/{full}: bucket {self.url.bucket!r} does not exist",
                bucket=self.url.bucket,
                key=full,
            )

    def _get(self, op: str, key: str) -> _Stored:
        self._check(op, key)
        stored = self.objects.get(key)
        if stored is None:
            full = full_key(self.url, key)
            raise ObjectNotFound(
                f"{op} s3://{self.url.bucket}/{full}: no such object",
                bucket=self.url.bucket,
                key=full,
            )
        return stored


def full_key(url: S3Url, key: str) -> str:
    """The bucket-relative key of a store-relative one (what S3 errors name)."""
    return f"{url.prefix}/{key}" if url.prefix else key


def _info(key: str, stored: _Stored, *, with_metadata: bool) -> ObjectInfo:
    return ObjectInfo(
        key=key,
        size=len(stored.data),
        etag=stored.etag,
        last_modified_ms=stored.modified_ms,
        metadata=dict(stored.metadata) if with_metadata else None,
        encryption="AES256",
    )


@dataclass(frozen=True)
class _Fault:
    kind: FaultKind
    ops: frozenset[str] | None


class FaultyObjectStore:
    """Wraps any `ObjectStore` and makes chosen calls fail as an outage or a denial
    would, before they reach the inner store. `calls` records every (op, key) asked."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: list[tuple[str, str]] = []
        self._faults: deque[_Fault] = deque()

    def fail_next(
        self, count: int = 1, kind: FaultKind = "unavailable", *, ops: Collection[str] | None = None
    ) -> None:
        """The next `count` calls (of `ops` only, e.g. {"put", "put_file"}, when given)
        raise ObjectStoreUnavailable or ObjectStoreDenied. Faults queue up in order."""
        chosen = None if ops is None else frozenset(ops)
        if chosen is not None and (unknown := chosen - OPS):
            raise ValueError(f"unknown operations {sorted(unknown)}; known: {sorted(OPS)}")
        if kind not in ("unavailable", "denied"):
            raise ValueError(f"unknown fault {kind!r}: unavailable or denied")
        self._faults.extend(_Fault(kind, chosen) for _ in range(count))

    def clear(self) -> None:
        """Drop the faults not yet used."""
        self._faults.clear()

    @property
    def pending(self) -> int:
        return len(self._faults)

    def _enter(self, op: str, key: str) -> None:
        self.calls.append((op, key))
        fault = next((f for f in self._faults if f.ops is None or op in f.ops), None)
        if fault is None:
            return
        self._faults.remove(fault)
        full = full_key(self.url, key)
        where = f"{op} s3://{self.url.bucket}/{full}".rstrip("/")
        if fault.kind == "denied":
            raise ObjectStoreDenied(
                f"{where}: access denied (injected fault)", bucket=self.url.bucket, key=full
            )
        raise ObjectStoreUnavailable(
            f"{where}: S3 unavailable (injected fault)", bucket=self.url.bucket, key=full
        )

    async def put(
        self, key: str, data: bytes, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        self._enter("put", key)
        await self.inner.put(key, data, metadata=metadata)

    async def put_file(
        self, key: str, path: Path, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        self._enter("put_file", key)
        await self.inner.put_file(key, path, metadata=metadata)

    async def get(self, key: str) -> bytes:
        self._enter("get", key)
        return await self.inner.get(key)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        self._enter("get_range", key)
        return await self.inner.get_range(key, start, length)

    async def get_file(self, key: str, path: Path) -> None:
        self._enter("get_file", key)
        await self.inner.get_file(key, path)

    async def head(self, key: str) -> ObjectInfo | None:
        self._enter("head", key)
        return await self.inner.head(key)

    async def delete(self, key: str) -> None:
        self._enter("delete", key)
        await self.inner.delete(key)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        self._enter("list", prefix)
        async for info in self.inner.list(prefix):
            yield info

    async def ensure_bucket(self) -> None:
        self._enter("ensure_bucket", "")
        await self.inner.ensure_bucket()

    async def close(self) -> None:
        await self.inner.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
