"""A FUSE file system that answers a create's requests from a dict (bench/mount).

    python bench/null_fuse.py MOUNTPOINT

What the kernel and pyfuse3 cost per create before any file-system work: the same
pyfuse3 event loop, workers and mount options as the ClaudeFS mount, the same entry
and attribute timeouts, and handlers that do nothing but remember names. A create
through it is the kernel's lookup of the new name, the create, flush and release, as
through the real mount; bench/mount adds its CPU per create to the library's to get
the most any mount of this design could do on this machine.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import signal
import stat
import sys
import time
from collections.abc import Sequence

import pyfuse3
import pyfuse3.asyncio

from cfs.fuse.attrs import ATTR_TIMEOUT_S, BLOCK_SIZE, ENTRY_TIMEOUT_S
from cfs.fuse.mount import IDLE_WORKERS, MAX_WORKERS, mount_options


class NullOperations(pyfuse3.Operations):
    """Names and modes in memory; nothing else kept, nothing checked."""

    def __init__(self) -> None:
        super().__init__()
        self._names: dict[tuple[int, bytes], int] = {}
        self._modes = {pyfuse3.ROOT_INODE: stat.S_IFDIR | 0o755}
        self._inos = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._handles = itertools.count(1)

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.entry_timeout = ENTRY_TIMEOUT_S
        attr.attr_timeout = ATTR_TIMEOUT_S
        attr.st_mode = self._modes[ino]
        attr.st_nlink = 2 if stat.S_ISDIR(attr.st_mode) else 1
        attr.st_blksize = BLOCK_SIZE
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = time.time_ns()
        return attr

    def _new(self, parent: int, name: bytes, mode: int) -> int:
        ino = next(self._inos)
        self._names[parent, name] = ino
        self._modes[ino] = mode
        return ino

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        ino = self._names.get((parent_inode, name))
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attr(self._new(parent_inode, name, stat.S_IFDIR | 0o755))

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        ino = self._new(parent_inode, name, stat.S_IFREG | 0o644)
        return pyfuse3.FileInfo(fh=next(self._handles)), self._attr(ino)

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        return None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None


async def serve(mountpoint: str) -> None:
    pyfuse3.init(NullOperations(), mountpoint, mount_options())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, pyfuse3.terminate)
    try:
        await pyfuse3.main(min_tasks=IDLE_WORKERS, max_tasks=MAX_WORKERS)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    pyfuse3.asyncio.enable()
    asyncio.run(serve(sys.argv[1]))
