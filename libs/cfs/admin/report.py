"""What `cfs admin status|raft-status|raft-debug` print, as pure functions of snapshots.

The line shapes are the operator guide's (`Node "storage-1" is DOWN (detected by
SWIM, age 15s)`, `Shard 001: Leader=storage-2 (re-elected, 5s ago)`), so the
runbook and the tool agree; `--json` gives the same facts as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cfs.admin.decide import NodeFacts
from cfs_contracts.backup import BackupStatus
from cfs_contracts.members import Lifecycle, Liveness
from cfs_contracts.tier import TierConfig, TierState

_SHOWN = {
    Liveness.ALIVE: "UP",
    Liveness.SUSPECT: "SUSPECT",
    Liveness.DOWN: "DOWN",
    Liveness.LEFT: "LEFT",
}


def age(seconds: float) -> str:
    """15s, 4m10s, 3h05m, 2d04h: short enough for one line."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def node_line(facts: NodeFacts, node: str) -> str:
    """`Node "storage-1" is DOWN (detected by SWIM, age 15s)`, then lifecycle and capacity."""
    state = facts.liveness(node)
    member = facts.members.get(node)
    head = f'Node "{node}" is {_SHOWN[state] if state else "UNKNOWN"}'
    if state in (Liveness.DOWN, Liveness.SUSPECT, Liveness.LEFT) and member is not None:
        detail = []
        if state is not Liveness.LEFT:
            detail.append(f"detected by {member.method or 'SWIM'}")
        if member.since_ms:
            detail.append(f"age {age((facts.now_ms - member.since_ms) / 1000)}")
        head += f" ({', '.join(detail)})" if detail else ""
        if state is not Liveness.LEFT and member.detected_by:
            head += f", reported by {member.detected_by}"
    elif state is None:
        head += " (no membership record, no fresh chunk-store record)"
    extras = []
    admin = facts.admin.get(node)
    if admin is not None and admin.lifecycle is not Lifecycle.ACTIVE:
        since = f" since {age((facts.now_ms - admin.since_ms) / 1000)}" if admin.since_ms else ""
        extras.append(f"{admin.lifecycle.value}{since}")
    store = facts.stores.get(node)
    if store is not None and store.capacity_bytes:
        extras.append(f"{size(store.free_bytes)} free of {size(store.capacity_bytes)}")
    return ", ".join([head, *extras])


def service_lines(facts: NodeFacts) -> list[str]:
    """What an operator must see about service processes: each degraded one with why,
    each live node's service that stopped reporting, and who runs each site singleton."""
    lines: list[str] = []
    singletons: dict[str, dict[str, list[str]]] = {}
    for record in sorted(facts.health, key=lambda r: (r.service, r.node)):
        where = f'Service {record.service} on "{record.node}"'
        if not facts.reporting(record):
            if facts.is_live(record.node):
                silent = age((facts.now_ms - record.updated_ms) / 1000)
                lines.append(f"{where} is NOT REPORTING (last report {silent} ago)")
            continue
        if record.degraded:
            why = "; ".join(f"{part}: {reason}" for part, reason in record.degraded.items())
            lines.append(f"{where} is DEGRADED ({why})")
        if record.singleton:
            singletons.setdefault(record.service, {}).setdefault(record.singleton, []).append(
                record.node
            )
    for service, states in sorted(singletons.items()):
        holding = ", ".join(states.get("holding", [])) or "nobody"
        standby = ", ".join(states.get("standby", [])) or "none"
        lines.append(f"Site service {service}: active on {holding} (standby: {standby})")
    return lines


def service_json(facts: NodeFacts) -> list[dict[str, Any]]:
    return [
        {
            **record.model_dump(),
            "state": record.state.value if facts.reporting(record) else "not_reporting",
        }
        for record in sorted(facts.health, key=lambda r: (r.service, r.node))
    ]


def node_json(facts: NodeFacts, node: str) -> dict[str, Any]:
    state = facts.liveness(node)
    member = facts.members.get(node)
    store = facts.stores.get(node)
    return {
        "node": node,
        "state": _SHOWN[state] if state else "UNKNOWN",
        "liveness": state.value if state else None,
        "detected_by": member.detected_by if member else None,
        "method": member.method if member else None,
        "age_s": (facts.now_ms - member.since_ms) / 1000 if member and member.since_ms else None,
        "lifecycle": facts.lifecycle(node).value,
        "capacity_bytes": store.capacity_bytes if store else None,
        "free_bytes": store.free_bytes if store else None,
        "fragments": store.fragments if store else None,
    }


@dataclass(frozen=True)
class Replica:
    server: str
    current: bool
    lag: int
    active_s: float


PEER_SILENT_S = 3.0  # Raft heartbeats every second: a peer silent this long is gone


@dataclass(frozen=True)
class ShardView:
    """Both Raft layers of one shard (DESIGN.md §4): the writer lease and the journal."""

    shard: str
    writer: str | None = None
    term: int = 0
    elected_ago_s: float | None = None
    renewed_ago_s: float | None = None
    lease_s: float | None = None
    handoff_to: str | None = None
    stream: str = ""
    stream_leader: str | None = None
    replicas: tuple[Replica, ...] = ()
    last_seq: int = 0
    problems: tuple[str, ...] = field(default=())

    @property
    def quorum_lost(self) -> bool:
        return self.stream_leader is None and any("Raft leader" in p for p in self.problems)

    @property
    def has_quorum(self) -> bool:
        """A journal leader that still hears a majority of its peers. A leader cut off
        from the others answers stream info for a few seconds before it steps down,
        so a reported leader alone does not prove the journal can take writes."""
        if self.stream_leader is None:
            return False
        heard = sum(1 for r in self.replicas if r.current and r.active_s < PEER_SILENT_S)
        return 2 * (1 + heard) > 1 + len(self.replicas)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "writer": self.writer,
            "term": self.term,
            "elected_ago_s": self.elected_ago_s,
            "renewed_ago_s": self.renewed_ago_s,
            "lease_s": self.lease_s,
            "handoff_to": self.handoff_to,
            "stream": self.stream,
            "stream_leader": self.stream_leader,
            "replicas": [r.__dict__ for r in self.replicas],
            "last_seq": self.last_seq,
            "problems": list(self.problems),
        }


