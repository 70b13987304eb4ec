"""The chunk-store's access log: coldness is never claimed for a time it forgot."""

from __future__ import annotations

import hashlib

from cfs_chunkstore.access import AccessLog
from cfs_contracts.data import fragment_key


def _id(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def test_reads_and_writes_by_fragment_key_count_for_the_chunk() -> None:
    log = AccessLog(started_ms=100)
    log.touch_key(fragment_key(_id(1), "ec2+1", 2), 150)
    log.touch_key("not a key", 150)  # ignored, not an error
    assert log.touched([_id(1), _id(2)], since_ms=150) == [_id(1)]
    assert log.touched([_id(1)], since_ms=151) == []
    assert log.history_from_ms == 100


def test_past_its_bound_it_forgets_the_oldest_and_says_from_when_it_knows() -> None:
    log = AccessLog(started_ms=0, max_entries=4)
    for n in range(5):
        log.touch(_id(n), 10 + n)
    assert len(log) == 2  # the oldest half and then some went
    assert log.history_from_ms == 12  # the newest access forgotten
    assert log.touched([_id(3), _id(4)], since_ms=13) == [_id(3), _id(4)]


def test_a_touch_again_moves_a_chunk_to_the_newest() -> None:
    log = AccessLog(started_ms=0, max_entries=6)
    for n in range(1, 7):
        log.touch(_id(n), n)
    log.touch(_id(1), 7)  # read again: now the newest
    log.touch(_id(7), 8)  # over the bound: 2, 3, 4 and 5 are forgotten, not 1
    assert log.touched([_id(n) for n in range(1, 8)], since_ms=0) == [_id(1), _id(6), _id(7)]
    assert log.history_from_ms == 5
