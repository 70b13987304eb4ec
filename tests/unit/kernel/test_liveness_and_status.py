"""The shared liveness vocabulary and the service lines of `cfs admin status` (pure)."""

from __future__ import annotations

from cfs.admin.report import service_lines
from cfs.liveness import NodeFacts
from cfs_contracts.data import StoreRecord
from cfs_contracts.members import Lifecycle, Liveness, MemberRecord, NodeAdmin, ServiceHealth
from cfs_repair.coordinator import next_check_s

NOW = 1_000_000


def member(node: str, state: Liveness, since_ms: int = 0) -> MemberRecord:
    return MemberRecord(node=node, state=state, incarnation=0, host="h", port=1, since_ms=since_ms)


def store(node: str, updated_ms: int) -> StoreRecord:
    return StoreRecord(
        node=node,
        capacity_bytes=1,
        free_bytes=1,
        used_bytes=0,
        fragments=0,
        updated_ms=updated_ms,
        started_ms=0,
    )


def health(node: str, service: str = "repair", **fields: object) -> ServiceHealth:
    base: dict[str, object] = dict(
        service=service, node=node, pid=1, started_ms=0, updated_ms=NOW, heartbeat_s=5.0
    )
    return ServiceHealth.model_validate({**base, **fields})


def test_one_vocabulary_for_who_is_up() -> None:
    facts = NodeFacts(
        members={"a": member("a", Liveness.ALIVE), "b": member("b", Liveness.SUSPECT)},
        admin={"a": NodeAdmin(node="a", lifecycle=Lifecycle.DRAINING, since_ms=0)},
        stores={"c": store("c", NOW - 1_000), "d": store("d", NOW - 60_000)},
        now_ms=NOW,
    )
    assert facts.live_nodes() == ["a", "c"]  # c: no membership, but a fresh store
    assert facts.liveness("d") is None  # a stale store says nothing
    assert facts.is_live("b") and not facts.usable("b")  # suspected: no new data
    assert not facts.usable("a") and facts.in_service("a")  # draining keeps coordinating
    assert facts.usable("c") and facts.in_service("c")
    drained = NodeFacts(admin={"e": NodeAdmin(node="e", lifecycle=Lifecycle.DRAINED, since_ms=0)})
    assert not drained.in_service("e")


def test_status_names_degraded_silent_and_singleton_services() -> None:
    facts = NodeFacts(
        members={n: member(n, Liveness.ALIVE) for n in ("s1", "s2", "s3")},
        now_ms=NOW,
        health=(
            health("s1", singleton="holding"),
            health("s2", singleton="standby", degraded={"consumer DATA/x": "no leader"}),
            health("s3", singleton="standby", updated_ms=NOW - 60_000),
        ),
    )
    lines = service_lines(facts)
    assert 'Service repair on "s2" is DEGRADED (consumer DATA/x: no leader)' in lines
    assert 'Service repair on "s3" is NOT REPORTING (last report 1m00s ago)' in lines
    assert "Site service repair: active on s1 (standby: s2)" in lines


def test_a_silent_service_on_a_down_node_is_not_repeated() -> None:
    facts = NodeFacts(
        members={"s1": member("s1", Liveness.DOWN)},
        now_ms=NOW,
        health=(health("s1", updated_ms=0),),
    )
    assert service_lines(facts) == []  # the node line already says DOWN


def test_repair_wakes_when_the_first_grace_period_ends() -> None:
    members = {
        "a": member("a", Liveness.DOWN, since_ms=NOW - 100_000),
        "b": member("b", Liveness.DOWN, since_ms=NOW - 10_000),
        "c": member("c", Liveness.ALIVE),
    }
    assert next_check_s(members, NOW, grace_s=120) == 20.0  # a's grace ends first
    assert next_check_s({}, NOW, grace_s=120) == 60.0  # nothing pending: the idle check
    assert next_check_s(members, NOW, grace_s=5) == 60.0  # both past grace: due already
