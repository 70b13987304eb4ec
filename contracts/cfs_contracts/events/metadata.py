"""Metadata journal events (META_<shard> streams, DESIGN.md §4).

A shard's journal holds, in order: `LeaderFenced` when a writer takes over,
then `MetaCommitted` group commits. Each committed entry records the changes
an operation made (full records, so replay never re-runs POSIX logic) and its
reply (so a retried operation id gets the original answer).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from cfs_contracts.fs.records import Dentry, Inode
from cfs_contracts.fs.rpc import Reply
from cfs_contracts.registry import REGISTRY, EventPayload

_JOURNAL = "cfs.{site}.meta.{shard}.journal"


@REGISTRY.event("LeaderFenced", version=1, stream="META", subject=_JOURNAL)
class LeaderFenced(EventPayload):
    """First append of a new shard writer; later appends by older terms fail."""

    shard: str
    term: int = Field(ge=1)
    leader: str = Field(description="node holding the writer lease for this term")


class _Change(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PutInode(_Change):
    c: Literal["inode"] = "inode"
    inode: Inode


class DelInode(_Change):
    c: Literal["del_inode"] = "del_inode"
    ino: int


class PutDentry(_Change):
    c: Literal["dentry"] = "dentry"
    dentry: Dentry


class DelDentry(_Change):
    c: Literal["del_dentry"] = "del_dentry"
    parent: int
    name: str


class SetNextLocal(_Change):
    """Inode allocation counter of the shard (the next local number to hand out)."""

    c: Literal["next_local"] = "next_local"
    value: int = Field(ge=1)


Change = Annotated[
    PutInode | DelInode | PutDentry | DelDentry | SetNextLocal, Field(discriminator="c")
]


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
