"""The flash watermark machine (guide scenario 7): never an acknowledgement on flash
above the high watermark, ENOSPC exactly when full, NORMAL again only once the queue
has drained, and no flapping on a reading that hovers at a threshold."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cfs_tierer.watermark import (
    Level,
    Reading,
    Thresholds,
    WritePolicy,
    decide,
    policy,
    settle,
    worst,
)

CAPACITY = 1000
T = Thresholds()

levels = st.sampled_from(list(Level))
readings = st.builds(
    Reading,
    node=st.just("storage-1"),
    capacity_bytes=st.just(CAPACITY),
    unflushed_bytes=st.integers(0, CAPACITY + 50),
    queue_entries=st.integers(0, 5),
    s3_reachable=st.booleans(),
)


def _reading(fill: float, queue: int = 1, reachable: bool = False) -> Reading:
    return Reading("storage-1", CAPACITY, round(fill * CAPACITY), queue, reachable)


def _walk(level: Level, *fills_and_queues: tuple[float, int]) -> list[Level]:
    seen = []
    for fill, queue in fills_and_queues:
        for step in settle(level, _reading(fill, queue), T):
            level = step.after
        seen.append(level)
    return seen


def test_the_guides_outage_in_order() -> None:
    """S3 down: flash fills, the machine climbs level by level; S3 back: it drains and
    comes down, to NORMAL only with an empty queue."""
    climb = _walk(Level.NORMAL, (0.5, 9), (0.81, 9), (0.90, 9), (0.96, 9), (1.0, 9))
    assert climb == [
        Level.NORMAL,
        Level.WRITE_THROUGH,
        Level.WRITE_THROUGH,
        Level.CRITICAL,
        Level.FULL,
    ]
    drain = _walk(Level.FULL, (0.97, 9), (0.94, 5), (0.5, 2), (0.0, 0))
    assert drain == [Level.FULL, Level.CRITICAL, Level.WRITE_THROUGH, Level.NORMAL]


def test_the_alerts_say_what_the_guide_says() -> None:
    (critical,) = settle(Level.WRITE_THROUGH, _reading(0.95), T)
    assert critical.alert == "Flash critical, S3 unreachable, write-through active"
    (full,) = settle(Level.CRITICAL, _reading(1.0), T)
    assert full.alert is not None and "ENOSPC" in full.alert
    (back,) = settle(Level.CRITICAL, _reading(0.0, queue=0, reachable=True), T)
    assert back.after is Level.NORMAL and back.alert is None
    assert "queue drained" in back.reason


def test_thresholds_must_rise() -> None:
    with pytest.raises(ValueError, match="must rise"):
        Thresholds(high=0.9, critical=0.8)
    with pytest.raises(ValueError, match="resume_margin"):
        Thresholds(resume_margin=0.85)


@given(levels, readings)
def test_a_settled_level_is_safe_for_its_reading(level: Level, reading: Reading) -> None:
    for step in settle(level, reading, T):
        assert step.before == level  # one chain, no skipped bookkeeping
        level = step.after
    fill = reading.fill
    assert (policy(level) is WritePolicy.REFUSE) == (level is Level.FULL)
    if fill >= T.high:
        assert policy(level) is not WritePolicy.ACK_ON_FLASH
    if fill >= T.critical:
        assert level >= Level.CRITICAL
    if fill >= T.full:
        assert level is Level.FULL
    assert decide(level, reading, T) is None  # settled: the same reading changes nothing


@given(levels, readings)
def test_normal_again_only_with_an_empty_queue(level: Level, reading: Reading) -> None:
    steps = settle(level, reading, T)
    if level > Level.NORMAL and steps and steps[-1].after is Level.NORMAL:
        assert reading.queue_entries == 0


@given(levels, readings, st.integers(0, 50))
def test_more_unflushed_data_is_never_a_milder_level(
    level: Level, reading: Reading, more: int
) -> None:
    def settled(r: Reading) -> Level:
        steps = settle(level, r, T)
        return steps[-1].after if steps else level

    fuller = Reading(
        reading.node,
        reading.capacity_bytes,
        reading.unflushed_bytes + more,
        reading.queue_entries,
        reading.s3_reachable,
    )
    assert settled(fuller) >= settled(reading)


@given(st.lists(levels))
def test_the_cluster_is_as_bad_as_its_worst_node(node_levels: list[Level]) -> None:
    assert worst(node_levels) == max(node_levels, default=Level.NORMAL)


class Hovering(RuleBasedStateMachine):
    """Random readings over time: every transition chains from the last, and a reading
    within the margin of a threshold never moves the machine back and forth."""

    def __init__(self) -> None:
        super().__init__()
        self.level = Level.NORMAL

    @rule(reading=readings)
    def read(self, reading: Reading) -> None:
        for step in settle(self.level, reading, T):
            assert step.before == self.level
            self.level = step.after

    @rule(below=st.integers(1, int(T.resume_margin * CAPACITY)))
    def hover(self, below: int) -> None:
        """A reading less than the margin under the current level's threshold (S3 still
        owed data) keeps the level: no flapping at a threshold."""
        if self.level is Level.NORMAL:
            return
        threshold = round(T.entered_at(self.level) * CAPACITY)
        at = threshold - below + 1  # within (threshold - margin, threshold]
        before = self.level
        for step in settle(self.level, Reading("storage-1", CAPACITY, at, 1, False), T):
            self.level = step.after
        assert self.level is before

    @invariant()
    def full_means_refused(self) -> None:
        assert (policy(self.level) is WritePolicy.REFUSE) == (self.level is Level.FULL)


TestHovering = Hovering.TestCase
