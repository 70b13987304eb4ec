"""backup as the kernel runs it: a process per node, one active per site (lease)."""

from __future__ import annotations

from cfs.kernel.spec import Grants, ServiceSpec, Singleton, deferred, imported
from cfs_contracts.streams import AUDIT, LEASES, NODES, TIER_INDEX

SPEC = ServiceSpec(
    name="backup",
    role="backup",
    package="cfs_backup",
    description="The backup service: consistent metadata snapshots across all shards, the "
    "journal archive and fragment garbage collection (one active per site).",
    settings=imported("cfs_backup.service:BackupSettings"),
    grants=Grants(
        publish=(
            "{s}.rpc.metaadmin.*",  # snapshot markers on each shard's journal
            "{s}.backup.>",  # snapshot progress
            "{s}.rpc.chunk.*.list",  # fragment GC: what each chunk-store holds
            "{s}.rpc.chunk.*.delete",  # fragment GC: conditional deletes, nothing else
            "{s}.rpc.tier.forget",  # the S3 tier's garbage, for the tierer to unindex
        ),
        serve=("{s}.rpc.backup.*", "{s}.rpc.backup.fetch.*"),
        read_streams=("META_*", AUDIT.name),
        read_buckets=(NODES.bucket, LEASES.bucket, TIER_INDEX.bucket),
        write_keys={NODES.bucket: ("backup.*",)},
    ),
    singleton=Singleton(deferred("cfs_backup.service:lead"), lease_s=5.0, renew_s=1.0),
    start=deferred("cfs_backup.service:start"),
)
