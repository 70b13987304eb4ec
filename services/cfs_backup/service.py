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
import logging
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import nats.js.errors
from nats.aio.msg import Msg
from pydantic import Field

from cfs.backup.image import encode_pairs
from cfs.backup.snapshot_file import kv_parquet, read_snapshot, write_snapshot
from cfs.bus import Bus
from cfs.client.shard_admin import shard_admin
from cfs.cluster import read_config
from cfs.kernel.runtime import Context
from cfs.service_main import ServiceSettings, run_spec
from cfs_backup.cut import advance_to_cut
from cfs_contracts.backup import (
    BACKUP_STATUS_KEY,
    SNAPSHOT_FORMAT,
    BackupStatus,
    FetchRequest,
    KvDump,
    ShardCut,
    SnapshotManifest,
    SnapshotReply,
    SnapshotRequest,
    fetch_subject,
    progress_subject,
    snapshot_subject,
)
from cfs_contracts.fs.shard_admin import MarkCut
from cfs_contracts.streams import LEASES, NODES, shard_name
from cfs_metadata.journal import Journal
from cfs_metadata.projection import Projection

log = logging.getLogger(__name__)


class BackupSettings(ServiceSettings):
    data_dir: Path = Path("/var/lib/claudefs")
    shards: int = Field(default=1, ge=1, le=999)
    keep_local: int = Field(default=3, ge=1, description="snapshot files kept for fetching")


class Backup:
    def __init__(self, bus: Bus, settings: BackupSettings) -> None:
        self.bus = bus
        self.settings = settings
        self.root = settings.data_dir / "backup"
        self.out = self.root / "snapshots"
        self._lock = asyncio.Lock()

    def _shadow(self, index: int) -> Projection:
        return Projection(self.root / "shadow" / f"shard-{index:03d}", index)

    async def snapshot(self, request: SnapshotRequest) -> SnapshotReply:
        async with self._lock:
            started = time.monotonic()
            try:
                manifest, path = await self._snapshot(request.snapshot_id)
            except Exception as exc:
                log.warning(
                    "snapshot.failed", extra={"snapshot": request.snapshot_id, "error": str(exc)}
                )
                return SnapshotReply(ok=False, message=f"snapshot failed: {exc}")
            data = path.read_bytes()
            seconds = time.monotonic() - started
            log.info(
                "snapshot.written",
                extra={
                    "snapshot": manifest.snapshot_id,
                    "inodes": manifest.inodes,
                    "bytes": len(data),
                    "seconds": round(seconds, 3),
                },
            )
            await self._record(manifest)
            return SnapshotReply(
                ok=True,
                manifest=manifest,
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                seconds=seconds,
            )

    async def _snapshot(self, snapshot_id: str) -> tuple[SnapshotManifest, Path]:
        config = await read_config(self.bus)
        if config is None:
            raise RuntimeError("the cluster is not initialized (`cfs cluster init`)")
        cut = self.bus.clock.now()
        await self._progress(snapshot_id, "marking", 0, config.shards)
        markers = await asyncio.gather(
            *(
                shard_admin(self.bus, index, MarkCut(snapshot_id=snapshot_id, cut=cut))
                for index in range(1, config.shards + 1)
            )
        )
        cuts: list[ShardCut] = []
        images: dict[str, bytes] = {}
        for index, marker in enumerate(markers, start=1):
            shard = shard_name(index)
            projection = self._shadow(index)
            try:
                stamp = await advance_to_cut(Journal(self.bus, index), projection, cut, marker.seq)
                pairs = list(projection.image_pairs())
                images[shard] = await asyncio.to_thread(encode_pairs, pairs)
                cuts.append(
                    ShardCut(
                        shard=shard,
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
            finally:
                projection.close()
            await self._progress(snapshot_id, "shards", index, config.shards)
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
            release=version("claudefs"),
        )
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{snapshot_id}.tar.gz"
        final = await asyncio.to_thread(write_snapshot, path, manifest, images, kv_files)
        await self._progress(snapshot_id, "verifying", 0, 1)
        await asyncio.to_thread(self._verify, path, final)
        self._prune()
        return final, path

    def _verify(self, path: Path, manifest: SnapshotManifest) -> None:
        """Read it back as a restore would, and load every image into a scratch projection
        (every record's seal checked): a snapshot that cannot restore is never reported."""
        snapshot = read_snapshot(path)
        if snapshot.manifest != manifest:
            raise RuntimeError(f"{path}: manifest read back differs from the one written")
        scratch = self.root / "verify"
        for cut in manifest.shards:
            shutil.rmtree(scratch, ignore_errors=True)
            projection = Projection(scratch / cut.shard, int(cut.shard))
            try:
                projection.load_image(snapshot.images[cut.shard])
                loaded = projection.to_memory()
                if len(loaded.inodes) != cut.inodes:
                    raise RuntimeError(
                        f"{path}: shard {cut.shard} loads {len(loaded.inodes)} inodes, "
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
            try:
                keys = await kv.keys()
            except nats.js.errors.NoKeysError:
                keys = []
            for key in keys:
                try:
                    entry = await kv.get(key)
                except nats.js.errors.KeyNotFoundError:
                    continue
                rows.append({"key": key, "revision": entry.revision, "value": entry.value or b""})
            files[bucket] = kv_parquet(rows)
            dumps.append(KvDump(bucket=bucket, file="", rows=len(rows), sha256=""))
        return tuple(dumps), files

    async def _progress(self, snapshot_id: str, phase: str, done: int, total: int) -> None:
        body = f'{{"phase": "{phase}", "done": {done}, "total": {total}}}'.encode()
        await self.bus.nc.publish(progress_subject(self.bus.site, snapshot_id), body)

    async def _record(self, manifest: SnapshotManifest) -> None:
        status = BackupStatus(
            node=self.bus.node,
            updated_ms=time.time_ns() // 1_000_000,
            last_snapshot_id=manifest.snapshot_id,
            last_snapshot_ms=manifest.created_ms,
            last_snapshot_inodes=manifest.inodes,
        )
        kv = await self.bus.key_value(NODES.bucket)
        await kv.put(BACKUP_STATUS_KEY, status.model_dump_json().encode())

    async def fetch(self, request: FetchRequest) -> bytes:
        path = self.out / f"{request.snapshot_id}.tar.gz"
        with path.open("rb") as handle:
            handle.seek(request.offset)
            return handle.read(request.length)


async def start(ctx: Context) -> Backup:
    return Backup(ctx.bus, ctx.settings)


async def lead(ctx: Context) -> None:
    """The active instance: answer snapshot and fetch requests until the lease is lost."""
    backup: Backup = ctx.service

    async def on_snapshot(msg: Msg) -> bytes:
        reply = await backup.snapshot(SnapshotRequest.model_validate_json(msg.data))
        return reply.model_dump_json().encode()

    async def on_fetch(msg: Msg) -> bytes:
        return await backup.fetch(FetchRequest.model_validate_json(msg.data))

    subs = [
        await ctx.bus.serve(snapshot_subject(ctx.bus.site), on_snapshot),
        await ctx.bus.serve(fetch_subject(ctx.bus.site), on_fetch),
    ]
    try:
        await asyncio.Event().wait()
    finally:
        for sub in subs:
            if not ctx.bus.nc.is_closed:
                await sub.unsubscribe()


def main(argv: list[str] | None = None) -> None:
    from cfs_backup.spec import SPEC

    run_spec(SPEC, argv)
