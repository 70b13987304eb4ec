"""Site-neutral digests (`metadata-consistency-check --cross-site`): two sites' copies
of a namespace digest the same although each names its own chunk holders and keeps
its own stamps and counters; a real difference still shows."""

from __future__ import annotations

from pathlib import Path

from cfs_contracts.events.metadata import JournalEntry, PutDentry, PutInode, SetNextLocal
from cfs_contracts.fs.records import ChunkRef, Dentry, Inode, Kind, Stamp
from cfs_contracts.fs.rpc import Reply
from cfs_metadata.digest import scan_pairs, site_neutral
from cfs_metadata.projection import Projection


def _state(path: Path, holder: str, site: str, uid: int, local: int) -> list[str]:
    chunk = ChunkRef(index=0, chunk_id="ab" * 32, length=10, scheme="copy1", fragments=(holder,))
    inode = Inode(
        ino=1025, kind=Kind.FILE, mode=0o644, uid=uid, gid=0, nlink=1, size=10,
        atime_ns=local, mtime_ns=5, ctime_ns=5, chunks=(chunk,),
        stamps={"content": Stamp(ns=local, site=site)},
    )  # fmt: skip
    dentry = Dentry(parent=1, name="f", ino=1025, kind=Kind.FILE, stamp=Stamp(ns=local, site=site))
    changes = (PutInode(inode=inode), PutDentry(dentry=dentry), SetNextLocal(value=local))
    projection = Projection(path, 1)
    try:
        projection.apply(1, [JournalEntry(op_id="x", op="create", changes=changes, reply=Reply())])
        return scan_pairs(site_neutral(projection.image_pairs()), verify=False).buckets
    finally:
        projection.close()


def test_what_differs_by_site_does_not_count_and_a_real_difference_does(tmp_path: Path) -> None:
    here = _state(tmp_path / "a", "storage-1", "site-a", uid=7, local=3)
    there = _state(tmp_path / "b", "node-b9", "site-b", uid=7, local=99)
    assert here == there
    changed = _state(tmp_path / "c", "storage-1", "site-a", uid=8, local=3)
    assert changed != here
