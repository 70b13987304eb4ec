"""Executes admin command events for one service type (DESIGN.md §1: commands are events).

Each service process runs a `CommandExecutor` bound to one durable consumer
shared by every process of its type (`cmd-<service>`), so each command on
`cfs.<site>.cmd.<service>.>` is executed by exactly one process although one runs
per node. For each command it records `AdminActionRecorded` (requested, then
succeeded or failed: reason) in AUDIT and answers `AdminCommandCompleted` on
`cfs.<site>.cmd.reply.<command_id>`.

At most once per command id: before acting, the executor looks for a reply
already in the CMD stream (a redelivery after a crash between the reply and the
ack finds it and does nothing). A crash between acting and replying re-runs the
action, which is safe because every action is idempotent: a repeated drain or
remove is "already draining/removed", a repeated handoff to the current holder
returns at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from cfs.admin.decide import Verdict
from cfs.admin.snapshot import SnapshotUnavailable, now_ms
from cfs.bus import Bus, BusError, ConsumerSpec, Delivery, Retry
from cfs.kernel.spec import CommandHandler
from cfs_contracts import REGISTRY, DecodedEvent
from cfs_contracts.events.admin import AdminCommandCompleted, AdminCommandIssued
from cfs_contracts.events.ops import AdminActionRecorded
from cfs_contracts.streams import CMD

log = logging.getLogger(__name__)

MAX_DELIVER = 4


def reply_subject(site: str, command_id: str) -> str:
    return REGISTRY.spec(AdminCommandCompleted.EVENT_TYPE).subject(site, command_id=command_id)


def command_subject(site: str, service: str, verb: str) -> str:
    return REGISTRY.spec(AdminCommandIssued.EVENT_TYPE).subject(site, service=service, verb=verb)


@dataclass
class CommandExecutor:
    """The thin runner: skip what is done, decide and act, audit, reply. The service
    runtime (`cfs.kernel`) consumes `consumer_spec` with `handle`."""

    bus: Bus
    service: str
    handlers: Mapping[str, CommandHandler]

    @property
    def consumer_spec(self) -> ConsumerSpec:
        return ConsumerSpec(
            stream=CMD.name,
            durable=f"cmd-{self.service}",
            filter_subject=f"cfs.{self.bus.site}.cmd.{self.service}.>",
            ack_wait_s=60.0,
            max_deliver=MAX_DELIVER,
            retry_delay_s=1.0,
            batch=8,
        )

    async def handle(self, event: DecodedEvent, delivery: Delivery) -> None:
        cmd = event.payload
        if not isinstance(cmd, AdminCommandIssued):
            return  # replies and future command kinds are not ours
        ids = {"command_id": cmd.command_id, "verb": cmd.verb, "target": cmd.target}
        if await self._already_answered(cmd.command_id):
            log.info("admin.command_duplicate", extra=ids)
            return
        handler = self.handlers.get(cmd.verb)
        if handler is None:
            verdict = Verdict("usage", f"{self.service} has no command {cmd.verb!r}")
        elif now_ms() > cmd.expires_ms:
            verdict = Verdict("expired", f"{cmd.verb} {cmd.target} arrived after its deadline")
        else:
            await self._audit(event, cmd, "requested")
            try:
                verdict = await handler(cmd)
            except (BusError, SnapshotUnavailable, *_TRANSPORT) as exc:
                reason = str(exc) or type(exc).__name__
                if delivery.num_delivered < MAX_DELIVER:
                    raise Retry(reason) from None  # the action is idempotent: try again
                verdict = Verdict("failed", f"{cmd.verb} {cmd.target} failed: {reason}")
        outcome = "succeeded" if verdict.ok else f"failed: {verdict.message}"
        if handler is not None:
            await self._audit(event, cmd, outcome)
        reply = AdminCommandCompleted(
            command_id=cmd.command_id,
            verb=cmd.verb,
            ok=verdict.ok,
            code=verdict.code,
            message=verdict.message,
            executor=self.bus.node,
        )
        await self.bus.publish(
            self.bus.event(reply, caused_by=event.envelope, correlation_id=cmd.command_id)
        )
        log.info("admin.command_executed", extra={**ids, "code": verdict.code, "reason": outcome})

    async def _already_answered(self, command_id: str) -> bool:
        try:
            await self.bus.js.get_msg(
                CMD.name, subject=reply_subject(self.bus.site, command_id), direct=True
            )
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def _audit(self, event: DecodedEvent, cmd: AdminCommandIssued, outcome: str) -> None:
        record = AdminActionRecorded(
            actor=cmd.actor,
            command=cmd.verb,
            arguments={"target": cmd.target, **cmd.arguments, "executor": self.bus.node},
            outcome=outcome,
        )
        await self.bus.publish(
            self.bus.event(record, caused_by=event.envelope, correlation_id=cmd.command_id)
        )


_TRANSPORT = (nats.errors.Error, TimeoutError)
