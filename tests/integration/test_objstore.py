"""The object store against a real S3 server: moto as its own process, spoken to over
HTTP as S3 would be. One server for the module; each test works in a bucket of its own.

The contract tests run against every implementation (S3 and in-memory, STYLE.md #7);
the rest are what only a real server shows: encryption at rest, multipart, request
counts (no retry on 404/403), denials, and an outage that fails within the deadline
and heals when the server is back (last in the file: moto restarts empty).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import boto3
import pytest

from cfs.objstore import (
    MemoryObjectStore,
    NoSuchBucket,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreDenied,
    ObjectStoreUnavailable,
    S3ObjectStore,
    S3Settings,
    S3Url,
    write_credentials_file,
)
from cfs.objstore.settings import MiB
from cfs.supervisor import S3Server, free_port

PAGE = 7  # keys per LIST request: a few dozen keys cross several pages
_buckets = itertools.count(1)


@pytest.fixture(scope="module")
def settings(s3_server: S3Server) -> S3Settings:
    credentials = s3_server.write_credentials(s3_server.state_dir / "credentials.ini")
    return S3Settings(
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.REGION,
        credentials_file=credentials,
        deadline_s=10.0,
        multipart_threshold_bytes=5 * MiB,
        multipart_chunk_bytes=5 * MiB,
        list_page_size=PAGE,
    )


def new_bucket() -> str:
    return f"cfs-t{next(_buckets)}-{os.getpid()}"


def raw(s3_server: S3Server) -> object:
    """boto3 as a second opinion on what the server stored."""
    return boto3.client("s3", **s3_server.client_kwargs)


def requests_for(s3_server: S3Server, needle: str) -> int:
    """How many requests moto logged whose request line contains `needle`."""
    time.sleep(0.2)  # moto writes its access log line after the answer
    return sum(needle in line for line in s3_server.log_path.read_text().splitlines())


@pytest.fixture
async def s3_store(settings: S3Settings) -> AsyncIterator[S3ObjectStore]:
    store = S3ObjectStore(S3Url(new_bucket(), "site-a"), settings)
    async with store:
        await store.ensure_bucket()
        yield store


@pytest.fixture(params=["s3", "memory"])
async def store(request: pytest.FixtureRequest, settings: S3Settings) -> AsyncIterator[ObjectStore]:
    """The same contract, every implementation."""
    if request.param == "memory":
        yield MemoryObjectStore(S3Url(new_bucket(), "site-a"))
        return
    async with S3ObjectStore(S3Url(new_bucket(), "site-a"), settings) as real:
        await real.ensure_bucket()
        await real.ensure_bucket()  # idempotent
        yield real


# -- the contract ------------------------------------------------------------------------------
async def test_put_get_head_delete(store: ObjectStore) -> None:
    await store.put("journal/001/seg-1", b"events", metadata={"first-seq": "1"})
    assert await store.get("journal/001/seg-1") == b"events"
    info = await store.head("journal/001/seg-1")
    assert info is not None
    assert info.key == "journal/001/seg-1"
    assert info.size == 6
    assert info.etag == hashlib.md5(b"events").hexdigest()
    assert info.metadata == {"first-seq": "1"}
    assert info.encryption == "AES256"
    assert abs(info.last_modified_ms - time.time() * 1000) < 120_000
    await store.put("journal/001/seg-1", b"")  # replaced
    assert await store.get("journal/001/seg-1") == b""
    await store.delete("journal/001/seg-1")
    await store.delete("journal/001/seg-1")  # idempotent
    await store.delete("never-there")
    assert await store.head("journal/001/seg-1") is None
    with pytest.raises(ObjectNotFound) as err:
        await store.get("journal/001/seg-1")
    where = f"s3://{store.url.bucket}/site-a/journal/001/seg-1"
    assert str(err.value) == f"GET {where}: no such object"
    assert (err.value.bucket, err.value.key) == (store.url.bucket, "site-a/journal/001/seg-1")


async def test_ranged_gets_read_a_part_or_the_tail(store: ObjectStore) -> None:
    data = bytes(range(256)) * 40
    await store.put("blob", data)
    assert await store.get_range("blob", 100, 50) == data[100:150]
    assert await store.get_range("blob", 10_000, 500) == data[10_000:]  # short at the end
    assert await store.get_range("blob", -46, 0) == data[-46:]  # the tail
    with pytest.raises(ObjectNotFound):
        await store.get_range("absent", 0, 10)


async def test_list_pages_through_every_key_in_order(store: ObjectStore) -> None:
    keys = [f"seg/{i:03d}" for i in range(31)] + ["seg/é", "seg/z", "snap/1", "segment"]
    await asyncio.gather(*(store.put(key, key.encode()) for key in reversed(keys)))
    listed = [info async for info in store.list()]
    assert [i.key for i in listed] == sorted(keys, key=str.encode)  # S3's order: UTF-8 bytes
    assert all(i.size == len(i.key.encode()) for i in listed)
    assert [i.key async for i in store.list("seg/")] == sorted(
        (k for k in keys if k.startswith("seg/")), key=str.encode
    )
    assert [i.key async for i in store.list("snap")] == ["snap/1"]
    assert [i.key async for i in store.list("nothing/")] == []


async def test_put_file_and_get_file(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "snapshot.tar.gz"
    source.write_bytes(os.urandom(100_000))
    await store.put_file("snapshots/1.tar.gz", source, metadata={"shards": "2"})
    target = tmp_path / "restored" / "snapshot.tar.gz"
    target.parent.mkdir()
    await store.get_file("snapshots/1.tar.gz", target)
    assert target.read_bytes() == source.read_bytes()
    info = await store.head("snapshots/1.tar.gz")
    assert info is not None and info.metadata == {"shards": "2"}
    assert os.listdir(target.parent) == ["snapshot.tar.gz"]


async def test_get_file_of_a_missing_object_leaves_the_target_alone(
    store: ObjectStore, tmp_path: Path
) -> None:
    target = tmp_path / "config.json"
    target.write_bytes(b"previous")
    with pytest.raises(ObjectNotFound):
        await store.get_file("missing.json", target)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["config.json"]


async def test_a_missing_bucket_is_named(store: ObjectStore) -> None:
    if isinstance(store, S3ObjectStore):
        missing: ObjectStore = S3ObjectStore(S3Url("cfs-no-such-bucket", "p"), store.settings)
    else:
        missing = MemoryObjectStore(S3Url("cfs-no-such-bucket", "p"), bucket_exists=False)
    async with missing:
        for call in (
            missing.put("k", b"1"),
            missing.get("k"),
            missing.head("k"),
            missing.delete("k"),
            _drain(missing.list()),
        ):
            with pytest.raises(NoSuchBucket) as err:
                await call
            assert "s3://cfs-no-such-bucket/p" in str(err.value)
            assert "bucket 'cfs-no-such-bucket' does not exist" in str(err.value)


async def _drain(items: AsyncIterator[object]) -> None:
    async for _ in items:
        pass


# -- what only a real server shows ---------------------------------------------------------------
async def test_every_put_is_encrypted_and_big_files_go_multipart(
    s3_store: S3ObjectStore, s3_server: S3Server, tmp_path: Path
) -> None:
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"x" * 1000)
    big.write_bytes(os.urandom(11 * MiB))  # 5 MiB parts: 3 of them
    await s3_store.put("bytes", b"payload")
    await s3_store.put_file("small", small)
    await s3_store.put_file("big", big)
    client = raw(s3_server)
    for key in ("bytes", "small", "big"):
        head = client.head_object(Bucket=s3_store.url.bucket, Key=f"site-a/{key}")  # type: ignore[attr-defined]
        assert head["ServerSideEncryption"] == "AES256", key
    info = await s3_store.head("big")
    assert info is not None and info.size == 11 * MiB
    assert info.etag.endswith("-3"), info.etag  # a multipart upload's ETag
    target = tmp_path / "big.copy"
    await s3_store.get_file("big", target)
    assert target.read_bytes() == big.read_bytes()


async def test_prefix_is_prepended_and_stripped(
    s3_store: S3ObjectStore, s3_server: S3Server
) -> None:
    await s3_store.put("a/b", b"1")
    listed = raw(s3_server).list_objects_v2(Bucket=s3_store.url.bucket)  # type: ignore[attr-defined]
    assert [o["Key"] for o in listed["Contents"]] == ["site-a/a/b"]
    assert [i.key async for i in s3_store.list()] == ["a/b"]
    async with S3ObjectStore(s3_store.url.child("a"), s3_store.settings) as below:
        assert await below.get("b") == b"1"


async def test_a_cancelled_download_leaves_no_half_file(
    s3_store: S3ObjectStore, tmp_path: Path
) -> None:
    blob = os.urandom(16 * MiB)
    await s3_store.put("blob", blob)
    target = tmp_path / "blob"
    target.write_bytes(b"previous")
    task = asyncio.create_task(s3_store.get_file("blob", target))
    while not task.done() and len(os.listdir(tmp_path)) == 1:  # until the .part file exists
        await asyncio.sleep(0.001)
    task.cancel()
    try:
        await task
        assert target.read_bytes() == blob  # it finished first: then all of it
    except asyncio.CancelledError:
        assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["blob"]


async def test_no_retry_on_404(s3_store: S3ObjectStore, s3_server: S3Server) -> None:
    started = time.monotonic()
    with pytest.raises(ObjectNotFound):
        await s3_store.get("missing-once")
    assert time.monotonic() - started < 1.0
    assert requests_for(s3_server, f"GET /{s3_store.url.bucket}/site-a/missing-once ") == 1


def _moto_auth(s3_server: S3Server, after: str) -> None:
    """Make moto check credentials (IAM) from now on ("0"), or stop checking ("inf")."""
    request = urllib.request.Request(
        f"{s3_server.endpoint_url}/moto-api/reset-auth",
        data=after.encode(),
        headers={"Content-Type": "text/plain"},  # a form body would hide it from moto
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


async def test_denials_are_one_line_and_never_retried(
    s3_store: S3ObjectStore, s3_server: S3Server, tmp_path: Path
) -> None:
    iam = boto3.client("iam", **s3_server.client_kwargs)
    iam.create_user(UserName="no-rights")
    key = iam.create_access_key(UserName="no-rights")["AccessKey"]
    secret = key["SecretAccessKey"]
    cases = {
        "InvalidAccessKeyId": ("AKIAUNKNOWNKEY000000", "not-a-secret-1"),
        "SignatureDoesNotMatch": (key["AccessKeyId"], "wrong-secret-0123456789"),
        "AccessDenied": (key["AccessKeyId"], secret),
    }
    _moto_auth(s3_server, "0")
    try:
        for code, (key_id, key_secret) in cases.items():
            credentials = write_credentials_file(tmp_path / f"{code}.ini", key_id, key_secret)
            settings = s3_store.settings.model_copy(update={"credentials_file": credentials})
            async with S3ObjectStore(s3_store.url, settings) as denied:
                started = time.monotonic()
                with pytest.raises(ObjectStoreDenied) as err:
                    await denied.put(f"denied-{code}", b"1")
                assert time.monotonic() - started < 1.0
            message = str(err.value)
            assert message.startswith(f"PUT s3://{s3_store.url.bucket}/site-a/denied-{code}: ")
            assert f"access denied by {s3_server.endpoint_url} ({code}" in message
            assert str(credentials) in message
            assert key_secret not in message and "\n" not in message
            assert requests_for(s3_server, f"PUT /{s3_store.url.bucket}/site-a/denied-{code} ") == 1
    finally:
        _moto_auth(s3_server, "inf")
    await s3_store.put("after-denials", b"ok")


async def test_nothing_listening_fails_within_the_deadline(settings: S3Settings) -> None:
    closed = settings.model_copy(
        update={"endpoint_url": f"http://127.0.0.1:{free_port()}", "deadline_s": 1.0}
    )
    async with S3ObjectStore(S3Url("backups", "site-a"), closed) as store:
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable) as err:
            await store.put("x", b"1")
        elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert err.value.attempts >= 2
    message = str(err.value)
    assert message.startswith(f"PUT s3://backups/site-a/x: S3 at {closed.endpoint_url} unavailable")
    assert re.search(r"; gave up after [01]\.\ds and [0-9]+ attempt\(s\), deadline 1s: ", message)
    assert "Could not connect" in message and "\n" not in message


async def test_outage_fails_within_the_deadline_then_heals(
    s3_store: S3ObjectStore, s3_server: S3Server
) -> None:
    """Last: the server is paused (a stall), then stopped (refused), then restarted empty.
    A store with a 1 s deadline fails each time within it, with one clear error."""
    await s3_store.put("before", b"1")
    quick = s3_store.settings.model_copy(
        update={"deadline_s": 1.0, "read_timeout_s": 0.3, "connect_timeout_s": 0.3}
    )
    async with S3ObjectStore(s3_store.url, quick) as store:
        assert await store.get("before") == b"1"
        s3_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(ObjectStoreUnavailable, match="unavailable; gave up after"):
                await store.get("before")
            assert time.monotonic() - started < 2.5
        finally:
            s3_server.resume()
        assert await store.get("before") == b"1"  # the same client, after the stall
        s3_server.stop()
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable) as err:
            await store.put("during", b"2")
        assert time.monotonic() - started < 2.5
        assert err.value.attempts >= 2
        s3_server.start()
    # The store opened before the outage (its client kept all along) works again; moto
    # keeps nothing across a restart, so the bucket is made anew.
    await s3_store.ensure_bucket()
    await s3_store.put("after", b"3")
    assert [i.key async for i in s3_store.list()] == ["after"]
