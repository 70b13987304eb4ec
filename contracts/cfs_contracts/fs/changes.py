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
    c: Literal["del_inode"] = "del_inode"
    ino: int


class PutDentry(_Change):
    c: Literal["dentry"] = "dentry"
    dentry: Dentry


class DelDentry(_Change):
    c: Literal["del_dentry"] = "del_dentry"
    parent: int
    name: str
    ino: int | None = Field(
        default=None,
        description="the file the name led to (cross-site merge: the other "
        "site removes the name only if it still leads there)",
    )


class SetNextLocal(_Change):
    """Inode allocation counter of the shard (the next local number to hand out)."""

    c: Literal["next_local"] = "next_local"
    value: int = Field(ge=1)


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
    PutInode | DelInode | PutDentry | DelDentry | SetNextLocal | TxPut | TxClear,
    Field(discriminator="c"),
]
