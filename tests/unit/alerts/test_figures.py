"""The figures alert rules watch, from the records the services publish."""

from __future__ import annotations

from dataclasses import replace

from cfs_alerts.figures import Published, TermHistory, figures
from cfs_alerts.rules import DEFAULT_RULES, Evaluator, Kind, load_rules
from cfs_contracts.backup import ArchiveStream, BackupStatus, SnapshotSchedule
from cfs_contracts.fs.check import CheckStatus
from cfs_contracts.geo import GeoApplied, OpenConflicts, ShardApplied
from cfs_contracts.members import ClusterConfig, Liveness, MemberRecord, RepairJob

NOW = 1_000_000_000


def member(node: str, state: Liveness) -> MemberRecord:
    return MemberRecord(node=node, state=state, incarnation=0, host="127.0.0.1", port=7946,
                        since_ms=0)  # fmt: skip


def test_each_published_record_becomes_its_figures() -> None:
    published = Published(
        site="site-a",
        members={
            "storage-1": member("storage-1", Liveness.ALIVE),
            "storage-2": member("storage-2", Liveness.DOWN),
            "storage-3": member("storage-3", Liveness.LEFT),
        },
        geo=GeoApplied(
            peer="site-b",
            shards={
                1: ShardApplied(position=9, pending=3, newest_ms=NOW - 12_000),
                2: ShardApplied(position=4, pending=0, newest_ms=NOW - 99_000),
            },
            updated_ms=NOW,
        ),
        backup=BackupStatus(
            node="storage-1",
            updated_ms=NOW,
            last_snapshot_ms=NOW - 7_200_000,
            archive=(ArchiveStream(stream="META_001", lag_s=400.0),),
        ),
        schedule=SnapshotSchedule(interval_s=3600, destination="s3://b/p"),
        conflicts=OpenConflicts(open=2, updated_ms=NOW),
    )
    figs = figures(published, NOW)
    assert figs["node.down"] == {"storage-1": 0.0, "storage-2": 1.0}
    assert figs["replication.lag_s"] == {"site-b": 12.0}
    assert figs["archive.lag_s"] == {"META_001": 400.0}
    assert figs["backup.age_ratio"] == {"site-a": 2.0}
    assert figs["conflicts.open"] == {"site-a": 2.0}
    assert "tier.queue_chunks" not in figs  # no tier state published: no keys


def test_the_shipped_rules_fire_on_what_the_figures_say() -> None:
    evaluator = Evaluator(load_rules(DEFAULT_RULES))
    figs = {"node.down": {"storage-2": 1.0}, "archive.lag_s": {"META_001": 400.0},
            "conflicts.open": {"site-a": 2.0}}  # fmt: skip
    fired = {(n.rule.name, n.key) for n in evaluator.round(figs, {}, 0.0)}
    assert fired == {("conflicts-recorded", "site-a")}  # at once; the others have a for:
    later = {(n.rule.name, n.key, n.kind) for n in evaluator.round(figs, {}, 61.0)}
    assert later == {
        ("node-down", "storage-2", Kind.FIRED),
        ("archive-lag", "META_001", Kind.FIRED),
    }
    events = {"CorruptionDetected": {"inode 7"}}
    (corrupt,) = evaluator.round(figs, events, 62.0)
    assert (corrupt.rule.name, corrupt.key, corrupt.kind) == (
        "corruption-detected",
        "inode 7",
        Kind.FIRED,
    )
    gone = {(n.rule.name, n.kind) for n in evaluator.round({}, {}, 70.0)}
    assert gone == {("node-down", Kind.RESOLVED), ("archive-lag", Kind.RESOLVED),
                    ("conflicts-recorded", Kind.RESOLVED)}  # fmt: skip


def test_check_age_repair_stall_and_leader_changes() -> None:
    job = RepairJob(node="storage-2", job_id="j", reason="down", trigger_ms=0,
                    started_ms=NOW - 4_000_000, progress_ms=NOW - 2_000_000)  # fmt: skip
    stale = job.model_copy(update={"node": "storage-1"})  # its node came back
    cluster = ClusterConfig(name="c", site="site-a", shards=1, bootstrap_node="storage-1",
                            created_ms=NOW - 50_000, created_by="admin")  # fmt: skip
    published = Published(
        site="site-a",
        members={
            "storage-1": member("storage-1", Liveness.ALIVE),
            "storage-2": member("storage-2", Liveness.DOWN),
        },
        cluster=cluster,
        repairs={"storage-1": stale, "storage-2": job},
    )
    figs = figures(published, NOW)
    assert figs["check.age_s"] == {"site-a": 50.0}  # never checked: since the cluster began
    assert figs["repair.stalled_s"] == {"storage-2": 2000.0}
    incomplete = CheckStatus(finished_ms=NOW - 1_000, status="incomplete", by="x")
    assert figures(replace(published, check=incomplete), NOW)["check.age_s"] == {"site-a": 50.0}
    clean = CheckStatus(finished_ms=NOW - 1_000, status="clean", by="x")
    assert figures(replace(published, check=clean), NOW)["check.age_s"] == {"site-a": 1.0}

    history = TermHistory(window_s=3600)
    history.observe({"001": 4, "002": 1}, 0.0)  # baseline: older changes are unknown
    history.observe({"001": 6, "002": 1}, 10.0)  # two changes between two rounds
    history.observe({"001": 7}, 3000.0)  # a shard unread this round keeps its history
    assert history.counts(3000.0) == {"001": 3, "002": 0}
    assert history.counts(3611.0) == {"001": 1, "002": 0}  # the first two left the hour
    published = Published(site="site-a", leader_changes=history.counts(3000.0))
    assert figures(published, NOW)["meta.leader_changes_per_h"] == {"001": 3.0, "002": 0.0}
