"""`cfs admin show-conflicts` and `resolve-conflicts` (guide scenario 6).

What the two sites' merges found is in each site's CONFLICTS stream: a
`ConflictDetected` per conflict (the same id on both sites), a `ConflictResolved`
once an operator decided. Every conflict was settled by the merge already (the later
write kept, the losing file kept under another name); the operator confirms that
(`--strategy last-write-wins`) or picks the other site's value for an inode
(`--strategy manual --inode N --winner SITE`): that is written as an ordinary change
here, later than both, so it replaces the kept value on both sites. The decision is
recorded on both sites (the peer's stream over the link, when it answers) and audited.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import nats.js.errors
import typer

from cfs.admin.client import actor, record_action
from cfs.bus import Bus, BusError
from cfs.cli.admin import JsonOpt, _session, _settings, app
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.cli.geo import read_peer
from cfs.client import MetadataClient
from cfs.ids import new_id
from cfs_contracts.events.geo import ConflictDetected, ConflictResolved
from cfs_contracts.fs import rpc
from cfs_contracts.fs.conflicts import FieldConflict
from cfs_contracts.fs.records import Stamp
from cfs_contracts.streams import CONFLICTS

# What a manual choice can write again: the groups a metadata operation sets.
MANUAL_GROUPS = ("owner", "mode", "xattrs")


class Strategy(StrEnum):
    LWW = "last-write-wins"
    MANUAL = "manual"


@dataclass(frozen=True)
class Open:
    """A conflict recorded here and not resolved yet."""

    detected: ConflictDetected

    @property
    def conflict(self) -> FieldConflict:
        return self.detected.conflict

    @property
    def conflict_id(self) -> str:
        return self.detected.conflict_id


def open_conflicts(events: list[ConflictDetected | ConflictResolved]) -> list[Open]:
    """Pure: every divergence detected and not resolved, once each (its latest
    detection), oldest first. A resolution covers its id, and every detection of the
    same inode, kind and group between changes made before it was decided."""
    resolutions = [e for e in events if isinstance(e, ConflictResolved)]
    ids = {r.conflict_id for r in resolutions}
    scopes = [((r.ino, r.kind, r.group), r.through_ns) for r in resolutions if r.through_ns]

    def settled(detected: ConflictDetected) -> bool:
        c = detected.conflict
        if detected.conflict_id in ids:
            return True
        return any(
            scope == (c.ino, c.kind, c.group) and c.last_ns <= through for scope, through in scopes
        )

    found: dict[tuple[int, str, str, int], Open] = {}
    for event in events:
        if isinstance(event, ConflictDetected) and not settled(event):
            found[event.conflict.scope] = Open(event)
    return list(found.values())


def _when(stamp: Stamp | None) -> str:
    if stamp is None:
        return "as created"
    moment = datetime.fromtimestamp(stamp.ns / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _values(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items()) or "-"


def headline(conflict: FieldConflict) -> str:
    """One line, in the guide's words."""
    c = conflict
    if c.kind == "name":
        return (
            f"Inode {c.ino}: CONFLICT - name {c.group!r} (directory {c.parent}) created on "
            f"both sites; {c.winner} won, the other file is {c.kept_as!r}"
        )
    if c.kind == "deleted":
        name = f" as {c.kept_as!r}" if c.kept_as else ""
        return f"Inode {c.ino}: CONFLICT - deleted on one site, changed on {c.winner}: kept{name}"
    later = max((s for s in (c.local_stamp, c.remote_stamp) if s is not None), key=Stamp.key)
    return (
        f"Inode {c.ino}: CONFLICT - attr.{c.group} differs; {c.winner} won "
        f"(written last, {_when(later)})"
    )


def details(conflict: FieldConflict) -> list[str]:
    """The two versions, each with its site and time (`--verbose`)."""
    c = conflict
    if c.kind != "field":
        return [f"  {c.here}: {_values(c.local)}", f"  {c.there}: {_values(c.remote)}"]
    return [
        f"  {c.here}: {_values(c.local)} ({_when(c.local_stamp)})",
        f"  {c.there}: {_values(c.remote)} ({_when(c.remote_stamp)})",
    ]


async def conflict_events(bus: Bus) -> list[ConflictDetected | ConflictResolved]:
    """This site's CONFLICTS stream, in order."""
    info = await bus.js.stream_info(CONFLICTS.name)
    events: list[ConflictDetected | ConflictResolved] = []
    if not info.state.messages:
        return events
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await bus.js.get_msg(CONFLICTS.name, seq, direct=True)
        except nats.js.errors.NotFoundError:
            continue
        payload = bus.registry.decode(msg.data or b"").payload
        if isinstance(payload, ConflictDetected | ConflictResolved):
            events.append(payload)
    return events


def _as_json(item: Open) -> dict[str, Any]:
    return {
        "conflict_id": item.conflict_id,
        "shard": item.detected.shard,
        "headline": headline(item.conflict),
        **json.loads(item.conflict.model_dump_json()),
    }


@app.command("show-conflicts")
@one_line_errors
def show_conflicts(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="both versions of each, with their times")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """What the merges of the two sites' changes found and no one resolved yet."""
    settings = _settings(ctx, None, None, None)
    found = open_conflicts(_session(settings, conflict_events))
    if as_json:
        typer.echo(json.dumps({"conflicts": [_as_json(item) for item in found]}))
        return
    if not found:
        typer.echo("No conflicts.")
        return
    for item in found:
        typer.echo(headline(item.conflict))
        if verbose:
            typer.echo(f"  id {item.conflict_id}, shard {item.detected.shard:03d}")
            for line in details(item.conflict):
                typer.echo(line)


