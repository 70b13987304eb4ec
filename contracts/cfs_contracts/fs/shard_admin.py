"""Shard admin RPC: backup and restore steps sent to a shard's writer.

These travel on their own subject (`cfs.<site>.rpc.metaadmin.<shard>`), which only
the admin and backup roles may publish to: a client can never restore or replay.
Each step goes through the writer's group-commit loop, so it is ordered with
every other append of the shard.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from cfs_contracts.envelope import HLC
from cfs_contracts.events.metadata import JournalEntry, Lineage
from cfs_contracts.fs.changes import BaseChange
from cfs_contracts.fs.conflicts import FieldConflict
from cfs_contracts.fs.rpc import RemoteRecord


class _AdminOp(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MarkCut(_AdminOp):
    """Journal a snapshot marker stamped after `cut`: every later message is past the cut."""

    op: Literal["mark_cut"] = "mark_cut"
    snapshot_id: str
    cut: HLC


class ShardPosition(_AdminOp):
    """Applied sequence, last stamp and lineage of the writer's projection."""

    op: Literal["position"] = "position"


class RestoreBegin(_AdminOp):
    op: Literal["restore_begin"] = "restore_begin"
    lineage: Lineage
    chunks: int = Field(ge=1)
    records: int = Field(ge=0)
    sha256: str


class RestoreChunk(_AdminOp):
    op: Literal["restore_chunk"] = "restore_chunk"
    snapshot_id: str
    index: int = Field(ge=0)
    data_b64: str


class ReplayedMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    seq: int = Field(ge=1)
    hlc: HLC
    entries: tuple[JournalEntry, ...]


class ReplayBatch(_AdminOp):
    """Source journal messages `first..last` (in order, gaps only where the source
    message held no entries), applied on top of the restored state."""

    op: Literal["replay"] = "replay"
    cluster_id: str
    first: int = Field(ge=1)
    last: int = Field(ge=1)
    messages: tuple[ReplayedMessage, ...]


class OpenShard(_AdminOp):
    op: Literal["open"] = "open"
    reason: str


class RepairRecords(_AdminOp):
    """`cfs admin metadata-repair`: journal `changes` if every record in `expected` is
    still what the checker saw (else ESTALE, nothing changes). `repair_id` is the
    entry's op id: a retried repair is answered from the journal, applied once."""

    op: Literal["repair"] = "repair"
    repair_id: str
    problem: str = Field(description="what it fixes: nlink, parent, orphan, dangling, ...")
    finding: str = Field(description="the checker's line for it")
    expected: tuple[RemoteRecord, ...] = ()
    changes: tuple[BaseChange, ...] = ()


class RemoteMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    seq: int = Field(ge=1, description="its sequence in this site's GEO_IN stream")
    entries: tuple[JournalEntry, ...]


class ApplyRemote(_AdminOp):
    """The geo-replicator: messages of the peer site's journal for this shard, in the
    peer's order, their chunk maps already naming this site's copies of the data.
    Merged into this shard and journaled under `...journal.remote` with the position
    they reach; messages at or before the shard's position are skipped, and so is an
    entry applied before (see `cfs_metadata.remote`). No messages: where the shard is."""

    op: Literal["apply_remote"] = "apply_remote"
    origin: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="the peer site")
    messages: tuple[RemoteMessage, ...] = ()


class Republish(_AdminOp):
    """`cfs admin replication-sync`: journal these records again, as they are here and
    stamped now, so the geo-replicator ships them to the peer, whose differing
    version loses to the later stamps (and is reported as a conflict). `sync_id` is
    the entry's op id: a retried request is journaled once."""

    op: Literal["republish"] = "republish"
    sync_id: str
    inodes: tuple[int, ...] = ()
    dentries: tuple[tuple[int, str], ...] = Field(default=(), description="(parent, name)")


AnyShardAdminOp = Annotated[
    MarkCut
    | ShardPosition
    | RestoreBegin
    | RestoreChunk
    | ReplayBatch
    | OpenShard
    | RepairRecords
    | ApplyRemote
    | Republish,
    Field(discriminator="op"),
]


class ShardAdminRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    body: AnyShardAdminOp
    hlc: HLC | None = None


class ShardAdminReply(BaseModel):
    model_config = ConfigDict(frozen=True)

    errno: int = 0
    message: str = ""
    not_leader: bool = False
    seq: int = Field(default=0, description="journal sequence of the step's message")
    applied_seq: int = 0
    inodes: int = 0
    last_hlc: HLC | None = None
    lineage: Lineage | None = None
    installing: str | None = Field(default=None, description="snapshot id being installed")
    next_chunk: int = Field(default=0, description="restore: the chunk index the writer expects")
    fence_epoch: int = Field(
        default=0,
        description="the active-site record (epoch) whose fence this writer enforces; 0: none",
    )
    applied: int = Field(default=0, description="apply_remote: entries journaled now")
    remote_applied: int = Field(
        default=0, description="apply_remote: the last GEO_IN message applied, after the step"
    )
    skipped: int = Field(default=0, description="apply_remote: entries applied before")
    conflicts: tuple[FieldConflict, ...] = ()
    hlc: HLC | None = None
