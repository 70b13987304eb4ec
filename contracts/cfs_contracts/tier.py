"""Formats the s3-tierer persists in the bucket (DESIGN.md §7).

Chunks are packed into blobs of about 64 MiB. Each blob ends with its own index,
so the bucket alone is enough to find every chunk after the loss of everything
else (scenario 8); a blob outlives the release that wrote it, hence the format
number in its footer.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

BLOB_FORMAT = 1
BLOB_TARGET_BYTES = 64 * 1024 * 1024


class BlobEntry(BaseModel):
    """Where one chunk's bytes are in a blob, and their SHA-256."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_id: str = Field(min_length=1, max_length=255)
    offset: int = Field(ge=0, description="of the chunk's data within the blob")
    length: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class BlobIndex(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    blob_id: str = Field(min_length=1)
    format: int = BLOB_FORMAT
    entries: tuple[BlobEntry, ...]


# -- where each chunk is, in the `tier` bucket -------------------------------------------
TIER_CONFIG_KEY = "tier.config"  # in the `nodes` bucket: the mode, set by the operator
TIER_STATE_KEY = "tier.state"  # in the `nodes` bucket: the tierer's figures, for everyone
BLOB_KEY_PREFIX = "blobs/"


def chunk_location_key(chunk_id: str) -> str:
    return f"chunk.{chunk_id}"


def blob_record_key(blob_id: str) -> str:
    return f"blob.{blob_id}"


def blob_object_key(blob_id: str) -> str:
    """The blob's key under the tier URL's prefix."""
    return f"{BLOB_KEY_PREFIX}{blob_id}"


class FlashCopy(StrEnum):
    """Whether a chunk in S3 is still expected on flash (tiered mode evicts it).

    Eviction marks EVICTING, deletes the fragments, then marks EVICTED: a crash in
    between leaves EVICTING, which the next pass finishes. Both say "fragments missing
    from flash is no damage" to repair, the consistency check and readers."""

    PRESENT = "present"
    EVICTING = "evicting"
    EVICTED = "evicted"


class ChunkLocation(BaseModel):
    """`chunk.<id>` in the `tier` bucket: the chunk is in S3, in this blob."""

    model_config = ConfigDict(
        frozen=True
    )  # readers of another release ignore fields they do not know

    blob_id: str
    offset: int = Field(ge=0)
    length: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    flash: FlashCopy = FlashCopy.PRESENT
    flash_changed_ms: int | None = None
    requeued_ms: int | None = Field(
        default=None,
        description="when a write last queued this chunk and found it in S3 already: a "
        "new reference may be committing, so it is not garbage before the grace",
    )

    @property
    def off_flash(self) -> bool:
        return self.flash is not FlashCopy.PRESENT


class BlobRecord(BaseModel):
    """`blob.<id>` in the `tier` bucket, written after the PUT and before any chunk
    points at the blob: a blob in the bucket without one is an orphan (a PUT whose
    writer died), safe to delete."""

    model_config = ConfigDict(
        frozen=True
    )  # readers of another release ignore fields they do not know

    blob_id: str
    url: str = Field(description="s3://bucket/prefix it was written under")
    bytes: int = Field(ge=0)
    chunks: int = Field(ge=0)
    created_ms: int


class TierMode(StrEnum):
    OFF = "off"  # data on flash only
    CACHE = "cache"  # every write on flash and, flushed after its acknowledgement, in S3
    TIERED = "tiered"  # as cache; cold data evicted from flash, recalled on read


class TierConfig(BaseModel):
    """`tier.config` in the `nodes` bucket (`cfs admin tier-config`)."""

    model_config = ConfigDict(
        frozen=True
    )  # readers of another release ignore fields they do not know

    mode: TierMode = TierMode.OFF
    url: str | None = Field(default=None, description="s3://bucket/prefix new blobs go to")
    previous_url: str | None = Field(
        default=None, description="before the last `s3-failover`: where blobs are copied from"
    )
    high: float = Field(default=0.80, gt=0, le=1, description="write-through from this fill")
    critical: float = Field(default=0.95, gt=0, le=1, description="critical alert")
    full: float = Field(default=1.0, gt=0, le=1, description="ENOSPC from this fill")
    resume_margin: float = Field(default=0.05, ge=0, lt=1)
    flash_bytes: int = Field(
        default=0, ge=0, description="per node flash for unflushed data; 0: the store's capacity"
    )
    write_through_wait_s: float = Field(
        default=60.0, gt=0, description="how long a write-through write waits for S3 (then EIO)"
    )
    blob_target_bytes: int = Field(default=BLOB_TARGET_BYTES, ge=1)
    flush_after_s: float = Field(
        default=2.0, gt=0, description="a blob is sealed once its oldest chunk waited this long"
    )
    evict_after_s: float = Field(
        default=86_400.0,
        gt=0,
        description="tiered: a file neither written nor read this long leaves flash",
    )
    compact_below: float = Field(
        default=0.5, ge=0, le=1, description="a blob whose live share is below this is rewritten"
    )
    updated_ms: int = 0
    updated_by: str = ""

    @property
    def enabled(self) -> bool:
        return self.mode is not TierMode.OFF and self.url is not None


class WritePolicy(StrEnum):
    ACK_ON_FLASH = "ack_on_flash"  # NORMAL
    ACK_AFTER_S3 = "ack_after_s3"  # WRITE_THROUGH, CRITICAL
    REFUSE = "refuse"  # FULL: ENOSPC


class S3Health(BaseModel):
    model_config = ConfigDict(
        frozen=True
    )  # readers of another release ignore fields they do not know

    url: str | None
    reachable: bool
    last_ok_ms: int | None = Field(default=None, description="last successful write")
    error: str | None = None
    error_class: str | None = Field(default=None, description="auth, network, service, bucket")
    failing_since_ms: int | None = None


class NodeFlash(BaseModel):
    model_config = ConfigDict(
        frozen=True
    )  # readers of another release ignore fields they do not know

    node: str
    level: str = Field(description="NORMAL, WRITE_THROUGH, CRITICAL, FULL")
    fill: float = Field(ge=0)
    unflushed_bytes: int = Field(ge=0)
    capacity_bytes: int = Field(ge=0)


class TierState(BaseModel):
    """`tier.state` in the `nodes` bucket, written by the active tierer every second:
    clients follow `level` (write-through, ENOSPC); `s3-health` and `s3-queue-status`
    print the rest."""

    model_config = ConfigDict(
        frozen=True
    )  # readers of another release ignore fields they do not know

    holder: str
    holder_since_ms: int | None = Field(
        default=None, description="when this holder's term began: a restart is a new one"
    )
    updated_ms: int
    mode: TierMode
    level: str = Field(description="the worst node's level: it rules every write")
    policy: WritePolicy = Field(description="what a write must do at this level")
    nodes: tuple[NodeFlash, ...] = ()
    queue_entries: int = Field(ge=0)
    queue_bytes: int = Field(ge=0)
    flushed_below_seq: int = Field(
        default=0, ge=0, description="every TIER message below this is in S3 (a flush barrier)"
    )
    oldest_queued_ms: int | None = None
    drain_entries_per_s: float = Field(default=0.0, ge=0)
    drain_bytes_per_s: float = Field(default=0.0, ge=0)
    flushed_chunks: int = Field(default=0, ge=0, description="by this holder")
    flushed_bytes: int = Field(default=0, ge=0, description="by this holder")
    blobs_written: int = Field(default=0, ge=0, description="by this holder")
    s3: S3Health
    stray_blobs: int = Field(
        default=0, ge=0, description="blobs not yet copied to `url` after a failover"
    )
    stray_bytes: int = Field(default=0, ge=0)
    copied_blobs: int = Field(default=0, ge=0, description="by this holder")
    copy_error: str | None = None
    complete_url: str | None = Field(
        default=None, description="every recorded blob is under this URL (checked)"
    )
    forgotten_chunks: int = Field(
        default=0, ge=0, description="by this holder: garbage (backup's keep set) unindexed"
    )
    compacted_blobs: int = Field(default=0, ge=0, description="by this holder: rewritten")
    deleted_blobs: int = Field(default=0, ge=0, description="by this holder: nothing live left")
    orphan_blobs: int = Field(default=0, ge=0, description="by this holder: unrecorded, deleted")
    reclaimed_bytes: int = Field(default=0, ge=0, description="by this holder, from S3")
    compact_note: str | None = None
    backfilled_chunks: int = Field(
        default=0, ge=0, description="by this holder: chunks found unqueued and not in S3"
    )
    backfilled_bytes: int = Field(default=0, ge=0, description="by this holder")
    backfill_pass_ms: int | None = Field(
        default=None,
        description="when the last backfill pass began (it covers what was committed before)",
    )
    backfill_note: str | None = Field(default=None, description="why the last pass failed")
    evicted_chunks: int = Field(default=0, ge=0, description="by this holder (tiered)")
    evicted_bytes: int = Field(default=0, ge=0, description="by this holder (tiered)")
    evict_pass_ms: int | None = Field(default=None, description="when the last pass ended")
    evict_note: str | None = Field(
        default=None, description="why the last eviction pass evicted nothing, if it did not run"
    )


class FlushRequest(BaseModel):
    """Write-through: the client waits until these chunks are in S3."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_ids: tuple[str, ...] = Field(min_length=1)


class FlushReply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    flushed: tuple[str, ...] = ()
    error: str | None = None


def tier_flush_subject(site: str) -> str:
    return f"cfs.{site}.rpc.tier.flush"


class ChunkPlacement(BaseModel):
    """A chunk as its chunk map records it: enough to put its fragments back."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    length: int = Field(ge=0)
    scheme: str
    fragments: tuple[str, ...] = Field(min_length=1)


class RecallRequest(BaseModel):
    """Bring chunks back from S3 onto their chunk-stores (a read that found fewer than
    k fragments; `restore-data --from-s3`). Fragments that verify are left alone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunks: tuple[ChunkPlacement, ...] = Field(min_length=1)


class RecallReply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    restored_fragments: int = Field(default=0, ge=0)
    present_fragments: int = Field(default=0, ge=0)
    restored_bytes: int = Field(default=0, ge=0, description="chunk bytes read from S3")
    failed: tuple[str, ...] = Field(default=(), description="'<chunk id>: <why>' each")
    evicted: tuple[str, ...] = Field(
        default=(), description="chunks that were off flash on purpose (tiered): no damage"
    )


class ReindexRequest(BaseModel):
    """Rebuild the `tier` bucket's index from the blobs under `url` (after total loss:
    the bucket alone is enough)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str


