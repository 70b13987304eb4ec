"""The eviction decision (pure): what may leave flash, and when a pass may not decide."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from cfs_contracts.fs.records import ChunkRef, Inode, Kind
from cfs_contracts.tier import ChunkLocation, FlashCopy
from cfs_tierer.evict import cold_chunks, history_gap

CUT_MS = 1_000_000


def _id(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def _ref(n: int, index: int = 0) -> ChunkRef:
    return ChunkRef(index=index, chunk_id=_id(n), length=10, scheme="ec2+1",
                    fragments=("a", "b", "c"))  # fmt: skip


def _file(ino: int, chunks: list[int], mtime_ms: int) -> Inode:
    return Inode(
        ino=ino, kind=Kind.FILE, mode=0o644, uid=0, gid=0, nlink=1, size=10 * len(chunks),
        atime_ns=0, mtime_ns=mtime_ms * 1_000_000, ctime_ns=0,
        chunks=tuple(_ref(n, i) for i, n in enumerate(chunks)),
    )  # fmt: skip


def _at(flash: FlashCopy = FlashCopy.PRESENT) -> ChunkLocation:
    return ChunkLocation(blob_id="b", offset=0, length=10, sha256="0" * 64, flash=flash)


def test_a_cold_file_wholly_in_s3_is_chosen_with_each_holder_list() -> None:
    files = [_file(2, [1, 2], CUT_MS - 1), _file(3, [2], CUT_MS - 5)]
    chosen = cold_chunks(files, {_id(1): _at(), _id(2): _at()}, set(), CUT_MS)
    assert set(chosen) == {_id(1), _id(2)}
    assert len(chosen[_id(2)]) == 2  # both files' chunk maps name holders


def test_a_recent_write_a_chunk_not_in_s3_or_one_touched_keeps_the_whole_file() -> None:
    where = {_id(1): _at(), _id(2): _at()}
    assert cold_chunks([_file(2, [1], CUT_MS)], where, set(), CUT_MS) == {}
    assert cold_chunks([_file(2, [1, 3], CUT_MS - 1)], where, set(), CUT_MS) == {}
    assert cold_chunks([_file(2, [1, 2], CUT_MS - 1)], where, {_id(2)}, CUT_MS) == {}


def test_evicted_chunks_are_not_chosen_again_but_evicting_ones_are_finished() -> None:
    where = {_id(1): _at(FlashCopy.EVICTED), _id(2): _at(FlashCopy.EVICTING)}
    chosen = cold_chunks([_file(2, [1, 2], CUT_MS - 1)], where, set(), CUT_MS)
    assert set(chosen) == {_id(2)}


@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 6), min_size=1, max_size=4),
            st.integers(CUT_MS - 3, CUT_MS + 3),
        ),
        max_size=6,
    ),
    st.sets(st.integers(0, 6)),
    st.sets(st.integers(0, 6)),
)
def test_nothing_touched_recent_or_absent_from_s3_is_ever_chosen(
    files: list[tuple[list[int], int]], in_s3: set[int], touched: set[int]
) -> None:
    inodes = [_file(i + 2, chunks, mtime) for i, (chunks, mtime) in enumerate(files)]
    where = {_id(n): _at() for n in in_s3}
    chosen = cold_chunks(inodes, where, {_id(n) for n in touched}, CUT_MS)
    for chunk_id, refs in chosen.items():
        assert chunk_id in where and chunk_id not in {_id(n) for n in touched}
        owners = [i for i in inodes if any(r.chunk_id == chunk_id for r in i.chunks)]
        assert any(i.mtime_ns < CUT_MS * 1_000_000 for i in owners)
        assert all(r.chunk_id == chunk_id for r in refs)
    # A file is all or none: a cold one has every chunk chosen.
    for inode in inodes:
        ids = {r.chunk_id for r in inode.chunks}
        cold = inode.mtime_ns < CUT_MS * 1_000_000 and ids <= set(where)
        if cold and not ids & {_id(n) for n in touched}:
            assert ids <= set(chosen)


def test_a_store_that_started_after_the_cut_stops_the_pass() -> None:
    assert history_gap({"a": CUT_MS - 10, "b": CUT_MS}, CUT_MS) is None
    gap = history_gap({"a": CUT_MS - 10, "b": CUT_MS + 1}, CUT_MS)
    assert gap is not None and "chunk-stores b started after the cut" in gap
