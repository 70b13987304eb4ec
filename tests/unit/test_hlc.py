"""Hybrid logical clock properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cfs.hlc import ClockSkewError, HybridClock, merge, tick
from cfs_contracts.envelope import HLC

stamps = st.builds(
    HLC, wall_ms=st.integers(0, 10**13), counter=st.integers(0, 1000), node=st.just("r")
)


@given(walls=st.lists(st.integers(0, 10**6), min_size=1, max_size=50))
def test_local_stamps_strictly_increase_even_when_the_wall_clock_goes_back(
    walls: list[int],
) -> None:
    it = iter(walls)
    clock = HybridClock("n", wall=lambda: next(it))
    stamps_seen = [clock.now() for _ in walls]
    keys = [s.key()[:2] for s in stamps_seen]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


@given(last=stamps, remote=stamps, wall=st.integers(0, 10**13))
def test_receive_is_after_both_local_and_remote(last: HLC, remote: HLC, wall: int) -> None:
    out = merge(last, remote, wall, "n")
    assert out.key()[:2] > last.key()[:2]
    assert out.key()[:2] > remote.key()[:2]
    assert out.wall_ms >= wall


@given(last=stamps, wall=st.integers(0, 10**13))
def test_tick_tracks_wall_time(last: HLC, wall: int) -> None:
    out = tick(last, wall, "n")
    assert out.wall_ms == max(last.wall_ms, wall)


def test_remote_stamp_far_in_the_future_is_refused() -> None:
    clock = HybridClock("n", wall=lambda: 1_000, max_drift_ms=500)
    with pytest.raises(ClockSkewError, match="ahead of this node's clock"):
        clock.update(HLC(wall_ms=10_000, counter=0, node="x"))
