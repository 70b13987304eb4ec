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

A figure nobody publishes has no keys: its rules never fire (the README lists which).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cfs_contracts.backup import BackupStatus, SnapshotSchedule
from cfs_contracts.geo import GeoApplied, OpenConflicts
from cfs_contracts.members import Liveness, MemberRecord
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
    return out
