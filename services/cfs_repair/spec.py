"""repair as the kernel runs it: a process per node, one active coordinator per site."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cfs.bus.consumer import ConsumerSpec
from cfs.kernel.spec import Consumer, Grants, ServiceSpec, Singleton
from cfs_contracts.streams import CLUSTER, DATA, NODES

if TYPE_CHECKING:
    from cfs.bus.consumer import Handler
    from cfs.kernel.runtime import Context
    from cfs.service_main import ServiceSettings


def _settings() -> type[ServiceSettings]:
    from cfs_repair.service import RepairSettings

    return RepairSettings


async def _start(ctx: Context) -> object:
    from cfs_repair.service import start

    return await start(ctx)


async def _lead(ctx: Context) -> None:
    await ctx.service.lead()


def _on_damage(ctx: Context) -> Handler:
    handler: Handler = ctx.service.on_damage
    return handler


SPEC = ServiceSpec(
    name="repair",
    role="repair",
    package="cfs_repair",
    description="The repair service: re-protects the fragments of lost, removed and "
    "draining nodes (one active coordinator per site).",
    settings=_settings,
    grants=Grants(
        publish=(
            "{s}.cluster.>",  # RepairStarted/Progress/Completed, ChunkLost, NodeDrained
            "{s}.data.>",  # FragmentRebuilt
            "{s}.rpc.meta.*",  # scan chunk maps, move fragments
            "{s}.rpc.chunk.*.*",  # rebuild, list, delete
        ),
        read_streams=(CLUSTER.name,),
        write_keys={NODES.bucket: ("repair.*", "admin.*")},
    ),
    consumers=(
        Consumer(
            ConsumerSpec(
                stream=DATA.name,
                durable="repair-damaged",
                filter_subject="{s}.data.*.damaged",
                batch=16,
                ack_wait_s=60.0,
                max_deliver=10,
                retry_delay_s=5.0,
            ),
            _on_damage,
            singleton=True,
        ),
    ),
    singleton=Singleton(_lead, lease_s=5.0, renew_s=1.0),
    start=_start,
)
