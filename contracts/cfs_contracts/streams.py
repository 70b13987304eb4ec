"""Stream and KV bucket definitions for one site (DESIGN.md §1, §3).

Streams are provisioned from these specs by `cfs cluster init` and deploy
tooling (STYLE.md principle 5), never as a side effect of a service starting.
Subjects follow `cfs.<site>.<area>.<...>`; request/reply subjects live under
`cfs.<site>.rpc.` and are deliberately captured by no stream, so file data never
passes through JetStream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

SUBJECT_ROOT = "cfs"
JOURNAL_MAX_MSG_BYTES = 1024 * 1024
DEFAULT_DUPLICATE_WINDOW_S = 120.0


class Retention(StrEnum):
    LIMITS = "limits"
    WORK_QUEUE = "workqueue"


@dataclass(frozen=True)
class StreamSpec:
    """Site-independent description of a stream; `subjects` hold `{site}`."""

    name: str
    subjects: tuple[str, ...]
    description: str
    retention: Retention = Retention.LIMITS
    max_age_s: float = 0.0  # 0 = keep forever
    max_msg_bytes: int = JOURNAL_MAX_MSG_BYTES
    duplicate_window_s: float = DEFAULT_DUPLICATE_WINDOW_S
    # Journals are the system of record: deleting or purging them is refused.
    deny_delete: bool = True
    deny_purge: bool = True
    # Direct get lets a survivor answer reads after quorum loss (guide scenario 3).
    allow_direct: bool = True

    def subjects_for(self, site: str) -> list[str]:
        return [s.format(site=site) for s in self.subjects]


@dataclass(frozen=True)
class KVSpec:
    bucket: str
    description: str
    history: int = 1
    ttl_s: float = 0.0
    max_value_bytes: int = 64 * 1024
    extra: dict[str, str] = field(default_factory=dict)


def site_subject(site: str, *parts: str) -> str:
    return ".".join((SUBJECT_ROOT, site, *parts))


def shard_name(index: int) -> str:
    """Shards are shown as 001, 002, ... (guide: `cfs admin raft-status`)."""
    if not 1 <= index <= 999:
        raise ValueError(f"shard index must be 1..999, got {index}")
    return f"{index:03d}"


def meta_stream(shard: str) -> StreamSpec:
    return StreamSpec(
        name=f"META_{shard}",
        subjects=(f"{SUBJECT_ROOT}.{{site}}.meta.{shard}.>",),
        description=f"metadata journal of shard {shard}",
    )


CLUSTER = StreamSpec("CLUSTER", ("cfs.{site}.cluster.>",), "membership and node lifecycle")
DATA = StreamSpec("DATA", ("cfs.{site}.data.>",), "fragment stored/deleted events")
TIER = StreamSpec(
    "TIER",
    ("cfs.{site}.tier.>",),
    "S3 flush queue: chunks on flash not yet in S3 (purged below the oldest one pending)",
    deny_purge=False,
    deny_delete=False,
)
REPL = StreamSpec("REPL", ("cfs.{site}.repl.>",), "cross-site replication progress")
CONFLICTS = StreamSpec("CONFLICTS", ("cfs.{site}.conflicts.>",), "cross-site merge conflicts")
CMD = StreamSpec("CMD", ("cfs.{site}.cmd.>",), "admin command events")
ALERTS = StreamSpec(
    "ALERTS", ("cfs.{site}.alerts.>",), "alerts raised by rules", max_age_s=90 * 86400.0
)
AUDIT = StreamSpec("AUDIT", ("cfs.{site}.audit.>",), "audit log of every admin action")
DLQ = StreamSpec(
    "DLQ",
    ("cfs.{site}.dlq.>",),
    "messages no consumer could decode, with the reason; kept for inspection",
    max_msg_bytes=8 * 1024 * 1024,
    max_age_s=30 * 86400.0,
    deny_purge=False,
    deny_delete=False,
)

SITE_STREAMS: tuple[StreamSpec, ...] = (
    CLUSTER,
    DATA,
    TIER,
    REPL,
    CONFLICTS,
    CMD,
    ALERTS,
    AUDIT,
    DLQ,
)

LEASES = KVSpec("leases", "writer leases per metadata shard and singleton service", history=1)
NODES = KVSpec("nodes", "membership view: state, incarnation, labels, capacity", history=5)
# Each service process rewrites its record every few seconds. Apart from `nodes`: every
# live view of the site (`NodeView`, in each service and client) watches all of that
# bucket, and with the health records in it each process's heartbeat reached every view.
HEALTH = KVSpec("health", "service health: one record per process (<node>.<service>)")
TIER_INDEX = KVSpec("tier", "s3 tier: the blob of each chunk in S3, and each blob's record")
SITE_BUCKETS: tuple[KVSpec, ...] = (LEASES, NODES, HEALTH, TIER_INDEX)


def site_streams(shard_count: int) -> list[StreamSpec]:
    """Every stream a site needs for a given (fixed at init) shard count."""
    return [meta_stream(shard_name(i)) for i in range(1, shard_count + 1)] + list(SITE_STREAMS)


def dead_letter_subject(site: str, stream: str, consumer: str) -> str:
    return site_subject(site, "dlq", stream.lower(), consumer)


def meta_rpc_subject(site: str, shard: str) -> str:
    """Requests to a shard's current writer (only the lease holder subscribes)."""
    return site_subject(site, "rpc", "meta", shard)


def meta_admin_subject(site: str, shard: str) -> str:
    """Backup and restore steps to a shard's writer (admin and backup roles only)."""
    return site_subject(site, "rpc", "metaadmin", shard)


def shard_lease_key(shard: str) -> str:
    """The writer lease of a metadata shard in the `leases` bucket (`meta.001`)."""
    return f"meta.{shard}"


def service_lease_key(service: str) -> str:
    """The lease of a site-singleton service in the `leases` bucket (`service.repair`)."""
    return f"service.{service}"


SHARD_LEASE_PREFIX = "meta."
SERVICE_LEASE_PREFIX = "service."
