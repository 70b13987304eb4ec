"""Bring a shard's snapshot projection to exactly a cut (DESIGN.md §9).

The cut is a hybrid-clock stamp T. Every metadata request and reply carries its
sender's clock and every writer stamps its journal messages after what it has
seen, so a cross-shard operation's steps are stamped in causal order in both
journals: "every message stamped <= T, in every shard" is a consistent cut (a
participant's step is never in it without the coordinator step that caused it).
The marker each writer journals after observing T bounds the walk: every message
after the marker is stamped past T.
"""

from __future__ import annotations

from cfs_contracts.envelope import HLC
from cfs_metadata.journal import Journal, apply_record
from cfs_metadata.projection import Projection


def before(stamp: HLC, cut: HLC) -> bool:
    return stamp.key() <= cut.key()


async def advance_to_cut(
    journal: Journal, projection: Projection, cut: HLC, marker_seq: int
) -> HLC | None:
    """Apply the journal from the projection's position through the last message stamped
    at or before `cut`; returns that message's stamp (None if nothing new was applied)."""
    last: HLC | None = None
    if projection.applied_seq >= marker_seq:
        return None
    async for record in journal.tail(projection.applied_seq + 1):
        stamp = record.event.envelope.hlc
        if not before(stamp, cut):
            break
        apply_record(projection, record)
        last = stamp
        if record.seq >= marker_seq:
            break
    return last
