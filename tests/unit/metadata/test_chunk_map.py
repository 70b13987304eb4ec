"""Chunk-map rules of the metadata state machine (truncate and commit)."""

from __future__ import annotations

import errno

import pytest

from cfs_contracts.fs import rpc
from cfs_contracts.fs.records import ROOT_INO, ChunkRef, Inode, Kind
from cfs_contracts.fs.rpc import FsError
from cfs_metadata.decide import bootstrap_entry, decide, truncate_chunks
from cfs_metadata.reads import scan
from cfs_metadata.state import MemoryShard, apply_entries

CS = 4096


def _file(*lengths: int) -> Inode:
    chunks = tuple(
        ChunkRef(index=i, chunk_id=f"{i:064x}", length=n, scheme="copy1", fragments=("a",))
        for i, n in enumerate(lengths)
    )
    size = CS * (len(lengths) - 1) + lengths[-1]
    return Inode(
        ino=1024 + 1,
        kind=Kind.FILE,
        mode=0o644,
        uid=0,
        gid=0,
        nlink=1,
        size=size,
        atime_ns=0,
        mtime_ns=0,
        ctime_ns=0,
        chunks=chunks,
        chunk_size=CS,
    )


def test_truncate_drops_chunks_past_the_end() -> None:
    kept = truncate_chunks(_file(CS, CS, CS), 2 * CS)
    assert [c.index for c in kept] == [0, 1]


def test_truncate_inside_a_chunk_shortens_it_so_regrowth_reads_zeros() -> None:
    kept = truncate_chunks(_file(CS, CS), CS + 100)
    assert [(c.index, c.length) for c in kept] == [(0, CS), (1, 100)]


def test_truncate_to_zero_and_growth_keep_nothing_or_everything() -> None:
    assert truncate_chunks(_file(CS, 10), 0) == ()
    grown = truncate_chunks(_file(CS, 10), 10 * CS)
    assert [(c.index, c.length) for c in grown] == [(0, CS), (1, 10)]


# -- repair support: fragment moves and scans -----------------------------------------
def _shard_with_files() -> tuple[MemoryShard, list[int]]:
    shard = MemoryShard(1)
    apply_entries(shard, [bootstrap_entry(0, "boot")])
    inos = []
    for i in range(5):
        op = rpc.Create(op_id=f"c{i}", parent=ROOT_INO, name=f"f{i}")
        entry = decide(shard, op, 1).entry(op)
        apply_entries(shard, [entry])
        ino = entry.reply.inode.ino if entry.reply.inode else 0
        inos.append(ino)
        holders = ("a", "b", "c") if i % 2 else ("b", "c", "d")
        ref = ChunkRef(index=0, chunk_id=f"{i:064x}", length=10, scheme="ec2+1", fragments=holders)
        commit = rpc.CommitChunks(op_id=f"w{i}", ino=ino, chunks=(ref,), size=10)
        apply_entries(shard, [decide(shard, commit, 2).entry(commit)])
    return shard, inos


def _move(ino: int, old: str, new: str, fragment: int, chunk: int) -> rpc.MoveFragments:
    move = rpc.FragmentMove(
        index=0, chunk_id=f"{chunk:064x}", fragment=fragment, old_node=old, new_node=new
    )
    return rpc.MoveFragments(op_id=f"m-{ino}-{fragment}-{new}", ino=ino, moves=(move,))


def test_move_fragments_is_compare_and_set() -> None:
    shard, inos = _shard_with_files()
    op = _move(inos[1], "a", "e", 0, 1)
    apply_entries(shard, [decide(shard, op, 3).entry(op)])
    assert shard.inodes[inos[1]].chunks[0].fragments == ("e", "b", "c")
    assert shard.inodes[inos[1]].mtime_ns == 2, "moving data is not a modification"
    with pytest.raises(FsError) as stale:  # a second repair of the same fragment
        decide(shard, _move(inos[1], "a", "f", 0, 1), 4)
    assert stale.value.errno == errno.ESTALE
    with pytest.raises(FsError):  # the file was rewritten: another chunk id
        decide(shard, _move(inos[1], "b", "f", 1, 99), 4)


def test_scan_chunks_pages_through_files_on_a_node() -> None:
    shard, inos = _shard_with_files()
    found: list[int] = []
    cursor = 0
    while True:
        reply = scan(shard, rpc.ScanChunks(shard=1, after_ino=cursor, node="a", limit=1))
        found += [i.ino for i in reply.inodes]
        if not reply.cursor:
            break
        cursor = reply.cursor
    assert found == [inos[1], inos[3]]
    every = scan(shard, rpc.ScanChunks(shard=1, limit=1000))
    assert [i.ino for i in every.inodes] == inos


def test_find_names() -> None:
    shard, inos = _shard_with_files()
    reply = scan(shard, rpc.FindNames(shard=1, ino=inos[2]))
    assert [(r.dentry.parent, r.dentry.name) for r in reply.records if r.dentry] == [
        (ROOT_INO, "f2")
    ]
