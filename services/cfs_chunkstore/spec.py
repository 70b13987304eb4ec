"""chunk-store as the kernel runs it: one per node, this node's fragments."""

from __future__ import annotations

from cfs.kernel.spec import Grants, ServiceSpec, deferred, imported
from cfs_contracts.streams import NODES

SPEC = ServiceSpec(
    name="chunk-store",
    role="chunkstore",
    package="cfs_chunkstore",
    description="The chunk-store service: this node's fragments, served over NATS.",
    settings=imported("cfs_chunkstore.service:ChunkStoreSettings"),
    grants=Grants(
        publish=(
            "{s}.data.{n}.>",  # FragmentStored/Deleted/Damaged, of its own fragments only
            "{s}.rpc.chunk.*.get",  # a rebuild reads the surviving fragments itself
        ),
        serve=("{s}.rpc.chunk.{n}.*",),  # this node's fragments only
        write_keys={NODES.bucket: ("store.{n}",)},  # this node's capacity record only
    ),
    per_node=True,
    start=deferred("cfs_chunkstore.service:start"),
)
