"""Shared fixtures: real nats-server and S3 (moto) processes, always torn down.

The supervisor API is synchronous (start/stop take milliseconds to a second), so these
fixtures are plain sync fixtures usable from async tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfs.supervisor import NatsCluster, NatsServer, S3Server, kill_all, live_processes

# Contracts parse strictly under test (unknown payload fields fail), leniently in production.
os.environ["CFS_STRICT_CONTRACTS"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    """Fail the session if any supervised child outlives its fixture (then kill it)."""
    yield
    leaked = [repr(proc) for proc in live_processes()]
    kill_all()
    assert not leaked, f"supervised processes still alive at session end: {leaked}"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A standalone JetStream nats-server with its store under tmp_path."""
    server = NatsServer.standalone(tmp_path / "nats")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_cluster3(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster (n1..n3) with a meta leader elected."""
    cluster = NatsCluster(3, tmp_path / "nats-cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[S3Server]:
    """Moto's S3 server as a separate process; see `S3Server.client_kwargs`."""
    server = S3Server(tmp_path / "s3")
    try:
        server.start()
        yield server
    finally:
        server.stop()
