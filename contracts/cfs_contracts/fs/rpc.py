"""Metadata RPC: operations (requests), their replies, and POSIX errors.

Requests travel as JSON over NATS request/reply to the shard leader; every
mutating request carries an `op_id` so a retry after a timeout or a leader
change is answered from the journal instead of being applied twice.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from cfs_contracts.envelope import HLC
from cfs_contracts.fs.changes import BaseChange
from cfs_contracts.fs.conflicts import FieldConflict
from cfs_contracts.fs.records import ChunkRef, Dentry, Inode, Kind

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
MAX_XATTR_VALUE = 64 * 1024


class FsError(Exception):
    """A POSIX error: `errno` goes back to the caller (and the kernel) as is."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(f"[{errno.errorcode.get(code, code)}] {message or os.strerror(code)}")
        self.errno = code
        self.message = message or os.strerror(code)


# Extended attributes the kernel gives a meaning this file system does not implement:
# POSIX ACLs (access is decided by the mode bits alone) and SELinux labels. They are
# refused with EOPNOTSUPP, as a file system without them answers: `setfacl` says so
# instead of storing an ACL nobody enforces, and `ls -l`, which remembers a device that
# answered so, asks once per listing instead of twice per file.
UNSUPPORTED_XATTRS = frozenset(
    {"system.posix_acl_access", "system.posix_acl_default", "security.selinux"}
)


def listed_xattrs(names: Iterable[str]) -> tuple[str, ...]:
    """What listxattr shows: a name stored before it was refused stays hidden."""
    return tuple(sorted(n for n in names if n not in UNSUPPORTED_XATTRS))


def refuse_unsupported_xattr(name: str) -> None:
    if name in UNSUPPORTED_XATTRS:
        raise FsError(
            errno.EOPNOTSUPP, f"{name}: this file system has no POSIX ACLs or SELinux labels"
        )


