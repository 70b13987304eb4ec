"""A deliberately simple in-memory POSIX file system: the oracle for the metadata state machine.

Written from POSIX / Linux semantics (fs/namei.c, rename(2), link(2), setxattr(2), ...), not
from `cfs_metadata.decide`. Inode numbers are not chosen here: every creating operation asks
`alloc()` for the number the system under test handed out, after all checks passed and before
anything changes, so a failing operation never touches the model.

An operation either returns or raises `ModelError(*codes)`. When several errors apply at once
and POSIX leaves their order open (e.g. a bad parent *and* a bad name), `codes` holds every
acceptable errno; otherwise it holds exactly one.

Link counts are not stored: a directory has 2 + its subdirectories, anything else one link per
name. Expected mtimes and ctimes are stored where POSIX fixes them, `None` where it does not.
"""

from __future__ import annotations

import base64
import binascii
import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from cfs_contracts.fs.records import ROOT_INO, Kind

NAME_MAX = 255  # bytes per name
PATH_MAX = 4096  # bytes including the terminating NUL: a symlink target holds at most 4095
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 64 * 1024

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2

Alloc = Callable[[], int]


class ModelError(Exception):
    """The operation fails; any errno in `codes` is a correct answer."""

    def __init__(self, *codes: int) -> None:
        super().__init__(", ".join(errno.errorcode.get(c, str(c)) for c in sorted(set(codes))))
        self.codes = frozenset(codes)


@dataclass
class Node:
    ino: int
    kind: Kind
    mode: int
    uid: int
    gid: int
    size: int = 0
    rdev: int = 0
    target: str | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    entries: dict[str, int] = field(default_factory=dict)  # directories: name -> ino
    parent: int = 0  # directories: the directory holding this one (root: itself)
    mtime: int | None = None  # expected mtime_ns; None where POSIX leaves it open
    ctime: int | None = None  # expected ctime_ns; likewise

    def modified(self, now: int) -> None:
        """Contents changed (data, or a directory's entries): mtime and ctime."""
        self.mtime = self.ctime = now

    def changed(self, now: int) -> None:
        """Status changed (attributes, link count, xattrs): ctime only."""
        self.ctime = now

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR


