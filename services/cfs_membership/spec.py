"""membership as the kernel runs it: one SWIM member per node."""

from __future__ import annotations

from cfs.kernel.spec import AdminVerb, Grants, ServiceSpec, deferred, imported
from cfs_contracts.streams import CLUSTER, LEASES, NODES

SPEC = ServiceSpec(
    name="membership",
    role="membership",
    package="cfs_membership",
    description="The membership service: SWIM over UDP, verdicts to CLUSTER and the nodes KV.",
    settings=imported("cfs_membership.service:MembershipSettings"),
    grants=Grants(
        publish=("{s}.cluster.node.>",),
        serve=("{s}.rpc.membership.{n}.view",),
        read_streams=(CLUSTER.name,),
        read_buckets=(LEASES.bucket,),  # a drain records the leases it must move
        write_keys={NODES.bucket: ("member.*", "admin.*")},
    ),
    admin={
        "node-drain": AdminVerb(
            deferred("cfs_membership.admin:drain_verb"),
            "move every fragment and lease off a node",
        ),
        "node-remove": AdminVerb(
            deferred("cfs_membership.admin:remove_verb"), "forget a drained or dead node"
        ),
    },
    start=deferred("cfs_membership.service:start"),
    per_node=True,  # its view answers and health record; verdicts cover every node
    fatal=(OSError,),  # the SWIM port in use or unresolvable: an operator must act
)