def shard_line(view: ShardView) -> str:
    """`Shard 001: Leader=storage-2 (re-elected, 5s ago)` or `Leader=None (...)`."""
    if view.writer:
        how = "elected" if view.term <= 1 else "re-elected"
        when = f", {age(view.elected_ago_s)} ago" if view.elected_ago_s is not None else ""
        return f"Shard {view.shard}: Leader={view.writer} ({how}{when}; term {view.term})"
    if view.quorum_lost:
        why = f"quorum lost: journal {view.stream} has no Raft leader"
    elif view.handoff_to and view.handoff_to != "*":
        why = f"election in progress, handing over to {view.handoff_to}"
    else:
        why = "election in progress"
    return f"Shard {view.shard}: Leader=None ({why})"


def stream_line(view: ShardView) -> str:
    """The JetStream Raft layer: `  journal META_001: leader storage-2, replicas ...`."""
    if view.stream_leader is None:
        return f"  journal {view.stream}: no Raft leader"
    followers = ", ".join(
        f"{r.server} {'current' if r.current else 'behind'}" + (f" lag {r.lag}" if r.lag else "")
        for r in view.replicas
    )
    total = len(view.replicas) + 1
    current = 1 + sum(1 for r in view.replicas if r.current)
    return f"  journal {view.stream}: leader {view.stream_leader}, {current}/{total} current" + (
        f" ({followers})" if followers else ""
    )


def debug_lines(view: ShardView) -> list[str]:
    """Everything known about one shard, for `raft-debug`."""

    def ago(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}s ago"

    lines = [
        shard_line(view),
        f"  writer lease (leases KV, key meta.{view.shard}):",
        f"    holder      {view.writer or '-'}",
        f"    term        {view.term}",
        f"    elected     {ago(view.elected_ago_s)}",
        f"    renewed     {ago(view.renewed_ago_s)}",
        f"    lease time  {'-' if view.lease_s is None else f'{view.lease_s:g}s'}",
        f"    handoff to  {view.handoff_to or '-'}",
        f"  journal stream {view.stream} (JetStream Raft group):",
        f"    leader      {view.stream_leader or '-'}",
        f"    last seq    {view.last_seq}",
    ]
    for r in view.replicas:
        state = "current" if r.current else "behind"
        lines.append(
            f"    replica     {r.server}: {state}, lag {r.lag}, seen {r.active_s:.1f}s ago"
        )
    lines.append("  problems:" + ("" if view.problems else " none"))
    lines.extend(f"    - {p}" for p in view.problems)
    return lines


BACKUP_STALE_S = 10.0


def backup_lines(status: BackupStatus | None, now_ms: int) -> list[str]:
    """Backup age and archive lag (DESIGN.md §10), or why they are unknown."""
    if status is None:
        return ["Backup: no status (no backup service has reported)"]
    silent = (now_ms - status.updated_ms) / 1000
    if silent > BACKUP_STALE_S:
        return [f"Backup: NOT REPORTING (last report {age(silent)} ago from {status.node})"]
    lines = []
    if status.last_snapshot_ms:
        where = f" at {status.last_snapshot_url}" if status.last_snapshot_url else ""
        lines.append(
            f"Backup: last metadata snapshot {age((now_ms - status.last_snapshot_ms) / 1000)} "
            f"ago{where} ({status.last_snapshot_inodes} inodes)"
        )
    else:
        lines.append("Backup: no metadata snapshot taken yet")
    if status.schedule:
        lines.append(f"Backup: scheduled {status.schedule}")
    if status.archive_url:
        worst = max((a.lag_s for a in status.archive), default=0.0)
        failing = [a for a in status.archive if a.error]
        state = "DEGRADED, " if failing else ""
        lines.append(f"Backup: journal archive {state}lag {worst:.1f} s to {status.archive_url}")
        lines += [f"  {a.stream}: {a.error}" for a in failing]
    else:
        lines.append(
            "Backup: journal archive OFF (no archive_url): RPO after total loss is "
            "the last snapshot's age"
        )
    if status.last_error:
        lines.append(f"Backup: last error: {status.last_error}")
    return lines


def tier_lines(config: TierConfig | None, state: TierState | None, now_ms: int) -> list[str]:
    """The data tier in one line (the details: `s3-queue-status`, `s3-health`)."""
    if config is None or not config.enabled:
        return ["Data tier: off (no S3 copy of file data; cfs admin tier-config)"]
    head = f"Data tier: {config.mode.value} to {config.url}"
    if state is None or (now_ms - state.updated_ms) / 1000 > BACKUP_STALE_S:
        return [f"{head}; s3-tierer NOT REPORTING"]
    s3 = "S3 reachable" if state.s3.reachable else f"S3 UNREACHABLE ({state.s3.error_class})"
    oldest = (
        f", oldest {age((now_ms - state.oldest_queued_ms) / 1000)}"
        if state.oldest_queued_ms
        else ""
    )
    return [
        f"{head}; {s3}; queue {state.queue_entries} chunks ({size(state.queue_bytes)}{oldest}); "
        f"watermark {state.level}"
    ]
