"""The FUSE request handlers: POSIX calls onto MetadataClient (names, attributes)
and FileStore (contents).

The mount keeps no namespace state of its own: every answer comes from the
metadata shards, and the kernel caches it for about a second (attrs.py), so
several mounts and `cfs fs` see one namespace. The only local state is the
table of open files: their buffered writes make them the freshest source of a
file's size until they are flushed.

Our inode numbers are the kernel's (ROOT_INO == pyfuse3.ROOT_INODE == 1), so
`forget` has nothing to drop.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import itertools
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import pyfuse3

from cfs.client.files import FileStore, OpenFile
from cfs.client.metadata import MetadataClient
from cfs.fuse.attrs import ATTR_TIMEOUT_S, BLOCK_SIZE, entry_attributes, posix_errors
from cfs.ids import new_id
from cfs.telemetry import root_span
from cfs_contracts.fs import rpc
from cfs_contracts.fs.records import MAX_NAME_BYTES, ROOT_INO, Inode, Kind
from cfs_contracts.fs.rpc import DirEntry, FsError, Reply

log = logging.getLogger("cfs.fuse")

assert ROOT_INO == pyfuse3.ROOT_INODE

# Kernel readdir buffers hold a few dozen entries; a small page keeps the
# per-entry getattr calls (readdirplus needs full attributes) close to what is used.
READDIR_PAGE = 64
READDIR_BATCH = 16

# statfs: the data path does not report cluster capacity yet, so `df` shows a
# nominal size with everything free (f_files and f_ffree are real).
NOMINAL_BLOCKS = 2**50 // 4096  # 1 PiB in 4 KiB blocks
NOMINAL_FREE_INODES = 2**40

_KIND_BY_IFMT = {
    stat.S_IFREG: Kind.FILE,
    stat.S_IFIFO: Kind.FIFO,
    stat.S_IFSOCK: Kind.SOCKET,
    stat.S_IFCHR: Kind.CHAR,
    stat.S_IFBLK: Kind.BLOCK,
}


def _name(raw: bytes) -> str:
    """Kernel names are bytes; ours are UTF-8 text (the metadata wire is JSON)."""
    if len(raw) > MAX_NAME_BYTES:
        raise FsError(errno.ENAMETOOLONG, f"name longer than {MAX_NAME_BYTES} bytes")
    return _text(raw, "name")


def _text(raw: bytes, what: str) -> str:
    """A name, symlink target or xattr name that is not UTF-8 is refused with EILSEQ
    (as file systems that store UTF-8 names do, e.g. ZFS utf8only), not carried as
    surrogates that no JSON encoder takes (that was an EIO and an error per lookup)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FsError(errno.EILSEQ, f"{what} is not valid UTF-8") from None


