"""Read-only operations, answered from the committed projection."""

from __future__ import annotations

import errno

from cfs_contracts.fs.records import Inode, Kind, shard_of
from cfs_contracts.fs.rpc import (
    DirEntry,
    FsError,
    GetAttr,
    GetXattr,
    ListXattr,
    Lookup,
    ReadDir,
    ReadLink,
    ReadOp,
    Reply,
    StatFs,
    TxRead,
)
from cfs_metadata.state import ShardView
from cfs_metadata.txn import read_records


def read(view: ShardView, op: ReadOp) -> Reply:
    """Answer a read; raises FsError."""
    match op:
        case Lookup():
            entry = view.dentry(op.parent, op.name)
            if entry is None:
                _inode(view, op.parent, want_dir=True)
                raise FsError(errno.ENOENT, f"no {op.name!r} in directory {op.parent}")
            if shard_of(entry.ino) != view.shard:
                # The inode lives in another shard: the client asks that shard for it.
                found = DirEntry(
                    cookie=entry.cookie, name=entry.name, ino=entry.ino, kind=entry.kind
                )
                return Reply(entries=(found,))
            return Reply(inode=_inode(view, entry.ino))
        case GetAttr():
            return Reply(inode=_inode(view, op.ino))
        case ReadLink():
            inode = _inode(view, op.ino)
            if inode.kind is not Kind.SYMLINK:
                raise FsError(errno.EINVAL, f"inode {op.ino} is not a symbolic link")
            return Reply(target=inode.target)
        case ReadDir():
            _inode(view, op.ino, want_dir=True)
            entries: list[DirEntry] = []
            more = False
            for dentry in view.dentries(op.ino, op.cookie):
                if len(entries) == op.limit:
                    more = True
                    break
                entries.append(
                    DirEntry(
                        cookie=dentry.cookie, name=dentry.name, ino=dentry.ino, kind=dentry.kind
                    )
                )
            return Reply(entries=tuple(entries), more=more)
        case GetXattr():
            inode = _inode(view, op.ino)
            if op.name not in inode.xattrs:
                raise FsError(errno.ENODATA, f"no xattr {op.name!r}")
            return Reply(value_b64=inode.xattrs[op.name])
        case ListXattr():
            return Reply(names=tuple(sorted(_inode(view, op.ino).xattrs)))
        case StatFs():
            return Reply(stats={"shard": view.shard, "inodes": view.inode_count()})
        case TxRead():
            return Reply(records=read_records(view, op.keys))


def _inode(view: ShardView, ino: int, *, want_dir: bool = False) -> Inode:
    inode = view.inode(ino)
    if inode is None:
        raise FsError(errno.ENOENT, f"inode {ino} does not exist")
    if want_dir and not inode.is_dir:
        raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
    return inode
