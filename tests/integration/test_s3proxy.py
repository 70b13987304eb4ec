"""The S3 fault proxy (issue 15's fault tests stand on it), against the real moto server
through the object-store port: each fault comes out as the error class a service
branches on, and the proxy passes everything else through unchanged."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfs.objstore import (
    ObjectStoreDenied,
    ObjectStoreUnavailable,
    S3ObjectStore,
    S3Settings,
    S3Url,
)
from cfs.supervisor import S3Server
from cfs.supervisor.errors import SupervisorError
from cfs.supervisor.s3proxy import S3FaultProxy

_buckets = itertools.count(1)


@pytest.fixture(scope="module")
def proxy(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(tmp_path_factory.mktemp("s3proxy"), s3_server.endpoint_url) as running:
        yield running


def _store(s3_server: S3Server, proxy: S3FaultProxy, deadline_s: float = 3.0) -> S3ObjectStore:
    credentials = s3_server.write_credentials(s3_server.state_dir / "proxy-credentials.ini")
    settings = S3Settings(
        endpoint_url=proxy.endpoint_url,
        region=s3_server.REGION,
        credentials_file=credentials,
        deadline_s=deadline_s,
    )
    return S3ObjectStore(S3Url(f"cfs-proxy{next(_buckets)}-{os.getpid()}", "p"), settings)


@pytest.mark.slow  # make test-slow: its guide scenario covers the same (3, 7 or 8)
async def test_faults_come_out_as_the_error_classes_services_branch_on(
    s3_server: S3Server, proxy: S3FaultProxy
) -> None:
    data = os.urandom(300_000)
    async with _store(s3_server, proxy) as store:
        await store.ensure_bucket()
        await store.put("a", data)
        assert await store.get("a") == data  # passed through, byte for byte
        info = await store.head("a")
        assert info is not None and info.size == len(data)

        proxy.set_fault("status", status=403)
        with pytest.raises(ObjectStoreDenied):
            await store.get("a")

        proxy.set_fault("status", status=503, methods=("PUT",))
        assert await store.get("a") == data  # only PUTs fail
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable):
            await store.put("b", b"x")
        assert time.monotonic() - started < 10  # within the deadline, retried

        proxy.set_fault("cut", methods=("GET",))
        with pytest.raises(ObjectStoreUnavailable):
            await store.get("a")  # half a body, then the connection is dropped

        proxy.set_fault("cut", methods=("PUT",))
        with pytest.raises(ObjectStoreUnavailable):
            await store.put("cut", os.urandom(200_000))  # the upload dropped mid-body
        proxy.set_fault("pass")
        assert await store.head("cut") is None, "a cut upload is not stored"

        proxy.set_fault("slow", delay_s=0.5)
        started = time.monotonic()
        assert await store.get("a") == data
        assert time.monotonic() - started >= 0.5

        proxy.set_fault("status", status=500, buckets=(store.url.bucket,))
        async with _store(s3_server, proxy) as other:  # another bucket, same server
            await other.ensure_bucket()
            await other.put("c", b"elsewhere")
            with pytest.raises(ObjectStoreUnavailable):
                await store.put("c", b"here")

        proxy.set_fault("pass")
        await store.put("b", b"after")
        assert await store.get("b") == b"after"


async def test_a_stopped_proxy_refuses_then_serves_again_on_the_same_port(
    s3_server: S3Server, tmp_path: Path
) -> None:
    proxy = S3FaultProxy(tmp_path / "p", s3_server.endpoint_url)
    with proxy:
        async with _store(s3_server, proxy, deadline_s=1.0) as store:
            await store.ensure_bucket()
            proxy.stop()
            with pytest.raises(ObjectStoreUnavailable):
                await store.put("k", b"v")
            proxy.start()
            await store.put("k", b"v")
            assert await store.get("k") == b"v"
        with pytest.raises(SupervisorError, match="unknown mode"):
            proxy.set_fault("melt")
