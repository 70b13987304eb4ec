"""The archive's pure parts: segment bytes, key names, when to cut, completeness."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cfs.backup.segments import (
    ArchiveProgress,
    Message,
    SegmentBuffer,
    SegmentCorrupt,
    StreamProgress,
    decode_segment,
    encode_segment,
    parse_segment_key,
    segment_key,
)
from cfs.objstore import MemoryObjectStore
from cfs_backup.archive import Archiver, ArchiveSettings
from cfs_contracts.envelope import HLC


def _msg(seq: int, data: bytes = b"x") -> Message:
    return Message(seq, HLC(wall_ms=1_000 + seq, counter=0, node="n"), data)


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=40), st.integers(1, 10**12))
def test_a_segment_round_trips_with_its_manifest(payloads: list[bytes], first: int) -> None:
    messages = [_msg(first + i, data) for i, data in enumerate(payloads)]
    blob, manifest = encode_segment("META_001", messages)
    decoded, pairs = decode_segment(blob)
    assert decoded == manifest
    assert (manifest.first, manifest.last, manifest.count) == (
        first,
        first + len(payloads) - 1,
        len(payloads),
    )
    assert list(pairs) == [(m.seq, m.data) for m in messages]


def test_a_flipped_byte_in_a_segment_is_refused() -> None:
    blob, _ = encode_segment("META_001", [_msg(1, b"hello" * 100)])
    head, _, body = blob.partition(b"\n")
    damaged = bytearray(body)
    damaged[len(damaged) // 2] ^= 0xFF
    with pytest.raises(SegmentCorrupt):
        _, pairs = decode_segment(head + b"\n" + bytes(damaged))
        list(pairs)


@given(st.integers(1, 10**15), st.integers(0, 10**6))
def test_segment_names_sort_by_sequence_and_parse_back(first: int, extra: int) -> None:
    key = segment_key("META_001", first, first + extra)
    assert parse_segment_key(key) == (first, first + extra)
    assert parse_segment_key(f"cluster/{key}") == (first, first + extra)
    assert parse_segment_key("cluster/META_001/progress.json") is None


def test_a_buffer_is_due_by_size_or_by_the_age_of_its_oldest_message() -> None:
    buffer = SegmentBuffer(max_bytes=100, max_age_s=1.0)
    assert not buffer.due(0.0)
    buffer.add(_msg(1, b"a" * 10), now=10.0)
    assert not buffer.due(10.5)
    assert buffer.due(11.0)
    buffer.add(_msg(2, b"b" * 100), now=10.6)
    assert buffer.due(10.6)
    assert [m.seq for m in buffer.take()] == [1, 2] and not buffer.messages


def test_the_archive_is_complete_up_to_its_slowest_stream() -> None:
    progress = ArchiveProgress(
        cluster_id="c",
        updated_ms=0,
        streams=(
            StreamProgress(stream="META_001", complete_through_ms=5_000),
            StreamProgress(stream="META_002", complete_through_ms=3_000),
        ),
    )
    assert progress.complete_through_ms(["META_001", "META_002"]) == 3_000
    assert progress.complete_through_ms(["META_001", "META_003"]) == 0  # unknown stream


def test_retention_deletes_old_segments_but_never_the_newest() -> None:
    store = MemoryObjectStore()
    now = [10_000_000]
    archiver = Archiver(
        bus=None,  # type: ignore[arg-type]  # expire() needs no bus
        store=store,
        cluster_id="c",
        streams=[("AUDIT", "cfs.s.audit.>")],
        settings=ArchiveSettings(retention_s={"AUDIT": 60.0}),
        wall_ms=lambda: now[0],
    )

    async def scenario() -> list[str]:
        for first in (1, 11, 21):
            blob, _ = encode_segment("AUDIT", [_msg(first), _msg(first + 9)])
            await store.put(f"c/{segment_key('AUDIT', first, first + 9)}", blob)
        now[0] = 10**13  # every segment is far older than a minute
        assert await archiver.expire() == 2
        return [info.key async for info in store.list("c/AUDIT/")]

    assert asyncio.run(scenario()) == [f"c/{segment_key('AUDIT', 21, 30)}"]
