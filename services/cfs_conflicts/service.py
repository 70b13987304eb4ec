"""conflict-resolver: the open conflicts between the two sites, counted and resolved
(DESIGN.md §8; guide scenario 6).

The merge that finds a conflict settles it at once (`cfs_metadata.remote`) and the
geo-replicator records it (`ConflictDetected` in CONFLICTS). This service:

    CONFLICTS, read as it grows (the active instance)
        ▼
    open_conflicts: what no resolution covers yet
        ▼
    `conflicts.open` in the nodes bucket: how many, of which kinds, since when
    (`replication-status` shows it; an alert hook can watch it)

and executes `cfs admin resolve-conflicts` (admin verb `resolve`, any instance): the
chosen values written again here, `ConflictResolved` recorded here and on the peer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import nats.errors
from pydantic import Field

from cfs.admin.decide import Verdict
from cfs.bus import Bus
from cfs.conflicts import (
    Event,
    ResolutionRefused,
    Strategy,
    conflict_events,
    open_conflicts,
    outcome,
    plan,
    resolve,
)
from cfs.hlc import system_wall_ms
from cfs.kernel.runtime import Context, until_jetstream_answers
from cfs.kernel.spec import CommandHandler
from cfs.service_main import ServiceSettings, run_spec
from cfs_contracts.events.admin import AdminCommandIssued
from cfs_contracts.geo import CONFLICTS_OPEN_KEY, OpenConflicts
from cfs_contracts.streams import NODES

log = logging.getLogger(__name__)


class ConflictSettings(ServiceSettings):
    count_s: float = Field(default=5.0, gt=0, description="how often open conflicts are counted")


async def lead(ctx: Context) -> None:
    """The active instance: keep `conflicts.open` current."""
    bus, every = ctx.bus, ctx.settings.count_s
    kv = await until_jetstream_answers(
        f"{NODES.bucket} bucket", lambda: bus.key_value(NODES.bucket)
    )
    events: list[Event] = []
    last = 0
    published: OpenConflicts | None = None
    while True:
        try:
            more, last = await conflict_events(bus, after=last)
            events += more
            counted = count(events, published)
            if counted != published:
                await kv.put(CONFLICTS_OPEN_KEY, counted.model_dump_json().encode())
                log.info("conflicts.counted", extra={"open": counted.open, "kinds": counted.kinds})
                published = counted
        except (nats.errors.Error, TimeoutError) as exc:  # the next round reads again
            log.info("conflicts.count_failed", extra={"error": str(exc) or repr(exc)})
        await asyncio.sleep(every)


def count(events: list[Event], previous: OpenConflicts | None) -> OpenConflicts:
    """Pure: the record for `events` (its time kept while nothing changed)."""
    found = open_conflicts(events)
    kinds = dict(Counter(item.conflict.kind for item in found))
    oldest = min((item.conflict.last_ns for item in found), default=None)
    if previous is not None and (previous.open, previous.kinds) == (len(found), kinds):
        return previous
    return OpenConflicts(
        open=len(found), kinds=kinds, oldest_ns=oldest, updated_ms=system_wall_ms()
    )


def resolve_verb(ctx: Context) -> CommandHandler:
    return resolve_handler(ctx.bus)


def resolve_handler(bus: Bus) -> CommandHandler:
    """`cfs admin resolve-conflicts`: planned (pure, refused with a reason), then the
    writes and records; transport trouble is raised, and the executor retries (a
    choice written twice is the same value, a resolution recorded twice the same)."""

    async def handle(cmd: AdminCommandIssued) -> Verdict:
        args = cmd.arguments
        try:
            strategy = Strategy(args.get("strategy", ""))
            inode = int(args["inode"]) if args.get("inode") else None
        except ValueError as exc:
            return Verdict("usage", f"bad resolve arguments: {exc}")
        events, _ = await conflict_events(bus)
        try:
            choices = plan(open_conflicts(events), strategy, inode, args.get("winner") or None)
        except ResolutionRefused as exc:
            return Verdict("refused", str(exc))
        resolved, peer, on_peer = await resolve(bus, choices, strategy, cmd.actor)
        return Verdict("ok", outcome(resolved, peer, on_peer))

    return handle


def main(argv: list[str] | None = None) -> None:
    from cfs_conflicts.spec import SPEC

    run_spec(SPEC, argv)
