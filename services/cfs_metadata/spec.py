"""metadata-raft as the kernel runs it: one process per node, a replica of every shard."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cfs.kernel.spec import AdminVerb, CommandHandler, Grants, ServiceSpec
from cfs_contracts.streams import LEASES

if TYPE_CHECKING:
    from cfs.kernel.runtime import Context
    from cfs.service_main import ServiceSettings


def _settings() -> type[ServiceSettings]:
    from cfs_metadata.service import MetadataSettings

    return MetadataSettings


async def _start(ctx: Context) -> None:
    from cfs_metadata.service import start

    await start(ctx)


def _force_election(ctx: Context) -> CommandHandler:
    from cfs_metadata.admin import force_election_handler

    return force_election_handler(ctx.bus, ctx.settings.shards)


SPEC = ServiceSpec(
    name="metadata-raft",
    role="metadata",
    package="cfs_metadata",
    description="The metadata-raft service: one replica of every metadata shard on this node.",
    settings=_settings,
    grants=Grants(
        publish=(
            "{s}.meta.>",  # its journals
            "{s}.rpc.meta.*",  # cross-shard two-phase operations
            "{s}.rpc.chunk.*.*",  # fragments of deleted files
        ),
        serve=("{s}.rpc.meta.*",),
        read_streams=("META_*",),
        read_buckets=(LEASES.bucket,),
        write_keys={LEASES.bucket: ("meta.*",)},
        stepdown=("META_*",),
    ),
    admin={
        "force-election": AdminVerb(
            _force_election, "stream leader stepdown plus writer lease handoff"
        )
    },
    start=_start,
)
