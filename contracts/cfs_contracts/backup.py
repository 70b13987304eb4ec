"""Formats the backup service persists: snapshot manifests and backup status.

A snapshot outlives the release that wrote it, so its manifest carries a format
number; a reader refuses a newer format with the reason instead of guessing.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cfs_contracts.envelope import HLC
from cfs_contracts.streams import site_subject

SNAPSHOT_FORMAT = 1
BACKUP_STATUS_KEY = "backup.status"
FETCH_BYTES = 512 * 1024
SCHEDULE_KEY = "backup.schedule"
SNAPSHOT_PREFIX = "metadata-"


class ShardCut(BaseModel):
    """One shard's part of a snapshot: its state after journal message `seq`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shard: str
    seq: int = Field(ge=0, description="last journal sequence contained")
    hlc: HLC | None = Field(default=None, description="stamp of the message at `seq`")
    marker_seq: int = Field(ge=0, description="the snapshot marker's sequence (after the cut)")
    records: int = Field(ge=0)
    inodes: int = Field(ge=0)
    file: str
    bytes: int = Field(ge=0)
    sha256: str


class KvDump(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: str
    file: str
    rows: int = Field(ge=0)
    sha256: str


class SnapshotManifest(BaseModel):
    """`manifest.json` at the top of a snapshot tar.gz."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = Field(description="snapshot format version; readers refuse newer ones")
    snapshot_id: str
    cluster_id: str
    cluster_name: str
    site: str
    shard_count: int = Field(ge=1)
    created_ms: int
    cut: HLC = Field(description="every shard holds exactly its messages stamped up to this")
    shards: tuple[ShardCut, ...]
    kv: tuple[KvDump, ...] = ()
    archive_url: str | None = None
    release: str = ""

    @property
    def inodes(self) -> int:
        return sum(s.inodes for s in self.shards)


class ArchiveStream(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stream: str
    archived_seq: int = 0
    journal_seq: int = 0
    lag_s: float = Field(default=0.0, description="age of the oldest message not yet in S3")
    error: str | None = Field(default=None, description="why the last upload failed")


class BackupStatus(BaseModel):
    """What the active backup service last reported (`backup.status` in the nodes KV)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str
    updated_ms: int
    last_snapshot_id: str | None = None
    last_snapshot_ms: int | None = None
    last_snapshot_url: str | None = None
    last_snapshot_inodes: int = 0
    schedule: str | None = Field(default=None, description="e.g. 'every 1h to s3://…, keep 7'")
    archive_url: str | None = None
    archive: tuple[ArchiveStream, ...] = ()
    shadow_seqs: dict[str, int] = Field(
        default_factory=dict,
        description="shard -> journal sequence the service's own projection has applied "
        "(followed between snapshots, so a snapshot has only its last moments to apply)",
    )
    last_error: str | None = None


# -- requests to the active backup service (core NATS request/reply) -------------------
class SnapshotRequest(BaseModel):
    snapshot_id: str = Field(min_length=1)
    destination: str | None = Field(default=None, description="s3://bucket/prefix to upload to")
    keep: int | None = Field(default=None, ge=1, description="retention: newest N at destination")
    max_age_s: float | None = Field(default=None, gt=0, description="retention: by age")


class SnapshotSchedule(BaseModel):
    """`backup.schedule` in the nodes KV: set by `snapshot-metadata --interval`."""

    interval_s: float = Field(gt=0)
    destination: str
    keep: int | None = Field(default=None, ge=1)
    max_age_s: float | None = Field(default=None, gt=0)

    def describe(self) -> str:
        keep = f", keep {self.keep}" if self.keep else ""
        age = f", max age {self.max_age_s / 86400:g}d" if self.max_age_s else ""
        return f"every {self.interval_s:g}s to {self.destination}{keep}{age}"


class SnapshotReply(BaseModel):
    ok: bool
    message: str = ""
    url: str | None = Field(default=None, description="where it was uploaded, if anywhere")
    node: str = Field(default="", description="the backup process holding the file")
    manifest: SnapshotManifest | None = None
    bytes: int = 0
    sha256: str = ""
    seconds: float = 0.0


class FetchRequest(BaseModel):
    snapshot_id: str
    offset: int = Field(ge=0)
    length: int = Field(default=FETCH_BYTES, ge=1, le=FETCH_BYTES)


def snapshot_subject(site: str) -> str:
    return site_subject(site, "rpc", "backup", "snapshot")


def fetch_subject(site: str, node: str) -> str:
    """Served by every backup process for the files on its own disk: the lease may move
    between a snapshot and its download."""
    return site_subject(site, "rpc", "backup", "fetch", node)


def progress_subject(site: str, snapshot_id: str) -> str:
    return site_subject(site, "backup", "progress", snapshot_id)


# -- fragment garbage collection (`cfs admin gc`, run by the active backup service) -----
GC_REPORT_KEY = "backup.gc"  # the last run's GcReport in the nodes KV
GC_DESTINATIONS_KEY = "backup.destinations"  # JSON list: where snapshots were uploaded


class GcRequest(BaseModel):
    dry_run: bool = Field(default=False, description="decide and report, delete nothing")


class GcDeletion(BaseModel):
    """One fragment deleted (or, in a dry run, that would be)."""

    model_config = ConfigDict(frozen=True)

    node: str
    key: str
    size: int = Field(ge=0, description="bytes")
    age_s: float = Field(ge=0, description="since it was stored, at the mark")


class GcReport(BaseModel):
    """One collection: what protected what, and what went (`backup.gc` in the nodes KV)."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    node: str = Field(description="the backup process that ran it")
    dry_run: bool
    ok: bool = Field(description="False: blocked (nothing deleted) or some deletes failed")
    message: str = Field(default="", description="why it was blocked, or what failed")
    started_ms: int
    marked_ms: int = Field(default=0, description="wall ms the keep set was taken at")
    seconds: float = 0.0
    grace_s: float = Field(ge=0)
    protected_snapshot: str | None = Field(
        default=None, description="URL of the oldest retained snapshot (its chunks are kept)"
    )
    keep_chunks: int = Field(default=0, ge=0, description="chunk ids in the keep set")
    nodes: tuple[str, ...] = Field(default=(), description="chunk-stores listed")
    unreachable: tuple[str, ...] = Field(default=(), description="skipped: they did not answer")
    fragments: int = Field(default=0, ge=0, description="fragments listed")
    kept_referenced: int = Field(default=0, ge=0)
    kept_young: int = Field(default=0, ge=0, description="unreferenced but within the grace")
    deleted: int = Field(default=0, ge=0, description="deleted (dry run: would be)")
    deleted_bytes: int = Field(default=0, ge=0)
    already_gone: int = Field(default=0, ge=0, description="deleted before we got to them")
    stored_again: int = Field(default=0, ge=0, description="re-stored since listed: kept")
    failed: int = Field(default=0, ge=0, description="deletes that failed (retried next run)")
    deletions: tuple[GcDeletion, ...] = Field(
        default=(), description="the first 1000 deletions, for the operator"
    )
    tier_candidates: int = Field(
        default=0, ge=0, description="chunks in the S3 tier's index not in the keep set"
    )
    tier_forgotten: int = Field(
        default=0, ge=0, description="of them, unindexed by the tierer (compaction frees them)"
    )
    tier_young: int = Field(default=0, ge=0, description="of them, kept: within the grace")
    tier_note: str = Field(default="", description="why the S3 tier was not collected")


def gc_subject(site: str) -> str:
    return site_subject(site, "rpc", "backup", "gc")
