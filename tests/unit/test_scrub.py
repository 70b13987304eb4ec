"""Scrubber on a tmp FileFragmentStore: pacing, damage reports, the persisted cursor."""

from __future__ import annotations

import asyncio
import json
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfs_chunkstore.scrub import (
    MIN_COST_BYTES,
    Cursor,
    MiB,
    Scrubber,
    load_cursor,
    save_cursor,
)
from cfs_chunkstore.store import FileFragmentStore, fragment_path
from cfs_contracts.data import FragmentInfo, fragment_key
from cfs_contracts.events.data import FragmentDamaged

CHUNK = "a" * 64
SIZE = 256 * 1024


def key(index: int) -> str:
    return fragment_key(CHUNK, "copy9", index)


class CountingStore(FileFragmentStore):
    """Records which keys were verified, in order."""

    verified: list[str]

    def verify(self, key: str) -> FragmentInfo:
        self.verified.append(key)
        return super().verify(key)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    s = CountingStore(tmp_path / "chunks", node="n1", reserve_bytes=0)
    s.verified = []
    yield s
    s.close()


def fill(store: FileFragmentStore, count: int, size: int = SIZE) -> list[str]:
    keys = [key(i) for i in range(count)]
    for k in keys:
        data = os.urandom(size)
        store.put(k, data, zlib.crc32(data))
    return sorted(keys)


def flip_byte(path: Path, offset: int = 100) -> None:
    with path.open("r+b") as f:  # in place: the size never changes
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


