"""The figures alert rules watch, from what the services publish in the `nodes`
bucket. Pure: records in, `{figure: {key: value}}` out.

    node.down[node]                  1 while SWIM has the node down, else 0
    tier.watermark_level[site]       0 normal, 1 write-through, 2 critical, 3 full
    tier.queue_chunks[site]          chunks queued for S3
    tier.queue_age_s[site]           age of the oldest of them
    replication.lag_s[peer]          age of the last peer message applied, while any wait
    archive.lag_s[stream]            age of the oldest journal message not yet in S3
    backup.age_ratio[site]           newest snapshot's age / the snapshot interval
    conflicts.open[site]             conflicts between the sites no one resolved
    check.age_s[site]                age of the last complete metadata-consistency-check
                                     (of the cluster, while no check has ever run)
    meta.leader_changes_per_h[shard] new writer terms seen in the last hour
    repair.stalled_s[node]           time since a repair that is still needed last
                                     finished a page of files

A figure nobody publishes has no keys: its rules never fire (the README lists which).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from cfs_contracts.backup import BackupStatus, SnapshotSchedule
from cfs_contracts.fs.check import CheckStatus
from cfs_contracts.geo import GeoApplied, OpenConflicts
from cfs_contracts.members import ClusterConfig, Liveness, MemberRecord, RepairJob
from cfs_contracts.tier import TierState

WATERMARK_LEVELS = {"NORMAL": 0, "WRITE_THROUGH": 1, "CRITICAL": 2, "FULL": 3}

Figures = dict[str, dict[str, float]]


@dataclass(frozen=True)
class Published:
    """What the evaluation reads, one snapshot of the nodes bucket."""

    site: str
    members: dict[str, MemberRecord] = field(default_factory=dict)
    tier: TierState | None = None
    geo: GeoApplied | None = None
    backup: BackupStatus | None = None
    schedule: SnapshotSchedule | None = None
    conflicts: OpenConflicts | None = None
    cluster: ClusterConfig | None = None
    check: CheckStatus | None = None
    repairs: dict[str, RepairJob] = field(default_factory=dict)
    leader_changes: Mapping[str, int] = field(default_factory=dict)  # `TermHistory.counts`


def figures(p: Published, now_ms: int) -> Figures:
    out: Figures = {}

    def put(name: str, key: str, value: float) -> None:
        out.setdefault(name, {})[key] = value

    def age_s(ms: int | None) -> float:
        return 0.0 if ms is None else max(0.0, (now_ms - ms) / 1000)

    for node, member in p.members.items():
        if member.state is not Liveness.LEFT:
            put("node.down", node, 1.0 if member.state is Liveness.DOWN else 0.0)
    if p.tier is not None:
        put("tier.watermark_level", p.site, float(WATERMARK_LEVELS.get(p.tier.level.upper(), 0)))
        put("tier.queue_chunks", p.site, float(p.tier.queue_entries))
        put("tier.queue_age_s", p.site, age_s(p.tier.oldest_queued_ms))
    if p.geo is not None:
        waiting = [s.newest_ms for s in p.geo.shards.values() if s.pending and s.newest_ms]
        put("replication.lag_s", p.geo.peer, age_s(min(waiting)) if waiting else 0.0)
    if p.backup is not None:
        for stream in p.backup.archive:
            put("archive.lag_s", stream.stream, stream.lag_s)
        if p.schedule is not None and p.backup.last_snapshot_ms is not None:
            ratio = age_s(p.backup.last_snapshot_ms) / p.schedule.interval_s
            put("backup.age_ratio", p.site, ratio)
    if p.conflicts is not None:
        put("conflicts.open", p.site, float(p.conflicts.open))
    complete = p.check if p.check is not None and p.check.status != "incomplete" else None
    if complete is not None:
        put("check.age_s", p.site, age_s(complete.finished_ms))
    elif p.cluster is not None:
        put("check.age_s", p.site, age_s(p.cluster.created_ms))
    for shard, changes in p.leader_changes.items():
        put("meta.leader_changes_per_h", shard, float(changes))
    for node, job in p.repairs.items():
        if not job.done_ms and _still_needed(job, p.members.get(node)):
            put("repair.stalled_s", node, age_s(max(job.progress_ms, job.started_ms)))
    return out


def _still_needed(job: RepairJob, member: MemberRecord | None) -> bool:
    """A repair of a node that came back is abandoned, not stalled."""
    if job.reason != "down":
        return True
    return member is not None and member.state in (Liveness.DOWN, Liveness.LEFT)


@dataclass
class TermHistory:
    """Leader changes per shard over the last `window_s`, from the writer terms seen at
    each round. A term that grew by n counts n changes (some fell between two rounds);
    the first sight of a shard is its baseline (an alerts leader that just started knows
    nothing older)."""

    window_s: float = 3600.0
    last: dict[str, int] = field(default_factory=dict)
    seen: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)

    def observe(self, terms: Mapping[str, int], now: float) -> None:
        for shard, term in terms.items():
            before = self.last.get(shard)
            self.last[shard] = term
            if before is not None and term > before:
                self.seen.setdefault(shard, deque()).append((now, term - before))
        for changes in self.seen.values():
            while changes and changes[0][0] <= now - self.window_s:
                changes.popleft()

    def counts(self, now: float) -> dict[str, int]:
        since = now - self.window_s
        return {
            shard: sum(n for at, n in self.seen.get(shard, ()) if at > since) for shard in self.last
        }
