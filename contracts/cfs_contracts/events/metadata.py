"""Metadata journal events (META_<shard> streams, DESIGN.md §4).

A shard's journal holds, in order: `LeaderFenced` when a writer takes over,
then `MetaCommitted` group commits. Each committed entry records the changes
an operation made (full records, so replay never re-runs POSIX logic) and its
reply (so a retried operation id gets the original answer).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cfs_contracts.envelope import HLC, EventPayload
from cfs_contracts.fs.changes import (
    Change,
    DelDentry,
    DelInode,
    PutDentry,
    PutInode,
    SetNextLocal,
    SetRemoteApplied,
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
    "Lineage",
    "MetaCommitted",
    "MetaReplayed",
    "PutDentry",
    "PutInode",
    "SetNextLocal",
    "SetRemoteApplied",
    "ShardImageChunk",
    "ShardOpened",
    "ShardRestored",
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


class Lineage(BaseModel):
    """Where a restored shard's state came from: a position in some cluster's journal.

    `seq` advances as `replay-journal` applies that journal's later messages, so a
    replay knows exactly where to continue and running it twice changes nothing.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    cluster_id: str = Field(description="journal owner: ClusterConfig.cluster_id of the source")
    shard: str
    seq: int = Field(ge=0, description="last source journal sequence contained in this state")
    hlc: HLC | None = Field(default=None, description="stamp of the message at `seq`")
    snapshot_id: str
    archive_url: str | None = Field(
        default=None, description="the source's journal archive (s3://…), for replay-journal"
    )
    held: bool = Field(
        default=True,
        description="mutations refused (EROFS) until replay-journal finishes or the "
        "operator opens the shard: a replay must apply on exactly the restored state",
    )


@REGISTRY.event("ShardRestored", version=1, stream="META", subject=_JOURNAL)
class ShardRestored(EventPayload):
    """Start of a restore: the next `chunks` ShardImageChunk messages replace the state.

    The image travels in the journal itself, so a replica rebuilt later (or one that
    was down during the restore) installs it by replaying the journal like anything else.
    """

    shard: str
    term: int = Field(ge=1)
    lineage: Lineage
    chunks: int = Field(ge=1)
    records: int = Field(ge=0, description="key/value pairs in the image")
    sha256: str = Field(description="of the image bytes (all chunks' data, in order)")


@REGISTRY.event("ShardImageChunk", version=1, stream="META", subject=_JOURNAL)
class ShardImageChunk(EventPayload):
    """Part of a restored shard image: length-prefixed key/value pairs (base64)."""

    shard: str
    term: int = Field(ge=1)
    snapshot_id: str
    index: int = Field(ge=0)
    data_b64: str


@REGISTRY.event("MetaReplayed", version=1, stream="META", subject=_JOURNAL)
class MetaReplayed(EventPayload):
    """Entries of a source journal message applied again by `replay-journal`."""

    shard: str
    term: int = Field(ge=1)
    source_first: int = Field(ge=1, description="first source journal sequence replayed")
    source_last: int = Field(ge=1, description="last source journal sequence replayed")
    source_hlc: HLC = Field(description="stamp of the source message at `source_last`")
    entries: tuple[JournalEntry, ...]


@REGISTRY.event("ShardOpened", version=1, stream="META", subject=_JOURNAL)
class ShardOpened(EventPayload):
    """A restored shard accepts mutations again (replay finished, or the operator said so)."""

    shard: str
    term: int = Field(ge=1)
    reason: str