class _Op(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Mutation(_Op):
    op_id: str = Field(description="client-chosen ULID; retries reuse it")
    uid: int = 0
    gid: int = 0


# -- reads --------------------------------------------------------------------------
class Lookup(_Op):
    op: Literal["lookup"] = "lookup"
    parent: int
    name: str


class GetAttr(_Op):
    op: Literal["getattr"] = "getattr"
    ino: int


class ReadLink(_Op):
    op: Literal["readlink"] = "readlink"
    ino: int


class ReadDir(_Op):
    op: Literal["readdir"] = "readdir"
    ino: int
    cookie: int = Field(default=0, description="0 = from the start; else the last cookie seen")
    limit: int = Field(default=1000, ge=1, le=10_000)
    plus: bool = Field(
        default=False,
        description="also the inodes (without chunk maps) of the entries this shard holds, "
        "as `inodes`: a long listing needs no getattr per file",
    )


class GetXattr(_Op):
    op: Literal["getxattr"] = "getxattr"
    ino: int
    name: str


class ListXattr(_Op):
    op: Literal["listxattr"] = "listxattr"
    ino: int


class StatFs(_Op):
    op: Literal["statfs"] = "statfs"


# -- mutations ----------------------------------------------------------------------
class SetAttr(_Mutation):
    op: Literal["setattr"] = "setattr"
    ino: int
    mode: int | None = None
    owner: int | None = Field(default=None, description="new uid")
    group: int | None = Field(default=None, description="new gid")
    size: int | None = Field(default=None, ge=0)
    atime_ns: int | None = None
    mtime_ns: int | None = None
    atime_now: bool = False
    mtime_now: bool = False


class Create(_Mutation):
    op: Literal["create"] = "create"
    parent: int
    name: str
    mode: int = 0o644
    exclusive: bool = True


class MkNod(_Mutation):
    op: Literal["mknod"] = "mknod"
    parent: int
    name: str
    kind: Kind
    mode: int = 0o644
    rdev: int = 0


class MkDir(_Mutation):
    op: Literal["mkdir"] = "mkdir"
    parent: int
    name: str
    mode: int = 0o755


class Symlink(_Mutation):
    op: Literal["symlink"] = "symlink"
    parent: int
    name: str
    target: str


class Link(_Mutation):
    op: Literal["link"] = "link"
    ino: int
    new_parent: int
    new_name: str


class Unlink(_Mutation):
    op: Literal["unlink"] = "unlink"
    parent: int
    name: str


class RmDir(_Mutation):
    op: Literal["rmdir"] = "rmdir"
    parent: int
    name: str


class Rename(_Mutation):
    op: Literal["rename"] = "rename"
    parent: int
    name: str
    new_parent: int
    new_name: str
    flags: int = Field(default=0, description="RENAME_NOREPLACE | RENAME_EXCHANGE")


class SetXattr(_Mutation):
    op: Literal["setxattr"] = "setxattr"
    ino: int
    name: str
    value_b64: str
    flags: int = 0


class RemoveXattr(_Mutation):
    op: Literal["removexattr"] = "removexattr"
    ino: int
    name: str


class CommitChunks(_Mutation):
    """The data path's commit: fragments are stored, now the chunk map points at them."""

    op: Literal["commit_chunks"] = "commit_chunks"
    ino: int
    chunks: tuple[ChunkRef, ...]
    size: int = Field(ge=0, description="file size after the write")
    mtime_ns: int | None = None


class FragmentMove(BaseModel):
    """Fragment `fragment` of chunk `index` now lives on `new_node` instead of `old_node`."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0, description="chunk number within the file")
    chunk_id: str
    fragment: int = Field(ge=0)
    old_node: str
    new_node: str


class MoveFragments(_Mutation):
    """Repair and drain: repoint fragments whose new copy is durable.

    Compare-and-set per move: a move whose chunk or old node no longer matches
    (the file was rewritten, or another repair got there first) is skipped;
    ESTALE when none applies.
    """

    op: Literal["move_fragments"] = "move_fragments"
    ino: int
    moves: tuple[FragmentMove, ...] = Field(min_length=1)


class ScanChunks(_Op):
    """Files of this shard whose chunk map names `node` (any file if `node` is empty),
    in inode order after `after_ino`. Scans a bounded number of inodes per call;
    `Reply.cursor` is where to continue, 0 when the shard is done."""

    op: Literal["scan_chunks"] = "scan_chunks"
    shard: int = Field(ge=1, le=999)
    after_ino: int = Field(default=0, ge=0)
    node: str = ""
    limit: int = Field(default=100, ge=1, le=1000)


class FindNames(_Op):
    """Every entry naming `ino` held by this shard (slow: a scan; for lost-data reports)."""

    op: Literal["find_names"] = "find_names"
    shard: int = Field(ge=1, le=999)
    ino: int


# -- cross-shard transactions (shard to shard; DESIGN.md §4) ----------------------------
class RemoteRecord(BaseModel):
    """What one shard holds under a key, as read by a coordinating shard.

    Keys: `i:<ino>` (inode), `d:<parent>:<name>` (entry), `e:<parent>` (does the
    directory have entries).
    """

    model_config = ConfigDict(frozen=True)

    key: str
    inode: Inode | None = None
    dentry: Dentry | None = None
    nonempty: bool | None = None


class TxRead(_Op):
    op: Literal["tx_read"] = "tx_read"
    keys: tuple[str, ...]


class TxReserve(_Mutation):
    """Reserve one inode number in this shard for a directory created from another."""

    op: Literal["tx_reserve"] = "tx_reserve"


class TxPrepare(_Mutation):
    """Check that `expected` still holds, then record `changes` (applied on commit) and lock."""

    op: Literal["tx_prepare"] = "tx_prepare"
    tx_id: str
    coordinator: int
    expected: tuple[RemoteRecord, ...]
    changes: tuple[BaseChange, ...]


class TxDecide(_Mutation):
    op: Literal["tx_decide"] = "tx_decide"
    tx_id: str
    commit: bool


class TxStatus(_Mutation):
    """Asked of the coordinator by a participant holding a prepared transaction."""

    op: Literal["tx_status"] = "tx_status"
    tx_id: str


ReadOp = (
    Lookup
    | GetAttr
    | ReadLink
    | ReadDir
    | GetXattr
    | ListXattr
    | StatFs
    | TxRead
    | ScanChunks
    | FindNames
)
TxOp = TxReserve | TxPrepare | TxDecide | TxStatus
MutationOp = (
    SetAttr
    | Create
    | MkNod
    | MkDir
    | Symlink
    | Link
    | Unlink
    | RmDir
    | Rename
    | SetXattr
    | RemoveXattr
    | CommitChunks
    | MoveFragments
)
ShardOp = MutationOp | TxOp
AnyOp = Annotated[ReadOp | MutationOp | TxOp, Field(discriminator="op")]


class Request(BaseModel):
    """Wire wrapper so the discriminated union parses in one call."""

    model_config = ConfigDict(frozen=True)

    body: AnyOp
    hlc: HLC | None = Field(
        default=None, description="sender's clock: the receiver stamps its effects after it"
    )


# -- replies ------------------------------------------------------------------------
class DirEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    cookie: int
    name: str
    ino: int
    kind: Kind


class Reply(BaseModel):
    """One reply shape for every op; unused fields stay empty."""

    model_config = ConfigDict(frozen=True)

    errno: int = 0
    message: str = ""
    inode: Inode | None = None
    entries: tuple[DirEntry, ...] = ()
    more: bool = False
    target: str | None = None
    value_b64: str | None = None
    names: tuple[str, ...] = ()
    stats: dict[str, int] = Field(default_factory=dict)
    records: tuple[RemoteRecord, ...] = ()
    reserved: int = 0
    tx_state: str = ""
    inodes: tuple[Inode, ...] = ()
    cursor: int = Field(default=0, description="scan_chunks: continue after this inode; 0 = done")
    conflicts: tuple[FieldConflict, ...] = Field(
        default=(), description="a remote site's entry: what its merge found"
    )
    not_leader: bool = Field(default=False, description="ask again: the writer is changing")
    hlc: HLC | None = Field(
        default=None, description="writer's clock when answering (causality for snapshot cuts)"
    )

    @classmethod
    def error(cls, exc: FsError) -> Reply:
        return cls(errno=exc.errno, message=exc.message)
