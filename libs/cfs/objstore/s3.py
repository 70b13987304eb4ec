"""`ObjectStore` on S3 (aioboto3): one client for the store's lifetime, one retry policy.

Retries happen in exactly one place: botocore's own are switched off (one attempt per
call) and every call goes through `cfs.retry` with `is_temporary` below, which says
what S3QL's backends say is worth another try: connection failures, timeouts, 5xx
(but not "not implemented"), 408/429, SlowDown, RequestTimeout, InternalError. A 403
or 404 is an answer and is never retried. After `deadline_s` of temporary failures a
call fails with `ObjectStoreUnavailable`, one line saying for how long it tried.

Calls that move bytes in memory (put, get, head, list, delete) are bounded by the
deadline as a whole; file transfers (put_file, get_file) may run longer, but a stalled
connection ends an attempt after `read_timeout_s` and retrying stops at the deadline.

Every PUT, multipart included, asks for server-side encryption (SSE-S3, AES256).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from cfs.objstore.base import (
    ObjectInfo,
    check_key,
    check_prefix,
    commit_file,
    temporary_path,
)
from cfs.objstore.errors import (
    NoSuchBucket,
    ObjectNotFound,
    ObjectStoreDenied,
    ObjectStoreError,
    ObjectStoreUnavailable,
)
from cfs.objstore.settings import S3Settings, load_credentials
from cfs.objstore.url import S3Url
from cfs.retry import RetryPolicy, retry

log = logging.getLogger(__name__)

T = TypeVar("T")

SSE = {"ServerSideEncryption": "AES256"}
DOWNLOAD_CHUNK = 1024 * 1024
MIN_ATTEMPT_S = 1.0  # the last attempt before the deadline still gets this long

TEMPORARY_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "OperationAborted",
        "BadDigest",
        "IncompleteBody",
    }
)
TEMPORARY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AccountProblem",
        "InvalidClientTokenId",
        "403",
    }
)
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def error_code(exc: ClientError) -> tuple[str, int, str]:
    """(S3 error code, HTTP status, S3's message) of a ClientError."""
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0), str(error.get("Message", "") or "")


def is_temporary(exc: BaseException) -> bool:
    """The S3 boundary's classification: may a later attempt of the same call succeed?"""
    if isinstance(exc, ClientError):
        code, status, _ = error_code(exc)
        if code in DENIED_CODES or status in (401, 403, 404):
            return False
        return code in TEMPORARY_CODES or status in TEMPORARY_STATUS
    if isinstance(exc, HTTPClientError | BotoConnectionError | ConnectionError | TimeoutError):
        return True
    # aiohttp errors that aiobotocore did not wrap (only possible once it is imported).
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(exc, aiohttp.ClientError)


def _import_aioboto3() -> tuple[Any, Any]:
    return importlib.import_module("aioboto3"), importlib.import_module("aiobotocore.config")


