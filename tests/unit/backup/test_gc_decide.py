"""Fragment GC's pure decide: never a referenced chunk, never a young fragment, every
old unreferenced one; and every place a chunk can be named is found."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cfs.backup.image import encode_pairs
from cfs_backup.gc import (
    Candidate,
    KeepSet,
    Verdict,
    chunks_of_image,
    chunks_of_payload,
    decide,
)
from cfs_contracts.data import fragment_key
from cfs_contracts.events.metadata import JournalEntry, MetaCommitted, ShardImageChunk
from cfs_contracts.fs.changes import DelInode, PutInode, TxPut, TxRecord
from cfs_contracts.fs.records import ChunkRef, Inode, Kind
from cfs_contracts.fs.rpc import Reply
from cfs_metadata.projection import Projection
from cfs_metadata.records import CorruptRecord, seal

chunk_ids = st.sampled_from([f"{i:064x}" for i in range(12)])
candidates = st.builds(
    Candidate,
    node=st.sampled_from(["n1", "n2", "n3"]),
    key=st.builds(fragment_key, chunk_ids, st.sampled_from(["ec2+1", "copy2"]), st.integers(0, 1)),
    size=st.integers(0, 1 << 20),
    stored_ms=st.integers(0, 10_000_000),
)


@given(
    st.lists(candidates, max_size=40),
    st.frozensets(chunk_ids),
    st.integers(0, 5_000_000),
    st.integers(0, 12_000_000),
    st.integers(0, 2_000_000),
)
def test_deletes_exactly_the_old_unreferenced_fragments(
    found: list[Candidate], keep: frozenset[str], grace: int, marked: int, later: int
) -> None:
    now = marked + later  # the sweep runs after the mark; age counts at the mark
    judged = decide(found, KeepSet(keep, marked), grace, now)
    assert [j.candidate for j in judged] == found
    for j in judged:
        chunk = j.candidate.key.split(".")[0]
        old = marked - j.candidate.stored_ms >= grace
        assert j.delete == (chunk not in keep and old), j
        if chunk in keep:
            assert j.verdict is Verdict.REFERENCED
        elif not old:
            assert j.verdict is Verdict.YOUNG
        assert j.reason


@given(st.lists(candidates, max_size=20), st.integers(0, 10_000_000))
def test_age_is_taken_at_the_mark_not_at_the_sweep(found: list[Candidate], marked: int) -> None:
    """A fragment written just after the mark (its commit is not in the keep set) is
    never old enough, however long the sweep takes."""
    keep = KeepSet(frozenset(), marked)
    young = [c for c in found if c.stored_ms > marked - 1000]
    assert not any(j.delete for j in decide(young, keep, 1000, marked + 10**9))


def test_unknown_keys_are_kept_and_negative_grace_refused() -> None:
    odd = Candidate("n1", "not-a-fragment", 1, 0)
    [j] = decide([odd], KeepSet(frozenset(), 10**9), 0, 10**9)
    assert j.verdict is Verdict.UNKNOWN_KEY and not j.delete
    with pytest.raises(ValueError):
        decide([], KeepSet(frozenset(), 0), -1, 0)


def _file(ino: int, *chunks: str) -> Inode:
    refs = tuple(
        ChunkRef(index=i, chunk_id=c, length=10, scheme="copy1", fragments=("n1",))
        for i, c in enumerate(chunks)
    )
    return Inode(
        ino=ino, kind=Kind.FILE, mode=0o644, uid=0, gid=0, nlink=1, size=10,
        atime_ns=0, mtime_ns=0, ctime_ns=0, chunks=refs,
    )  # fmt: skip


A, B, C, D = (f"{i:064x}" for i in range(1, 5))
TX = TxRecord(
    tx_id="tx1", role="participant", state="prepared", coordinator=1,
    changes=(PutInode(inode=_file(2049, C)),),
)  # fmt: skip


def _image() -> list[tuple[bytes, bytes]]:
    return [
        (Projection.inode_key(1025), seal(_file(1025, A, B))),
        (Projection.inode_key(3073), seal(_file(3073))),
        (b"t" + TX.tx_id.encode(), TX.model_dump_json().encode()),
        (b"m:local", b"\x00" * 8),
    ]


def test_an_image_names_its_files_chunks_and_open_transactions() -> None:
    assert set(chunks_of_image(_image())) == {A, B, C}


def test_a_damaged_image_record_stops_the_collection() -> None:
    key, value = _image()[0]
    with pytest.raises(CorruptRecord):
        list(chunks_of_image([(key, value[:-1] + b"!")]))


def test_journal_messages_name_committed_and_restored_chunks() -> None:
    entry = JournalEntry(
        op_id="o1",
        op="write",
        changes=(PutInode(inode=_file(5121, D)), DelInode(ino=1025), TxPut(tx=TX)),
        reply=Reply(),
    )
    committed = MetaCommitted(shard="001", term=1, entries=(entry,))
    assert set(chunks_of_payload(committed)) == {D, C}
    restored = ShardImageChunk(
        shard="001",
        term=1,
        snapshot_id="s1",
        index=0,
        data_b64=base64.b64encode(encode_pairs(_image())).decode(),
    )
    assert set(chunks_of_payload(restored)) == {A, B, C}
    assert not set(chunks_of_payload(object()))
