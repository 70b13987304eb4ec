"""What compaction rewrites and what garbage collection may unindex (pure)."""

from __future__ import annotations

from cfs_contracts.tier import BlobRecord, ChunkLocation
from cfs_tierer.compact import orphan, to_compact, young

URL = "s3://b/p"


def _blob(blob_id: str, size: int, created_ms: int = 0, url: str = URL) -> BlobRecord:
    return BlobRecord(blob_id=blob_id, url=url, bytes=size, chunks=1, created_ms=created_ms)


def _at(blob_id: str, length: int, requeued_ms: int | None = None) -> ChunkLocation:
    return ChunkLocation(
        blob_id=blob_id, offset=0, length=length, sha256="0" * 64, requeued_ms=requeued_ms
    )


def test_a_chunk_written_or_queued_again_within_the_grace_is_young() -> None:
    assert not young(_at("a", 1), _blob("a", 10, created_ms=1_000), 10_000, 5_000)
    assert young(_at("a", 1), _blob("a", 10, created_ms=5_000), 10_000, 5_000)
    assert young(_at("a", 1, requeued_ms=9_000), _blob("a", 10, created_ms=0), 10_000, 5_000)
    assert not young(_at("a", 1), None, 10_000, 5_000)  # a blob without a record: old


def test_blobs_below_the_live_share_oldest_first_empty_ones_included() -> None:
    records = [
        _blob("full", 100, created_ms=1),
        _blob("half", 100, created_ms=3),
        _blob("empty", 100, created_ms=2),
        _blob("new", 100, created_ms=50),  # may still be getting its locations
        _blob("away", 100, created_ms=1, url="s3://other/p"),  # the failover copy's
    ]
    locations = [
        ("c1", _at("full", 90), 1),
        ("c2", _at("half", 30), 2),
        ("c3", _at("half", 10), 3),
        ("c4", _at("away", 1), 4),
    ]
    plan = to_compact(records, locations, url=URL, below=0.5, before_ms=10)
    assert [u.record.blob_id for u in plan] == ["empty", "half"]
    assert plan[0].live == () and plan[1].live_bytes == 40
    assert {c for c, _, _ in plan[1].live} == {"c2", "c3"}


def test_an_unrecorded_blob_is_an_orphan_only_if_each_chunk_is_served_elsewhere() -> None:
    where = {"c1": _at("live", 1), "c2": _at("live", 1)}
    assert orphan("dup", ["c1", "c2"], where, recorded={"live"})
    assert not orphan("dup", ["c1", "c2"], where, recorded={"live", "dup"})  # recorded
    assert not orphan("dup", ["c1", "c3"], where, recorded={"live"})  # c3 only there
    assert not orphan("dup", ["c1"], {"c1": _at("dup", 1)}, recorded={"live"})
    assert not orphan("dup", ["c1"], {"c1": _at("gone", 1)}, recorded={"live"})
    assert not orphan("any", ["c1"], {}, recorded=set())  # an empty index: nothing is
