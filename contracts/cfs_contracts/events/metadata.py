"""Metadata journal events (META_<shard> streams, DESIGN.md §4).

A shard's journal holds, in order: `LeaderFenced` when a writer takes over,
then `MetaCommitted` group commits. Each committed entry records the changes
an operation made (full records, so replay never re-runs POSIX logic) and its
reply (so a retried operation id gets the original answer).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cfs_contracts.envelope import EventPayload
from cfs_contracts.fs.changes import (
    Change,
    DelDentry,
    DelInode,
    PutDentry,
    PutInode,
    SetNextLocal,
    TxClear,
    TxPut,
)
from cfs_contracts.fs.rpc import Reply
from cfs_contracts.registry import REGISTRY

__all__ = [
    "Change",
    "DelDentry",
    "DelInode",
    "JournalEntry",
    "LeaderFenced",
    "MetaCommitted",
    "PutDentry",
    "PutInode",
    "SetNextLocal",
    "TxClear",
    "TxPut",
]

_JOURNAL = "cfs.{site}.meta.{shard}.journal"


@REGISTRY.event("LeaderFenced", version=1, stream="META", subject=_JOURNAL)
class LeaderFenced(EventPayload):
    """First append of a new shard writer; later appends by older terms fail."""

    shard: str
    term: int = Field(ge=1)
    leader: str = Field(description="node holding the writer lease for this term")


class JournalEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    op_id: str
    op: str = Field(description="operation name, for audit and replay tooling")
    changes: tuple[Change, ...]
    reply: Reply


@REGISTRY.event("MetaCommitted", version=1, stream="META", subject=_JOURNAL)
class MetaCommitted(EventPayload):
    """One group commit: the operations decided in one batch by the shard writer."""

    shard: str
    term: int = Field(ge=1, description="writer term that appended this batch")
    entries: tuple[JournalEntry, ...]
