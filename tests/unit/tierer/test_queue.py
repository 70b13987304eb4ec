"""The tierer's flush queue (pure): flash accounting and the purge floor."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cfs_contracts.events.tier import ChunkQueued
from cfs_tierer.queue import FlushQueue, fragment_bytes

NODES = ("n1", "n2", "n3", "n4")


def _chunk(i: int, length: int, scheme: str = "ec2+1") -> ChunkQueued:
    holders = 3 if scheme == "ec2+1" else 1
    return ChunkQueued(
        chunk_id=f"{i:064x}", length=length, scheme=scheme, fragments=NODES[:holders]
    )


def test_a_fragment_holds_its_share_of_the_chunk() -> None:
    assert fragment_bytes(_chunk(1, 4_000_001)) == 2_000_001
    assert fragment_bytes(_chunk(1, 10, "copy1")) == 10


def test_a_chunk_queued_twice_is_one_upload_and_purges_past_both() -> None:
    queue = FlushQueue()
    assert queue.apply(1, _chunk(7, 100), 1000)
    assert not queue.apply(2, _chunk(7, 100), 1001)  # written again: one upload
    assert queue.apply(3, _chunk(8, 100), 1002)
    assert not queue.apply(3, _chunk(9, 100), 1003)  # a redelivery
    assert queue.purge_below() == 1
    queue.done(f"{8:064x}")
    assert queue.purge_below() == 1  # chunk 7 (seq 1) still pending
    queue.done(f"{7:064x}")
    assert queue.purge_below() == 4 and queue.bytes == 0 and not queue.unflushed


def test_take_fills_a_blob_with_the_asked_for_chunks_first() -> None:
    queue = FlushQueue()
    for i in range(1, 6):
        queue.apply(i, _chunk(i, 40), i)
    taken = queue.take(100, first=[f"{5:064x}"])
    assert [p.chunk.chunk_id for p in taken] == [f"{5:064x}", f"{1:064x}"]
    assert [p.chunk.chunk_id for p in queue.take(10)] == [f"{1:064x}"]  # at least one


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 20), st.integers(0, 5_000_000)),
        max_size=80,
    )
)
def test_flash_accounting_is_exactly_the_pending_chunks(
    steps: list[tuple[bool, int, int]],
) -> None:
    queue = FlushQueue()
    seq = 0
    for add, chunk, length in steps:
        if add:
            seq += 1
            queue.apply(seq, _chunk(chunk, length), seq)
        else:
            queue.done(f"{chunk:064x}")
        expected = {node: 0 for node in NODES}
        for entry in queue.pending.values():
            for node in entry.chunk.fragments:
                expected[node] += fragment_bytes(entry.chunk)
        assert {n: queue.unflushed.get(n, 0) for n in NODES} == expected
        assert queue.bytes == sum(e.chunk.length for e in queue.pending.values())
        floor = queue.purge_below()
        assert all(min(e.seqs) >= floor for e in queue.pending.values())
        assert floor <= seq + 1
