"""The object store's pure parts: failure classification, settings and credentials
(never a secret in a repr or a message), and the in-memory and fault-injecting stores.
Behaviour against a real S3 server: tests/integration/test_objstore.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from cfs.objstore import (
    FaultyObjectStore,
    MemoryObjectStore,
    NoSuchBucket,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreDenied,
    ObjectStoreError,
    ObjectStoreUnavailable,
    S3ObjectStore,
    S3Settings,
    S3Url,
    is_temporary,
    load_credentials,
    open_store,
    write_credentials_file,
)
from cfs.retry import RetryPolicy

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def client_error(code: str, status: int, message: str = "") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )


@pytest.mark.parametrize(
    ("exc", "temporary"),
    [
        (client_error("SlowDown", 503), True),
        (client_error("ServiceUnavailable", 503), True),
        (client_error("InternalError", 500), True),
        (client_error("RequestTimeout", 400), True),
        (client_error("BadGateway", 502), True),
        (client_error("GatewayTimeout", 504), True),
        (client_error("TooManyRequests", 429), True),
        (client_error("AccessDenied", 403), False),
        (client_error("InvalidAccessKeyId", 403), False),
        (client_error("SignatureDoesNotMatch", 403), False),
        (client_error("403", 403), False),
        (client_error("NoSuchKey", 404), False),
        (client_error("404", 404), False),
        (client_error("NoSuchBucket", 404), False),
        (client_error("NotImplemented", 501), False),
        (client_error("InvalidArgument", 400), False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
        (ResponseStreamingError(error="IncompleteRead"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (NoCredentialsError(), False),
        (FileNotFoundError("/tmp/x"), False),
        (ValueError("bug"), False),
    ],
)
def test_classification(exc: BaseException, temporary: bool) -> None:
    """Only what a later attempt may not meet is retried: never a 403 or a 404."""
    assert is_temporary(exc) is temporary


def test_the_store_uses_its_own_classification_with_the_callers_timing() -> None:
    settings = S3Settings(endpoint_url="http://127.0.0.1:1", deadline_s=7)
    store = S3ObjectStore(S3Url("backups"), settings)
    assert store.policy.deadline_s == 7
    assert store.policy.temporary is is_temporary
    mine = S3ObjectStore(S3Url("backups"), settings, policy=RetryPolicy("x", deadline_s=2))
    assert (mine.policy.what, mine.policy.deadline_s) == ("x", 2)
    assert mine.policy.temporary is is_temporary
    assert isinstance(open_store("s3://backups/a", settings), S3ObjectStore)
    with pytest.raises(ValueError, match="bad S3 URL"):
        open_store("backups/a", settings)


# -- settings and credentials ----------------------------------------------------------------
@pytest.fixture
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No CFS_S3_* from the outside, and a working directory without .cfs-dev."""
    for name in ("CFS_CONFIG", "CFS_S3_ENDPOINT_URL", "CFS_S3_REGION", "CFS_S3_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_settings_from_the_cluster_file_then_env_then_flags(
    no_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert S3Settings().endpoint_url is None
    config = no_config / ".cfs-dev" / "cluster.json"
    config.parent.mkdir()
    config.write_text(
        json.dumps(
            {
                "site": "local",
                "nats_urls": ["nats://127.0.0.1:4222"],
                "s3_endpoint": "http://127.0.0.1:9000",
                "s3_region": "eu-west-1",
                "s3_credentials_file": "credentials/s3.ini",
            }
        )
    )
    found = S3Settings()
    assert found.endpoint_url == "http://127.0.0.1:9000"
    assert found.region == "eu-west-1"
    assert found.credentials_file == config.parent / "credentials" / "s3.ini"
    monkeypatch.setenv("CFS_S3_ENDPOINT_URL", "http://env:9000")
    monkeypatch.setenv("CFS_S3_DEADLINE_S", "5")
    assert (S3Settings().endpoint_url, S3Settings().deadline_s) == ("http://env:9000", 5)
    assert S3Settings(endpoint_url="http://flag:1").endpoint_url == "http://flag:1"


def test_credentials_file_and_no_secret_in_any_repr(no_config: Path) -> None:
    path = write_credentials_file(no_config / "s3.ini", "AKIAEXAMPLE", SECRET)
    assert path.stat().st_mode & 0o777 == 0o600
    credentials = load_credentials(path)
    assert credentials.access_key_id == "AKIAEXAMPLE"
    assert credentials.secret_access_key == SECRET
    assert credentials.client_kwargs()["aws_secret_access_key"] == SECRET
    settings = S3Settings(credentials_file=path)
    store = S3ObjectStore(S3Url("backups"), settings)
    for text in (repr(credentials), str(credentials), repr(settings), repr(store)):
        assert SECRET not in text
    assert SECRET not in settings.model_dump_json()
    assert str(path) in settings.credentials_source


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "No such file"),
        ("not ini at all", "not in the AWS credentials-file format"),
        ("[other]\naws_access_key_id = A\naws_secret_access_key = " + SECRET, "no [default]"),
        ("[default]\naws_access_key_id = A\n", "no aws_secret_access_key"),
    ],
)
def test_bad_credentials_file_is_one_line_without_the_secret(
    no_config: Path, content: str | None, why: str
) -> None:
    path = no_config / "s3.ini"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ObjectStoreError) as err:
        load_credentials(path)
    assert why in str(err.value)
    assert str(path) in str(err.value)
    assert SECRET not in str(err.value)
    assert "\n" not in str(err.value)


