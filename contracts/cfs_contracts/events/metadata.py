"""Metadata journal events (META_<shard> streams, DESIGN.md §4)."""

from __future__ import annotations

from pydantic import Field

from cfs_contracts.registry import REGISTRY, EventPayload

_JOURNAL = "cfs.{site}.meta.{shard}.journal"


@REGISTRY.event("LeaderFenced", version=1, stream="META", subject=_JOURNAL)
class LeaderFenced(EventPayload):
    """First append of a new shard writer; later appends by older terms fail."""

    shard: str
    term: int = Field(ge=1)
    leader: str = Field(description="node holding the writer lease for this term")