class ClaudeFsOperations(pyfuse3.Operations):
    """One instance per mount; every handler is wrapped by `posix_errors`."""

    supports_dot_lookup = True
    enable_writeback_cache = False  # close-to-open across clients needs writes to reach us
    enable_acl = False

    def __init__(self, meta: MetadataClient, store: FileStore, *, shard_count: int) -> None:
        super().__init__()
        self._seen = SeenInodes(ATTR_TIMEOUT_S)
        self.meta: MetadataClient
        self.store: FileStore
        self.serve_from(meta, store)
        self.shard_count = shard_count
        self._handles: dict[int, OpenFile] = {}  # fh -> open file (FileStore shares per ino)
        self._by_ino: dict[int, OpenFile] = {}
        self._open_count: dict[int, int] = {}  # ino -> file handles the kernel holds
        self._next_fh = itertools.count(1)

    def serve_from(self, meta: MetadataClient, store: FileStore) -> None:
        """Answer from `meta` and `store` (another site's after a failover): every change
        sent through `meta` refreshes the records seen, and none seen before is kept."""
        meta.changed = self._seen.changed
        self._seen.clear()
        self.meta, self.store = meta, store

    # -- attributes -----------------------------------------------------------------
    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """What the kernel caches for `inode`, kept as long here (`SeenInodes`)."""
        self._seen.seen(inode)
        return entry_attributes(inode)

    async def _inode(self, ino: int) -> Inode:
        """The inode as the metadata shard has it, with the size of buffered writes."""
        handle = self._open_file(ino)
        try:
            inode = await self.meta.getattr(ino)
        except FsError as exc:
            if exc.errno != errno.ENOENT or handle is None:
                raise
            # Unlinked while open: POSIX keeps it usable through its descriptors.
            return handle.inode.model_copy(update={"nlink": 0})
        if handle is None:
            return inode
        local = handle.inode
        return inode.model_copy(
            update={"size": local.size, "mtime_ns": max(inode.mtime_ns, local.mtime_ns)}
        )

    def _open_file(self, ino: int) -> OpenFile | None:
        return self._by_ino.get(ino)

    @posix_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        known = self._seen.directory(inode)
        if known is not None:
            return entry_attributes(known)
        return self._attrs(await self._inode(inode))

    @posix_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._attrs(await self._inode(parent_inode))
        if name == b"..":
            parent = await self.meta.getattr(parent_inode)
            return self._attrs(await self._inode(parent.parent or ROOT_INO))
        found = await self.meta.lookup(parent_inode, _name(name))
        return self._attrs(await self._with_local_size(found))

    async def _with_local_size(self, inode: Inode) -> Inode:
        handle = self._open_file(inode.ino)
        if handle is None:
            return inode
        return inode.model_copy(update={"size": handle.inode.size})

    @posix_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        changes: dict[str, object] = {}
        if fields.update_mode:
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["owner"] = attr.st_uid
        if fields.update_gid:
            changes["group"] = attr.st_gid
        # UTIME_NOW arrives as the current time already filled in by pyfuse3;
        # UTIME_OMIT leaves the update flag unset.
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        result: Inode | None = None
        if fields.update_size:
            result = await self._truncate(inode, attr.st_size, fh)
        if changes or result is None:  # nothing else: a ctime-only touch
            result = await self.meta.setattr(inode, **changes)
        return self._attrs(await self._with_local_size(result))

    async def _truncate(self, ino: int, size: int, fh: int | None) -> Inode:
        """Through the data path: it zero-fills the cut chunk so a later extension reads zeros."""
        handle = self._handles.get(fh) if fh is not None else self._open_file(ino)
        if handle is not None:
            return await handle.truncate(size)
        handle = await self.store.open(ino)  # EISDIR / EINVAL for anything but a file
        try:
            return await handle.truncate(size)
        finally:
            await self.store.release(handle)

    # -- names ------------------------------------------------------------------------
    @staticmethod
    def _owner(ctx: pyfuse3.RequestContext, mode: int) -> tuple[int, int, int]:
        """(uid, gid, permission bits) of a new inode: the caller's ids and umask (the
        shard applies a set-group-id directory's group, `decide.inherited`)."""
        return ctx.uid, ctx.gid, stat.S_IMODE(mode) & ~ctx.umask

    @posix_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        uid, gid, perms = self._owner(ctx, mode)
        created = await self.meta.mkdir(parent_inode, _name(name), perms, uid=uid, gid=gid)
        return self._attrs(created)

    @posix_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        kind = _KIND_BY_IFMT.get(stat.S_IFMT(mode))
        if kind is None:
            raise FsError(errno.EINVAL, f"mknod of file type {stat.S_IFMT(mode):o}")
        uid, gid, perms = self._owner(ctx, mode)
        if kind is Kind.FILE:
            created = await self.meta.create(parent_inode, _name(name), perms, uid=uid, gid=gid)
        else:
            created = await self.meta.mknod(
                parent_inode, _name(name), kind, perms, rdev=rdev, uid=uid, gid=gid
            )
        return self._attrs(created)

    @posix_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        uid, gid, _ = self._owner(ctx, 0o777)
        created = await self.meta.symlink(
            parent_inode, _name(name), _text(target, "symlink target"), uid=uid, gid=gid
        )
        return self._attrs(created)

    @posix_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(await self.meta.readlink(inode))

    @posix_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        linked = await self.meta.link(inode, new_parent_inode, _name(new_name))
        return self._attrs(await self._with_local_size(linked))

    @posix_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.meta.unlink(parent_inode, _name(name))

    @posix_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.meta.rmdir(parent_inode, _name(name))

    @posix_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        ours = 0
        if flags & pyfuse3.RENAME_NOREPLACE:
            ours |= rpc.RENAME_NOREPLACE
        if flags & pyfuse3.RENAME_EXCHANGE:
            ours |= rpc.RENAME_EXCHANGE
        if flags & ~(pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE):
            raise FsError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
        await self.meta.rename(
            parent_inode_old, _name(name_old), parent_inode_new, _name(name_new), ours
        )

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Nothing to drop: no per-inode state outlives a request (open files are per fh)."""

    # -- directories --------------------------------------------------------------------
    @posix_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # Listing is stateless (resumed from cookies), so the handle is the inode itself.
        return inode

    @posix_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries in cookie order from `start_id` (0 or a cookie handed out before).

        Cookies are hashes of names, so they stay valid while entries come and go:
        nothing is skipped or listed twice when the kernel resumes a listing. Each
        page comes with the attributes the directory's shard holds (readdirplus, so
        `ls -l` needs no round trip per file); only subdirectories placed on other
        shards are asked for one by one.
        """
        cookie = start_id
        while True:
            reply = await self.meta.call(
                rpc.ReadDir(ino=fh, cookie=cookie, limit=READDIR_PAGE, plus=True)
            )
            entries = reply.entries
            known = {inode.ino: inode for inode in reply.inodes}
            for first in range(0, len(entries), READDIR_BATCH):
                batch = entries[first : first + READDIR_BATCH]
                found = await asyncio.gather(*(self._listed(entry, known) for entry in batch))
                for entry, inode in zip(batch, found, strict=True):
                    if inode is None:
                        continue  # removed since the page was read
                    attr = self._attrs(inode)
                    if not pyfuse3.readdir_reply(
                        token, os.fsencode(entry.name), attr, entry.cookie
                    ):
                        return  # kernel buffer full; it resumes from the last cookie
            if not reply.more or not entries:
                return
            cookie = entries[-1].cookie

    async def _listed(self, entry: DirEntry, known: dict[int, Inode]) -> Inode | None:
        """readdirplus hands the kernel full attributes for each entry."""
        inode = known.get(entry.ino)
        if inode is None:
            try:
                inode = await self.meta.getattr(entry.ino)
            except FsError as exc:
                if exc.errno == errno.ENOENT:
                    return None
                raise
        return await self._with_local_size(inode)

    @posix_errors
    async def releasedir(self, fh: int) -> None:
        return None

    @posix_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None  # every metadata change is durable (R3 journal) when acknowledged

    @posix_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        totals = await self.meta.statfs(self.shard_count)
        st = pyfuse3.StatvfsData()
        st.f_bsize = BLOCK_SIZE
        st.f_frsize = 4096
        st.f_blocks = NOMINAL_BLOCKS
        st.f_bfree = NOMINAL_BLOCKS
        st.f_bavail = NOMINAL_BLOCKS
        st.f_files = totals["inodes"] + NOMINAL_FREE_INODES
        st.f_ffree = NOMINAL_FREE_INODES
        st.f_favail = NOMINAL_FREE_INODES
        st.f_namemax = MAX_NAME_BYTES
        return st

    # -- files --------------------------------------------------------------------------
    def _register(self, handle: OpenFile) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = handle
        self._by_ino[handle.ino] = handle
        self._open_count[handle.ino] = self._open_count.get(handle.ino, 0) + 1
        return fh

    def _handle(self, fh: int) -> OpenFile:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF, f"no open file with handle {fh}")
        return handle

    @posix_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        handle = await self.store.open(inode, truncate=bool(flags & os.O_TRUNC))
        return pyfuse3.FileInfo(fh=self._register(handle))

    @posix_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        with root_span("fuse create"):
            uid, gid, perms = self._owner(ctx, mode)
            created = await self.meta.create(
                parent_inode,
                _name(name),
                perms,
                uid=uid,
                gid=gid,
                exclusive=bool(flags & os.O_EXCL),
            )
            # Another client may have created it first (no O_EXCL): then O_TRUNC applies.
            handle = await self.store.open(
                created.ino, truncate=bool(flags & os.O_TRUNC), fresh=created
            )
        fh = self._register(handle)
        return pyfuse3.FileInfo(fh=fh), self._attrs(handle.inode)

    @posix_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._handle(fh).read(off, size)

    @posix_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        # One span per write(2): what it uploads (a full chunk) is part of its trace.
        with root_span("fuse write"):
            return await self._handle(fh).write(off, buf)

    @posix_errors
    async def flush(self, fh: int) -> None:
        """Every close(2): store what is buffered, so the next open anywhere sees it."""
        with root_span("fuse flush"):
            await self._flush(self._handle(fh))

    @posix_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        with root_span("fuse fsync"):
            await self._flush(self._handle(fh))

    async def _flush(self, handle: OpenFile) -> None:
        try:
            await handle.flush()
        except FsError as exc:
            if exc.errno != errno.ENOENT or not await self._unlinked(handle.ino):
                raise
            # Unlinked while open: nobody can ever read what it still buffers.

    async def _unlinked(self, ino: int) -> bool:
        try:
            await self.meta.getattr(ino)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return True
            raise
        return False

    @posix_errors
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        remaining = self._open_count.get(handle.ino, 1) - 1
        if remaining:
            self._open_count[handle.ino] = remaining
        else:
            self._open_count.pop(handle.ino, None)
            self._by_ino.pop(handle.ino, None)
        # The kernel ignores release errors (close(2) already returned): log them.
        try:
            await self.store.release(handle)
        except FsError as exc:
            if exc.errno == errno.ENOENT and await self._unlinked(handle.ino):
                return  # unlinked while open: its buffered data goes with it
            log.error(
                "fuse.release_failed",
                extra={"ino": handle.ino, "errno": exc.errno, "error": exc.message},
            )

    # -- extended attributes ----------------------------------------------------------------
    @posix_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        # XATTR_CREATE / XATTR_REPLACE are checked by pyfuse3 before it calls us.
        op = rpc.SetXattr(
            op_id=new_id(),
            ino=inode,
            name=_text(name, "xattr name"),
            value_b64=base64.b64encode(value).decode(),
        )
        await self.meta.call(op)  # the records it touched are refreshed (`SeenInodes`)

    @posix_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        key = _text(name, "xattr name")
        rpc.refuse_unsupported_xattr(key)  # no round trip: `ls -l` asks of every file
        known = self._seen.xattrs(inode)
        if known is not None:
            if key not in known:
                raise FsError(errno.ENODATA, f"no xattr {key!r}")
            return base64.b64decode(known[key])
        reply = await self.meta.call(rpc.GetXattr(ino=inode, name=key))
        return base64.b64decode(reply.value_b64 or "")

    @posix_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        known = self._seen.xattrs(inode)
        if known is not None:
            return [os.fsencode(name) for name in rpc.listed_xattrs(known)]
        reply = await self.meta.call(rpc.ListXattr(ino=inode))
        return [os.fsencode(name) for name in reply.names]

    @posix_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.meta.call(
            rpc.RemoveXattr(op_id=new_id(), ino=inode, name=_text(name, "xattr name"))
        )


