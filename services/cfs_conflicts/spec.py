"""conflict-resolver as the kernel runs it: a process per node, one active per site
(lease), on sites linked to a peer."""

from __future__ import annotations

from cfs.kernel.spec import AdminVerb, Grants, ServiceSpec, Singleton, deferred, imported
from cfs_contracts.geo import CONFLICTS_OPEN_KEY
from cfs_contracts.streams import CONFLICTS, NODES

SPEC = ServiceSpec(
    name="conflict-resolver",
    role="conflicts",
    package="cfs_conflicts",
    description="Keeps the count of open conflicts between the two sites and executes "
    "`cfs admin resolve-conflicts` (one active per site).",
    settings=imported("cfs_conflicts.service:ConflictSettings"),
    grants=Grants(
        publish=(
            "{s}.rpc.meta.*",  # a manual choice, written again
            "{s}.conflicts.resolved",  # ConflictResolved here
            "cfs.*.conflicts.resolved",  # ... and on the peer, over the link
        ),
        read_streams=(CONFLICTS.name,),
        read_buckets=(NODES.bucket,),
        write_keys={NODES.bucket: (CONFLICTS_OPEN_KEY,)},
    ),
    admin={
        "resolve": AdminVerb(
            deferred("cfs_conflicts.service:resolve_verb"),
            "close open conflicts: last-write-wins, or one inode's manual choice",
        )
    },
    singleton=Singleton(deferred("cfs_conflicts.service:lead"), lease_s=5.0, renew_s=1.0),
    needs_peer=True,
)