class ReindexReply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    blobs: int = Field(ge=0, description="blobs found under the URL")
    blobs_indexed: int = Field(ge=0, description="of them, not in the index before")
    chunks_indexed: int = Field(ge=0)
    damaged: tuple[str, ...] = Field(default=(), description="'<blob>: <why>' (scanned)")
    seconds: float = Field(ge=0)


class ForgetRequest(BaseModel):
    """From the backup service's fragment GC: these chunks were in no state the cluster
    can return to when it marked its keep set at `marked_ms` (DESIGN.md §7). The
    tierer drops each one's location unless it is younger than the grace."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_ids: tuple[str, ...] = Field(min_length=1, max_length=1000)
    marked_ms: int = Field(ge=0)
    grace_ms: int = Field(ge=0)


class ForgetReply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    forgotten: int = Field(default=0, ge=0)
    young: int = Field(default=0, ge=0, description="flushed or queued within the grace")
    gone: int = Field(default=0, ge=0, description="not in the index (any more)")


class CompactRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CompactReply(BaseModel):
    """`s3-compact`: one compaction pass, run now."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    compacted: int = Field(default=0, ge=0, description="blobs rewritten with their live chunks")
    deleted: int = Field(default=0, ge=0, description="blobs with nothing live, deleted")
    orphans: int = Field(default=0, ge=0, description="unrecorded blobs served elsewhere, deleted")
    reclaimed_bytes: int = Field(default=0, ge=0)
    errors: tuple[str, ...] = ()
    seconds: float = Field(default=0.0, ge=0)


class BackfillRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BackfillReply(BaseModel):
    """`s3-backfill`: one pass over every file's chunk map, run now."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    files: int = Field(default=0, ge=0, description="files with a chunk map, scanned")
    chunks: int = Field(default=0, ge=0, description="distinct chunks not queued, looked up")
    queued: int = Field(default=0, ge=0, description="of those, not in S3: queued now")
    queued_bytes: int = Field(default=0, ge=0)
    error: str | None = None
    seconds: float = Field(default=0.0, ge=0)


def tier_backfill_subject(site: str) -> str:
    return f"cfs.{site}.rpc.tier.backfill"


def tier_compact_subject(site: str) -> str:
    return f"cfs.{site}.rpc.tier.compact"


def tier_forget_subject(site: str) -> str:
    return f"cfs.{site}.rpc.tier.forget"


def tier_recall_subject(site: str) -> str:
    return f"cfs.{site}.rpc.tier.recall"


def tier_reindex_subject(site: str) -> str:
    return f"cfs.{site}.rpc.tier.reindex"


TIER_SNAPSHOT_FORMAT = 1


class TierSnapshotBlob(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    blob_id: str
    url: str
    bytes: int = Field(ge=0)
    chunks: int = Field(ge=0)


class TierSnapshot(BaseModel):
    """`s3-snapshot`: the data tier at one point, to pair with a metadata snapshot taken
    just before it. Every chunk queued before the point is in one of these blobs; each
    blob's footer indexes its chunks, so the list is enough to rebuild the index."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = TIER_SNAPSHOT_FORMAT
    snapshot_id: str
    created_ms: int
    tier_url: str
    queue_seq: int = Field(ge=0, description="TIER messages up to this are in the blobs")
    blobs: tuple[TierSnapshotBlob, ...]
    bytes: int = Field(ge=0)
    chunks: int = Field(ge=0)