class FakeTime:
    """A clock that only moves when the scrubber sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Reports:
    def __init__(self, failures: int = 0) -> None:
        self.events: list[FragmentDamaged] = []
        self.failures = failures

    async def __call__(self, event: FragmentDamaged) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("nats is away")
        self.events.append(event)


def scrubber(
    store: FileFragmentStore,
    report: Reports,
    fake: FakeTime,
    cursor: Path | None,
    mb_s: float = 1.0,
    save_every_s: float = 5.0,
) -> Scrubber:
    return Scrubber(
        store,
        report,
        cursor_path=cursor,
        mb_s=mb_s,
        pass_interval_s=60.0,
        batch=3,  # several pages per pass
        clock=fake.clock,
        sleep=fake.sleep,
        save_every_s=save_every_s,
    )


async def test_pass_finds_flipped_and_missing_fragments(
    store: CountingStore, tmp_path: Path
) -> None:
    keys = fill(store, 8)
    fill(store, 1, size=0)  # key(0) rewritten empty: costs MIN_COST_BYTES
    empty = key(0)
    flip_byte(fragment_path(store.root, keys[3]))
    fragment_path(store.root, keys[5]).unlink()
    fake, reports = FakeTime(), Reports()
    scrub = scrubber(store, reports, fake, tmp_path / "scrub.json")

    summary = await scrub.run_pass()

    assert summary is not None
    assert store.verified == keys  # every fragment, in key order, once
    assert [(e.key, e.reason) for e in reports.events] == [
        (keys[3], "corrupt"),
        (keys[5], "missing"),
    ]
    damaged = reports.events[0]
    assert (damaged.node_id, damaged.reported_by) == ("n1", "n1/scrub")
    assert "failed its checksum" in damaged.detail
    assert (summary.pass_no, summary.fragments, summary.damaged) == (1, 6, 2)
    assert summary.bytes == 5 * SIZE  # the damaged ones are not counted as checked
    # the rate: 1 MiB/s, the bucket starts empty and the fake clock only moves in
    # sleeps, so the sleeps add up to exactly every byte charged / rate
    charged = 7 * SIZE + MIN_COST_BYTES
    assert sum(fake.sleeps) == pytest.approx(charged / MiB)
    assert all(s > 0 for s in fake.sleeps)
    progress = scrub.progress()
    assert (progress.pass_no, progress.passes_done, progress.damaged_total) == (2, 1, 2)
    assert progress.last_pass == summary
    assert empty in store.verified


async def test_faster_rate_sleeps_less(store: CountingStore, tmp_path: Path) -> None:
    fill(store, 6)
    slow, fast = FakeTime(), FakeTime()
    await scrubber(store, Reports(), slow, None, mb_s=1.0).run_pass()
    await scrubber(store, Reports(), fast, None, mb_s=4.0).run_pass()
    assert sum(slow.sleeps) == pytest.approx(6 * SIZE / MiB)
    assert sum(fast.sleeps) == pytest.approx(sum(slow.sleeps) / 4)
    # one sleep per fragment at most: the pace is between fragments, never a spin
    assert len(slow.sleeps) <= 6


async def test_damage_reported_once_per_pass(store: CountingStore, tmp_path: Path) -> None:
    keys = fill(store, 4)
    flip_byte(fragment_path(store.root, keys[1]))
    fake, reports = FakeTime(), Reports()
    scrub = scrubber(store, reports, fake, tmp_path / "scrub.json")
    first = await scrub.run_pass()
    second = await scrub.run_pass()
    assert first is not None and second is not None
    assert (first.pass_no, second.pass_no) == (1, 2)
    assert [e.key for e in reports.events] == [keys[1], keys[1]]  # still broken next pass
    assert (first.damaged, second.damaged) == (1, 1)


async def test_cursor_resumes_after_restart(store: CountingStore, tmp_path: Path) -> None:
    keys = fill(store, 7)
    cursor = tmp_path / "scrub.json"
    fake = FakeTime()
    first = scrubber(store, Reports(), fake, cursor)
    sleeps_before_stop = 4

    async def sleep_then_stop(seconds: float) -> None:
        await fake.sleep(seconds)
        if len(fake.sleeps) == sleeps_before_stop:
            await first.stop()  # as on shutdown: no task running, the cursor is saved

    first._sleep = sleep_then_stop
    assert await first.run_pass() is None
    checked = store.verified[:]
    assert checked == keys[: sleeps_before_stop - 1]
    saved = json.loads(cursor.read_text())
    assert saved["after"] == checked[-1]
    assert saved["fragments"] == len(checked)
    assert saved["pass_no"] == 1

    store.verified.clear()
    second = scrubber(store, Reports(), FakeTime(), cursor)
    assert second.cursor.after == checked[-1]
    summary = await second.run_pass()
    assert store.verified == keys[len(checked) :]  # nothing twice, nothing skipped
    assert summary is not None
    assert (summary.pass_no, summary.fragments) == (1, len(keys))

    # the pass is over: a third scrubber starts pass 2 from the first key, after a rest
    third = scrubber(store, Reports(), FakeTime(), cursor)
    assert third.cursor == Cursor(pass_no=2, last_finished_ms=summary.finished_ms)
    assert 59.0 < third._rest_left() <= 60.0
    store.verified.clear()
    assert (await third.run_pass()) is not None
    assert store.verified == keys


async def test_damage_saves_the_cursor_at_once(store: CountingStore, tmp_path: Path) -> None:
    keys = fill(store, 5)
    flip_byte(fragment_path(store.root, keys[2]))
    cursor = tmp_path / "scrub.json"
    fake = FakeTime()

    class StopAfterReport(Reports):
        async def __call__(self, event: FragmentDamaged) -> None:
            await super().__call__(event)
            scrub._stopping.set()  # a crash right after the report

    scrub = scrubber(store, StopAfterReport(), fake, cursor, save_every_s=1e9)
    assert await scrub.run_pass() is None
    saved = load_cursor(cursor)
    assert (saved.after, saved.damaged) == (keys[2], 1)  # not reported twice after a restart


async def test_unpublished_report_is_retried(store: CountingStore, tmp_path: Path) -> None:
    keys = fill(store, 3)
    flip_byte(fragment_path(store.root, keys[0]))
    fake, reports = FakeTime(), Reports(failures=2)
    scrub = scrubber(store, reports, fake, tmp_path / "scrub.json")
    summary = await scrub.run_pass()
    assert summary is not None
    assert [e.key for e in reports.events] == [keys[0]]
    pace = SIZE / MiB
    assert fake.sleeps[:3] == [pytest.approx(pace), 1.0, 2.0]  # pace, then backoff


async def test_stop_while_report_fails_keeps_the_fragment(
    store: CountingStore, tmp_path: Path
) -> None:
    keys = fill(store, 3)
    flip_byte(fragment_path(store.root, keys[1]))
    cursor = tmp_path / "scrub.json"
    fake = FakeTime()
    scrub = scrubber(store, Reports(failures=1000), fake, cursor)

    async def stop_on_backoff(seconds: float) -> None:
        await fake.sleep(seconds)
        if seconds == 1.0:  # the first retry: shut down
            await scrub.stop()

    scrub._sleep = stop_on_backoff
    assert await scrub.run_pass() is None
    assert load_cursor(cursor).after == keys[0]  # checked again after the restart


def test_cursor_file_round_trip_and_damage(tmp_path: Path) -> None:
    path = tmp_path / "scrub.json"
    assert load_cursor(path) == Cursor()
    cursor = Cursor(after=key(3), pass_no=4, started_ms=5, fragments=6, bytes=7, damaged=1)
    save_cursor(path, cursor)
    assert load_cursor(path) == cursor
    assert not list(tmp_path.glob(".*tmp"))
    path.write_text("{not json")
    assert load_cursor(path) == Cursor()
    path.write_text(json.dumps({"after": 3, "pass_no": 0}))
    assert load_cursor(path) == Cursor()


async def test_disabled_scrubber_does_nothing(store: CountingStore, tmp_path: Path) -> None:
    fill(store, 2)
    scrub = Scrubber(store, Reports(), cursor_path=tmp_path / "scrub.json", mb_s=0)
    assert not scrub.enabled
    scrub.start()
    await asyncio.sleep(0.05)
    await scrub.stop()
    assert store.verified == []
    assert not (tmp_path / "scrub.json").exists()


async def test_background_task_finds_damage_and_stops_cleanly(
    store: CountingStore, tmp_path: Path
) -> None:
    """Real clock and sleeps: passes repeat after the rest; stop cuts a rest short."""
    keys = fill(store, 3, size=4096)
    reports = Reports()
    scrub = Scrubber(
        store,
        reports,
        cursor_path=tmp_path / "scrub.json",
        mb_s=100.0,
        pass_interval_s=0.05,
    )
    scrub.start()
    try:
        deadline = time.monotonic() + 5
        while scrub.passes_done < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert reports.events == []
        flip_byte(fragment_path(store.root, keys[2]))
        while not reports.events:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert (reports.events[0].key, reports.events[0].reason) == (keys[2], "corrupt")
    finally:
        scrub.pass_interval_s = 3600.0
        started = time.monotonic()
        await scrub.stop()
    assert time.monotonic() - started < 2.0
    assert scrub._task is None
