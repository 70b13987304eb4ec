"""Read-only operations, answered from the committed projection."""

from __future__ import annotations

import errno

from cfs_contracts.fs.records import Inode, Kind, shard_of
from cfs_contracts.fs.rpc import (
    DirEntry,
    FindNames,
    FsError,
    GetAttr,
    GetXattr,
    ListXattr,
    Lookup,
    ReadDir,
    ReadLink,
    ReadOp,
    RemoteRecord,
    Reply,
    ScanChunks,
    StatFs,
    TxRead,
    listed_xattrs,
    refuse_unsupported_xattr,
)
from cfs_metadata.state import Scannable, ShardView
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
            attrs: list[Inode] = []
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
                if op.plus and shard_of(dentry.ino) == view.shard:
                    held = view.inode(dentry.ino)
                    if held is not None:
                        attrs.append(
                            held.model_copy(update={"chunks": ()}) if held.chunks else held
                        )
            return Reply(entries=tuple(entries), more=more, inodes=tuple(attrs))
        case GetXattr():
            refuse_unsupported_xattr(op.name)
            inode = _inode(view, op.ino)
            if op.name not in inode.xattrs:
                raise FsError(errno.ENODATA, f"no xattr {op.name!r}")
            return Reply(value_b64=inode.xattrs[op.name])
        case ListXattr():
            return Reply(names=listed_xattrs(_inode(view, op.ino).xattrs))
        case StatFs():
            return Reply(stats={"shard": view.shard, "inodes": view.inode_count()})
        case TxRead():
            return Reply(records=read_records(view, op.keys))
        case ScanChunks() | FindNames():
            raise TypeError("whole-shard scans are answered by `scan`, from the projection")


SCAN_BUDGET = 5000  # inodes looked at per scan_chunks call, so one call stays short


def scan(view: Scannable, op: ScanChunks | FindNames) -> Reply:
    """Whole-shard scans (repair, lost-data reports); raises FsError."""
    if isinstance(op, FindNames):
        found = tuple(
            RemoteRecord(key=f"d:{d.parent}:{d.name}", dentry=d)
            for d in view.scan_dentries()
            if d.ino == op.ino
        )
        return Reply(records=found)
    matches: list[Inode] = []
    cursor = 0
    for looked, inode in enumerate(view.scan_inodes(op.after_ino), start=1):
        cursor = inode.ino
        if inode.chunks and (
            not op.node or any(op.node in chunk.fragments for chunk in inode.chunks)
        ):
            matches.append(inode)
        if len(matches) == op.limit or looked == SCAN_BUDGET:
            return Reply(inodes=tuple(matches), cursor=cursor)
    return Reply(inodes=tuple(matches), cursor=0)


def _inode(view: ShardView, ino: int, *, want_dir: bool = False) -> Inode:
    inode = view.inode(ino)
    if inode is None:
        raise FsError(errno.ENOENT, f"inode {ino} does not exist")
    if want_dir and not inode.is_dir:
        raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
    return inode
