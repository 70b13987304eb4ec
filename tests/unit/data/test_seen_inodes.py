"""The mount's records seen: answer only while fresh, never older than its own changes."""

from __future__ import annotations

import time
from types import SimpleNamespace

from cfs.fuse.operations import ClaudeFsOperations, SeenInodes
from cfs_contracts.fs import rpc
from cfs_contracts.fs.records import Inode, Kind
from cfs_contracts.fs.rpc import Reply


def inode(ino: int, kind: Kind = Kind.FILE, mtime: int = 0, **xattrs: str) -> Inode:
    return Inode(ino=ino, kind=kind, mode=0o755, uid=0, gid=0, nlink=2 if kind is Kind.DIR
                 else 1, size=0, atime_ns=0, mtime_ns=mtime, ctime_ns=0, xattrs=xattrs)  # fmt: skip


def test_fresh_entries_answer_stale_and_forgotten_ones_do_not() -> None:
    cache = SeenInodes(ttl_s=0.2, limit=2)
    assert cache.xattrs(5) is None  # never seen: ask the shard
    cache.seen(inode(5, **{"user.a": "eA=="}))
    cache.seen(inode(6))
    assert cache.xattrs(5) == {"user.a": "eA=="}
    assert cache.xattrs(6) == {}  # known to have none: ENODATA without a round trip
    assert cache.directory(5) is None  # only directories answer getattr
    cache.forget(5)
    assert cache.xattrs(5) is None
    cache.seen(inode(7))
    cache.seen(inode(8))  # over the limit: the oldest goes
    assert cache.xattrs(6) is None and cache.xattrs(8) == {}
    time.sleep(0.25)
    assert cache.xattrs(8) is None  # past the kernel's attribute timeout


def test_a_change_refreshes_what_its_reply_carries_and_drops_the_rest() -> None:
    cache = SeenInodes(ttl_s=5.0)
    cache.seen(inode(10, Kind.DIR))
    cache.seen(inode(20, Kind.DIR))
    create = rpc.Create(op_id="x", parent=10, name="f")
    cache.changed(create, Reply(inode=inode(11), inodes=(inode(10, Kind.DIR, mtime=7),)))
    found = cache.directory(10)
    assert found is not None and found.mtime_ns == 7  # the parent as the create left it
    rename = rpc.Rename(op_id="y", parent=10, name="f", new_parent=20, new_name="g")
    cache.changed(rename, Reply())  # a reply without the directories (cross-shard)
    assert cache.directory(10) is None and cache.directory(20) is None
    cache.seen(inode(10, Kind.DIR))
    cache.changed(rpc.RmDir(op_id="z", parent=10, name="d"), None)  # failed: unknown
    assert cache.directory(10) is None


def test_a_mount_moved_to_another_site_starts_afresh_and_hears_its_changes() -> None:
    old, new = SimpleNamespace(changed=None), SimpleNamespace(changed=None)
    ops = ClaudeFsOperations(old, SimpleNamespace(), shard_count=1)  # type: ignore[arg-type]
    assert old.changed is not None
    ops._seen.seen(inode(10, Kind.DIR))
    ops.serve_from(new, SimpleNamespace())  # type: ignore[arg-type]
    assert new.changed is not None and ops.meta is new
    assert ops._seen.directory(10) is None  # the other site's records may differ
