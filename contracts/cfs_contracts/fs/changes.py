"""Changes recorded in the metadata journal: full records, so replay never re-runs logic.

Also the record of a cross-shard transaction (DESIGN.md §4), which participants
keep while prepared (its locks survive a leader change) and coordinators keep
until every participant has confirmed the outcome.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from cfs_contracts.fs.records import Dentry, Inode


class _Change(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PutInode(_Change):
    c: Literal["inode"] = "inode"
    inode: Inode


class DelInode(_Change):
    """An inode removed. With `inode` (the writer fills it in; a DelInode written by an
    older release has none) it is also the shard's tombstone of the inode: the inode
    as the deleting site had it, and the names the same entry removed, so a change
    made on another site that the deletion never saw can bring it back there."""

    c: Literal["del_inode"] = "del_inode"
    ino: int
    inode: Inode | None = Field(default=None, description="as it was deleted (cross-site merge)")
    names: tuple[Dentry, ...] = Field(
        default=(), description="the names of it the same entry removed, as they were"
    )


class PutDentry(_Change):
    c: Literal["dentry"] = "dentry"
    dentry: Dentry


class DelDentry(_Change):
    c: Literal["del_dentry"] = "del_dentry"
    parent: int
    name: str
    removed: Dentry | None = Field(
        default=None,
        description="the binding removed, as it was (the writer fills it in): the other "
        "site removes the same binding only, wherever a name conflict put it there",
    )


class SetNextLocal(_Change):
    """Inode allocation counter of the shard (the next local number to hand out)."""

    c: Literal["next_local"] = "next_local"
    value: int = Field(ge=1)


class SetRemoteApplied(_Change):
    """How far this shard has applied its peer site's journal: the last message of it
    (a sequence of this site's `GEO_IN` stream) whose entries are in. Journaled with
    them, so the geo-replicator resumes exactly there whatever happened to it."""

    c: Literal["remote_applied"] = "remote_applied"
    peer: str
    seq: int = Field(ge=0)


BaseChange = Annotated[
    PutInode | DelInode | PutDentry | DelDentry | SetNextLocal, Field(discriminator="c")
]


class TxRecord(BaseModel):
    """A cross-shard transaction as one shard remembers it until it is resolved.

    Participant: `prepared` with the concrete changes it will apply on commit and
    the keys it locks meanwhile. Coordinator: `committed` until every participant
    confirmed, or `aborted` (kept so a late status query gets the same answer).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tx_id: str
    role: Literal["participant", "coordinator"]
    state: Literal["prepared", "committed", "aborted"]
    coordinator: int = Field(description="coordinating shard index")
    participants: tuple[int, ...] = ()
    changes: tuple[BaseChange, ...] = ()
    locks: tuple[str, ...] = Field(default=(), description="keys no other operation may touch")
    created_ns: int = 0


class TxPut(_Change):
    c: Literal["tx"] = "tx"
    tx: TxRecord


class TxClear(_Change):
    c: Literal["tx_clear"] = "tx_clear"
    tx_id: str


Change = Annotated[
    PutInode | DelInode | PutDentry | DelDentry | SetNextLocal | TxPut | TxClear | SetRemoteApplied,
    Field(discriminator="c"),
]
