"""Translation between ClaudeFS records and what pyfuse3 hands to the kernel.

Two things live here: inode -> `EntryAttributes`, and the one place where
exceptions become errnos (`posix_errors`), so no handler can crash the mount.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from cfs_contracts.fs.records import Inode
from cfs_contracts.fs.rpc import FsError

log = logging.getLogger("cfs.fuse")

P = ParamSpec("P")
R = TypeVar("R")

# The namespace is shared by many clients: the kernel may trust what we told it
# only briefly. One second is what NFS's `actimeo` floor and most distributed
# FUSE file systems use; lower costs a metadata round trip per syscall.
ATTR_TIMEOUT_S = 1.0
ENTRY_TIMEOUT_S = 1.0
# The I/O size tools (cp, dd with no bs) use; FUSE sends at most 128 KiB per write
# by default, so larger hints buy nothing.
BLOCK_SIZE = 128 * 1024


def entry_attributes(inode: Inode) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = inode.ino
    attr.generation = 0
    attr.entry_timeout = ENTRY_TIMEOUT_S
    attr.attr_timeout = ATTR_TIMEOUT_S
    attr.st_mode = inode.st_mode
    attr.st_nlink = inode.nlink
    attr.st_uid = inode.uid
    attr.st_gid = inode.gid
    attr.st_rdev = inode.rdev
    attr.st_size = inode.size
    attr.st_blksize = BLOCK_SIZE
    attr.st_blocks = _blocks(inode)
    attr.st_atime_ns = inode.atime_ns
    attr.st_mtime_ns = inode.mtime_ns
    attr.st_ctime_ns = inode.ctime_ns
    return attr


def _blocks(inode: Inode) -> int:
    """512-byte blocks holding data: the committed chunks, so holes take no room (`du`
    of a file written at 1 TiB is its one chunk). A file with a size but no chunk yet
    (its data not committed) counts its size: tools such as tar take `st_blocks == 0`
    for a file that is all hole and would skip its data."""
    stored = min(sum(chunk.length for chunk in inode.chunks), inode.size)
    if stored == 0:
        stored = inode.size
    return (stored + 511) // 512


def posix_errors(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """FsError -> its errno; anything unexpected -> logged with the request, then EIO.

    pyfuse3 stops the whole mount when a handler raises anything but FUSEError,
    so this wraps every handler.
    """

    @functools.wraps(fn)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            if exc.errno == errno.EIO:  # unavailable leader, unreadable data: worth a line
                log.warning(
                    "fuse.io_error",
                    extra={"op": fn.__name__, "request": _describe(args), "error": exc.message},
                )
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:
            log.error(
                "fuse.unexpected_error",
                exc_info=True,
                extra={"op": fn.__name__, "request": _describe(args), "error": repr(exc)},
            )
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


def _describe(args: tuple[Any, ...]) -> list[str]:
    """The request's identifying arguments (inodes, names, offsets), never file data."""
    described: list[str] = []
    for arg in args[1:]:  # args[0] is the Operations instance
        if isinstance(arg, bool | int):
            described.append(str(arg))
        elif isinstance(arg, bytes) and len(arg) <= 255:
            described.append(arg.decode("utf-8", "backslashreplace"))
        elif isinstance(arg, bytes):
            described.append(f"<{len(arg)} bytes>")
    return described