def name_errors(name: str) -> list[int]:
    """Why `name` cannot be a directory entry (empty list: it can)."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return [errno.EINVAL]
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return [errno.ENAMETOOLONG]
    return []


def existing_name_errors(name: str) -> list[int]:
    """A name looked up to act on what it names: no entry has a bad name, so ENOENT is fair too.

    Linux: "" is ENOENT; "." and ".." are EINVAL/ENOTEMPTY for rmdir, EISDIR for unlink,
    EBUSY for rename.
    """
    errors = name_errors(name)
    if name in (".", ".."):
        errors += [errno.EBUSY, errno.ENOTEMPTY, errno.EISDIR]
    return [*errors, errno.ENOENT] if errors else []


def _fail(*groups: list[int]) -> None:
    """Raise with every errno of the independent checks that failed, if any did."""
    codes = [code for group in groups for code in group]
    if codes:
        raise ModelError(*codes)


class ModelFS:
    def __init__(self, now: int) -> None:
        root = Node(ROOT_INO, Kind.DIR, 0o755, 0, 0, parent=ROOT_INO, mtime=now, ctime=now)
        self.nodes: dict[int, Node] = {ROOT_INO: root}
        self.ever: set[int] = {ROOT_INO}  # every inode number ever handed out

    # -- queries ----------------------------------------------------------------------
    def node(self, ino: int) -> Node:
        found = self.nodes.get(ino)
        if found is None:
            raise ModelError(errno.ENOENT)
        return found

    def dirs(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.is_dir]

    def names_of(self, ino: int) -> int:
        return sum(1 for d in self.dirs() for child in d.entries.values() if child == ino)

    def nlink(self, ino: int) -> int:
        node = self.nodes[ino]
        if node.is_dir:
            return 2 + sum(1 for c in node.entries.values() if self.nodes[c].is_dir)
        return self.names_of(ino)

    def in_subtree(self, ino: int, top: int) -> bool:
        """Is directory `ino` equal to or below directory `top`?"""
        seen: set[int] = set()
        while ino not in seen:
            if ino == top:
                return True
            seen.add(ino)
            ino = self.nodes[ino].parent
        return False

    def _dir_errors(self, ino: int) -> list[int]:
        node = self.nodes.get(ino)
        if node is None:
            return [errno.ENOENT]
        return [] if node.is_dir else [errno.ENOTDIR]

    def _ino_errors(self, ino: int) -> list[int]:
        return [] if ino in self.nodes else [errno.ENOENT]

    # -- creating ---------------------------------------------------------------------
    def _add(self, parent: int, name: str, node: Node, now: int) -> int:
        assert node.ino not in self.ever, f"inode number {node.ino} handed out twice"
        self.ever.add(node.ino)
        directory = self.nodes[parent]
        if directory.mode & 0o2000:  # set-group-id directory: its group, and the bit for dirs
            node.gid = directory.gid
            if node.is_dir:
                node.mode |= 0o2000
        self.nodes[node.ino] = node
        directory = self.nodes[parent]
        directory.entries[name] = node.ino
        directory.modified(now)
        node.modified(now)
        return node.ino

    def _free_name(self, parent: int, name: str, *more: list[int]) -> None:
        _fail(self._dir_errors(parent), name_errors(name), *more)
        if name in self.nodes[parent].entries:
            raise ModelError(errno.EEXIST)

    def create(
        self,
        parent: int,
        name: str,
        mode: int,
        uid: int,
        gid: int,
        exclusive: bool,
        now: int,
        alloc: Alloc,
    ) -> int:
        """open(O_CREAT [| O_EXCL]); returns the inode opened or created."""
        _fail(self._dir_errors(parent), name_errors(name))
        existing = self.nodes[parent].entries.get(name)
        if existing is not None:
            if exclusive:
                raise ModelError(errno.EEXIST)
            if self.nodes[existing].is_dir:
                raise ModelError(errno.EISDIR)
            return existing  # opened as is: nothing changes
        node = Node(alloc(), Kind.FILE, mode & 0o7777, uid, gid)
        return self._add(parent, name, node, now)

    def mknod(
        self,
        parent: int,
        name: str,
        kind: Kind,
        mode: int,
        rdev: int,
        uid: int,
        gid: int,
        now: int,
        alloc: Alloc,
    ) -> int:
        # may_mknod(): directories EPERM, anything not a node type EINVAL (checked first);
        # the system says EINVAL for a directory too: fair, FUSE never sends one
        bad_kind = {Kind.DIR: [errno.EPERM, errno.EINVAL], Kind.SYMLINK: [errno.EINVAL]}
        self._free_name(parent, name, bad_kind.get(kind, []))
        keep_rdev = rdev if kind in (Kind.CHAR, Kind.BLOCK) else 0
        node = Node(alloc(), kind, mode & 0o7777, uid, gid, rdev=keep_rdev)
        return self._add(parent, name, node, now)

    def mkdir(
        self, parent: int, name: str, mode: int, uid: int, gid: int, now: int, alloc: Alloc
    ) -> int:
        self._free_name(parent, name)
        node = Node(alloc(), Kind.DIR, mode & 0o7777, uid, gid, parent=parent)
        return self._add(parent, name, node, now)

    def symlink(
        self, parent: int, name: str, target: str, uid: int, gid: int, now: int, alloc: Alloc
    ) -> int:
        raw = target.encode("utf-8", "surrogateescape")
        bad_target = (
            [errno.ENOENT] if not raw else [errno.ENAMETOOLONG] if len(raw) >= PATH_MAX else []
        )
        self._free_name(parent, name, bad_target)
        node = Node(alloc(), Kind.SYMLINK, 0o777, uid, gid, size=len(raw), target=target)
        return self._add(parent, name, node, now)

    def link(self, ino: int, new_parent: int, new_name: str, now: int) -> int:
        # Linux resolves both paths and finds an existing new name (EEXIST) before vfs_link
        # refuses a directory (EPERM); refusing the directory first is as fair
        source = self.nodes.get(ino)
        is_dir = source is not None and source.is_dir
        refuse_dir = [errno.EPERM] if is_dir else []
        _fail(
            self._ino_errors(ino), self._dir_errors(new_parent), name_errors(new_name), refuse_dir
        )
        if new_name in self.nodes[new_parent].entries:
            raise ModelError(errno.EEXIST, *refuse_dir)
        directory = self.nodes[new_parent]
        directory.entries[new_name] = ino
        directory.modified(now)
        self.nodes[ino].changed(now)  # one more link
        return ino

    # -- removing ---------------------------------------------------------------------
    def _forget_if_unnamed(self, ino: int) -> None:
        if ino != ROOT_INO and self.names_of(ino) == 0:
            del self.nodes[ino]

    def _existing(self, parent: int, name: str) -> Node:
        _fail(self._dir_errors(parent), existing_name_errors(name))
        child = self.nodes[parent].entries.get(name)
        if child is None:
            raise ModelError(errno.ENOENT)
        return self.nodes[child]

    def unlink(self, parent: int, name: str, now: int) -> None:
        victim = self._existing(parent, name)
        if victim.is_dir:
            raise ModelError(errno.EISDIR)  # Linux; POSIX also allows EPERM
        directory = self.nodes[parent]
        del directory.entries[name]
        directory.modified(now)
        victim.changed(now)  # one link fewer
        self._forget_if_unnamed(victim.ino)

    def rmdir(self, parent: int, name: str, now: int) -> None:
        victim = self._existing(parent, name)
        if not victim.is_dir:
            raise ModelError(errno.ENOTDIR)
        if victim.entries:
            raise ModelError(errno.ENOTEMPTY)
        directory = self.nodes[parent]
        del directory.entries[name]
        directory.modified(now)
        del self.nodes[victim.ino]

    # -- rename -----------------------------------------------------------------------
    def rename(
        self, parent: int, name: str, new_parent: int, new_name: str, flags: int, now: int
    ) -> None:
        """renameat2(2), following the order of checks of Linux's do_renameat2/vfs_rename."""
        known = RENAME_NOREPLACE | RENAME_EXCHANGE
        bad_flags = [errno.EINVAL] if flags & ~known or flags == known else []
        _fail(
            bad_flags,
            self._dir_errors(parent),
            self._dir_errors(new_parent),
            existing_name_errors(name),
            name_errors(new_name),
        )
        exchange = bool(flags & RENAME_EXCHANGE)
        src_dir, dst_dir = self.nodes[parent], self.nodes[new_parent]
        if name not in src_dir.entries:
            raise ModelError(errno.ENOENT)
        src = self.nodes[src_dir.entries[name]]
        dst_ino = dst_dir.entries.get(new_name)
        dst = None if dst_ino is None else self.nodes[dst_ino]
        if flags & RENAME_NOREPLACE and dst is not None:
            raise ModelError(errno.EEXIST)
        if exchange and dst is None:
            raise ModelError(errno.ENOENT)
        # the source must not be an ancestor of the target
        if src.is_dir and self.in_subtree(new_parent, src.ino):
            raise ModelError(errno.EINVAL)
        # the target must not be an ancestor of the source
        if dst is not None and dst.is_dir and self.in_subtree(parent, dst.ino):
            if exchange:
                raise ModelError(errno.EINVAL)
            # Linux says ENOTEMPTY even for a non-directory source; EISDIR is as fair
            raise ModelError(errno.ENOTEMPTY, *([] if src.is_dir else [errno.EISDIR]))
        if dst is not None and dst.ino == src.ino:
            return  # two names of one inode (or one name twice): do nothing, succeed
        if dst is not None and not exchange:
            if src.is_dir and not dst.is_dir:
                raise ModelError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise ModelError(errno.EISDIR)
            if dst.is_dir and dst.entries:
                raise ModelError(errno.ENOTEMPTY)

        # POSIX leaves open whether a renamed inode's ctime changes (Linux: it does), and
        # file systems differ on the mtime of a directory whose ".." now points elsewhere
        moved = [src, dst] if exchange else [src]
        if exchange:
            assert dst is not None
            src_dir.entries[name] = dst.ino
            dst_dir.entries[new_name] = src.ino
            if dst.is_dir:
                dst.parent = parent
        else:
            del src_dir.entries[name]
            dst_dir.entries[new_name] = src.ino
            if dst is not None:
                if dst.is_dir:
                    del self.nodes[dst.ino]
                else:
                    dst.changed(now)  # replaced: one link fewer
                    self._forget_if_unnamed(dst.ino)
        if src.is_dir:
            src.parent = new_parent
        for node in moved:
            if node is not None:
                node.ctime = None
                if node.is_dir and parent != new_parent:
                    node.mtime = None
        src_dir.modified(now)
        dst_dir.modified(now)

    # -- attributes -------------------------------------------------------------------
    def setattr(
        self,
        ino: int,
        now: int,
        *,
        mode: int | None = None,
        owner: int | None = None,
        group: int | None = None,
        size: int | None = None,
        mtime_now: bool = False,
    ) -> None:
        node = self.node(ino)
        if size is not None:
            if node.is_dir:
                raise ModelError(errno.EISDIR)
            if node.kind is not Kind.FILE:
                raise ModelError(errno.EINVAL)
        if mode is not None:
            node.mode = mode & 0o7777
        if owner is not None:
            node.uid = owner
        if group is not None:
            node.gid = group
        if size is not None:
            if size != node.size:
                node.modified(now)
            else:  # POSIX marks the times only when the size changes; Linux always does
                node.mtime = node.ctime = None
            node.size = size
        if mode is not None or owner is not None or group is not None or mtime_now:
            node.changed(now)
        elif size is None:
            node.ctime = None  # a setattr that sets nothing
        if mtime_now:
            node.mtime = now

    def commit_chunks(self, ino: int, size: int, now: int) -> None:
        """The data path's write commit (not POSIX): a regular file gets its new size."""
        node = self.node(ino)
        if node.is_dir:
            raise ModelError(errno.EISDIR, errno.EINVAL)
        if node.kind is not Kind.FILE:
            raise ModelError(errno.EINVAL)
        node.size = size
        node.mtime = None  # taken from the request or the clock
        node.changed(now)

    # -- extended attributes ----------------------------------------------------------
    @staticmethod
    def _xattr_name_errors(name: str) -> list[int]:
        if not name:
            return [errno.ERANGE, errno.EINVAL]  # Linux: ERANGE
        if len(name.encode("utf-8", "surrogateescape")) > XATTR_NAME_MAX:
            return [errno.ERANGE]
        return []

    def setxattr(self, ino: int, name: str, value_b64: str, flags: int, now: int) -> None:
        try:
            value = base64.b64decode(value_b64, validate=True)
            bad_value = [errno.E2BIG] if len(value) > XATTR_SIZE_MAX else []
        except (binascii.Error, ValueError):
            value, bad_value = b"", [errno.EINVAL]
        bad_flags = [errno.EINVAL] if flags & ~(XATTR_CREATE | XATTR_REPLACE) else []
        _fail(self._ino_errors(ino), self._xattr_name_errors(name), bad_value, bad_flags)
        node = self.nodes[ino]
        both = [errno.EINVAL] if flags == XATTR_CREATE | XATTR_REPLACE else []
        if flags & XATTR_CREATE and name in node.xattrs:
            raise ModelError(errno.EEXIST, *both)
        if flags & XATTR_REPLACE and name not in node.xattrs:
            raise ModelError(errno.ENODATA, *both)
        node.xattrs[name] = value
        node.changed(now)

    def removexattr(self, ino: int, name: str, now: int) -> None:
        _fail(self._ino_errors(ino), self._xattr_name_errors(name))
        node = self.nodes[ino]
        if name not in node.xattrs:
            raise ModelError(errno.ENODATA)
        del node.xattrs[name]
        node.changed(now)

    # -- reads ------------------------------------------------------------------------
    def lookup(self, parent: int, name: str) -> int:
        _fail(self._dir_errors(parent))
        child = self.nodes[parent].entries.get(name)
        if child is None:
            # no entry can have a bad name: "not found" is as right as "bad name"
            raise ModelError(*existing_name_errors(name) or [errno.ENOENT])
        return child

    def readlink(self, ino: int) -> str:
        node = self.node(ino)
        if node.kind is not Kind.SYMLINK or node.target is None:
            raise ModelError(errno.EINVAL)
        return node.target

    def listdir(self, ino: int) -> dict[str, int]:
        _fail(self._dir_errors(ino))
        return dict(self.nodes[ino].entries)

    def getxattr(self, ino: int, name: str) -> bytes:
        node = self.node(ino)
        if name not in node.xattrs:
            raise ModelError(errno.ENODATA)
        return node.xattrs[name]

    def listxattr(self, ino: int) -> list[str]:
        return sorted(self.node(ino).xattrs)
