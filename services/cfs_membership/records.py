"""What a membership change writes to `member.<node>` and which event it announces.

Pure: every member that observes a change proposes a record; `merge` decides
against the stored one (SWIM precedence, `MemberRecord.supersedes`), the runner
writes the result with compare-and-set, and only the member whose write went in
publishes the event (`event_for`). So five observers of one death write one
record and publish one `NodeDown`.

A node's own record has two extra rules: it may refresh `last_seen_ms` at an
unchanged incarnation, and a node coming back after a graceful leave (a higher
incarnation) replaces its final LEFT record.
"""

from __future__ import annotations

from cfs_contracts.envelope import EventPayload
from cfs_contracts.events.cluster import NodeAlive, NodeDown, NodeJoined, NodeLeft, NodeSuspect
from cfs_contracts.members import Liveness, MemberRecord
from cfs_membership.swim import Changed

LEAVE_REASON = "left gracefully"


def proposal(change: Changed, now_ms: int) -> MemberRecord:
    """The record an observer of `change` would write."""
    return MemberRecord(
        node=change.node,
        state=change.new,
        incarnation=change.incarnation,
        host=change.host,
        port=change.port,
        labels=change.labels,
        since_ms=now_ms,
        detected_by=change.by,
    )


def merge(stored: MemberRecord | None, wanted: MemberRecord, *, own: bool) -> MemberRecord | None:
    """The record to write over `stored`, or None when `stored` already says as much."""
    if stored is None:
        return wanted
    if own:
        if wanted.state is Liveness.LEFT:
            return None if stored.state is Liveness.LEFT else wanted
        if wanted.incarnation > stored.incarnation:
            return wanted  # also a rejoin after LEFT
        if wanted.incarnation == stored.incarnation and stored.state is Liveness.ALIVE:
            # A refresh: same state, same incarnation, new last-seen.
            return wanted.model_copy(
                update={"since_ms": stored.since_ms, "detected_by": stored.detected_by}
            )
    if wanted.supersedes(stored):
        return wanted.model_copy(update={"last_seen_ms": stored.last_seen_ms})
    return None


def accuses(stored: MemberRecord | None, wanted: MemberRecord, *, own: bool) -> bool:
    """Whether the stored record says the node writing its own ALIVE record is SUSPECT
    or DOWN at an incarnation that record cannot override: only a refutation (a
    higher incarnation) can. SWIM refutes what it hears by gossip; a verdict can also
    reach the records late, written by a member whose writes waited out a partition
    while everyone else already saw the node alive."""
    return (
        own
        and stored is not None
        and wanted.state is Liveness.ALIVE
        and stored.state in (Liveness.SUSPECT, Liveness.DOWN)
        and stored.incarnation >= wanted.incarnation
    )


def event_for(stored: MemberRecord | None, written: MemberRecord) -> EventPayload | None:
    """The CLUSTER event announcing `written` (None for refreshes and address updates)."""
    before = stored.state if stored is not None else None
    if written.state is Liveness.ALIVE:
        if before is None or before is Liveness.LEFT:
            return NodeJoined(
                node_id=written.node,
                host=written.host,
                port=written.port,
                labels=dict(written.labels),
            )
        if before in (Liveness.SUSPECT, Liveness.DOWN):
            return NodeAlive(node_id=written.node, incarnation=written.incarnation)
        return None
    if written.state is Liveness.SUSPECT:
        return NodeSuspect(
            node_id=written.node,
            incarnation=written.incarnation,
            suspected_by=written.detected_by,
        )
    if written.state is Liveness.DOWN:
        return NodeDown(
            node_id=written.node,
            incarnation=written.incarnation,
            detected_by=written.detected_by,
            method=written.method,
        )
    return NodeLeft(node_id=written.node, reason=LEAVE_REASON)
