"""The metadata-raft service process: one replica of every shard on this node.

    cfs service run metadata-raft --node storage-1 [--config FILE]
    python -m cfs_metadata --node storage-1

Settings come from flags, then `CFS_*` environment variables, then a config
file (JSON/TOML via pydantic-settings).
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from pathlib import Path

from pydantic import Field

from cfs.admin.executor import CommandExecutor, metadata_handlers
from cfs.client.nodes import NodeView
from cfs.placement import Candidate, rank
from cfs.service_main import ServiceSettings, run_service, until_jetstream_answers
from cfs_contracts.streams import shard_name
from cfs_metadata.admin import force_election
from cfs_metadata.projection import Projection
from cfs_metadata.replica import ReplicaSettings, ShardReplica

log = logging.getLogger(__name__)


class MetadataSettings(ServiceSettings):
    data_dir: Path = Path("/var/lib/claudefs")
    shards: int = Field(default=1, ge=1, le=999, description="fixed at `cfs cluster init`")
    lease_s: float = 0.8
    renew_s: float = 0.2
    max_batch_ops: int = 512


async def serve(settings: MetadataSettings, stop: asyncio.Event) -> None:
    bus = await settings.connect("metadata-raft")
    replica_settings = ReplicaSettings(
        lease_s=settings.lease_s,
        renew_s=settings.renew_s,
        max_batch_ops=settings.max_batch_ops,
        shard_count=settings.shards,
    )
    replicas: list[ShardReplica] = []
    nodes = NodeView(bus)
    executor: CommandExecutor | None = None
    try:
        await until_jetstream_answers("nodes view", nodes.start)
        for index in range(1, settings.shards + 1):
            path = settings.data_dir / "metadata" / f"shard-{index:03d}"
            replica = ShardReplica(
                bus,
                index,
                Projection(path, index),
                replica_settings,
                may_lead=lambda: nodes.active(settings.node),
                acquire_delay=partial(preference_delay, nodes, settings.node, index),
            )
            await replica.start()
            replicas.append(replica)
        shards = [shard_name(i) for i in range(1, settings.shards + 1)]
        executor = CommandExecutor(
            bus, "metadata-raft", metadata_handlers(bus, shards, force_election)
        )
        await executor.start()  # executes cmd.metadata-raft.* (force-election)
        log.info("metadata.started", extra={"node": settings.node, "shards": settings.shards})
        await stop.wait()
    finally:
        if executor is not None:
            await executor.stop()
        for replica in reversed(replicas):
            await replica.stop()
            replica.projection.close()
        await nodes.stop()
        await bus.close()
        log.info("metadata.stopped", extra={"node": settings.node})


LEASE_PREFERENCE_STEP_S = 0.1


def preference_delay(nodes: NodeView, node: str, shard: int) -> float:
    """This node's place in the shard's rendezvous order over live nodes, times a step:
    contested leases go to the preferred replica, so shards spread over the nodes."""
    live = nodes.live_nodes()
    if node not in live:
        live.append(node)
    order = [c.node for c in rank(f"meta.{shard}", [Candidate(n) for n in live])]
    return order.index(node) * LEASE_PREFERENCE_STEP_S


def main(argv: list[str] | None = None) -> None:
    run_service("metadata-raft", __doc__.splitlines()[0], MetadataSettings, serve, argv)
