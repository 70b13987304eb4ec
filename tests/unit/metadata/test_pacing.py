"""The group commit's pacing: a lone writer never waits; company is waited for."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cfs_metadata.pacing import COMPANY, CommitPacer

LIMIT = 512


def test_a_lone_writer_never_waits() -> None:
    pacer = CommitPacer(linger_s=0.004)
    for _ in range(100):
        assert not pacer.wants_more(1, LIMIT)
        pacer.committed(1)


def test_requests_that_come_together_are_waited_for_up_to_the_usual_company() -> None:
    pacer = CommitPacer(linger_s=0.004)
    for _ in range(10):
        pacer.committed(6)
    assert pacer.average > 5
    assert pacer.wants_more(1, LIMIT)
    assert pacer.wants_more(5, LIMIT)
    assert not pacer.wants_more(6, LIMIT)  # caught up with the average: goes at once
    assert not pacer.wants_more(5, limit=5)  # full


def test_company_that_stops_coming_stops_the_waiting() -> None:
    pacer = CommitPacer(linger_s=0.004)
    for _ in range(10):
        pacer.committed(8)
    lone = 0
    while pacer.wants_more(1, LIMIT):
        pacer.committed(1)
        lone += 1
    assert lone <= 10  # each waited at most the linger: 40 ms in all, once


def test_no_linger_no_waiting() -> None:
    pacer = CommitPacer(linger_s=0.0)
    for _ in range(10):
        pacer.committed(50)
    assert not pacer.wants_more(1, LIMIT)


@given(st.lists(st.integers(min_value=1, max_value=LIMIT), max_size=50), st.integers(1, LIMIT))
def test_a_batch_waits_only_below_the_average_with_company_and_room(
    sizes: list[int], size: int
) -> None:
    pacer = CommitPacer(linger_s=0.004)
    for committed in sizes:
        pacer.committed(committed)
    assert 1.0 <= pacer.average <= LIMIT
    if pacer.wants_more(size, LIMIT):
        assert pacer.average >= COMPANY and size < pacer.average and size < LIMIT
