"""`cfs admin`: the executor's pure decisions and the CLI's output lines."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cfs.admin.decide import (
    NodeFacts,
    Verdict,
    decide_drain,
    decide_force_election,
    decide_remove,
    merge_views,
    parse_shard,
)
from cfs.admin.report import (
    Replica,
    ShardView,
    age,
    debug_lines,
    node_line,
    shard_line,
    stream_line,
)
from cfs_contracts.data import StoreRecord
from cfs_contracts.members import Lifecycle, Liveness, MemberRecord, NodeAdmin

NOW = 1_800_000_000_000
GIB = 1024**3


def member(
    node: str, state: Liveness = Liveness.ALIVE, since_ms: int = NOW - 15_000
) -> MemberRecord:
    return MemberRecord(
        node=node,
        state=state,
        incarnation=1,
        host="10.0.0.1",
        port=7946,
        since_ms=since_ms,
        detected_by="storage-2",
    )


def admin(node: str, lifecycle: Lifecycle) -> NodeAdmin:
    return NodeAdmin(node=node, lifecycle=lifecycle, since_ms=NOW - 4_000)


def store(node: str) -> StoreRecord:
    return StoreRecord(
        node=node,
        capacity_bytes=20 * GIB,
        free_bytes=18 * GIB,
        used_bytes=2 * GIB,
        fragments=10,
        updated_ms=NOW - 1_000,
        started_ms=NOW - 60_000,
    )


def facts(*members: MemberRecord, admins: tuple[NodeAdmin, ...] = ()) -> NodeFacts:
    return NodeFacts(
        members={m.node: m for m in members},
        admin={a.node: a for a in admins},
        stores={m.node: store(m.node) for m in members},
        now_ms=NOW,
    )


SITE = facts(member("storage-1", Liveness.DOWN), member("storage-2"), member("storage-3"))


def test_remove_of_a_live_undrained_node_is_refused_with_the_way_out() -> None:
    verdict = decide_remove(SITE, "storage-2")
    assert verdict.code == "refused" and verdict.lifecycle is None
    assert verdict.message == (
        "node storage-2 is alive and not drained; drain it first (cfs admin node-drain storage-2)"
    )


def test_remove_of_a_dead_or_drained_node_is_recorded_and_repeats_change_nothing() -> None:
    assert decide_remove(SITE, "storage-1").lifecycle is Lifecycle.REMOVED
    drained = facts(member("storage-2"), admins=(admin("storage-2", Lifecycle.DRAINED),))
    assert decide_remove(drained, "storage-2").lifecycle is Lifecycle.REMOVED
    removed = facts(
        member("storage-1", Liveness.DOWN), admins=(admin("storage-1", Lifecycle.REMOVED),)
    )
    again = decide_remove(removed, "storage-1")
    assert again.ok and again.lifecycle is None and "already removed" in again.message
    draining = facts(member("storage-2"), admins=(admin("storage-2", Lifecycle.DRAINING),))
    assert decide_remove(draining, "storage-2").code == "refused"


def test_drain_is_idempotent_and_refuses_removed_nodes() -> None:
    assert decide_drain(SITE, "storage-3").lifecycle is Lifecycle.DRAINING
    assert decide_drain(SITE, "storage-1").lifecycle is Lifecycle.DRAINING  # dead: rebuilt
    for state, code in (
        (Lifecycle.DRAINING, "ok"),
        (Lifecycle.DRAINED, "ok"),
        (Lifecycle.REMOVED, "refused"),
    ):
        verdict = decide_drain(
            facts(member("storage-3"), admins=(admin("storage-3", state),)), "storage-3"
        )
        assert (verdict.code, verdict.lifecycle) == (code, None)


@pytest.mark.parametrize("decide", [decide_drain, decide_remove])
def test_unknown_node_is_a_usage_error_naming_the_known_ones(
    decide: Callable[[NodeFacts, str], Verdict],
) -> None:
    verdict = decide(SITE, "storage-9")
    assert verdict.code == "usage"
    assert verdict.message == "unknown node 'storage-9' (known: storage-1, storage-2, storage-3)"


def test_force_election_checks_shard_and_target() -> None:
    shards = ["001", "002"]
    assert decide_force_election(SITE, "001", shards, None).ok
    assert decide_force_election(SITE, "003", shards, None).code == "usage"
    assert decide_force_election(SITE, "001", shards, "storage-9").code == "usage"
    assert decide_force_election(SITE, "001", shards, "storage-1").code == "refused"  # down
    assert decide_force_election(SITE, "001", shards, "storage-3").ok
    draining = facts(member("storage-3"), admins=(admin("storage-3", Lifecycle.DRAINING),))
    assert decide_force_election(draining, "001", shards, "storage-3").code == "refused"


@pytest.mark.parametrize(
    ("text", "allow_all", "expected"),
    [
        ("1", False, ["001"]),
        ("02", False, ["002"]),
        ("002", False, ["002"]),
        ("*", True, ["001", "002"]),
    ],
)
def test_shard_ids(text: str, allow_all: bool, expected: list[str]) -> None:
    assert parse_shard(text, ["001", "002"], allow_all=allow_all) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "bad shard id 'abc'"),
        ("000", "bad shard id '000'"),
        ("1000", "bad shard id"),
        ("*", "bad shard id '*' (expected 001..999)"),
        ("3", "unknown shard 003 (shards: 001, 002)"),
    ],
)
def test_bad_shard_ids(text: str, message: str) -> None:
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")
    ):
        parse_shard(text, ["001", "002"])


def test_node_lines_read_like_the_guide() -> None:
    assert node_line(SITE, "storage-1") == (
        'Node "storage-1" is DOWN (detected by SWIM, age 15s), reported by storage-2, '
        "18.0 GiB free of 20.0 GiB"
    )
    assert node_line(SITE, "storage-3") == 'Node "storage-3" is UP, 18.0 GiB free of 20.0 GiB'
    draining = facts(member("storage-3"), admins=(admin("storage-3", Lifecycle.DRAINING),))
    assert node_line(draining, "storage-3").startswith('Node "storage-3" is UP, draining since 4s')
    assert age(15) == "15s" and age(250) == "4m10s" and age(3 * 3600 + 300) == "3h05m"


def test_views_correct_a_stale_kv() -> None:
    stale = facts(member("storage-1"), member("storage-3"))
    seen = NodeFacts(members={"storage-1": member("storage-1", Liveness.DOWN, since_ms=0)})
    merged, corrected = merge_views(stale, seen)
    assert corrected == ["storage-1"]
    assert node_line(merged, "storage-1").startswith('Node "storage-1" is DOWN (detected by SWIM')


def test_shard_lines_show_both_layers() -> None:
    led = ShardView(
        shard="001",
        writer="storage-2",
        term=3,
        elected_ago_s=5.2,
        renewed_ago_s=0.1,
        stream="META_001",
        stream_leader="storage-2",
        replicas=(Replica("storage-1", True, 0, 0.1), Replica("storage-3", False, 12, 2.0)),
    )
    assert shard_line(led) == "Shard 001: Leader=storage-2 (re-elected, 5s ago; term 3)"
    assert stream_line(led) == (
        "  journal META_001: leader storage-2, 2/3 current "
        "(storage-1 current, storage-3 behind lag 12)"
    )
    electing = ShardView(shard="001", term=3, stream="META_001", stream_leader="storage-2")
    assert shard_line(electing) == "Shard 001: Leader=None (election in progress)"
    lost = ShardView(
        shard="002",
        stream="META_002",
        problems=("stream META_002: no Raft leader answered (quorum lost?)",),
    )
    assert (
        shard_line(lost)
        == "Shard 002: Leader=None (quorum lost: journal META_002 has no Raft leader)"
    )
    debug = "\n".join(debug_lines(led))
    assert "holder      storage-2" in debug and "replica     storage-3: behind, lag 12" in debug
    assert debug.endswith("problems: none")


def test_a_journal_leader_that_hears_no_majority_has_no_quorum() -> None:
    from cfs.admin.report import Replica, ShardView

    def view(*peers: tuple[bool, float]) -> ShardView:
        replicas = tuple(
            Replica(f"p{i}", current, 0, active) for i, (current, active) in enumerate(peers)
        )
        return ShardView(shard="001", stream_leader="storage-3", replicas=replicas)

    assert view((True, 0.5), (True, 0.7)).has_quorum
    assert view((True, 0.5), (False, 9.0)).has_quorum  # one peer lost: 2 of 3
    assert not view((True, 4.0), (True, 5.0)).has_quorum  # both silent: the leader is alone
    assert not view((False, 0.5), (False, 0.5)).has_quorum
    assert ShardView(shard="001", stream_leader="storage-3").has_quorum  # R1
    assert not ShardView(shard="001").has_quorum
