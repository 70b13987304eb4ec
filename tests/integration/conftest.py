"""Fixtures shared by integration modules: one S3 server (moto) per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cfs.supervisor import S3Server


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server for the module's tests (its start costs seconds)."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "s3")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_env(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The `CFS_S3_*` variables by which services and `cfs` find that server."""
    credentials = tmp_path_factory.mktemp("s3-credentials") / "s3.ini"
    return s3_server.settings_env(s3_server.write_credentials(credentials))
