"""Chaos sites: `cfs dev` sites as the scenarios drive them (their fixtures, their
logs), each chunk-store on a disk of its own and the S3 tier behind a fault proxy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cfs.supervisor import free_port
from cfs.supervisor.s3 import HOST
from cfs.supervisor.s3proxy import S3FaultProxy
from tests.chaos.disks import node_disks
from tests.chaos.harness import ChaosSite
from tests.scenarios.conftest import DevSite

DISK_BYTES = 2 * 1024**3  # each chunk-store's tmpfs: far above what a run writes
TIER_URL = "s3://cfs-chaos-tier/data"
# The tierer notices S3 failing and coming back within seconds, as scenario 7 has it.
S3_ENV = {"CFS_STATUS_S": "0.5", "CFS_S3_DEADLINE_S": "2", "CFS_PROBE_S": "1",
          "CFS_COPY_RETRY_S": "1"}  # fmt: skip


@pytest.fixture
def chaos_site_factory(tmp_path: Path) -> Iterator[Callable[[int], ChaosSite]]:
    with contextlib.ExitStack() as stack:

        def make(nodes: int) -> ChaosSite:
            names = [f"storage-{i}" for i in range(1, nodes + 1)]
            s3_port = free_port(HOST)
            proxy = stack.enter_context(
                S3FaultProxy(tmp_path / "s3proxy", f"http://{HOST}:{s3_port}")
            )
            site = DevSite(
                tmp_path, nodes, {**S3_ENV, "CFS_S3_ENDPOINT_URL": proxy.endpoint_url},
                s3_port=s3_port,
            )  # fmt: skip
            disks = stack.enter_context(node_disks(site.state, names, DISK_BYTES))
            stack.callback(site.down)  # first out: the site, then its disks and proxy
            site.up()
            site.mount()
            site.ok("admin", "tier-config", "--mode", "cache", "--url", TIER_URL,
                    "--flush-after", "0.5")  # fmt: skip
            return ChaosSite(site, names, disks, proxy)

        yield make
