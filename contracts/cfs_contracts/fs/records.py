"""File-system records: inodes, directory entries, chunk maps (DESIGN.md §4, §5).

They are part of the metadata journal's schema, so they live in contracts.
Inode numbers encode their shard: `(local counter << SHARD_BITS) | shard`.
"""

from __future__ import annotations

import hashlib
import stat
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

ROOT_INO = 1
SHARD_BITS = 10  # inode = (local counter << SHARD_BITS) | shard index (1..999)
MAX_NAME_BYTES = 255
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024


class Kind(StrEnum):
    FILE = "f"
    DIR = "d"
    SYMLINK = "l"
    FIFO = "p"
    SOCKET = "s"
    CHAR = "c"
    BLOCK = "b"


_S_IF = {
    Kind.FILE: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.FIFO: stat.S_IFIFO,
    Kind.SOCKET: stat.S_IFSOCK,
    Kind.CHAR: stat.S_IFCHR,
    Kind.BLOCK: stat.S_IFBLK,
}


def shard_of(ino: int) -> int:
    return ino & ((1 << SHARD_BITS) - 1)


def make_ino(shard_index: int, local: int) -> int:
    return (local << SHARD_BITS) | shard_index


# Two replicated sites allocate inode numbers from disjoint ranges of each shard's
# local counter, so a file created on each during a partition never share a number:
# site index i (ClusterConfig.site_index) counts from i << SITE_LOCAL_SHIFT.
SITE_LOCAL_SHIFT = 45  # 2**45 inodes per shard and site; index < 128 keeps ino < 2**62
MAX_SITE_INDEX = 127


def site_floor(site_index: int) -> int:
    """The first local number of site `site_index` (site 0: 1, as ever)."""
    if not 0 <= site_index <= MAX_SITE_INDEX:
        raise ValueError(f"site index {site_index} is not in 0..{MAX_SITE_INDEX}")
    return max(1, site_index << SITE_LOCAL_SHIFT)


def site_of(ino: int) -> int:
    """The index of the site that allocated `ino`."""
    return ino >> (SHARD_BITS + SITE_LOCAL_SHIFT)


class ChunkRef(BaseModel):
    """One chunk of a file as committed by the data path (DESIGN.md §5)."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0, description="chunk number within the file")
    chunk_id: str = Field(description="SHA-256 of the chunk's plaintext, hex")
    length: int = Field(ge=0, description="bytes of file data in this chunk")
    coded_length: int | None = Field(
        default=None,
        ge=0,
        description="bytes that were coded and hashed, when a truncate cut `length` "
        "below them; None = `length`",
    )
    scheme: str = Field(description="erasure scheme, e.g. ec4+2, ec2+1, copy2")
    fragments: tuple[str, ...] = Field(
        default=(), description="node holding fragment i, in fragment order"
    )

    @property
    def stored_length(self) -> int:
        return self.length if self.coded_length is None else self.coded_length


# The groups of an inode's fields that two sites merge one by one, last writer wins
# (DESIGN.md §8): a rename on one site and an owner change on the other both survive;
# the owner changed on both is a conflict. `ctime_ns` merges as the later of the two;
# `nlink` and `parent` follow the merged namespace; `kind` never changes.
FIELD_GROUPS: dict[str, tuple[str, ...]] = {
    "mode": ("mode",),
    "owner": ("uid", "gid"),
    "content": ("size", "chunks", "chunk_size", "mtime_ns"),
    "atime": ("atime_ns",),
    "xattrs": ("xattrs",),
    "link": ("target", "rdev"),
    # No field: stamped when the inode is given a new name (a rename, a hard link), so a
    # deletion on the other site that never saw the new name does not remove the file.
    "names": (),
}


class Stamp(BaseModel):
    """The last change of one group of an inode's fields: when (`ns`, the writer's
    clock) and on which site, and the stamp of the value it replaced (`base`; None:
    the value the inode was created with). A merge takes a remote value whose base is
    the local stamp as a plain successor; any other difference was made concurrently
    on both sites: a conflict, won by the later stamp (site names break ties)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ns: int = Field(ge=0)
    site: str = Field(min_length=1)
    base: tuple[int, str] | None = None

    def key(self) -> tuple[int, str]:
        return (self.ns, self.site)


class Inode(BaseModel):
    model_config = ConfigDict(frozen=True)

    ino: int = Field(ge=1)
    kind: Kind
    mode: int = Field(ge=0, le=0o7777, description="permission bits only")
    uid: int = Field(ge=0)
    gid: int = Field(ge=0)
    nlink: int = Field(ge=0)
    size: int = Field(ge=0)
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    parent: int = Field(default=0, description="directories: the parent directory; else 0")
    target: str | None = Field(default=None, description="symlink target")
    xattrs: dict[str, str] = Field(default_factory=dict, description="name -> base64 value")
    chunks: tuple[ChunkRef, ...] = ()
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=4096, description="bytes per chunk")
    stamps: dict[str, Stamp] = Field(
        default_factory=dict,
        description="FIELD_GROUPS changed since creation -> their last change (cross-site merge)",
    )

    @property
    def st_mode(self) -> int:
        return _S_IF[self.kind] | self.mode

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR


class Dentry(BaseModel):
    model_config = ConfigDict(frozen=True)

    parent: int
    name: str
    ino: int
    kind: Kind
    stamp: Stamp | None = Field(
        default=None, description="when and where the name was bound (cross-site merge)"
    )
    shadowed: tuple[Dentry, ...] = Field(
        default=(),
        description="bindings of this name from the other site that lost a name conflict "
        "here (kept under another name): the name goes back to one if this one is removed "
        "by the site that never saw the conflict",
    )

    @property
    def cookie(self) -> int:
        return name_cookie(self.name)


def name_cookie(name: str) -> int:
    """Stable readdir cookie: 62-bit hash of the name, never 0 (0 = start of listing).

    Listing in cookie order makes a cookie stay valid while other entries come
    and go, as ext4's hashed directories do.
    """
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return (int.from_bytes(digest) >> 2) or 1
