"""Send backup and restore steps to shard writers (`cfs_contracts.fs.shard_admin`).

Used by the backup service (snapshot markers) and `cfs admin restore-metadata` /
`replay-journal`. A writer change is retried within the deadline like any metadata
call; a refusal comes back as ShardAdminRefused with the writer's reason.
"""

from __future__ import annotations

import errno

from cfs.bus import Bus, BusError
from cfs.hlc import observe
from cfs.retry import RetryPolicy, retry
from cfs_contracts.fs.shard_admin import AnyShardAdminOp, ShardAdminReply, ShardAdminRequest
from cfs_contracts.streams import meta_admin_subject, shard_name


class ShardAdminRefused(Exception):
    def __init__(self, shard: str, reply: ShardAdminReply) -> None:
        code = errno.errorcode.get(reply.errno, str(reply.errno))
        super().__init__(f"shard {shard}: {reply.message} [{code}]")
        self.reply = reply


class _NotServing(Exception):
    pass


async def shard_admin(
    bus: Bus,
    shard: int,
    op: AnyShardAdminOp,
    *,
    deadline_s: float = 60.0,
    attempt_timeout_s: float = 10.0,
) -> ShardAdminReply:
    name = shard_name(shard)
    subject = meta_admin_subject(bus.site, name)

    async def attempt() -> ShardAdminReply:
        data = ShardAdminRequest(body=op, hlc=bus.clock.now()).model_dump_json().encode()
        msg = await bus.request(subject, data, timeout=attempt_timeout_s)
        reply = ShardAdminReply.model_validate_json(msg.data)
        if reply.hlc is not None:
            observe(bus.clock, reply.hlc)
        if reply.not_leader:
            raise _NotServing(reply.message)
        return reply

    policy = RetryPolicy(
        f"shard {name} {op.op}",
        temporary=lambda exc: isinstance(exc, _NotServing | BusError),
        deadline_s=deadline_s,
        first_delay_s=0.05,
        max_delay_s=0.5,
    )
    try:
        reply = await retry(attempt, policy, extra={"shard": name})
    except (_NotServing, BusError) as exc:
        raise ShardAdminRefused(
            name, ShardAdminReply(errno=errno.EIO, message=f"no writer answered: {exc}")
        ) from None
    if reply.errno:
        raise ShardAdminRefused(name, reply)
    return reply
