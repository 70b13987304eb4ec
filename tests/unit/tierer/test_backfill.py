"""The backfill's decisions (pure): which chunks a pass queues, and when a pass is due."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from cfs_contracts.fs.records import ChunkRef, Inode, Kind
from cfs_contracts.tier import TierConfig, TierMode
from cfs_tierer.backfill import RETRY_S, Schedule, tier_key, unqueued


def _id(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def _ref(n: int, index: int = 0, *, coded: int | None = None) -> ChunkRef:
    return ChunkRef(index=index, chunk_id=_id(n), length=10, coded_length=coded,
                    scheme="ec2+1", fragments=("a", "b", "c"))  # fmt: skip


def _file(ino: int, refs: list[ChunkRef]) -> Inode:
    return Inode(
        ino=ino, kind=Kind.FILE, mode=0o644, uid=0, gid=0, nlink=1, size=10 * len(refs),
        atime_ns=0, mtime_ns=0, ctime_ns=0, chunks=tuple(refs),
    )  # fmt: skip


def test_each_chunk_not_pending_is_queued_once_with_its_coded_length() -> None:
    files = [_file(2, [_ref(1), _ref(2, 1, coded=4096)]), _file(3, [_ref(1), _ref(3)])]
    found = unqueued(files, lambda chunk_id: chunk_id == _id(3))
    assert list(found) == [_id(1), _id(2)]
    assert found[_id(1)].ino == 2  # the first file naming it
    assert found[_id(2)].length == 4096  # a truncated chunk is read and checked whole
    assert found[_id(1)].fragments == ("a", "b", "c") and found[_id(1)].scheme == "ec2+1"


@given(st.lists(st.lists(st.integers(0, 20), max_size=6), max_size=8), st.sets(st.integers(0, 20)))
def test_every_named_chunk_is_either_pending_or_queued(
    files: list[list[int]], pending: set[int]
) -> None:
    inodes = [_file(i + 2, [_ref(n, j) for j, n in enumerate(ns)]) for i, ns in enumerate(files)]
    known = {_id(n) for n in pending}
    found = unqueued(inodes, known.__contains__)
    named = {_id(n) for ns in files for n in ns}
    assert set(found) == named - known


def _config(mode: TierMode = TierMode.CACHE, url: str | None = "s3://b/p") -> TierConfig:
    return TierConfig(mode=mode, url=url)


def test_no_tier_no_key_and_a_new_url_or_mode_is_a_new_key() -> None:
    assert tier_key(None) is None
    assert tier_key(_config(TierMode.OFF)) is None
    assert tier_key(_config(url=None)) is None
    keys = {
        tier_key(_config()),
        tier_key(_config(TierMode.TIERED)),
        tier_key(_config(url="s3://c")),
    }
    assert len(keys) == 3


def test_a_new_tier_is_passed_after_the_grace_then_every_period() -> None:
    schedule = Schedule(grace_s=5, every_s=100)
    key = tier_key(_config())
    assert schedule.due(key, 0.0) is None  # first seen: clients are learning of it
    assert schedule.due(key, 4.9) is None
    assert schedule.due(key, 5.0) is not None
    schedule.ran(key, 5.0)  # type: ignore[arg-type]
    assert schedule.due(key, 104.9) is None
    assert schedule.due(key, 105.0) == "the last pass began 100 s ago"


def test_a_changed_tier_waits_its_own_grace_and_no_tier_forgets_the_wait() -> None:
    schedule = Schedule(grace_s=5, every_s=100)
    first, second = tier_key(_config()), tier_key(_config(url="s3://other"))
    schedule.due(first, 0.0)
    schedule.ran(first, 5.0)  # type: ignore[arg-type]
    assert schedule.due(second, 10.0) is None  # failover: its own grace from now
    assert schedule.due(second, 15.0) is not None
    schedule.ran(second, 15.0)  # type: ignore[arg-type]
    assert schedule.due(None, 16.0) is None  # tier off: writes meanwhile are not queued
    assert schedule.due(second, 17.0) is None  # on again, as before: a new grace
    assert schedule.due(second, 22.0) is not None


def test_a_failed_pass_is_tried_again_after_the_retry_pause() -> None:
    schedule = Schedule(grace_s=0, every_s=100)
    key = tier_key(_config())
    assert schedule.due(key, 0.0) is not None
    schedule.failed(0.0)
    assert schedule.due(key, RETRY_S - 0.1) is None
    assert schedule.due(key, RETRY_S) is not None
