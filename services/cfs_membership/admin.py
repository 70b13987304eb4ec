"""The admin verbs membership executes: `node-drain` and `node-remove` record the
operator's intent as `admin.<node>` once the pure decision (`cfs.admin.decide`) allows
it; repair and placement act on that record."""

from __future__ import annotations

from collections.abc import Callable

from cfs.admin.decide import NodeFacts, Verdict, decide_drain, decide_remove
from cfs.admin.snapshot import read_node_facts
from cfs.bus import Bus
from cfs.kernel.runtime import Context
from cfs.kernel.spec import CommandHandler
from cfs.lifecycle import set_lifecycle
from cfs_contracts.events.admin import AdminCommandIssued

Decide = Callable[[NodeFacts, str], Verdict]


def lifecycle_handler(bus: Bus, decide: Decide) -> CommandHandler:
    async def handle(cmd: AdminCommandIssued) -> Verdict:
        verdict = decide(await read_node_facts(bus), cmd.target)
        if verdict.ok and verdict.lifecycle is not None:
            await set_lifecycle(
                bus,
                cmd.target,
                verdict.lifecycle,
                requested_by=cmd.actor,
                reason=f"{cmd.verb} command {cmd.command_id}",
            )
        return verdict

    return handle


def drain_verb(ctx: Context) -> CommandHandler:
    return lifecycle_handler(ctx.bus, decide_drain)


def remove_verb(ctx: Context) -> CommandHandler:
    return lifecycle_handler(ctx.bus, decide_remove)
