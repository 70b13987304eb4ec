"""repair as the kernel runs it: a process per node, one active coordinator per site."""

from __future__ import annotations

from cfs.bus.consumer import ConsumerSpec
from cfs.kernel.spec import Consumer, Grants, ServiceSpec, Singleton, deferred, imported
from cfs_contracts.streams import CLUSTER, DATA, NODES, TIER_INDEX

SPEC = ServiceSpec(
    name="repair",
    role="repair",
    package="cfs_repair",
    description="The repair service: re-protects the fragments of lost, removed and "
    "draining nodes (one active coordinator per site).",
    settings=imported("cfs_repair.service:RepairSettings"),
    grants=Grants(
        publish=(
            "{s}.cluster.>",  # RepairStarted/Progress/Completed, ChunkLost, NodeDrained
            "{s}.data.>",  # FragmentRebuilt
            "{s}.rpc.meta.*",  # scan chunk maps, move fragments
            "{s}.rpc.chunk.*.*",  # rebuild, list, delete
        ),
        read_streams=(CLUSTER.name,),
        read_buckets=(TIER_INDEX.bucket,),  # evicted chunks are no damage
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
            deferred("cfs_repair.service:damage_handler"),
            singleton=True,
        ),
    ),
    singleton=Singleton(deferred("cfs_repair.service:lead"), lease_s=5.0, renew_s=1.0),
    start=deferred("cfs_repair.service:start"),
    per_node=True,  # a process per node (one coordinates): its health record is its own
)
