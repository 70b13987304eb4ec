"""The repair service process: one per node, one active coordinator per site (lease).

    cfs service run repair --node storage-1 [--config FILE]
    python -m cfs_repair --node storage-1

A separate process from membership on purpose: rebuilding is CPU- and
I/O-heavy (decode, re-encode, fsync'd puts), and SWIM's probe answers must
never wait behind it or healthy nodes would be suspected.
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import Field

from cfs.client.chunks import ChunkStoreClient
from cfs.client.metadata import MetadataClient
from cfs.client.nodes import NodeView
from cfs.lease import ShardLease
from cfs.service_main import ServiceSettings, run_service, until_jetstream_answers
from cfs_repair.coordinator import RepairCoordinator, Settings
from cfs_repair.plan import TokenBucket
from cfs_repair.rebuild import Rebuilder

log = logging.getLogger(__name__)

LEASE_KEY = "service.repair"
MB = 1_000_000


class RepairSettings(ServiceSettings):
    shards: int = Field(default=1, ge=1, le=999)
    repair_grace_s: float = Field(
        default=120.0, ge=0, description="how long a DOWN node may come back before repair"
    )
    repair_mb_s: float = Field(default=200.0, ge=0, description="throttle; 0 = unlimited")
    repair_parallel_chunks: int = Field(default=8, ge=1, le=64)
    repair_lease_s: float = 5.0
    repair_renew_s: float = 1.0


async def serve(settings: RepairSettings, stop: asyncio.Event) -> None:
    bus = await settings.connect("repair")
    nodes = NodeView(bus)
    lease = ShardLease(
        bus,
        LEASE_KEY,
        settings.node,
        lease_s=settings.repair_lease_s,
        renew_s=settings.repair_renew_s,
        eligible=lambda: nodes.in_service(settings.node),
    )
    try:
        await until_jetstream_answers("nodes view", nodes.start)
        meta = MetadataClient(bus)
        rebuilder = Rebuilder(meta, ChunkStoreClient(bus), TokenBucket(settings.repair_mb_s * MB))
        coordinator = RepairCoordinator(
            bus,
            Settings(
                node=settings.node,
                shards=settings.shards,
                grace_s=settings.repair_grace_s,
                parallel_chunks=settings.repair_parallel_chunks,
            ),
            meta,
            nodes,
            rebuilder,
            lease,
        )
        await lease.start()
        log.info("repair.service_started", extra={"node": settings.node})
        await coordinator.run(stop)
    finally:
        await lease.stop()
        await nodes.stop()
        await bus.close()
        log.info("repair.service_stopped", extra={"node": settings.node})


def main(argv: list[str] | None = None) -> None:
    run_service("repair", __doc__.splitlines()[0], RepairSettings, serve, argv)
