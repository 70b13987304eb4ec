"""The CLI side of an admin command: publish it, wait for its correlated reply.

The reply subject is subscribed to before the command is published, so a fast
executor's answer cannot be missed; both messages land in the CMD stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import nats.errors
from nats.aio.msg import Msg

from cfs.admin.executor import reply_subject
from cfs.bus import Bus
from cfs.ids import new_id
from cfs_contracts import ContractError, DecodedEvent
from cfs_contracts.events.admin import AdminCommandCompleted, AdminCommandIssued
from cfs_contracts.events.ops import AdminActionRecorded


class CommandTimeout(Exception):
    """Nobody answered: the executing service is not running (or JetStream is down)."""


def actor() -> str:
    """Who runs this command, for AUDIT records: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


async def record_action(bus: Bus, command: str, arguments: dict[str, str], outcome: str) -> None:
    """An `AdminActionRecorded` in AUDIT for an action that is not a CMD event."""
    await bus.publish(
        bus.event(
            AdminActionRecorded(
                actor=actor(), command=command, arguments=arguments, outcome=outcome
            )
        )
    )


async def issue(
    bus: Bus,
    *,
    service: str,
    verb: str,
    target: str,
    actor: str,
    arguments: dict[str, str] | None = None,
    timeout: float = 15.0,
) -> AdminCommandCompleted:
    """Publish `AdminCommandIssued` and return the executor's `AdminCommandCompleted`."""
    command_id = new_id()
    issued = time.time_ns() // 1_000_000
    command = AdminCommandIssued(
        command_id=command_id,
        service=service,
        verb=verb,
        target=target,
        arguments=arguments or {},
        actor=actor,
        issued_ms=issued,
        expires_ms=issued + int(timeout * 1000),
    )
    subject = reply_subject(bus.site, command_id)
    sub = await bus.nc.subscribe(subject)
    try:
        await bus.publish(bus.event(command, correlation_id=command_id), timeout=timeout)
        try:
            msg = await sub.next_msg(timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            raise CommandTimeout(
                f"no service executed the command within {timeout:g}s ({verb} {target}: "
                f"is {service} running? command {command_id})"
            ) from None
    finally:
        await sub.unsubscribe()
    reply = bus.registry.decode(msg.data).payload
    if not isinstance(reply, AdminCommandCompleted):
        raise ContractError(f"unexpected reply {type(reply).__name__} on {subject}")
    return reply


@asynccontextmanager
async def node_events(bus: Bus, node: str) -> AsyncIterator[asyncio.Queue[DecodedEvent]]:
    """CLUSTER events about `node` (repair progress, NodeDrained, ...) as they happen;
    enter before issuing the command so none is missed."""
    queue: asyncio.Queue[DecodedEvent] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        with contextlib.suppress(ContractError):  # the stream's consumers dead-letter it
            queue.put_nowait(bus.registry.decode(msg.data))

    sub = await bus.nc.subscribe(f"cfs.{bus.site}.cluster.*.{node}.*", cb=on_msg)
    try:
        yield queue
    finally:
        await sub.unsubscribe()


async def poll_until(check: Callable[[], object], timeout: float, every: float = 0.2) -> bool:
    """Await `check()` (a coroutine function returning truthy) until true or `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)
