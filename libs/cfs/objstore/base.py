"""The object store port: what the backup service and the s3-tierer may ask of S3.

Keys are relative to the store's root (`s3://bucket/prefix`): a store made for
`s3://backups/site-a` writes `put("journal/001/seg-1")` to the key
`site-a/journal/001/seg-1`, and `list()` yields `journal/001/seg-1` back. Every
implementation (S3, in-memory, fault-injecting) behaves the same, so code written
against `ObjectStore` is tested on the in-memory one and run on S3.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from cfs.objstore.url import S3Url


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows about one object. `etag` without quotes (a multipart
    upload's ends in `-<parts>`); `metadata` is the user metadata when the call
    returned it (HEAD does, LIST does not: None); `encryption` is the server-side
    encryption the store reports (`AES256`) when known."""

    key: str
    size: int
    etag: str
    last_modified_ms: int
    metadata: Mapping[str, str] | None = field(default=None, compare=False)
    encryption: str | None = None


@runtime_checkable
class ObjectStore(Protocol):
    """An object store rooted at `url`. All calls are retried inside on temporary
    failures and raise `ObjectStoreError` subclasses otherwise."""

    url: S3Url

    async def put(
        self, key: str, data: bytes, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Store `data` at `key` (replacing it), encrypted at rest."""
        ...

    async def put_file(
        self, key: str, path: Path, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Upload a local file (multipart when big), encrypted at rest."""
        ...

    async def get(self, key: str) -> bytes:
        """The object's content; ObjectNotFound if absent."""
        ...

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of the object from `start` (fewer at its end); ObjectNotFound
        if absent. Negative `start`: the last -start bytes (`length` ignored)."""
        ...

    async def get_file(self, key: str, path: Path) -> None:
        """Download to `path` through a temporary file renamed at the end, so `path`
        is either the whole object or untouched."""
        ...

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's info, None if absent."""
        ...

    async def delete(self, key: str) -> None:
        """Remove `key`; deleting an absent key succeeds."""
        ...

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in key order (UTF-8 bytes),
        fetched page by page."""
        ...

    async def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist."""
        ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def check_key(key: str) -> str:
    """A key is relative to the store's root: not empty, no leading slash."""
    if not key or key.startswith("/"):
        raise ValueError(f"bad object key {key!r}: keys are relative, e.g. 'journal/seg-1'")
    return key


def check_prefix(prefix: str) -> str:
    if prefix.startswith("/"):
        raise ValueError(f"bad list prefix {prefix!r}: prefixes are relative")
    return prefix


def temporary_path(path: Path) -> Path:
    """A hidden sibling of `path` to write before renaming: same directory, so the
    rename is atomic; a random part, so concurrent downloads do not collide."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")


def commit_file(tmp: Path, path: Path) -> None:
    """Rename a fully written, fsynced `tmp` over `path` and make the rename durable."""
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # a directory that cannot be opened or synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file_atomically(path: Path, data: bytes) -> None:
    """`path` holds `data` or what it held before, never a part of it (blocking)."""
    tmp = temporary_path(path)
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        commit_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
