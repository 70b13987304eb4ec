"""Conflicts between two sites' changes (DESIGN.md §8; guide scenario 6): which are
open, and an operator's resolution of them.

What the two sites' merges found is in each site's CONFLICTS stream: a
`ConflictDetected` per pair of changes (the same id on both sites), a
`ConflictResolved` once an operator decided. The merge settled every conflict already
(the later write kept, the losing file kept under another name); the operator
confirms it (last-write-wins) or picks the other site's value for an inode (manual):
that is written as an ordinary change here, later than both, so it replaces the kept
value on both sites. The conflict-resolver service executes resolutions
(`cfs_conflicts`); `cfs admin show-conflicts` reads the same stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import nats.js.errors

from cfs.admin.snapshot import read_record
from cfs.bus import Bus, BusError
from cfs.client import MetadataClient
from cfs.ids import new_id
from cfs_contracts.events.geo import ConflictDetected, ConflictResolved
from cfs_contracts.fs import rpc
from cfs_contracts.fs.conflicts import FieldConflict
from cfs_contracts.geo import GEO_PEER_KEY, GeoPeer
from cfs_contracts.streams import CONFLICTS

# What a manual choice can write again: the groups a metadata operation sets.
MANUAL_GROUPS = ("owner", "mode", "xattrs")

Event = ConflictDetected | ConflictResolved


class Strategy(StrEnum):
    LWW = "last-write-wins"
    MANUAL = "manual"


class ResolutionRefused(ValueError):
    """A resolution that cannot be made as asked; one line for the operator."""


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


def open_conflicts(events: list[Event]) -> list[Open]:
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


async def conflict_events(bus: Bus, after: int = 0) -> tuple[list[Event], int]:
    """This site's CONFLICTS stream past sequence `after`, in order; and its last seq."""
    info = await bus.js.stream_info(CONFLICTS.name)
    events: list[Event] = []
    last = int(info.state.last_seq)
    for seq in range(max(after + 1, int(info.state.first_seq or 1)), last + 1):
        try:
            msg = await bus.js.get_msg(CONFLICTS.name, seq, direct=True)
        except nats.js.errors.NotFoundError:
            continue
        payload = bus.registry.decode(msg.data or b"").payload
        if isinstance(payload, ConflictDetected | ConflictResolved):
            events.append(payload)
    return events, last


@dataclass(frozen=True)
class Choice:
    item: Open
    winner: str
    write: dict[str, Any] | None  # the winner's values to write again; None: as merged


def plan(
    found: list[Open], strategy: Strategy, inode: int | None, winner: str | None
) -> list[Choice]:
    """Pure: what resolving `found` as asked takes; ResolutionRefused if it cannot."""
    if strategy is Strategy.MANUAL and (inode is None or winner is None):
        raise ResolutionRefused("--strategy manual needs --inode and --winner")
    chosen = found if inode is None else [i for i in found if i.conflict.ino == inode]
    if inode is not None and not chosen:
        raise ResolutionRefused(f"no open conflict on inode {inode} (see show-conflicts)")
    choices = []
    for item in chosen:
        c, kept = item.conflict, item.conflict.winner
        target = winner or kept
        if target == kept:
            choices.append(Choice(item, kept, None))
            continue
        if target not in (c.here, c.there):
            raise ResolutionRefused(
                f"conflict {item.conflict_id} is between {c.here} and {c.there}, not {target}"
            )
        if c.kind != "field" or c.group not in MANUAL_GROUPS:
            raise ResolutionRefused(
                f"conflict {item.conflict_id} ({c.kind} {c.group}) can only keep what the "
                f"merge kept ({kept}); manual choices: attr.{', attr.'.join(MANUAL_GROUPS)}"
            )
        choices.append(Choice(item, target, c.local if target == c.here else c.remote))
    return choices


async def resolve(
    bus: Bus, choices: list[Choice], strategy: Strategy, by: str
) -> tuple[list[ConflictResolved], str | None, bool]:
    """Write the chosen values again, then record the resolutions here and on the peer;
    (resolutions, the peer, whether the peer has them)."""
    meta = MetadataClient(bus, deadline_s=30)
    resolved = []
    for choice in choices:
        c = choice.item.conflict
        if choice.write is not None:
            await write_back(meta, c, choice.write)
        resolved.append(
            ConflictResolved(
                conflict_id=choice.item.conflict_id,
                strategy=strategy.value,
                winner=choice.winner,
                applied=choice.write is not None,
                by=by,
                ino=c.ino,
                kind=c.kind,
                group=c.group,
                through_ns=max(time.time_ns(), c.last_ns),
            )
        )
    peer = await read_record(bus, GEO_PEER_KEY, GeoPeer)
    on_peer = await record(bus, resolved, peer.site if peer else None)
    return resolved, peer.site if peer else None, on_peer


async def write_back(meta: MetadataClient, conflict: FieldConflict, values: dict[str, Any]) -> None:
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


async def record(bus: Bus, resolved: list[ConflictResolved], peer: str | None) -> bool:
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


def outcome(resolved: list[ConflictResolved], peer: str | None, on_peer: bool) -> str:
    """One line for the operator."""
    if not resolved:
        return "No open conflicts."
    parts = [
        f"inode {r.ino} {r.kind} {r.group}: {r.winner}'s version "
        f"({'written again' if r.applied else 'as merged'})"
        for r in resolved
    ]
    line = f"Resolved {len(resolved)} conflict(s): " + "; ".join(parts)
    if peer and not on_peer:
        line += (
            f". {peer} did not answer: recorded here only (resolve there too once the link is back)"
        )
    return line
