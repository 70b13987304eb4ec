"""s3-tierer as the kernel runs it: a process per node, one active per site (lease)."""

from __future__ import annotations

from cfs.kernel.spec import Grants, ServiceSpec, Singleton, deferred, imported
from cfs_contracts.streams import NODES, TIER, TIER_INDEX

SPEC = ServiceSpec(
    name="s3-tierer",
    role="tierer",
    package="cfs_tierer",
    description="The data tier: flushes every chunk from flash to blobs in S3 and rules "
    "writes by the flash watermark (write-through, ENOSPC) while S3 is behind or down "
    "(one active per site).",
    settings=imported("cfs_tierer.service:TierSettings"),
    grants=Grants(
        publish=(
            "{s}.rpc.chunk.*.get",  # a queued chunk's fragments, read from flash
            "{s}.rpc.chunk.*.verify",  # recall: which fragments are still there
            "{s}.rpc.chunk.*.put",  # recall: the missing ones, stored again
            "{s}.rpc.chunk.*.touched",  # eviction: was the chunk read lately
            "{s}.rpc.chunk.*.delete",  # eviction: its fragments leave flash
            "{s}.rpc.meta.*",  # eviction: every file's chunk map (scan_chunks)
            "{s}.cluster.tier.watermark",  # WatermarkChanged
            "{s}.tier.chunk",  # backfill: chunks no client queued (ChunkQueued)
            f"$JS.API.STREAM.PURGE.{TIER.name}",  # the queue below the oldest pending
        ),
        serve=(
            "{s}.rpc.tier.flush",
            "{s}.rpc.tier.recall",
            "{s}.rpc.tier.reindex",
            "{s}.rpc.tier.forget",  # from backup's GC: chunks outside its keep set
            "{s}.rpc.tier.compact",  # `s3-compact`: a pass now
            "{s}.rpc.tier.backfill",  # `s3-backfill`: a pass now
        ),
        read_streams=(TIER.name,),
        read_buckets=(NODES.bucket, TIER_INDEX.bucket),
        write_keys={NODES.bucket: ("tier.state",), TIER_INDEX.bucket: ("chunk.*", "blob.*")},
    ),
    singleton=Singleton(deferred("cfs_tierer.service:lead"), lease_s=5.0, renew_s=1.0),
    start=deferred("cfs_tierer.service:start"),
)
