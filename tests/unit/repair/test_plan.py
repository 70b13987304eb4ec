"""Repair planning and scheduling are pure: same inputs, same targets, same jobs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cfs.placement import Candidate
from cfs_contracts.fs.records import ChunkRef
from cfs_contracts.members import Lifecycle, Liveness, MemberRecord, NodeAdmin, RepairJob
from cfs_repair.coordinator import due
from cfs_repair.plan import Reason, plan_chunk

NODES = [f"n{i}" for i in range(1, 9)]


def _ref(holders: tuple[str, ...], scheme: str = "ec4+2") -> ChunkRef:
    return ChunkRef(index=0, chunk_id="ab" * 32, length=100, scheme=scheme, fragments=holders)


def _candidates(*skip: str) -> list[Candidate]:
    return [Candidate(n) for n in NODES if n not in skip]


def test_fragments_of_the_leaving_node_go_to_fresh_nodes() -> None:
    ref = _ref(("n1", "n2", "n3", "n4", "n5", "n6"))
    plan = plan_chunk(7, ref, "n3", _candidates("n3"))
    assert plan is not None
    assert plan.missing == (2,)
    assert plan.sources == (0, 1, 3, 4, 5)
    assert plan.targets[2] in {"n7", "n8"}
    assert not plan.lost


def test_nothing_to_do_for_a_chunk_not_on_the_node() -> None:
    assert plan_chunk(7, _ref(("n1", "n2", "n3", "n4", "n5", "n6")), "n8", _candidates()) is None


def test_a_six_node_site_that_lost_one_doubles_up_rather_than_staying_unprotected() -> None:
    six = [Candidate(n) for n in NODES[:6] if n != "n1"]
    plan = plan_chunk(7, _ref(("n1", "n2", "n3", "n4", "n5", "n6")), "n1", six)
    assert plan is not None and plan.targets[0] in {"n2", "n3", "n4", "n5", "n6"}


def test_too_few_sources_is_lost_unless_the_old_copy_still_answers() -> None:
    ref = _ref(("n1", "n2", "n3"), scheme="ec2+1")
    plan = plan_chunk(7, ref, "n1", _candidates("n1", "n2"), unusable={"n2"})
    assert plan is not None and plan.lost
    drain = plan_chunk(7, ref, "n1", _candidates("n1", "n2"), unusable={"n2"}, copyable=True)
    assert drain is not None and not drain.lost


@settings(max_examples=60, deadline=None)
@given(leaving=st.sampled_from(NODES[:6]), order=st.permutations(NODES))
def test_targets_are_deterministic_and_never_the_leaving_or_a_down_node(
    leaving: str, order: list[str]
) -> None:
    ref = _ref(tuple(NODES[:6]))
    candidates = [Candidate(n) for n in order if n != leaving]
    first = plan_chunk(7, ref, leaving, candidates, unusable={"n8"})
    again = plan_chunk(7, ref, leaving, list(reversed(candidates)), unusable={"n8"})
    assert first is not None and again is not None
    assert first.targets == again.targets, "a resumed coordinator picks the same place"
    assert set(first.targets.values()).isdisjoint({leaving, "n8"})


def _member(node: str, state: Liveness, since_ms: int) -> MemberRecord:
    return MemberRecord(node=node, state=state, incarnation=1, host="h", port=1, since_ms=since_ms)


def test_due_waits_for_the_grace_period_and_does_not_repeat_finished_jobs() -> None:
    members = {"n1": _member("n1", Liveness.DOWN, 1_000), "n2": _member("n2", Liveness.ALIVE, 0)}
    assert due(members, {}, {}, now_ms=60_000, grace_s=120) == []
    assert due(members, {}, {}, now_ms=121_000, grace_s=120) == [("n1", Reason.DOWN, 1_000)]
    done = RepairJob(
        node="n1", job_id="j", reason="down", trigger_ms=1_000, started_ms=1, done_ms=2
    )
    assert due(members, {}, {"n1": done}, now_ms=500_000, grace_s=120) == []
    # A later outage of the same node is a new job.
    members["n1"] = _member("n1", Liveness.DOWN, 400_000)
    assert due(members, {}, {"n1": done}, now_ms=600_000, grace_s=120) == [
        ("n1", Reason.DOWN, 400_000)
    ]


def test_removed_and_draining_nodes_are_due_at_once() -> None:
    admin = {
        "n3": NodeAdmin(node="n3", lifecycle=Lifecycle.REMOVED, since_ms=5),
        "n4": NodeAdmin(node="n4", lifecycle=Lifecycle.DRAINING, since_ms=6),
        "n5": NodeAdmin(node="n5", lifecycle=Lifecycle.DRAINED, since_ms=7),
    }
    assert due({}, admin, {}, now_ms=10, grace_s=120) == [
        ("n3", Reason.REMOVED, 5),
        ("n4", Reason.DRAINING, 6),
    ]
