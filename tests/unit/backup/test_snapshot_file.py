"""Snapshot files and shard images: round trips, and every damage refused with its reason."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cfs.backup.image import encode_pairs, iter_pairs, split_chunks
from cfs.backup.snapshot_file import SnapshotInvalid, read_snapshot, write_snapshot
from cfs_contracts.backup import SNAPSHOT_FORMAT, ShardCut, SnapshotManifest
from cfs_contracts.envelope import HLC

pairs = st.lists(
    st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=200)), max_size=60
)


@given(pairs, st.integers(16, 2048))
def test_an_image_splits_at_pair_boundaries_and_reassembles(
    items: list[tuple[bytes, bytes]], chunk: int
) -> None:
    data = encode_pairs(items)
    pieces = split_chunks(data, chunk)
    assert b"".join(pieces) == data
    assert [p for piece in pieces for p in iter_pairs(piece)] == items


def _write(path: Path, images: dict[str, bytes]) -> SnapshotManifest:
    cuts = tuple(
        ShardCut(
            shard=s,
            seq=7,
            marker_seq=9,
            records=sum(1 for _ in iter_pairs(d)),
            inodes=1,
            file="",
            bytes=0,
            sha256="",
        )
        for s, d in images.items()
    )
    manifest = SnapshotManifest(
        format=SNAPSHOT_FORMAT,
        snapshot_id="S",
        cluster_id="c",
        cluster_name="n",
        site="s",
        shard_count=len(images),
        created_ms=0,
        cut=HLC(wall_ms=1, counter=0, node="b"),
        shards=cuts,
    )
    return write_snapshot(path, manifest, images, {})


def test_a_snapshot_reads_back_what_was_written(tmp_path: Path) -> None:
    images = {"001": encode_pairs([(b"i1", b"root")]), "002": encode_pairs([(b"k", b"v")] * 3)}
    written = _write(tmp_path / "s.tar.gz", images)
    snapshot = read_snapshot(tmp_path / "s.tar.gz")
    assert snapshot.manifest == written and snapshot.images == images
    assert not (tmp_path / "s.tar.gz.partial").exists()


def _rewrite(path: Path, edit: str) -> None:
    with tarfile.open(path, "r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    if edit == "newer":
        manifest = json.loads(files["manifest.json"])
        manifest["format"] = SNAPSHOT_FORMAT + 1
        files["manifest.json"] = json.dumps(manifest).encode()
    elif edit == "flip":
        data = bytearray(files["shards/shard-001.img"])
        data[-1] ^= 1
        files["shards/shard-001.img"] = bytes(data)
    elif edit == "missing":
        del files["shards/shard-001.img"]
    path.unlink()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io

            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip", "checksum mismatch"),
        ("newer", "is newer than this release"),
        ("missing", "is missing"),
        ("truncate", "truncated or corrupt"),
    ],
)
def test_a_damaged_snapshot_is_refused_with_its_reason(
    tmp_path: Path, damage: str, reason: str
) -> None:
    path = tmp_path / "s.tar.gz"
    _write(path, {"001": encode_pairs([(b"i1", b"root" * 50)])})
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-40])
    else:
        _rewrite(path, damage)
    with pytest.raises(SnapshotInvalid, match=reason):
        read_snapshot(path)
