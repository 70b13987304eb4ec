"""The metadata-raft service process: one replica of every shard on this node, and
the node's replica checks (`cfs.<site>.rpc.metacheck.<node>`, `check_server.py`).

    cfs service run metadata-raft --node storage-1 [--config FILE]
    python -m cfs_metadata --node storage-1

Settings come from flags, then `CFS_*` environment variables, then a config
file (JSON/TOML via pydantic-settings).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from pydantic import Field

from cfs.client.nodes import NodeView
from cfs.kernel.runtime import Context, started
from cfs.placement import Candidate, rank
from cfs.service_main import ServiceSettings, run_spec
from cfs_contracts.streams import shard_lease_key
from cfs_metadata.check_server import ReplicaChecks
from cfs_metadata.projection import Projection
from cfs_metadata.replica import ReplicaSettings, ShardReplica

log = logging.getLogger(__name__)


class MetadataSettings(ServiceSettings):
    data_dir: Path = Path("/var/lib/claudefs")
    shards: int = Field(default=1, ge=1, le=999, description="fixed at `cfs cluster init`")
    lease_s: float = 0.8
    renew_s: float = 0.2
    max_batch_ops: int = 512
    commit_linger_s: float = Field(
        default=0.004, ge=0, le=0.05, description="group commit's wait for company (pacing.py)"
    )


async def start(ctx: Context) -> None:
    """A replica of every shard; each stops (releasing its lease) when the service stops."""
    settings: MetadataSettings = ctx.settings
    replica_settings = ReplicaSettings(
        lease_s=settings.lease_s,
        renew_s=settings.renew_s,
        max_batch_ops=settings.max_batch_ops,
        commit_linger_s=settings.commit_linger_s,
        shard_count=settings.shards,
    )
    nodes = await ctx.nodes()
    replicas: dict[int, ShardReplica] = {}
    for index in range(1, settings.shards + 1):
        path = settings.data_dir / "metadata" / f"shard-{index:03d}"
        projection = Projection(path, index)
        ctx.stack.callback(projection.close)
        replica = ShardReplica(
            ctx.bus,
            index,
            projection,
            replica_settings,
            may_lead=lambda: nodes.active(settings.node),
            acquire_delay=partial(preference_delay, nodes, settings.node, index),
            spawn=ctx.spawner(),
            active_site=lambda: nodes.geo.get("active"),
        )
        await ctx.enter(started(replica))
        replicas[index] = replica
    checks = ReplicaChecks(ctx.bus, replicas, settings.data_dir / "metadata" / "check")
    await ctx.enter(started(checks))
    log.info("metadata.started", extra={"node": settings.node, "shards": settings.shards})


LEASE_PREFERENCE_STEP_S = 0.1


def preference_delay(nodes: NodeView, node: str, shard: int) -> float:
    """This node's place in the shard's rendezvous order over live nodes, times a step:
    contested leases go to the preferred replica, so shards spread over the nodes."""
    live = nodes.live_nodes()
    if node not in live:
        live.append(node)
    order = [c.node for c in rank(shard_lease_key(f"{shard}"), [Candidate(n) for n in live])]
    return order.index(node) * LEASE_PREFERENCE_STEP_S


def main(argv: list[str] | None = None) -> None:
    from cfs_metadata.spec import SPEC

    run_spec(SPEC, argv)
