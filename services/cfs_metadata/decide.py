"""The pure metadata state machine: `decide(view, op, now) -> changes + reply`.

No I/O and no clock: the writer passes `now_ns`, so replaying or re-deciding is
deterministic. Errors are `FsError(errno)`. Only committed changes (applied
with `state.apply_entries`) ever reach the projection; a failed operation
changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import errno
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from cfs_contracts.events.metadata import (
    Change,
    DelDentry,
    DelInode,
    JournalEntry,
    PutDentry,
    PutInode,
    SetNextLocal,
)
from cfs_contracts.fs.records import (
    MAX_NAME_BYTES,
    ROOT_INO,
    ChunkRef,
    Dentry,
    Inode,
    Kind,
    make_ino,
)
from cfs_contracts.fs.rpc import (
    MAX_XATTR_VALUE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    CommitChunks,
    Create,
    FsError,
    Link,
    MkDir,
    MkNod,
    MoveFragments,
    MutationOp,
    RemoveXattr,
    Rename,
    Reply,
    RmDir,
    SetAttr,
    SetXattr,
    Symlink,
    TxOp,
    Unlink,
    refuse_unsupported_xattr,
)
from cfs_metadata.state import Overlay, ShardView, apply_change

Placement = Callable[[int, str], int]

MAX_SYMLINK = 4095  # PATH_MAX less the terminating NUL, as Linux
MAX_PATH_DEPTH = 4096


@dataclass
class Decision:
    changes: list[Change] = field(default_factory=list)
    reply: Reply = field(default_factory=Reply)

    def entry(self, op: MutationOp | TxOp) -> JournalEntry:
        return JournalEntry(op_id=op.op_id, op=op.op, changes=tuple(self.changes), reply=self.reply)


def root_inode(now_ns: int, uid: int = 0, gid: int = 0) -> Inode:
    return Inode(
        ino=ROOT_INO,
        kind=Kind.DIR,
        mode=0o755,
        uid=uid,
        gid=gid,
        nlink=2,
        size=0,
        atime_ns=now_ns,
        mtime_ns=now_ns,
        ctime_ns=now_ns,
        parent=ROOT_INO,
    )


def bootstrap_entry(now_ns: int, op_id: str) -> JournalEntry:
    """The first entry of shard 001: the root directory."""
    root = root_inode(now_ns)
    return JournalEntry(
        op_id=op_id,
        op="init",
        changes=(PutInode(inode=root), SetNextLocal(value=2)),
        reply=Reply(inode=root),
    )


def floor_entry(floor: int, op_id: str) -> JournalEntry:
    """A shard's inode counter moved to its site's range (`site_floor`), once."""
    return JournalEntry(
        op_id=op_id, op="site-floor", changes=(SetNextLocal(value=floor),), reply=Reply()
    )


def decide(
    view: ShardView, op: MutationOp, now_ns: int, placement: Placement | None = None
) -> Decision:
    """Validate `op` against `view`; return the changes and the reply. Raises FsError.

    `placement(parent, name)` picks the shard of a new directory (default: this one).
    """
    stored = view.op_reply(op.op_id)
    if stored is not None:
        return Decision([], stored)  # a retry: the original answer, no new changes
    ctx = _Ctx(Overlay(view), now_ns, placement)
    reply = _dispatch(ctx, op)
    return Decision(ctx.changes, reply)


class _Ctx:
    """Collects changes and lets later steps of one op see earlier ones."""

    def __init__(self, view: Overlay, now_ns: int, placement: Placement | None) -> None:
        self.view = view
        self.now = now_ns
        self.changes: list[Change] = []
        self.placement: Placement = placement or (lambda parent, name: view.shard)

    def change(self, change: Change) -> None:
        self.changes.append(change)
        apply_change(self.view, change)

    def put(self, inode: Inode) -> Inode:
        self.change(PutInode(inode=inode))
        return inode

    def inode(self, ino: int) -> Inode:
        found = self.view.inode(ino)
        if found is None:
            raise FsError(errno.ENOENT, f"inode {ino} does not exist")
        return found

    def directory(self, ino: int) -> Inode:
        found = self.inode(ino)
        if not found.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        return found

    def allocate(self, shard: int) -> int:
        if shard != self.view.shard:
            return make_ino(shard, self.view.reserved_local(shard))
        local = self.view.next_local()
        self.change(SetNextLocal(value=local + 1))
        return make_ino(shard, local)

    def touch_dir(self, parent: Inode, nlink_delta: int = 0) -> Inode:
        return self.put(
            parent.model_copy(
                update={
                    "mtime_ns": self.now,
                    "ctime_ns": self.now,
                    "nlink": parent.nlink + nlink_delta,
                }
            )
        )

    def new_inode(
        self,
        kind: Kind,
        mode: int,
        op: Create | MkNod | MkDir | Symlink,
        directory: Inode,
        **extra: object,
    ) -> Inode:
        # Directories are spread over shards; everything else lives with its directory.
        shard = self.placement(op.parent, op.name) if kind is Kind.DIR else self.view.shard
        mode, gid = inherited(directory, kind, mode & 0o7777, op.gid)
        fields: dict[str, object] = {
            "ino": self.allocate(shard),
            "kind": kind,
            "mode": mode,
            "uid": op.uid,
            "gid": gid,
            "nlink": 2 if kind is Kind.DIR else 1,
            "size": 0,
            "atime_ns": self.now,
            "mtime_ns": self.now,
            "ctime_ns": self.now,
            **extra,
        }
        return self.put(Inode.model_validate(fields))

    def link_name(self, parent: Inode, name: str, child: Inode) -> None:
        self.change(
            PutDentry(dentry=Dentry(parent=parent.ino, name=name, ino=child.ino, kind=child.kind))
        )

    def drop_link(self, inode: Inode) -> None:
        """One name less for `inode`: delete it with its last name."""
        remaining = inode.nlink - (2 if inode.is_dir else 1)
        if remaining <= 0:
            self.change(DelInode(ino=inode.ino))
        else:
            self.put(inode.model_copy(update={"nlink": remaining, "ctime_ns": self.now}))


def inherited(directory: Inode, kind: Kind, mode: int, gid: int) -> tuple[int, int]:
    """(mode, gid) of a new inode: in a set-group-id directory it takes the directory's
    group, and a new subdirectory keeps the bit (as ext4 does). Decided here, where the
    directory is at hand, so a client need not read it first."""
    if not directory.mode & stat.S_ISGID:
        return mode, gid
    return (mode | stat.S_ISGID if kind is Kind.DIR else mode), directory.gid


def check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise FsError(errno.EINVAL, f"invalid file name {name!r}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise FsError(errno.ENAMETOOLONG, f"name longer than {MAX_NAME_BYTES} bytes")


def _free_name(ctx: _Ctx, parent: int, name: str) -> Inode:
    check_name(name)
    directory = ctx.directory(parent)
    if ctx.view.dentry(parent, name) is not None:
        raise FsError(errno.EEXIST, f"{name!r} exists in directory {parent}")
    return directory


def _create(ctx: _Ctx, op: Create) -> Reply:
    check_name(op.name)
    parent = ctx.directory(op.parent)
    existing = ctx.view.dentry(op.parent, op.name)
    if existing is not None:
        if op.exclusive:
            raise FsError(errno.EEXIST, f"{op.name!r} exists in directory {op.parent}")
        found = ctx.inode(existing.ino)
        if found.is_dir:
            raise FsError(errno.EISDIR, f"{op.name!r} is a directory")
        return Reply(inode=found)
    child = ctx.new_inode(Kind.FILE, op.mode, op, parent)
    ctx.link_name(parent, op.name, child)
    ctx.touch_dir(parent)
    return Reply(inode=child)


def _mknod(ctx: _Ctx, op: MkNod) -> Reply:
    if op.kind in (Kind.DIR, Kind.SYMLINK):
        raise FsError(errno.EINVAL, f"mknod cannot create a {op.kind.name.lower()}")
    parent = _free_name(ctx, op.parent, op.name)
    rdev = op.rdev if op.kind in (Kind.CHAR, Kind.BLOCK) else 0
    child = ctx.new_inode(op.kind, op.mode, op, parent, rdev=rdev)
    ctx.link_name(parent, op.name, child)
    ctx.touch_dir(parent)
    return Reply(inode=child)


def _mkdir(ctx: _Ctx, op: MkDir) -> Reply:
    parent = _free_name(ctx, op.parent, op.name)
    child = ctx.new_inode(Kind.DIR, op.mode, op, parent, parent=parent.ino)
    ctx.link_name(parent, op.name, child)
    ctx.touch_dir(parent, nlink_delta=1)
    return Reply(inode=child)


def _symlink(ctx: _Ctx, op: Symlink) -> Reply:
    if not op.target or len(op.target.encode("utf-8", "surrogateescape")) > MAX_SYMLINK:
        raise FsError(errno.ENAMETOOLONG if op.target else errno.ENOENT, "bad symlink target")
    parent = _free_name(ctx, op.parent, op.name)
    size = len(op.target.encode("utf-8", "surrogateescape"))
    child = ctx.new_inode(Kind.SYMLINK, 0o777, op, parent, target=op.target, size=size)
    ctx.link_name(parent, op.name, child)
    ctx.touch_dir(parent)
    return Reply(inode=child)


def _link(ctx: _Ctx, op: Link) -> Reply:
    target = ctx.inode(op.ino)
    if target.is_dir:
        raise FsError(errno.EPERM, "hard links to directories are not allowed")
    parent = _free_name(ctx, op.new_parent, op.new_name)
    linked = ctx.put(target.model_copy(update={"nlink": target.nlink + 1, "ctime_ns": ctx.now}))
    ctx.link_name(parent, op.new_name, linked)
    ctx.touch_dir(parent)
    return Reply(inode=linked)


def _unlink(ctx: _Ctx, op: Unlink) -> Reply:
    parent = ctx.directory(op.parent)
    entry = ctx.view.dentry(op.parent, op.name)
    if entry is None:
        raise FsError(errno.ENOENT, f"no {op.name!r} in directory {op.parent}")
    victim = ctx.inode(entry.ino)
    if victim.is_dir:
        raise FsError(errno.EISDIR, f"{op.name!r} is a directory")
    ctx.change(DelDentry(parent=op.parent, name=op.name))
    ctx.drop_link(victim)
    ctx.touch_dir(parent)
    return Reply()


def _rmdir(ctx: _Ctx, op: RmDir) -> Reply:
    if op.name == ".":
        raise FsError(errno.EINVAL, "cannot remove '.'")
    if op.name == "..":
        raise FsError(errno.ENOTEMPTY, "cannot remove '..'")
    parent = ctx.directory(op.parent)
    entry = ctx.view.dentry(op.parent, op.name)
    if entry is None:
        raise FsError(errno.ENOENT, f"no {op.name!r} in directory {op.parent}")
    victim = ctx.inode(entry.ino)
    if not victim.is_dir:
        raise FsError(errno.ENOTDIR, f"{op.name!r} is not a directory")
    if ctx.view.has_entries(victim.ino):
        raise FsError(errno.ENOTEMPTY, f"directory {op.name!r} is not empty")
    ctx.change(DelDentry(parent=op.parent, name=op.name))
    ctx.change(DelInode(ino=victim.ino))
    ctx.touch_dir(parent, nlink_delta=-1)
    return Reply()


def _is_ancestor(ctx: _Ctx, ancestor: int, ino: int) -> bool:
    """Is `ancestor` on the parent chain from directory `ino` up to the root?"""
    for _ in range(MAX_PATH_DEPTH):
        if ino == ancestor:
            return True
        if ino == ROOT_INO:
            return False
        ino = ctx.inode(ino).parent
    raise FsError(errno.ELOOP, "directory parent chain too deep")


def _rename(ctx: _Ctx, op: Rename) -> Reply:
    if op.flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or op.flags == (
        RENAME_NOREPLACE | RENAME_EXCHANGE
    ):
        raise FsError(errno.EINVAL, f"invalid rename flags {op.flags}")
    check_name(op.new_name)
    ctx.directory(op.parent)
    ctx.directory(op.new_parent)
    src_entry = ctx.view.dentry(op.parent, op.name)
    if src_entry is None:
        raise FsError(errno.ENOENT, f"no {op.name!r} in directory {op.parent}")
    src = ctx.inode(src_entry.ino)
    dst_entry = ctx.view.dentry(op.new_parent, op.new_name)
    dst = ctx.inode(dst_entry.ino) if dst_entry is not None else None
    if op.flags & RENAME_EXCHANGE:
        if dst is None:
            raise FsError(errno.ENOENT, f"no {op.new_name!r} to exchange with")
        return _exchange(ctx, op, src, dst)
    if dst is not None and op.flags & RENAME_NOREPLACE:
        raise FsError(errno.EEXIST, f"{op.new_name!r} exists")
    if src.is_dir and op.new_parent != op.parent and _is_ancestor(ctx, src.ino, op.new_parent):
        raise FsError(errno.EINVAL, "cannot move a directory into its own subtree")
    if dst is not None:
        if dst.ino == src.ino:
            return Reply()  # same file (or hard links to it): POSIX says do nothing
        if src.is_dir and not dst.is_dir:
            raise FsError(errno.ENOTDIR, f"{op.new_name!r} is not a directory")
        if not src.is_dir and dst.is_dir:
            raise FsError(errno.EISDIR, f"{op.new_name!r} is a directory")
        if dst.is_dir and ctx.view.has_entries(dst.ino):
            raise FsError(errno.ENOTEMPTY, f"directory {op.new_name!r} is not empty")
        ctx.drop_link(dst)
        if dst.is_dir:
            ctx.touch_dir(ctx.inode(op.new_parent), nlink_delta=-1)
    ctx.change(DelDentry(parent=op.parent, name=op.name))
    moved = src.model_copy(update={"ctime_ns": ctx.now})
    if src.is_dir and op.new_parent != op.parent:
        moved = moved.model_copy(update={"parent": op.new_parent})
        ctx.touch_dir(ctx.inode(op.parent), nlink_delta=-1)
        ctx.touch_dir(ctx.inode(op.new_parent), nlink_delta=+1)
    else:
        ctx.touch_dir(ctx.inode(op.parent))
        ctx.touch_dir(ctx.inode(op.new_parent))
    ctx.put(moved)
    ctx.link_name(ctx.inode(op.new_parent), op.new_name, moved)
    return Reply(inode=moved)


def _exchange(ctx: _Ctx, op: Rename, src: Inode, dst: Inode) -> Reply:
    if src.ino == dst.ino:
        return Reply()
    if op.parent != op.new_parent:
        if src.is_dir and _is_ancestor(ctx, src.ino, op.new_parent):
            raise FsError(errno.EINVAL, "cannot move a directory into its own subtree")
        if dst.is_dir and _is_ancestor(ctx, dst.ino, op.parent):
            raise FsError(errno.EINVAL, "cannot move a directory into its own subtree")
    new_src = src.model_copy(update={"ctime_ns": ctx.now})
    new_dst = dst.model_copy(update={"ctime_ns": ctx.now})
    if op.parent != op.new_parent:
        if src.is_dir:
            new_src = new_src.model_copy(update={"parent": op.new_parent})
        if dst.is_dir:
            new_dst = new_dst.model_copy(update={"parent": op.parent})
        moved_dirs = int(src.is_dir) - int(dst.is_dir)  # net directories leaving `parent`
        ctx.touch_dir(ctx.inode(op.parent), nlink_delta=-moved_dirs)
        ctx.touch_dir(ctx.inode(op.new_parent), nlink_delta=moved_dirs)
    else:
        ctx.touch_dir(ctx.inode(op.parent))
    ctx.put(new_src)
    ctx.put(new_dst)
    ctx.link_name(ctx.inode(op.new_parent), op.new_name, new_src)
    ctx.link_name(ctx.inode(op.parent), op.name, new_dst)
    return Reply(inode=new_src)


def _setattr(ctx: _Ctx, op: SetAttr) -> Reply:
    inode = ctx.inode(op.ino)
    update: dict[str, object] = {"ctime_ns": ctx.now}
    if op.mode is not None:
        update["mode"] = op.mode & 0o7777
    if op.owner is not None:
        update["uid"] = op.owner
    if op.group is not None:
        update["gid"] = op.group
    if op.size is not None:
        if inode.is_dir:
            raise FsError(errno.EISDIR, f"inode {op.ino} is a directory")
        if inode.kind is not Kind.FILE:
            raise FsError(errno.EINVAL, f"cannot truncate a {inode.kind.name.lower()}")
        update["size"] = op.size
        update["chunks"] = truncate_chunks(inode, op.size)
        if op.size != inode.size:
            update["mtime_ns"] = ctx.now
    if op.atime_now or op.atime_ns is not None:
        update["atime_ns"] = ctx.now if op.atime_now else op.atime_ns
    if op.mtime_now or op.mtime_ns is not None:
        update["mtime_ns"] = ctx.now if op.mtime_now else op.mtime_ns
    return Reply(inode=ctx.put(inode.model_copy(update=update)))


def truncate_chunks(inode: Inode, size: int) -> tuple[ChunkRef, ...]:
    """Chunks wholly past the new end go; a chunk cut in the middle keeps only its head.

    Its `length` shrinks, so extending the file later reads zeros there, not
    the bytes that were cut off (the data path zero-fills past `length`).
    """
    kept: list[ChunkRef] = []
    for chunk in inode.chunks:
        start = chunk.index * inode.chunk_size
        if start >= size:
            continue
        if start + chunk.length > size:
            chunk = chunk.model_copy(
                update={"length": size - start, "coded_length": chunk.stored_length}
            )
        kept.append(chunk)
    return tuple(kept)


def _commit_chunks(ctx: _Ctx, op: CommitChunks) -> Reply:
    inode = ctx.inode(op.ino)
    if inode.kind is not Kind.FILE:
        raise FsError(errno.EISDIR if inode.is_dir else errno.EINVAL, "not a regular file")
    by_index = {c.index: c for c in inode.chunks}
    by_index.update({c.index: c for c in op.chunks})
    # Never keep data past the end: extending later must read zeros, not stale bytes.
    merged = inode.model_copy(update={"chunks": tuple(by_index[i] for i in sorted(by_index))})
    mtime = op.mtime_ns if op.mtime_ns is not None else ctx.now
    updated = inode.model_copy(
        update={
            "chunks": truncate_chunks(merged, op.size),
            "size": op.size,
            "mtime_ns": mtime,
            "ctime_ns": ctx.now,
        }
    )
    return Reply(inode=ctx.put(updated))


def _move_fragments(ctx: _Ctx, op: MoveFragments) -> Reply:
    """Compare-and-set per fragment; neither mtime nor ctime change (same bytes)."""
    inode = ctx.inode(op.ino)
    chunks = {c.index: c for c in inode.chunks}
    applied = 0
    for move in op.moves:
        chunk = chunks.get(move.index)
        if (
            chunk is None
            or chunk.chunk_id != move.chunk_id
            or move.fragment >= len(chunk.fragments)
            or chunk.fragments[move.fragment] != move.old_node
        ):
            continue
        holders = list(chunk.fragments)
        holders[move.fragment] = move.new_node
        chunks[move.index] = chunk.model_copy(update={"fragments": tuple(holders)})
        applied += 1
    if not applied:
        raise FsError(errno.ESTALE, f"inode {op.ino}: no fragment is where the move expects")
    updated = inode.model_copy(update={"chunks": tuple(chunks[i] for i in sorted(chunks))})
    return Reply(inode=ctx.put(updated))


def _setxattr(ctx: _Ctx, op: SetXattr) -> Reply:
    inode = ctx.inode(op.ino)
    _check_xattr_name(op.name)
    try:
        value = base64.b64decode(op.value_b64, validate=True)
    except binascii.Error:
        raise FsError(errno.EINVAL, "xattr value is not base64") from None
    if len(value) > MAX_XATTR_VALUE:
        raise FsError(errno.E2BIG, f"xattr value larger than {MAX_XATTR_VALUE} bytes")
    if op.flags & ~(XATTR_CREATE | XATTR_REPLACE):
        raise FsError(errno.EINVAL, f"invalid setxattr flags {op.flags}")
    exists = op.name in inode.xattrs
    if op.flags & XATTR_CREATE and exists:
        raise FsError(errno.EEXIST, f"xattr {op.name!r} exists")
    if op.flags & XATTR_REPLACE and not exists:
        raise FsError(errno.ENODATA, f"no xattr {op.name!r}")
    xattrs = {**inode.xattrs, op.name: op.value_b64}
    ctx.put(inode.model_copy(update={"xattrs": xattrs, "ctime_ns": ctx.now}))
    return Reply()


def _removexattr(ctx: _Ctx, op: RemoveXattr) -> Reply:
    inode = ctx.inode(op.ino)
    _check_xattr_name(op.name)
    if op.name not in inode.xattrs:
        raise FsError(errno.ENODATA, f"no xattr {op.name!r}")
    xattrs = {k: v for k, v in inode.xattrs.items() if k != op.name}
    ctx.put(inode.model_copy(update={"xattrs": xattrs, "ctime_ns": ctx.now}))
    return Reply()


def _check_xattr_name(name: str) -> None:
    if not name:
        raise FsError(errno.EINVAL, "empty xattr name")
    refuse_unsupported_xattr(name)
    if len(name.encode()) > 255:
        raise FsError(errno.ERANGE, "xattr name longer than 255 bytes")


def _dispatch(ctx: _Ctx, op: MutationOp) -> Reply:
    match op:
        case Create():
            return _create(ctx, op)
        case MkNod():
            return _mknod(ctx, op)
        case MkDir():
            return _mkdir(ctx, op)
        case Symlink():
            return _symlink(ctx, op)
        case Link():
            return _link(ctx, op)
        case Unlink():
            return _unlink(ctx, op)
        case RmDir():
            return _rmdir(ctx, op)
        case Rename():
            return _rename(ctx, op)
        case SetAttr():
            return _setattr(ctx, op)
        case CommitChunks():
            return _commit_chunks(ctx, op)
        case MoveFragments():
            return _move_fragments(ctx, op)
        case SetXattr():
            return _setxattr(ctx, op)
        case RemoveXattr():
            return _removexattr(ctx, op)
