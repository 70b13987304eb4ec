"""membership as the kernel runs it: one SWIM member per node."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cfs.kernel.spec import AdminVerb, CommandHandler, Grants, ServiceSpec
from cfs_contracts.streams import CLUSTER, LEASES, NODES

if TYPE_CHECKING:
    from cfs.kernel.runtime import Context
    from cfs.service_main import ServiceSettings


def _settings() -> type[ServiceSettings]:
    from cfs_membership.service import MembershipSettings

    return MembershipSettings


async def _start(ctx: Context) -> None:
    from cfs_membership.service import start

    await start(ctx)


def _drain(ctx: Context) -> CommandHandler:
    from cfs_membership.admin import drain_handler

    return drain_handler(ctx.bus)


def _remove(ctx: Context) -> CommandHandler:
    from cfs_membership.admin import remove_handler

    return remove_handler(ctx.bus)


SPEC = ServiceSpec(
    name="membership",
    role="membership",
    package="cfs_membership",
    description="The membership service: SWIM over UDP, verdicts to CLUSTER and the nodes KV.",
    settings=_settings,
    grants=Grants(
        publish=("{s}.cluster.node.>",),
        serve=("{s}.rpc.membership.*.view",),
        read_streams=(CLUSTER.name,),
        read_buckets=(LEASES.bucket,),  # a drain records the leases it must move
        write_keys={NODES.bucket: ("member.*", "admin.*")},
    ),
    admin={
        "node-drain": AdminVerb(_drain, "move every fragment and lease off a node"),
        "node-remove": AdminVerb(_remove, "forget a drained or dead node"),
    },
    start=_start,
    fatal=(OSError,),  # the SWIM port in use or unresolvable: an operator must act
)
