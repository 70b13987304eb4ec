"""Chunk-map rules of the metadata state machine (truncate and commit)."""

from __future__ import annotations

from cfs_contracts.fs.records import ChunkRef, Inode, Kind
from cfs_metadata.decide import truncate_chunks

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
