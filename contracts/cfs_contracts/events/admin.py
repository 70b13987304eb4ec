"""Admin commands and their replies (CMD stream, DESIGN.md §1, §3).

Every `cfs admin` action that changes the cluster is a command event on
`cfs.<site>.cmd.<service>.<verb>`; exactly one process of that service executes
it (a shared durable consumer) and answers with `AdminCommandCompleted` on
`cfs.<site>.cmd.reply.<command_id>`, which is in the same stream: the request
and its outcome are both journaled. The CLI subscribes to the reply subject
before it publishes the command.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cfs_contracts.envelope import EventPayload
from cfs_contracts.registry import REGISTRY

CommandCode = Literal["ok", "usage", "refused", "failed", "expired"]


@REGISTRY.event(
    "AdminCommandIssued", version=1, stream="CMD", subject="cfs.{site}.cmd.{service}.{verb}"
)
class AdminCommandIssued(EventPayload):
    """An operator asked a service to act; executed at most once per `command_id`."""

    command_id: str = Field(description="ULID; the reply subject is cmd.reply.<command_id>")
    service: str = Field(description="executing service type: membership, metadata-raft")
    verb: str = Field(description="node-drain, node-remove, force-election, ...")
    target: str = Field(description="node id or shard (001..999) the command acts on")
    arguments: dict[str, str] = Field(default_factory=dict)
    actor: str = Field(description="who asked: user@host of the CLI")
    issued_ms: int = Field(ge=0, description="wall clock at the CLI")
    expires_ms: int = Field(
        ge=0,
        description="not executed after this wall time (answered `expired`), so a command "
        "nobody ran while the CLI waited never takes effect later by surprise",
    )


@REGISTRY.event(
    "AdminCommandCompleted",
    version=1,
    stream="CMD",
    subject="cfs.{site}.cmd.reply.{command_id}",
)
class AdminCommandCompleted(EventPayload):
    """The outcome of one command, published by the process that executed it."""

    command_id: str
    verb: str
    ok: bool
    code: CommandCode = Field(
        description="ok; usage (unknown node or shard); refused (not allowed in this "
        "state); failed (execution error); expired (arrived after expires_ms)"
    )
    message: str = Field(description="one line for the operator")
    executor: str = Field(description="node whose service executed the command")
