"""geo-replicator as the kernel runs it: a process per node, one active per site
(lease), on sites linked to a peer (`cfs admin replication-link`); it also keeps the
active-site record and fails over to this site when the active peer is gone."""

from __future__ import annotations

from cfs.kernel.spec import Grants, ServiceSpec, Singleton, deferred, imported
from cfs_contracts.geo import GEO_ACTIVE_KEY, GEO_APPLIED_KEY, INBOUND_STREAM
from cfs_contracts.streams import CONFLICTS, NODES

SPEC = ServiceSpec(
    name="geo-replicator",
    role="georep",
    package="cfs_georep",
    description="Applies the peer site's metadata journal here: ships the data its chunk "
    "maps need from the peer's chunk-stores, then has each shard writer merge the "
    "entries (one active per site).",
    settings=imported("cfs_georep.service:GeoSettings"),
    grants=Grants(
        publish=(
            "{s}.rpc.metaadmin.*",  # apply_remote on each shard's writer
            "{s}.rpc.meta.*",  # a file's local chunk map (data already here)
            "{s}.rpc.chunk.*.put",  # the peer's chunks, stored here
            "cfs.*.rpc.chunk.*.get",  # the peer's fragments, over the site link
            "{s}.tier.chunk",  # a stored chunk queued for S3, as a client's would be
            "{s}.rpc.tier.flush",  # write-through while flash is filling, as a client's
            "{s}.conflicts.detected",  # ConflictDetected
            # the peer's active-site record and whether it answers, over the link
            "$JS.*.API.INFO",
            f"$JS.*.API.STREAM.INFO.KV_{NODES.bucket}",
            f"$JS.*.API.DIRECT.GET.KV_{NODES.bucket}.$KV.{NODES.bucket}.{GEO_ACTIVE_KEY}",
            f"$JS.*.API.STREAM.MSG.GET.KV_{NODES.bucket}",
        ),
        read_streams=(INBOUND_STREAM, CONFLICTS.name),
        read_buckets=(NODES.bucket,),
        # progress, for replication-status; which site is active (adopted, or failover)
        write_keys={NODES.bucket: (GEO_APPLIED_KEY, GEO_ACTIVE_KEY)},
    ),
    singleton=Singleton(deferred("cfs_georep.service:lead"), lease_s=5.0, renew_s=1.0),
    needs_peer=True,
)