# -- the in-memory store and the fault injector ------------------------------------------------
async def test_memory_store_behaves_like_s3(tmp_path: Path) -> None:
    store = MemoryObjectStore(S3Url("backups", "site-a"))
    assert isinstance(store, ObjectStore)
    await store.put("b", b"2", metadata={"k": "v"})
    await store.put("a/é", b"1")
    await store.put("a/z", b"3")
    info = await store.head("b")
    assert info is not None
    assert (info.size, info.metadata, info.encryption) == (1, {"k": "v"}, "AES256")
    assert [i.key async for i in store.list()] == ["a/z", "a/é", "b"]  # UTF-8 byte order
    assert [i.key async for i in store.list("a/")] == ["a/z", "a/é"]
    await store.delete("b")
    await store.delete("b")
    assert await store.head("b") is None
    with pytest.raises(ObjectNotFound, match=r"GET s3://backups/site-a/b: no such object"):
        await store.get("b")
    target = tmp_path / "out"
    await store.get_file("a/z", target)
    assert target.read_bytes() == b"3"
    with pytest.raises(ValueError, match="keys are relative"):
        await store.put("/abs", b"")
    missing = MemoryObjectStore(S3Url("nope"), bucket_exists=False)
    with pytest.raises(NoSuchBucket, match="bucket 'nope' does not exist"):
        await missing.put("x", b"")
    await missing.ensure_bucket()
    await missing.put("x", b"")


async def test_faulty_store_queues_faults_in_order() -> None:
    inner = MemoryObjectStore()
    store = FaultyObjectStore(inner)
    store.fail_next(2, "unavailable", ops={"put", "put_file"})
    assert await store.head("x") is None  # not a put: passes
    for _ in range(2):
        with pytest.raises(ObjectStoreUnavailable, match="injected fault"):
            await store.put("x", b"1")
    await store.put("x", b"1")
    store.fail_next(1, "denied")
    with pytest.raises(ObjectStoreDenied, match=r"get s3://memory/x: access denied"):
        await store.get("x")
    assert await store.get("x") == b"1"
    store.fail_next(1, "unavailable", ops={"list"})
    with pytest.raises(ObjectStoreUnavailable):
        _ = [i async for i in store.list()]
    assert [i.key async for i in store.list()] == ["x"]
    assert store.calls[:3] == [("head", "x"), ("put", "x"), ("put", "x")]
    assert store.pending == 0
    with pytest.raises(ValueError, match="unknown operations"):
        store.fail_next(1, ops={"upload"})
