"""The backup service process: one per node, one active per site (the kernel's lease).

    cfs service run backup --node storage-1 [--config FILE]

The active instance answers `cfs.<site>.rpc.backup.snapshot`: it journals a marker
in every shard (the cut, `cut.py`), brings its own projection of each shard to the
cut (incrementally: it keeps them between snapshots), writes the snapshot file,
verifies it by reading it back and loading every image into a scratch projection,
and serves the file to the CLI in pieces (`rpc.backup.fetch`). Writes go on
throughout: nothing in the cluster waits for a snapshot.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import nats.js.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from pydantic import Field

from cfs.backup.image import encode_pairs
from cfs.backup.snapshot_file import kv_parquet, read_snapshot, write_snapshot
from cfs.bus import Bus, BusError
from cfs.bus.kv import bucket_keys
from cfs.client.shard_admin import shard_admin
from cfs.cluster import read_config
from cfs.faults import crash_point
from cfs.ids import new_id
from cfs.kernel.runtime import Context, until_jetstream_answers
from cfs.objstore import ObjectStore, ObjectStoreError, ServiceS3Settings, open_store
from cfs.service_main import ServiceSettings, run_spec
from cfs.telemetry import gauge
from cfs_backup.archive import Archiver, ArchiveSettings
from cfs_backup.collector import Collector
from cfs_backup.cut import advance_to_cut
from cfs_backup.shadow import Shadows
from cfs_contracts.backup import (
    BACKUP_STATUS_KEY,
    GC_DESTINATIONS_KEY,
    SCHEDULE_KEY,
    SNAPSHOT_FORMAT,
    SNAPSHOT_PREFIX,
    BackupStatus,
    FetchRequest,
    GcRequest,
    KvDump,
    ShardCut,
    SnapshotManifest,
    SnapshotReply,
    SnapshotRequest,
    SnapshotSchedule,
    fetch_subject,
    gc_subject,
    progress_subject,
    snapshot_subject,
)
from cfs_contracts.fs.shard_admin import MarkCut
from cfs_contracts.members import ClusterConfig
from cfs_contracts.streams import AUDIT, LEASES, NODES, meta_stream, shard_name
from cfs_metadata.projection import Projection
from cfs_metadata.records import CorruptRecord

log = logging.getLogger(__name__)


class BackupSettings(ServiceSettings):
    data_dir: Path = Path("/var/lib/claudefs")
    shards: int = Field(default=1, ge=1, le=999)
    keep_local: int = Field(default=3, ge=1, description="snapshot files kept for fetching")
    archive_url: str | None = Field(
        default=None,
        description="s3://bucket/prefix for the continuous journal archive (off when unset); "
        "this cluster's segments go under <prefix>/<cluster id>/",
    )
    archive_segment_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    archive_segment_s: float = Field(
        default=1.0,
        gt=0,
        description="a segment is shipped at most this long after its first message",
    )
    archive_clock_offset_ms: int = Field(
        default=1000, ge=0, description="clock offset plus delivery delay between nodes allowed for"
    )
    status_s: float = Field(default=1.0, gt=0, description="how often the status record is written")
    audit_retention_days: float = Field(
        default=3 * 365.0,
        gt=0,
        description="archived AUDIT segments kept this long (guide: 3 years)",
    )
    gc_interval_s: float = Field(
        default=3600.0,
        ge=0,
        description="fragment garbage collection every this long; 0: only `cfs admin gc`",
    )
    gc_grace_s: float = Field(
        default=3600.0,
        ge=0,
        description="fragments stored less than this long before a collection are never "
        "deleted (writes in flight; snapshots this service cannot see)",
    )
    gc_snapshot_urls: list[str] = Field(
        default_factory=list,
        description="more s3://bucket/prefix destinations whose metadata-*.tar.gz snapshots "
        "garbage collection must keep restorable",
    )


SCHEDULE_POLL_S = 5.0
PROGRESS_EVERY_S = 1.0


def snapshot_name(manifest: SnapshotManifest) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(manifest.created_ms / 1000))
    return f"{SNAPSHOT_PREFIX}{stamp}-{manifest.snapshot_id}.tar.gz"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _config(bus: Bus) -> ClusterConfig:
    config = await read_config(bus)
    if config is None:
        raise RuntimeError("the cluster is not initialized (`cfs cluster init`)")
    return config


class Backup:
    def __init__(self, bus: Bus, settings: BackupSettings) -> None:
        self.bus = bus
        self.settings = settings
        self.root = settings.data_dir / "backup"
        self.out = self.root / "snapshots"
        self._lock = asyncio.Lock()
        self.s3 = ServiceS3Settings()
        self._archiver: Archiver | None = None
        self._archive_root: str | None = None
        self._last: SnapshotManifest | None = None
        self._last_url: str | None = None
        self._schedule: SnapshotSchedule | None = None
        self._error: str | None = None
        self._phase: dict[str, object] = {}
        self.collector: Collector | None = None
        # Opened by the first `lead`, kept open across lease changes (followed only
        # while leading), closed when the process stops.
        self.shadows: Shadows | None = None

    async def open_shadows(self) -> Shadows:
        config = await _config(self.bus)
        if self.shadows is None or len(self.shadows.by_index) != config.shards:
            await self.close_shadows()
            self.shadows = Shadows(self.bus, self.root, config.shards)
        return self.shadows

    async def close_shadows(self) -> None:
        """A shadow a snapshot still moves is left to the process's exit (its writes
        are in RocksDB's log; the next start replays them)."""
        if self.shadows is not None:
            self.shadows.close()
            self.shadows = None

    def gc(self, shadows: Shadows, active: Callable[[], bool]) -> Collector:
        """The fragment collector of the active instance (`collector.py`)."""
        self.collector = Collector(
            self.bus,
            self.root,
            shadows,
            grace_s=self.settings.gc_grace_s,
            snapshot_urls=self.settings.gc_snapshot_urls,
            s3=self.s3,
            active=active,
        )
        return self.collector

    async def gc_loop(self, collector: Collector) -> None:
        """Periodic collections; a blocked or failed one is in its report, and retried."""
        interval = self.settings.gc_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            await collector.run()

    async def archiver(self, active: Callable[[], bool] = lambda: True) -> Archiver | None:
        """The journal archive, when `archive_url` is set (needs the cluster's id)."""
        url = self.settings.archive_url
        if not url:
            return None
        config = await _config(self.bus)
        streams = [
            (meta_stream(shard_name(i)).name, f"cfs.{self.bus.site}.meta.{shard_name(i)}.>")
            for i in range(1, config.shards + 1)
        ]
        streams.append((AUDIT.name, f"cfs.{self.bus.site}.audit.>"))
        self._archive_root = f"{url.rstrip('/')}/{config.cluster_id}"
        self._archiver = Archiver(
            self.bus,
            open_store(url, self.s3),
            config.cluster_id,
            streams,
            ArchiveSettings(
                segment_bytes=self.settings.archive_segment_bytes,
                segment_s=self.settings.archive_segment_s,
                clock_offset_ms=self.settings.archive_clock_offset_ms,
                retention_s={AUDIT.name: self.settings.audit_retention_days * 86400.0},
            ),
            active=active,
        )
        return self._archiver

    async def _nodes_bucket(self) -> KeyValue:
        """Right after a failover the bucket's stream may still be electing a leader."""
        return await until_jetstream_answers(
            f"{NODES.bucket} bucket", lambda: self.bus.key_value(NODES.bucket)
        )

    async def status_loop(self) -> None:
        kv = await self._nodes_bucket()
        while True:
            status = self.status()
            record_backup_status(status)
            try:
                await kv.put(BACKUP_STATUS_KEY, status.model_dump_json().encode())
            except (nats.errors.Error, TimeoutError, BusError) as exc:
                log.info("backup.status_unsaved", extra={"error": str(exc)})
            await asyncio.sleep(self.settings.status_s)

    def status(self) -> BackupStatus:
        last = self._last
        return BackupStatus(
            node=self.bus.node,
            updated_ms=time.time_ns() // 1_000_000,
            last_snapshot_id=last.snapshot_id if last else None,
            last_snapshot_ms=last.created_ms if last else None,
            last_snapshot_url=self._last_url,
            last_snapshot_inodes=last.inodes if last else 0,
            schedule=self._schedule.describe() if self._schedule else None,
            archive_url=self._archive_root,
            archive=self._archiver.figures() if self._archiver else (),
            shadow_seqs=self.shadows.positions() if self.shadows else {},
            last_error=self._error,
        )

    async def schedule_loop(self) -> None:
        """Scheduled snapshots (`snapshot-metadata --interval`): due when the newest
        snapshot at the destination is older than the interval (so a failover neither
        skips nor repeats one)."""
        kv = await self._nodes_bucket()
        while True:
            try:
                entry = await kv.get(SCHEDULE_KEY)
                self._schedule = (
                    SnapshotSchedule.model_validate_json(entry.value) if entry.value else None
                )
            except nats.js.errors.KeyNotFoundError:
                self._schedule = None
            except (nats.errors.Error, TimeoutError) as exc:
                log.info("backup.schedule_unread", extra={"error": str(exc)})
            schedule = self._schedule
            if schedule is not None:
                newest = await self._newest_at(schedule.destination)
                age_s = (time.time_ns() // 1_000_000 - newest) / 1000 if newest else None
                if age_s is None or age_s >= schedule.interval_s:
                    await self.snapshot(
                        SnapshotRequest(
                            snapshot_id=new_id(),
                            destination=schedule.destination,
                            keep=schedule.keep,
                            max_age_s=schedule.max_age_s,
                        )
                    )
            await asyncio.sleep(SCHEDULE_POLL_S)

    async def _newest_at(self, destination: str) -> int | None:
        try:
            async with open_store(destination, self.s3) as store:
                stamps = [i.last_modified_ms async for i in store.list(SNAPSHOT_PREFIX)]
        except ObjectStoreError as exc:
            self._error = str(exc)
            return None
        return max(stamps) if stamps else None

    async def snapshot(self, request: SnapshotRequest) -> SnapshotReply:
        """One snapshot at a time; any failure is the reply (and the status), never silence."""
        async with self._lock:
            self._phase = {"phase": "starting", "done": 0, "total": 1}
            reporter = asyncio.create_task(self._keep_reporting(request.snapshot_id))
            try:
                reply = await self._take(request)
            except Exception as exc:  # reported to the requester and in `cfs admin status`
                log.warning(
                    "snapshot.failed", extra={"snapshot": request.snapshot_id, "error": str(exc)}
                )
                self._error = f"snapshot {request.snapshot_id} failed: {exc}"
                return SnapshotReply(ok=False, message=self._error)
            finally:
                reporter.cancel()
            self._error = None
            return reply

    async def _take(self, request: SnapshotRequest) -> SnapshotReply:
        started = time.monotonic()
        manifest, path = await self._snapshot(request.snapshot_id)
        size = path.stat().st_size
        digest = await asyncio.to_thread(_sha256, path)
        seconds = time.monotonic() - started
        log.info(
            "snapshot.written",
            extra={
                "snapshot": manifest.snapshot_id,
                "inodes": manifest.inodes,
                "bytes": size,
                "seconds": round(seconds, 3),
            },
        )
        self._last = manifest
        url = await self._upload(path, digest, manifest, request) if request.destination else None
        self._last_url = url
        return SnapshotReply(
            url=url,
            node=self.bus.node,
            ok=True,
            manifest=manifest,
            bytes=size,
            sha256=digest,
            seconds=seconds,
        )

    async def _snapshot(self, snapshot_id: str) -> tuple[SnapshotManifest, Path]:
        config = await _config(self.bus)
        if self.shadows is None or len(self.shadows.by_index) != config.shards:
            raise RuntimeError("this backup instance is not leading (yet): retry")
        cuts: list[ShardCut] = []
        images: dict[str, bytes] = {}
        async with self.shadows.held() as shadows:  # from before the stamp (shadow.py)
            cut = self.bus.clock.now()
            await self._progress(snapshot_id, "marking", 0, config.shards)
            async with asyncio.TaskGroup() as marking:
                asked = [
                    marking.create_task(
                        shard_admin(
                            self.bus, shadow.index, MarkCut(snapshot_id=snapshot_id, cut=cut)
                        )
                    )
                    for shadow in shadows
                ]
            for shadow, task in zip(shadows, asked, strict=True):
                marker = task.result()
                await shadow.check_position()
                projection = shadow.projection
                stamp = await advance_to_cut(shadow.journal, projection, cut, marker.seq)
                pairs = list(projection.image_pairs())
                images[shard_name(shadow.index)] = await asyncio.to_thread(encode_pairs, pairs)
                cuts.append(
                    ShardCut(
                        shard=shard_name(shadow.index),
                        seq=projection.applied_seq,
                        hlc=stamp,
                        marker_seq=marker.seq,
                        records=len(pairs),
                        inodes=projection.inode_count(),
                        file="",
                        bytes=0,
                        sha256="",
                    )
                )
                await self._progress(snapshot_id, "shards", shadow.index, config.shards)
        kv_dumps, kv_files = await self._dump_kv()
        manifest = SnapshotManifest(
            format=SNAPSHOT_FORMAT,
            snapshot_id=snapshot_id,
            cluster_id=config.cluster_id,
            cluster_name=config.name,
            site=config.site,
            shard_count=config.shards,
            created_ms=time.time_ns() // 1_000_000,
            cut=cut,
            shards=tuple(cuts),
            kv=kv_dumps,
            archive_url=self._archive_root,
            release=version("claudefs"),
        )
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{snapshot_id}.tar.gz"
        crash_point("backup.snapshot_cut")  # markers journaled, nothing written yet
        final = await asyncio.to_thread(write_snapshot, path, manifest, images, kv_files)
        await self._progress(snapshot_id, "verifying", 0, 1)
        await asyncio.to_thread(self._verify, path, final)
        self._prune()
        return final, path

    def _verify(self, path: Path, manifest: SnapshotManifest) -> None:
        """Read it back as a restore would (every file's SHA-256), load every image into
        a scratch projection and check every record's seal there: a snapshot that
        cannot restore is never reported. (Records are not parsed again: they were
        parsed when applied, and the seals prove these are those bytes.)"""
        snapshot = read_snapshot(path)
        if snapshot.manifest != manifest:
            raise RuntimeError(f"{path}: manifest read back differs from the one written")
        scratch = self.root / "verify"
        for cut in manifest.shards:
            shutil.rmtree(scratch, ignore_errors=True)
            projection = Projection(scratch / cut.shard, int(cut.shard))
            try:
                projection.load_image(snapshot.images[cut.shard])
                try:
                    inodes = projection.check_seals()
                except CorruptRecord as exc:
                    raise RuntimeError(f"{path}: shard {cut.shard}: {exc}") from None
                if inodes != cut.inodes:
                    raise RuntimeError(
                        f"{path}: shard {cut.shard} loads {inodes} inodes, "
                        f"the cut holds {cut.inodes}"
                    )
            finally:
                projection.close()
        shutil.rmtree(scratch, ignore_errors=True)

    def _prune(self) -> None:
        files = sorted(self.out.glob("*.tar.gz"), key=lambda p: p.stat().st_mtime)
        for old in files[: -self.settings.keep_local]:
            old.unlink(missing_ok=True)

    async def _dump_kv(self) -> tuple[tuple[KvDump, ...], dict[str, bytes]]:
        dumps: list[KvDump] = []
        files: dict[str, bytes] = {}
        for bucket in (NODES.bucket, LEASES.bucket):
            kv = await self.bus.js.key_value(bucket)
            rows: list[dict[str, object]] = []
            for key in await bucket_keys(self.bus, bucket):
                try:
                    entry = await kv.get(key)
                except nats.js.errors.KeyNotFoundError:
                    continue
                rows.append({"key": key, "revision": entry.revision, "value": entry.value or b""})
            files[bucket] = kv_parquet(rows)
            dumps.append(KvDump(bucket=bucket, file="", rows=len(rows), sha256=""))
        return tuple(dumps), files

    async def _progress(self, snapshot_id: str, phase: str, done: int, total: int) -> None:
        self._phase = {"phase": phase, "done": done, "total": total}
        await self._report(snapshot_id)

    async def _report(self, snapshot_id: str) -> None:
        body = json.dumps(self._phase).encode()
        await self.bus.nc.publish(progress_subject(self.bus.site, snapshot_id), body)

    async def _keep_reporting(self, snapshot_id: str) -> None:
        """The requester's sign of life: the phase again every second (see `_take`)."""
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            await self._report(snapshot_id)

    async def _upload(
        self, path: Path, sha256: str, manifest: SnapshotManifest, request: SnapshotRequest
    ) -> str:
        """Upload (server-side encrypted), read back and check, then enforce retention."""
        assert request.destination is not None
        name = snapshot_name(manifest)
        async with open_store(request.destination, self.s3) as store:
            await store.ensure_bucket()
            await store.put_file(
                name,
                path,
                metadata={
                    "snapshot-id": manifest.snapshot_id,
                    "cluster": manifest.cluster_id,
                    "sha256": sha256,
                },
            )
            check = self.root / "verify-upload.tar.gz"
            try:
                await store.get_file(name, check)
                if await asyncio.to_thread(_sha256, check) != sha256:
                    raise RuntimeError(f"{request.destination}/{name} differs after upload")
            finally:
                check.unlink(missing_ok=True)
            await self._retain(store, request)
        await self._remember(request.destination)
        return f"{request.destination.rstrip('/')}/{name}"

    async def _remember(self, destination: str) -> None:
        """Fragment GC keeps the oldest snapshot at every destination used (a failed
        write here is logged: the schedule's destination is read from the KV anyway)."""
        kv = await self.bus.key_value(NODES.bucket)
        try:
            try:
                entry = await kv.get(GC_DESTINATIONS_KEY)
                known = [str(u) for u in json.loads(entry.value or b"[]")]
            except nats.js.errors.KeyNotFoundError:
                known = []
            url = destination.rstrip("/")
            if url not in known:
                await kv.put(GC_DESTINATIONS_KEY, json.dumps([*known, url]).encode())
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("snapshot.destination_unrecorded", extra={"error": str(exc)})

    async def _retain(self, store: ObjectStore, request: SnapshotRequest) -> None:
        infos = sorted(
            [i async for i in store.list(SNAPSHOT_PREFIX)], key=lambda i: i.key, reverse=True
        )
        now_ms = time.time_ns() // 1_000_000
        for index, info in enumerate(infos):
            too_many = request.keep is not None and index >= request.keep
            too_old = (
                request.max_age_s is not None
                and index > 0  # never the newest: a backup must remain
                and now_ms - info.last_modified_ms > request.max_age_s * 1000
            )
            if too_many or too_old:
                await store.delete(info.key)
                log.info("snapshot.expired", extra={"key": info.key})

    async def fetch(self, request: FetchRequest) -> bytes:
        """A piece of a snapshot file on this node; empty when it is not here (any more)."""
        path = self.out / f"{request.snapshot_id}.tar.gz"
        if not path.is_file():
            return b""
        with path.open("rb") as handle:
            handle.seek(request.offset)
            return handle.read(request.length)


async def start(ctx: Context) -> Backup:
    """Every process serves downloads of the snapshot files on its disk (the active one
    writes them, but may lose the lease before the requester has fetched its file)."""
    backup = Backup(ctx.bus, ctx.settings)

    async def on_fetch(msg: Msg) -> bytes:
        return await backup.fetch(FetchRequest.model_validate_json(msg.data))

    sub = await ctx.bus.serve(fetch_subject(ctx.bus.site, ctx.bus.node), on_fetch)
    ctx.on_stop(sub.unsubscribe)
    ctx.on_stop(backup.close_shadows)
    return backup


async def lead(ctx: Context) -> None:
    """The active instance: the archive, the schedule, the status record and snapshot
    requests, until the lease is lost (then all of it is cancelled)."""
    backup: Backup = ctx.service

    async def on_snapshot(msg: Msg) -> bytes:
        reply = await backup.snapshot(SnapshotRequest.model_validate_json(msg.data))
        return reply.model_dump_json().encode()

    lease = ctx.lease
    shadows = await backup.open_shadows()
    collector = backup.gc(shadows, lambda: lease is not None and lease.is_holder)

    async def on_gc(msg: Msg) -> bytes:
        report = await collector.run(GcRequest.model_validate_json(msg.data or b"{}").dry_run)
        return report.model_dump_json().encode()

    subs = [
        await ctx.bus.serve(snapshot_subject(ctx.bus.site), on_snapshot),
        await ctx.bus.serve(gc_subject(ctx.bus.site), on_gc),
    ]
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(shadows.follow(), name="shadows")
            archiver = await backup.archiver(lambda: lease is not None and lease.is_holder)
            if archiver is not None:
                tasks.create_task(archiver.run(), name="archive")
            tasks.create_task(backup.gc_loop(collector), name="fragment gc")
            tasks.create_task(backup.schedule_loop(), name="snapshot schedule")
            tasks.create_task(backup.status_loop(), name="backup status")
    finally:
        for sub in subs:
            if not ctx.bus.nc.is_closed:
                await sub.unsubscribe()


def main(argv: list[str] | None = None) -> None:
    from cfs_backup.spec import SPEC

    run_spec(SPEC, argv)


BACKUP_AGE = gauge(
    "backup_age_seconds", "age of the newest metadata snapshot (absent until there is one)"
)
ARCHIVE_LAG = gauge(
    "backup_archive_lag_seconds", "how far the journal archive trails its stream", ("stream",)
)
ARCHIVED_SEQ = gauge("backup_archived_seq", "last stream sequence archived", ("stream",))


def record_backup_status(status: BackupStatus) -> None:
    """The active backup's status record as gauges, every `status_s`."""
    if status.last_snapshot_ms is not None:
        BACKUP_AGE.set(max(0.0, (status.updated_ms - status.last_snapshot_ms) / 1000))
    for stream in status.archive:
        ARCHIVE_LAG.labels(stream.stream).set(stream.lag_s)
        ARCHIVED_SEQ.labels(stream.stream).set(stream.archived_seq)
