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


class NatsLogWatch:
    """New `... Violation` lines in every nats-server log under a directory.

    A service that lacks a permission it needs fails quietly (its request times out,
    nats-py reports the error asynchronously), so every test is checked for
    permission and authorization violations the servers logged while it ran."""

    _SKIP = ("store", "nodes", "s3", "logs", "credentials", "recovery")

    def __init__(self, base: Path) -> None:
        self.base = base
        self._offsets: dict[str, int] = {}

    def new_violations(self) -> list[str]:
        found: list[str] = []
        for root, dirs, files in os.walk(self.base):
            dirs[:] = [d for d in dirs if not d.startswith(self._SKIP)]
            if "nats.log" in files:
                found += self._read(os.path.join(root, "nats.log"))
        return found

    def _read(self, path: str) -> list[str]:
        offset = self._offsets.get(path, 0)
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < offset:  # a new log in the same place
                    offset = 0
                f.seek(offset)
                chunk = f.read()
        except OSError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offsets[path] = offset + len(complete)
        lines = complete.decode(errors="replace").splitlines()
        return [f"{path}: {line}" for line in lines if "Violation" in line]


@pytest.fixture(scope="session")
def _nats_logs(tmp_path_factory: pytest.TempPathFactory) -> NatsLogWatch:
    return NatsLogWatch(tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def _no_permission_violations(
    request: pytest.FixtureRequest, _nats_logs: NatsLogWatch
) -> Iterator[None]:
    """Fail a test during which a NATS server refused a client a permission, unless the
    test provokes that on purpose (`@pytest.mark.permission_violations`)."""
    _nats_logs.new_violations()  # whatever earlier tests left is theirs
    yield
    found = _nats_logs.new_violations()
    if request.node.get_closest_marker("permission_violations") is None:
        assert not found, "NATS refused a permission:\n" + "\n".join(found[:20])


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