class SeenInodes:
    """The last record seen of each inode, for `ttl_s` (the kernel's attribute timeout:
    no staler than what the kernel itself caches). Its xattrs answer getxattr and
    listxattr (`ls -l` asks two per file); a directory answers getattr, which the
    kernel sends after each create in it (it invalidates the parent's attributes) -
    the reply to that create carried the directory as it became. Every change this
    mount sends refreshes or drops the records it touched (`changed`), so the mount
    never answers from a record older than its own change. Bounded, oldest out."""

    def __init__(self, ttl_s: float, limit: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self._known: OrderedDict[int, tuple[float, Inode]] = OrderedDict()

    def seen(self, inode: Inode) -> None:
        self._known[inode.ino] = (time.monotonic() + self.ttl_s, inode)
        self._known.move_to_end(inode.ino)
        while len(self._known) > self.limit:
            self._known.popitem(last=False)

    def _fresh(self, ino: int) -> Inode | None:
        entry = self._known.get(ino)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def xattrs(self, ino: int) -> Mapping[str, str] | None:
        """name -> base64 value, or None when not known fresh (ask the shard)."""
        inode = self._fresh(ino)
        return None if inode is None else inode.xattrs

    def directory(self, ino: int) -> Inode | None:
        inode = self._fresh(ino)
        return inode if inode is not None and inode.is_dir else None

    def forget(self, ino: int) -> None:
        self._known.pop(ino, None)

    def clear(self) -> None:
        self._known.clear()

    def changed(self, op: rpc.MutationOp | rpc.TxOp, reply: Reply | None) -> None:
        """After a change (reply None: it failed or its outcome is unknown)."""
        fresh = {i.ino: i for i in reply.inodes} if reply is not None else {}
        if reply is not None and reply.inode is not None:
            fresh[reply.inode.ino] = reply.inode
        for field in ("parent", "new_parent", "ino"):
            ino = getattr(op, field, None)
            if isinstance(ino, int) and ino not in fresh:
                self.forget(ino)
        for inode in fresh.values():
            self.seen(inode)