class S3ObjectStore:
    """An `ObjectStore` rooted at `url` on the S3 endpoint of `settings`.

    Nothing is opened here; the client is created on first use (or `async with`) and
    kept until `close()`. `policy` sets the retry timing (its `temporary` is always
    this module's `is_temporary`); by default the deadline is `settings.deadline_s`."""

    def __init__(
        self, url: S3Url, settings: S3Settings, *, policy: RetryPolicy | None = None
    ) -> None:
        self.url = url
        self.settings = settings
        base = policy or RetryPolicy(f"s3 {url}", deadline_s=settings.deadline_s)
        self.policy = replace(base, temporary=is_temporary)
        self._root = f"{url.prefix}/" if url.prefix else ""
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._opening = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<S3ObjectStore {self.url} at {self.settings.endpoint}>"

    # -- lifecycle -----------------------------------------------------------------------
    async def _s3(self) -> Any:
        """The one aioboto3 client, created on first use."""
        if self._client is not None:
            return self._client
        async with self._opening:
            if self._closed:
                raise ObjectStoreError(f"object store {self.url} is closed", bucket=self.url.bucket)
            if self._client is None:
                self._client = await self._open()
        return self._client

    async def _open(self) -> Any:
        # 0.6-3 s to import (more on a loaded machine): only processes that use S3 pay,
        # and off the event loop, so a lease or a heartbeat in the same process never
        # waits behind it.
        aioboto3, config_module = await asyncio.to_thread(_import_aioboto3)
        AioConfig = config_module.AioConfig

        settings = self.settings
        credentials: dict[str, str] = {}
        if settings.credentials_file is not None:
            found = await asyncio.to_thread(
                load_credentials, settings.credentials_file, settings.profile
            )
            credentials = found.client_kwargs()
        config = AioConfig(
            retries={"total_max_attempts": 1, "mode": "standard"},  # cfs.retry retries
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            max_pool_connections=max(10, settings.multipart_concurrency),
        )
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            aioboto3.Session().client(
                "s3",
                endpoint_url=settings.endpoint_url,
                region_name=settings.region,
                config=config,
                **credentials,
            )
        )
        self._stack = stack
        log.debug(
            "objstore.opened",
            extra={
                "url": str(self.url),
                "endpoint": settings.endpoint,
                "credentials": settings.credentials_source,
            },
        )
        return client

    async def close(self) -> None:
        async with self._opening:
            self._closed = True
            stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Self:
        await self._s3()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- the port ------------------------------------------------------------------------
    async def put(
        self, key: str, data: bytes, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        full = self._key(key)

        async def call(s3: Any) -> None:
            await s3.put_object(
                Bucket=self.url.bucket, Key=full, Body=data, **self._put_args(metadata)
            )

        await self._call("PUT", full, call)

    async def put_file(
        self, key: str, path: Path, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]

        full = self._key(key)
        path = Path(path)
        size = (await asyncio.to_thread(path.stat)).st_size  # a missing file: OSError now
        config = TransferConfig(
            multipart_threshold=self.settings.multipart_threshold_bytes,
            multipart_chunksize=self.settings.multipart_chunk_bytes,
            max_concurrency=self.settings.multipart_concurrency,
        )
        started = time.monotonic()

        async def call(s3: Any) -> None:
            await s3.upload_file(
                str(path),
                self.url.bucket,
                full,
                ExtraArgs=self._put_args(metadata),
                Config=config,
            )

        await self._call("PUT", full, call, bounded=False)
        log.info(
            "objstore.uploaded",
            extra={
                "bucket": self.url.bucket,
                "key": full,
                "bytes": size,
                "multipart": size >= self.settings.multipart_threshold_bytes,
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    async def get(self, key: str) -> bytes:
        full = self._key(key)

        async def call(s3: Any) -> bytes:
            response = await s3.get_object(Bucket=self.url.bucket, Key=full)
            body = response["Body"]
            async with body:  # releases the connection, also when the read fails
                data: bytes = await body.read()
            return data

        return await self._call("GET", full, call)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        full = self._key(key)
        wanted = f"bytes={start}" if start < 0 else f"bytes={start}-{start + max(length, 1) - 1}"

        async def call(s3: Any) -> bytes:
            response = await s3.get_object(Bucket=self.url.bucket, Key=full, Range=wanted)
            body = response["Body"]
            async with body:
                data: bytes = await body.read()
            return data if start < 0 or length > 0 else b""

        return await self._call("GET", full, call)

    async def get_file(self, key: str, path: Path) -> None:
        full = self._key(key)
        path = Path(path)
        tmp = temporary_path(path)

        async def call(s3: Any) -> None:
            response = await s3.get_object(Bucket=self.url.bucket, Key=full)
            out = await asyncio.to_thread(tmp.open, "wb")  # each attempt starts afresh
            try:
                body = response["Body"]
                async with body:
                    async for chunk in body.iter_chunks(DOWNLOAD_CHUNK):
                        await asyncio.to_thread(out.write, chunk)
                await asyncio.to_thread(_flush_and_sync, out)
            finally:
                await asyncio.to_thread(out.close)

        try:
            await self._call("GET", full, call, bounded=False)
            await asyncio.to_thread(commit_file, tmp, path)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)

    async def head(self, key: str) -> ObjectInfo | None:
        full = self._key(key)

        async def call(s3: Any) -> ObjectInfo | None:
            try:
                found = await s3.head_object(Bucket=self.url.bucket, Key=full)
            except ClientError as exc:
                if error_code(exc)[1] == 404:
                    return None  # or no bucket: a HEAD answer has no body to tell
                raise
            return ObjectInfo(
                key=key,
                size=int(found.get("ContentLength", 0)),
                etag=str(found.get("ETag", "")).strip('"'),
                last_modified_ms=_ms(found.get("LastModified")),
                metadata=dict(found.get("Metadata") or {}),
                encryption=found.get("ServerSideEncryption"),
            )

        info = await self._call("HEAD", full, call)
        if info is None:
            await self._check_bucket(full)
        return info

    async def delete(self, key: str) -> None:
        full = self._key(key)

        async def call(s3: Any) -> None:
            await s3.delete_object(Bucket=self.url.bucket, Key=full)

        await self._call("DELETE", full, call)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        full = self._root + check_prefix(prefix)
        token: str | None = None
        while True:
            page_token = token

            async def call(s3: Any, page_token: str | None = page_token) -> dict[str, Any]:
                more = {"ContinuationToken": page_token} if page_token else {}
                page: dict[str, Any] = await s3.list_objects_v2(
                    Bucket=self.url.bucket,
                    Prefix=full,
                    MaxKeys=self.settings.list_page_size,
                    **more,
                )
                return page

            page = await self._call("LIST", full, call)
            for item in page.get("Contents", ()):
                yield ObjectInfo(
                    key=str(item["Key"])[len(self._root) :],
                    size=int(item.get("Size", 0)),
                    etag=str(item.get("ETag", "")).strip('"'),
                    last_modified_ms=_ms(item.get("LastModified")),
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def ensure_bucket(self) -> None:
        bucket = self.url.bucket
        region = self.settings.region

        async def call(s3: Any) -> bool:
            try:
                await s3.head_bucket(Bucket=bucket)
                return False
            except ClientError as exc:
                if error_code(exc)[1] != 404:
                    raise
            where = {} if region == "us-east-1" else {"LocationConstraint": region}
            try:
                if where:
                    await s3.create_bucket(Bucket=bucket, CreateBucketConfiguration=where)
                else:
                    await s3.create_bucket(Bucket=bucket)
            except ClientError as exc:
                if error_code(exc)[0] != "BucketAlreadyOwnedByYou":  # a concurrent create
                    raise
            return True

        if await self._call("CREATE", None, call):
            log.info(
                "objstore.bucket_created",
                extra={"bucket": bucket, "endpoint": self.settings.endpoint},
            )

    # -- internals -----------------------------------------------------------------------
    def _key(self, key: str) -> str:
        return self._root + check_key(key)

    @staticmethod
    def _put_args(metadata: Mapping[str, str] | None) -> dict[str, Any]:
        args: dict[str, Any] = dict(SSE)
        if metadata:
            args["Metadata"] = dict(metadata)
        return args

    async def _check_bucket(self, full: str) -> None:
        """After a HEAD 404: NoSuchBucket if it was the bucket that is missing."""

        async def call(s3: Any) -> None:
            try:
                await s3.head_bucket(Bucket=self.url.bucket)
            except ClientError as exc:
                if error_code(exc)[1] == 404:
                    raise self._no_bucket("HEAD", full) from None
                raise

        await self._call("HEAD", full, call)

    async def _call(
        self,
        op: str,
        full: str | None,
        call: Callable[[Any], Awaitable[T]],
        *,
        bounded: bool = True,
    ) -> T:
        """`call(client)` under the retry policy; its failure as an ObjectStoreError."""
        s3 = await self._s3()
        started = time.monotonic()
        deadline = self.policy.deadline_s
        attempts = 0

        async def attempt() -> T:
            nonlocal attempts
            attempts += 1
            if not bounded or deadline is None:
                return await call(s3)
            left = max(deadline - (time.monotonic() - started), MIN_ATTEMPT_S)
            async with asyncio.timeout(left):
                return await call(s3)

        extra = {"op": op, "bucket": self.url.bucket, "key": full}
        try:
            return await retry(attempt, self.policy, extra=extra, logger=log)
        except ObjectStoreError:
            raise
        except (BotoCoreError, ClientError, ConnectionError, TimeoutError) as exc:
            raise self._translate(exc, op, full, time.monotonic() - started, attempts) from exc
        except Exception as exc:
            if is_temporary(exc):  # an aiohttp error aiobotocore did not wrap
                raise self._translate(exc, op, full, time.monotonic() - started, attempts) from exc
            raise

    def _where(self, op: str, full: str | None) -> str:
        target = f"s3://{self.url.bucket}/{full}" if full else f"s3://{self.url.bucket}"
        return f"{op} {target}"

    def _no_bucket(self, op: str, full: str | None) -> NoSuchBucket:
        return NoSuchBucket(
            f"{self._where(op, full)}: bucket {self.url.bucket!r} does not exist at "
            f"{self.settings.endpoint}",
            bucket=self.url.bucket,
            key=full,
        )

    def _translate(
        self, exc: BaseException, op: str, full: str | None, seconds: float, attempts: int
    ) -> ObjectStoreError:
        where = self._where(op, full)
        bucket = self.url.bucket
        if isinstance(exc, ClientError):
            code, status, message = error_code(exc)
            why = f"{code}: {message}" if message and message != code else code or str(status)
            if code == "NoSuchBucket":
                return self._no_bucket(op, full)
            if code in NOT_FOUND_CODES or status == 404:
                return ObjectNotFound(f"{where}: no such object", bucket=bucket, key=full)
            if code in DENIED_CODES or status in (401, 403):
                return self._denied(where, why, full)
            if not is_temporary(exc):
                return ObjectStoreError(f"{where}: {why} (HTTP {status})", bucket=bucket, key=full)
        elif isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return self._denied(where, str(exc), full)
        elif not is_temporary(exc):
            return ObjectStoreError(f"{where}: {_describe(exc)}", bucket=bucket, key=full)
        deadline = self.policy.deadline_s
        budget = f", deadline {deadline:g}s" if deadline is not None else ""
        return ObjectStoreUnavailable(
            f"{where}: S3 at {self.settings.endpoint} unavailable; gave up after "
            f"{seconds:.1f}s and {attempts} attempt(s){budget}: {_describe(exc)}",
            bucket=bucket,
            key=full,
            seconds=seconds,
            attempts=attempts,
        )

    def _denied(self, where: str, why: str, full: str | None) -> ObjectStoreDenied:
        return ObjectStoreDenied(
            f"{where}: access denied by {self.settings.endpoint} ({why}); credentials from "
            f"{self.settings.credentials_source}",
            bucket=self.url.bucket,
            key=full,
        )


def _flush_and_sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())


def _ms(when: Any) -> int:
    return int(when.timestamp() * 1000) if when is not None else 0


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return text or type(exc).__name__
