"""The mount's xattr cache: answers only while fresh, forgets on this mount's changes."""

from __future__ import annotations

import time

from cfs.fuse.operations import XattrCache
from cfs_contracts.fs.records import Inode, Kind


def inode(ino: int, **xattrs: str) -> Inode:
    return Inode(ino=ino, kind=Kind.FILE, mode=0o644, uid=0, gid=0, nlink=1, size=0,
                 atime_ns=0, mtime_ns=0, ctime_ns=0, xattrs=xattrs)  # fmt: skip


def test_fresh_entries_answer_stale_and_forgotten_ones_do_not() -> None:
    cache = XattrCache(ttl_s=0.2, limit=2)
    assert cache.get(5) is None  # never seen: ask the shard
    cache.seen(inode(5, **{"user.a": "eA=="}))
    cache.seen(inode(6))
    assert cache.get(5) == {"user.a": "eA=="}
    assert cache.get(6) == {}  # known to have none: ENODATA without a round trip
    cache.forget(5)
    assert cache.get(5) is None
    cache.seen(inode(7))
    cache.seen(inode(8))  # over the limit: the oldest goes
    assert cache.get(6) is None and cache.get(8) == {}
    time.sleep(0.25)
    assert cache.get(8) is None  # past the kernel's attribute timeout
