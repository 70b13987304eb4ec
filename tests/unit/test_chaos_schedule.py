"""Chaos schedules (tests/chaos/schedule.py): pure, reproducible from the seed."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from tests.chaos.schedule import (
    NATS,
    S3_FAILURES,
    SITE,
    Kind,
    draw,
    overlapping,
    replay_command,
)

NODES = ["storage-1", "storage-2", "storage-3"]


@given(st.integers(0, 10_000), st.integers(1, 6))
def test_a_seed_draws_the_same_schedule_and_single_never_overlaps(seed: int, n: int) -> None:
    first = draw("single", seed, NODES, faults=n)
    assert first == draw("single", seed, NODES, faults=n)
    assert len(first.faults) == n and not overlapping(first)
    for fault in first.faults:
        if fault.kind is Kind.S3_FAIL:  # the site's S3, held long enough to be an outage
            assert fault.node == SITE and fault.how in S3_FAILURES and 10 <= fault.hold_s <= 30
            continue
        assert fault.node in NODES
        assert fault.hold_s == 30.0 if fault.kind is Kind.STOP_PROCESS else 3 <= fault.hold_s <= 8
        if fault.kind in (Kind.KILL_NATS, Kind.RESTART_NATS):
            assert fault.process == NATS


def test_multi_schedules_overlap_faults_on_different_nodes() -> None:
    schedules = [draw("multi", seed, NODES, faults=3) for seed in range(50)]
    overlapped = [s for s in schedules if overlapping(s)]
    assert overlapped, "some multi schedules hold two faults at once"
    for schedule in overlapped:
        spans = sorted(schedule.faults, key=lambda f: f.at_s)
        for a, b in itertools.pairwise(spans):
            if b.at_s < a.at_s + a.hold_s:
                assert a.node != b.node


def test_a_schedule_names_the_command_that_replays_it() -> None:
    schedule = draw("single", 17, NODES)
    assert replay_command(schedule, 3) == (
        "make chaos CHAOS_SCHEDULES=single CHAOS_SEEDS=17 CHAOS_NODES=3"
    )
    assert draw("single", 17, NODES) != draw("single", 18, NODES)


def test_every_fault_kind_is_drawn_and_the_kinds_can_be_chosen() -> None:
    drawn = {f.kind for seed in range(200) for f in draw("single", seed, NODES).faults}
    assert drawn == set(Kind)
    only = draw("multi", 3, NODES, faults=6, kinds=(Kind.PARTITION, Kind.DISK_FULL))
    assert {f.kind for f in only.faults} <= {Kind.PARTITION, Kind.DISK_FULL}
