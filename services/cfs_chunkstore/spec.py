"""chunk-store as the kernel runs it: one per node, this node's fragments."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cfs.kernel.spec import Grants, ServiceSpec
from cfs_contracts.streams import NODES

if TYPE_CHECKING:
    from cfs.kernel.runtime import Context
    from cfs.service_main import ServiceSettings


def _settings() -> type[ServiceSettings]:
    from cfs_chunkstore.service import ChunkStoreSettings

    return ChunkStoreSettings


async def _start(ctx: Context) -> None:
    from cfs_chunkstore.service import start

    await start(ctx)


SPEC = ServiceSpec(
    name="chunk-store",
    role="chunkstore",
    package="cfs_chunkstore",
    description="The chunk-store service: this node's fragments, served over NATS.",
    settings=_settings,
    grants=Grants(
        publish=(
            "{s}.data.>",  # FragmentStored/Deleted/Damaged
            "{s}.rpc.chunk.*.get",  # a rebuild reads the surviving fragments itself
        ),
        serve=("{s}.rpc.chunk.*.*",),
        write_keys={NODES.bucket: ("store.*",)},
    ),
    start=_start,
)
