"""metadata-raft as the kernel runs it: one process per node, a replica of every shard."""

from __future__ import annotations

from cfs.kernel.spec import AdminVerb, Grants, ServiceSpec, deferred, imported
from cfs_contracts.streams import LEASES

SPEC = ServiceSpec(
    name="metadata-raft",
    role="metadata",
    package="cfs_metadata",
    description="The metadata-raft service: one replica of every metadata shard on this node.",
    settings=imported("cfs_metadata.service:MetadataSettings"),
    grants=Grants(
        publish=(
            "{s}.meta.>",  # its journals
            "{s}.rpc.meta.*",  # cross-shard two-phase operations
            "{s}.rpc.chunk.*.*",  # fragments of deleted files
        ),
        serve=("{s}.rpc.meta.*", "{s}.rpc.metaadmin.*", "{s}.rpc.metacheck.*"),
        read_streams=("META_*",),
        read_buckets=(LEASES.bucket,),
        write_keys={LEASES.bucket: ("meta.*",)},
        stepdown=("META_*",),
    ),
    admin={
        "force-election": AdminVerb(
            deferred("cfs_metadata.admin:force_election_verb"),
            "stream leader stepdown plus writer lease handoff",
        )
    },
    start=deferred("cfs_metadata.service:start"),
    per_node=True,  # a replica per node: its health record is its own
)
