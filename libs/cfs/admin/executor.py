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

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from cfs.admin.decide import NodeFacts, Verdict, decide_drain, decide_force_election, decide_remove
from cfs.admin.snapshot import SnapshotUnavailable, now_ms, read_node_facts
from cfs.bus import Bus, BusError, ConsumerSpec, Delivery, DurableConsumer, Retry
from cfs.lease import LeaseError
from cfs.lifecycle import set_lifecycle
from cfs_contracts import REGISTRY, DecodedEvent
from cfs_contracts.events.admin import AdminCommandCompleted, AdminCommandIssued
from cfs_contracts.events.ops import AdminActionRecorded
from cfs_contracts.streams import CMD

log = logging.getLogger(__name__)

CommandHandler = Callable[[AdminCommandIssued], Awaitable[Verdict]]
MAX_DELIVER = 4
RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0


def reply_subject(site: str, command_id: str) -> str:
    return REGISTRY.spec(AdminCommandCompleted.EVENT_TYPE).subject(site, command_id=command_id)


def command_subject(site: str, service: str, verb: str) -> str:
    return REGISTRY.spec(AdminCommandIssued.EVENT_TYPE).subject(site, service=service, verb=verb)


@dataclass
class CommandExecutor:
    """The thin runner: consume, skip what is done, decide and act, audit, reply."""

    bus: Bus
    service: str
    handlers: Mapping[str, CommandHandler]

    def __post_init__(self) -> None:
        spec = ConsumerSpec(
            stream=CMD.name,
            durable=f"cmd-{self.service}",
            filter_subject=f"cfs.{self.bus.site}.cmd.{self.service}.>",
            ack_wait_s=60.0,
            max_deliver=MAX_DELIVER,
            retry_delay_s=1.0,
            batch=8,
        )
        self._consumer = DurableConsumer(self.bus, spec, self._handle)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Consume in the background. Never fails the service: right after a restart
        JetStream may still be electing, so the consumer is made again until it works."""
        self._task = asyncio.create_task(self._serve(), name=f"cmd-{self.service}")
        self._task.add_done_callback(self._ended)
        log.info("admin.executor_started", extra={"service": self.service, "node": self.bus.node})

    async def _serve(self) -> None:
        delay = RETRY_MIN_S
        while True:
            try:
                await self._consumer.run()
                return
            except (BusError, nats.errors.Error, TimeoutError) as exc:
                if self._consumer.stopped:
                    return
                log.warning(
                    "admin.executor_retry",
                    extra={"service": self.service, "error": str(exc), "retry_in_s": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def stop(self) -> None:
        self._consumer.stop()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=3.0)
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """Admin commands stop being executed here: say so loudly, never silently."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error(
                "admin.executor_failed",
                extra={"service": self.service, "node": self.bus.node, "error": repr(exc)},
            )

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def _handle(self, event: DecodedEvent, delivery: Delivery) -> None:
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


# -- the commands each service executes ---------------------------------------------------
def membership_handlers(bus: Bus) -> dict[str, CommandHandler]:
    """node-drain and node-remove: the operator's intent as `admin.<node>`."""

    async def lifecycle_change(cmd: AdminCommandIssued, decide: Callable[..., Verdict]) -> Verdict:
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

    async def drain(cmd: AdminCommandIssued) -> Verdict:
        return await lifecycle_change(cmd, decide_drain)

    async def remove(cmd: AdminCommandIssued) -> Verdict:
        return await lifecycle_change(cmd, decide_remove)

    return {"node-drain": drain, "node-remove": remove}


ForceElection = Callable[[Bus, str, str | None], Awaitable[None]]


def metadata_handlers(
    bus: Bus, shards: list[str], force: ForceElection
) -> dict[str, CommandHandler]:
    """force-election: stream leader stepdown plus writer lease handoff (`force`, i.e.
    `cfs_metadata.admin.force_election`, passed in so libs do not import services)."""

    async def force_election(cmd: AdminCommandIssued) -> Verdict:
        target = cmd.arguments.get("to") or None
        facts = await read_node_facts(bus) if target else None
        verdict = decide_force_election(facts or _NO_FACTS, cmd.target, shards, target)
        if not verdict.ok:
            return verdict
        try:
            await force(bus, cmd.target, target)
        except BusError as exc:
            if "stepdown refused" not in str(exc):
                raise  # transport trouble: retried
            return Verdict("failed", str(exc))
        except LeaseError as exc:
            return Verdict("failed", f"shard {cmd.target}: {exc}")
        return verdict

    return {"force-election": force_election}


_NO_FACTS = NodeFacts()