def _choose(item: Open, winner: str) -> dict[str, Any]:
    """The chosen site's values of the conflict's group."""
    c = item.conflict
    if winner not in (c.here, c.there):
        raise CliError(f"conflict {item.conflict_id} is between {c.here} and {c.there}, "
                       f"not {winner}")  # fmt: skip
    return c.local if winner == c.here else c.remote


async def _write_back(
    meta: MetadataClient, conflict: FieldConflict, values: dict[str, Any]
) -> None:
    """Make the chosen values current: an ordinary change, later than both versions."""
    ino = conflict.ino
    if conflict.group == "owner":
        await meta.setattr(ino, owner=values["uid"], group=values["gid"])
    elif conflict.group == "mode":
        await meta.setattr(ino, mode=values["mode"])
    else:  # xattrs: the chosen set exactly
        wanted: dict[str, str] = values["xattrs"]
        current = (await meta.getattr(ino)).xattrs
        for name, value in wanted.items():
            if current.get(name) != value:
                op = rpc.SetXattr(op_id=new_id(), ino=ino, name=name, value_b64=value)
                await meta.call(op)
        for name in set(current) - set(wanted):
            await meta.call(rpc.RemoveXattr(op_id=new_id(), ino=ino, name=name))


@app.command("resolve-conflicts")
@one_line_errors
def resolve_conflicts(
    ctx: typer.Context,
    strategy: Annotated[
        Strategy, typer.Option("--strategy", help="last-write-wins: keep what the merge kept")
    ],
    inode: Annotated[
        int | None, typer.Option("--inode", min=1, help="manual: the inode decided on")
    ] = None,
    winner: Annotated[
        str | None, typer.Option("--winner", help="manual: the site whose version stays")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Close open conflicts: all of them as the merge settled them (last-write-wins), or
    those of one inode with one site's version (manual: written again, so both sites
    end with it)."""
    if strategy is Strategy.MANUAL and (inode is None or winner is None):
        raise CliError("--strategy manual needs --inode and --winner", ExitCode.USAGE)
    if strategy is Strategy.LWW and (inode is not None or winner is not None):
        raise CliError("--inode and --winner go with --strategy manual", ExitCode.USAGE)
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> dict[str, Any]:
        found = open_conflicts(await conflict_events(bus))
        chosen = found if inode is None else [i for i in found if i.conflict.ino == inode]
        if inode is not None and not chosen:
            raise CliError(f"no open conflict on inode {inode} (see show-conflicts)")
        meta = MetadataClient(bus, deadline_s=30)
        resolved: list[ConflictResolved] = []
        for item in chosen:
            kept = item.conflict.winner
            target = winner or kept
            applied = False
            if target != kept:
                if item.conflict.kind != "field" or item.conflict.group not in MANUAL_GROUPS:
                    raise CliError(
                        f"conflict {item.conflict_id} ({item.conflict.kind} "
                        f"{item.conflict.group}) can only keep what the merge kept "
                        f"({kept}); manual choices: attr.{', attr.'.join(MANUAL_GROUPS)}"
                    )
                await _write_back(meta, item.conflict, _choose(item, target))
                applied = True
            c = item.conflict
            resolved.append(
                ConflictResolved(
                    conflict_id=item.conflict_id,
                    strategy=strategy.value,
                    winner=target,
                    applied=applied,
                    by=actor(),
                    ino=c.ino,
                    kind=c.kind,
                    group=c.group,
                    through_ns=max(time.time_ns(), c.last_ns),
                )
            )
        peer = await read_peer(bus)
        recorded_on_peer = await _record(bus, resolved, peer.site if peer else None)
        await record_action(
            bus,
            "resolve-conflicts",
            {"strategy": strategy.value, "inode": str(inode or ""), "winner": winner or ""},
            f"{len(resolved)} resolved",
        )
        return {
            "resolved": [json.loads(r.model_dump_json()) for r in resolved],
            "recorded_on_peer": recorded_on_peer,
            "peer": peer.site if peer else None,
        }

    result = _session(settings, work)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for item in result["resolved"]:
        how = "written again" if item["applied"] else "as merged"
        typer.echo(f"Resolved {item['conflict_id']}: {item['winner']}'s version ({how})")
    if not result["resolved"]:
        typer.echo("No open conflicts.")
    elif result["peer"] and not result["recorded_on_peer"]:
        typer.echo(
            f"{result['peer']} did not answer: the resolution is recorded here only "
            "(run the command there too once the link is back)"
        )


async def _record(bus: Bus, resolved: list[ConflictResolved], peer: str | None) -> bool:
    """ConflictResolved here, then on the peer (its stream, over the link); whether the
    peer has them. The event id is the same on both sites."""
    on_peer = peer is not None
    for event in resolved:
        envelope = bus.event(event)
        await bus.publish(envelope, timeout=10.0)
        if on_peer and peer is not None:
            subject = f"cfs.{peer}.conflicts.resolved"
            try:
                await bus.publish(envelope, subject=subject, timeout=5.0)
            except BusError:
                on_peer = False
    return on_peer
