"""Which chunks one ranged GET reads back together (pure)."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from cfs_contracts.tier import ChunkLocation
from cfs_tierer.recall import Wanted, plan_runs


def _wanted(blob_id: str, offset: int, length: int, name: str | None = None) -> Wanted:
    chunk_id = hashlib.sha256((name or f"{blob_id}@{offset}").encode()).hexdigest()
    where = ChunkLocation(blob_id=blob_id, offset=offset, length=length, sha256=chunk_id)
    return Wanted(chunk_id, where)


def test_neighbours_share_a_get_and_far_or_other_blobs_do_not() -> None:
    a, b = _wanted("x", 0, 10), _wanted("x", 12, 10)  # a gap of 2
    far = _wanted("x", 100, 10)  # 78 bytes past b
    other = _wanted("y", 22, 10)
    runs = plan_runs([far, b, other, a], max_gap=4, max_span=1000)
    assert [(r.blob_id, r.offset, r.length, r.chunks) for r in runs] == [
        ("x", 0, 22, (a, b)),
        ("x", 100, 10, (far,)),
        ("y", 22, 10, (other,)),
    ]


def test_a_run_never_spans_more_than_asked_unless_one_chunk_does() -> None:
    chunks = [_wanted("x", i * 10, 10) for i in range(5)]
    assert [len(r.chunks) for r in plan_runs(chunks, max_gap=0, max_span=20)] == [2, 2, 1]
    big = _wanted("x", 100, 50)
    assert [(r.offset, r.length) for r in plan_runs([big], max_gap=0, max_span=20)] == [(100, 50)]


def test_a_chunk_asked_twice_is_read_once() -> None:
    one = _wanted("x", 0, 10)
    assert plan_runs([one, one], max_gap=0, max_span=100)[0].chunks == (one,)


@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, 500), st.integers(0, 60)),
        max_size=40,
    ),
    st.integers(0, 50),
    st.integers(1, 300),
)
def test_every_chunk_is_read_once_from_a_run_that_holds_its_bytes(
    specs: list[tuple[str, int, int]], max_gap: int, max_span: int
) -> None:
    wanted = [_wanted(b, o, n, name=f"{i}") for i, (b, o, n) in enumerate(specs)]
    blobs = {b: bytes(i % 251 for i in range(600)) for b in "abc"}
    runs = plan_runs(wanted, max_gap=max_gap, max_span=max_span)
    served = [one for run in runs for one in run.chunks]
    assert sorted(w.chunk_id for w in served) == sorted(w.chunk_id for w in wanted)
    for run in runs:
        data = blobs[run.blob_id][run.offset : run.offset + run.length]
        assert run.length <= max_span or len(run.chunks) == 1
        for one in run.chunks:
            assert one.where.blob_id == run.blob_id
            where = one.where
            assert (
                run.piece(data, one)
                == blobs[run.blob_id][where.offset : where.offset + where.length]
            )
