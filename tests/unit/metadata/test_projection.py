"""The rocksdict projection behaves like the reference MemoryShard, survives reopening,
and catches corrupted records."""

from __future__ import annotations

from pathlib import Path

import pytest

import cfs_metadata.projection as projection_module
from cfs.backup.image import encode_pairs
from cfs_contracts.fs import rpc
from cfs_contracts.fs.records import ROOT_INO
from cfs_metadata.decide import bootstrap_entry, decide
from cfs_metadata.projection import Projection
from cfs_metadata.records import CorruptRecord
from cfs_metadata.state import MemoryShard, apply_entries

NOW = 1_700_000_000_000_000_000


def _ops() -> list[rpc.MutationOp]:
    ops: list[rpc.MutationOp] = [
        rpc.MkDir(op_id="m1", parent=ROOT_INO, name="d"),
        rpc.Create(op_id="c1", parent=ROOT_INO, name="f"),
        rpc.Symlink(op_id="s1", parent=ROOT_INO, name="l", target="f"),
    ]
    ops += [rpc.Create(op_id=f"c{i}", parent=ROOT_INO, name=f"n{i}") for i in range(2, 40)]
    ops += [rpc.Rename(op_id="r1", parent=ROOT_INO, name="n5", new_parent=ROOT_INO, new_name="z")]
    ops += [rpc.Unlink(op_id="u1", parent=ROOT_INO, name="n6")]
    return ops


def _journal() -> list[list]:
    """Messages of entries, built by deciding against a reference state."""
    reference = MemoryShard(1)
    messages = [[bootstrap_entry(NOW, "boot")]]
    apply_entries(reference, messages[0])
    for op in _ops():
        entry = decide(reference, op, NOW).entry(op)
        apply_entries(reference, [entry])
        messages.append([entry])
    return messages


def _reference(messages: list[list]) -> MemoryShard:
    state = MemoryShard(1)
    for entries in messages:
        apply_entries(state, entries)
    return state


def test_projection_matches_reference_and_resumes_after_reopen(tmp_path: Path) -> None:
    messages = _journal()
    half = len(messages) // 2
    projection = Projection(tmp_path / "p", 1)
    for seq, entries in enumerate(messages[:half], start=1):
        projection.apply(seq, entries)
    projection.close()
    projection = Projection(tmp_path / "p", 1)
    assert projection.applied_seq == half
    with pytest.raises(ValueError, match="already applied"):
        projection.apply(half, messages[half - 1])
    for seq, entries in enumerate(messages[half:], start=half + 1):
        projection.apply(seq, entries)
    reference = _reference(messages)
    dumped = projection.to_memory()
    assert dumped.inodes == reference.inodes
    assert dumped.dirs == reference.dirs
    assert projection.inode_count() == len(reference.inodes)
    assert projection.next_local() == reference.local
    paged = [d.name for d in projection.dentries(ROOT_INO)]
    assert paged == [d.name for d in reference.dentries(ROOT_INO)]
    middle = list(reference.dentries(ROOT_INO))[10].cookie
    assert [d.name for d in projection.dentries(ROOT_INO, middle)] == [
        d.name for d in reference.dentries(ROOT_INO, middle)
    ]
    assert projection.op_reply("c1") == reference.op_reply("c1")
    projection.close()


def test_old_replies_are_pruned_by_sequence(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(projection_module, "REPLY_RETENTION_SEQS", 5)
    projection = Projection(tmp_path / "p", 1)
    for seq, entries in enumerate(_journal(), start=1):
        projection.apply(seq, entries)
    assert projection.op_reply("boot") is None
    assert projection.op_reply("u1") is not None
    projection.close()


def test_a_flipped_byte_is_reported_with_both_checksums(tmp_path: Path) -> None:
    seen: list[CorruptRecord] = []
    projection = Projection(tmp_path / "p", 1, on_corruption=seen.append)
    projection.apply(1, _journal()[0])
    key = Projection.inode_key(ROOT_INO)
    raw = bytearray(projection.raw_get(key) or b"")
    raw[-3] ^= 0x20
    projection.raw_put(key, bytes(raw))
    with pytest.raises(
        CorruptRecord,
        match=r"Inode 1 checksum mismatch: expected 0x[0-9a-f]{8}, "
        r"got 0x[0-9a-f]{8}",
    ):
        projection.inode(ROOT_INO)
    assert len(seen) == 1
    projection.close()


def test_a_loaded_image_has_every_seal_checked_and_its_inodes_counted(tmp_path: Path) -> None:
    """The snapshot verify's trial load: seals checked without parsing, inodes counted;
    one flipped byte in any record names it."""
    source = Projection(tmp_path / "source", 1)
    for seq, entries in enumerate(_journal(), start=1):
        source.apply(seq, entries)
    image = encode_pairs(source.image_pairs())
    loaded = Projection(tmp_path / "loaded", 1)
    loaded.load_image(image)
    assert loaded.check_seals() == source.inode_count() == len(source.to_memory().inodes)

    dentry_key = next(k for k, _ in source.image_pairs() if k.startswith(b"d"))
    raw = bytearray(loaded.raw_get(dentry_key) or b"")
    raw[-2] ^= 0x01
    loaded.raw_put(dentry_key, bytes(raw))
    with pytest.raises(CorruptRecord, match=r"^Dentry 1/\S+ checksum mismatch"):
        loaded.check_seals()
    source.close()
    loaded.close()
