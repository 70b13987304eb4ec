"""The repair service process: one per node, one active coordinator per site (lease).

    cfs service run repair --node storage-1 [--config FILE]
    python -m cfs_repair --node storage-1

A separate process from membership on purpose: rebuilding is CPU- and
I/O-heavy (decode, re-encode, fsync'd puts), and SWIM's probe answers must
never wait behind it or healthy nodes would be suspected. The kernel runs the
coordinator's `lead` only while this process holds `service.repair`.
"""

from __future__ import annotations

from pydantic import Field

from cfs.bus.consumer import Handler
from cfs.client.chunks import ChunkStoreClient
from cfs.client.metadata import MetadataClient
from cfs.kernel.runtime import Context
from cfs.ratelimit import TokenBucket
from cfs.service_main import ServiceSettings, run_spec
from cfs_repair.coordinator import RepairCoordinator, Settings
from cfs_repair.rebuild import Rebuilder

MB = 1_000_000


class RepairSettings(ServiceSettings):
    shards: int = Field(default=1, ge=1, le=999)
    repair_grace_s: float = Field(
        default=120.0, ge=0, description="how long a DOWN node may come back before repair"
    )
    repair_mb_s: float = Field(default=200.0, ge=0, description="throttle; 0 = unlimited")
    repair_parallel_chunks: int = Field(default=8, ge=1, le=64)


async def start(ctx: Context) -> RepairCoordinator:
    settings: RepairSettings = ctx.settings
    meta = MetadataClient(ctx.bus)
    rebuilder = Rebuilder(meta, ChunkStoreClient(ctx.bus), TokenBucket(settings.repair_mb_s * MB))
    return RepairCoordinator(
        ctx.bus,
        Settings(
            node=settings.node,
            shards=settings.shards,
            grace_s=settings.repair_grace_s,
            parallel_chunks=settings.repair_parallel_chunks,
        ),
        meta,
        await ctx.nodes(),
        rebuilder,
    )


async def lead(ctx: Context) -> None:
    """The singleton's work: the kernel runs it while this process holds the lease."""
    coordinator: RepairCoordinator = ctx.service
    await coordinator.lead()


def damage_handler(ctx: Context) -> Handler:
    coordinator: RepairCoordinator = ctx.service
    return coordinator.on_damage


def main(argv: list[str] | None = None) -> None:
    from cfs_repair.spec import SPEC

    run_spec(SPEC, argv)
