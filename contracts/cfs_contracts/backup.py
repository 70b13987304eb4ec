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
