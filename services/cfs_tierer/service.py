"""s3-tierer: flushes flash to S3 and rules writes by the flash watermark (DESIGN.md §7).

One active instance per site (lease). While it leads:

    TIER stream ──follow──► FlushQueue ──take──► read k fragments, decode, check SHA-256
                               │                        │
                               │                 BlobBuilder ─► PUT blobs/<id> (SSE)
                               │                        │
                               │        blob.<id>, then chunk.<id> in the `tier` bucket
                               ▼                        │
            flash fill per node ◄── done ◄──────────────┘  (then the stream is purged
                   │                                        below the oldest pending)
        watermark machine ─► tier.state (policy) + WatermarkChanged (+ alert)

A chunk already in the `tier` bucket is never uploaded again, so a message delivered
twice (a kill -9 between the PUT and the purge) costs a lookup. A PUT whose writer died
before `blob.<id>` was written leaves an orphan blob no chunk points to.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time

import nats.errors
import nats.js.errors
from botocore.exceptions import ClientError  # type: ignore[import-untyped]
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue
from pydantic import Field

from cfs.bus import Bus, BusError
from cfs.client.chunks import ChunkStoreClient, Unrecoverable
from cfs.client.metadata import MetadataClient
from cfs.client.nodes import NodeView
from cfs.client.tier import read_blob_records
from cfs.erasure import Scheme, decode
from cfs.faults import crash_point
from cfs.hlc import system_wall_ms
from cfs.ids import new_id
from cfs.kernel.runtime import Context, cancel_and_wait, until_jetstream_answers
from cfs.objstore import (
    NoSuchBucket,
    ObjectStore,
    ObjectStoreDenied,
    ObjectStoreError,
    ObjectStoreUnavailable,
    ServiceS3Settings,
    open_store,
)
from cfs.rebuild import gather
from cfs.retry import Backoff, RetryPolicy
from cfs.service_main import ServiceSettings, run_spec
from cfs.telemetry import gauge
from cfs_contracts.events.ops import AlertRaised, Severity
from cfs_contracts.events.tier import ChunkQueued, WatermarkChanged
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.streams import NODES, TIER, TIER_INDEX
from cfs_contracts.tier import (
    TIER_STATE_KEY,
    BackfillReply,
    BlobRecord,
    ChunkLocation,
    CompactReply,
    FlushReply,
    FlushRequest,
    ForgetRequest,
    NodeFlash,
    RecallRequest,
    ReindexRequest,
    S3Health,
    TierConfig,
    TierMode,
    TierState,
    blob_object_key,
    blob_record_key,
    chunk_location_key,
    tier_backfill_subject,
    tier_compact_subject,
    tier_flush_subject,
    tier_forget_subject,
    tier_recall_subject,
    tier_reindex_subject,
)
from cfs_tierer.backfill import Backfiller, Schedule, TierKey, tier_key
from cfs_tierer.blob import BlobBuilder
from cfs_tierer.compact import Compactor, CompactResult
from cfs_tierer.evict import Evictor, PassAborted
from cfs_tierer.queue import FlushQueue, Pending
from cfs_tierer.recall import Recaller, change_location, reindex
from cfs_tierer.watermark import Level, Reading, Thresholds, policy, settle, worst

log = logging.getLogger(__name__)

DRAIN_WINDOW_S = 30.0  # the drain rate is measured over this long
BACKFILL_TICK_S = 0.5  # how often the backfill schedule is looked at


class TierSettings(ServiceSettings):
    status_s: float = Field(default=1.0, gt=0, description="watermark and tier.state period")
    s3_deadline_s: float = Field(
        default=10.0, gt=0, description="one S3 call's retry budget before it counts as failed"
    )
    probe_s: float = Field(default=5.0, gt=0, description="S3 health probe while idle")
    read_concurrency: int = Field(default=8, ge=1, description="chunks read from flash at once")
    copy_retry_s: float = Field(
        default=5.0, gt=0, description="failover copy: how often blobs elsewhere are looked for"
    )
    shards: int = Field(default=1, ge=1, le=999, description="metadata shards (eviction scans)")
    compact_s: float = Field(default=60.0, gt=0, description="compaction pass period")
    compact_min_age_s: float = Field(
        default=600.0, ge=0, description="a blob younger than this is never compacted"
    )
    orphan_sweep_s: float = Field(
        default=3600.0, gt=0, description="how often compaction LISTs the bucket for orphans"
    )
    backfill_s: float = Field(
        default=900.0, gt=0, description="how often every chunk map is checked against S3"
    )
    backfill_grace_s: float = Field(
        default=5.0,
        ge=0,
        description="after a new tier URL or mode: the wait for clients to see it, then a pass",
    )


class Tierer:
    """What outlives a lease: the settings and the S3 store per URL."""

    def __init__(self, bus: Bus, settings: TierSettings) -> None:
        self.bus = bus
        self.settings = settings
        self.s3 = ServiceS3Settings()
        self._stores: dict[str, ObjectStore] = {}

    def store(self, url: str) -> ObjectStore:
        if url not in self._stores:
            policy = RetryPolicy(f"s3 tier {url}", deadline_s=self.settings.s3_deadline_s)
            self._stores[url] = open_store(url, self.s3, policy=policy)
        return self._stores[url]

    async def close(self) -> None:
        for store in self._stores.values():
            await store.close()
        self._stores.clear()


def classify(exc: BaseException) -> str:
    """The error class `s3-health` names: what the operator should look at."""
    if isinstance(exc, ObjectStoreDenied):
        return "auth"
    if isinstance(exc, NoSuchBucket):
        return "bucket"
    if isinstance(exc, ObjectStoreUnavailable) and not isinstance(exc.__cause__, ClientError):
        return "network"
    return "service"


class Health:
    def __init__(self) -> None:
        self.reachable = True
        self.last_ok_ms: int | None = None
        self.error: str | None = None
        self.error_class: str | None = None
        self.failing_since_ms: int | None = None

    def ok(self) -> None:
        if not self.reachable:
            log.info(
                "tier.s3_back", extra={"down_ms": system_wall_ms() - (self.failing_since_ms or 0)}
            )
        self.reachable, self.error, self.error_class, self.failing_since_ms = True, None, None, None
        self.last_ok_ms = system_wall_ms()

    def failed(self, exc: BaseException) -> None:
        kind = classify(exc)
        if self.reachable or kind != self.error_class:
            log.error("tier.s3_failing", extra={"error_class": kind, "error": str(exc)})
        if self.reachable:
            self.failing_since_ms = system_wall_ms()
        self.reachable, self.error, self.error_class = False, str(exc), kind

    def record(self, url: str | None) -> S3Health:
        return S3Health(
            url=url,
            reachable=self.reachable,
            last_ok_ms=self.last_ok_ms,
            error=self.error,
            error_class=self.error_class,
            failing_since_ms=self.failing_since_ms,
        )


class Term:
    """One lease term of the active tierer: the queue read from the stream, the uploads,
    the watermark levels. Rebuilt from the stream by every new holder."""

    def __init__(self, tierer: Tierer, bus: Bus, nodes: NodeView, index: KeyValue) -> None:
        self.tierer = tierer
        self.bus = bus
        self.nodes = nodes
        self.index = index
        self.settings = tierer.settings
        self.queue = FlushQueue()
        self.health = Health()
        self.chunks = ChunkStoreClient(bus)
        self.recaller = Recaller(index, self.chunks, tierer.store)
        meta = MetadataClient(bus)
        self.evictor = Evictor(meta, index, self.chunks, self.recaller, shards=self.settings.shards)
        self.backfiller = Backfiller(bus, meta, index, shards=self.settings.shards)
        self.backfill_schedule = Schedule(
            grace_s=self.settings.backfill_grace_s, every_s=self.settings.backfill_s
        )
        self._backfilling = asyncio.Lock()
        self.backfilled_chunks = 0
        self.backfilled_bytes = 0
        self.backfill_pass_ms: int | None = None
        self.backfill_note: str | None = None
        self.compactor = Compactor(
            index,
            tierer.store,
            self.recaller.locks,
            min_age_s=self.settings.compact_min_age_s,
            forgotten=lambda chunk_id: self._flushed_recently.pop(chunk_id, None),
        )
        self.since_ms = system_wall_ms()
        self.forgotten_chunks = 0
        self.garbage = CompactResult()  # this holder's compaction totals
        self._orphans_swept = float("-inf")
        self._uploading_blob: str | None = None
        self._compacting = asyncio.Lock()
        self.levels: dict[str, Level] = {}
        self.level = Level.NORMAL
        # write-through requests: each gets True once its chunk is in S3, False if the
        # chunk could not be read from flash (it never will be)
        self.waiters: dict[str, list[asyncio.Future[bool]]] = collections.defaultdict(list)
        self.urgent: list[str] = []
        self._wake = asyncio.Event()
        self._caught_up = asyncio.Event()
        self._flushed_recently: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._drained: collections.deque[tuple[float, int, int]] = collections.deque()
        self.flushed_chunks = 0
        self.flushed_bytes = 0
        self.blobs = 0
        self._purged_below = 0
        self.stray_blobs = 0
        self.stray_bytes = 0
        self.copied_blobs = 0
        self.copy_error: str | None = None
        self._clean_url: str | None = None  # every recorded blob is under this URL
        self._uploading: set[str] = set()  # chunks of the blob being PUT
        self.evicted_chunks = 0
        self.evicted_bytes = 0
        self.evict_pass_ms: int | None = None
        self.evict_note: str | None = None

    # -- config ------------------------------------------------------------------------
    def config(self) -> TierConfig | None:
        return self.nodes.tier_config

    # -- the queue -----------------------------------------------------------------------
    async def follow(self) -> None:
        """Every queued chunk, from the stream's first message on (the purged ones are
        in S3), then new ones as they come."""
        info = await self.bus.js.stream_info(TIER.name)
        end = int(info.state.last_seq)
        if info.state.messages == 0:
            self._caught_up.set()
        sub = await self.bus.js.subscribe(
            f"cfs.{self.bus.site}.tier.chunk",
            stream=TIER.name,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        try:
            async for msg in sub.messages:
                seq = msg.metadata.sequence.stream
                event = self.bus.registry.decode(msg.data)
                if isinstance(event.payload, ChunkQueued):
                    stamp = int(msg.metadata.timestamp.timestamp() * 1000)
                    if self.queue.apply(seq, event.payload, stamp):
                        self._wake.set()
                if seq >= end:
                    self._caught_up.set()
        finally:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await sub.unsubscribe()

    async def on_flush(self, msg: Msg) -> bytes:
        """Write-through: answer once every asked chunk is in S3 (the client's request
        timeout bounds the wait)."""
        request = FlushRequest.model_validate_json(msg.data)
        futures: dict[str, asyncio.Future[bool]] = {}
        for chunk_id in request.chunk_ids:
            if chunk_id in self._flushed_recently:
                continue
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self.waiters[chunk_id].append(future)
            futures[chunk_id] = future
            self.urgent.append(chunk_id)
        self._wake.set()
        await asyncio.gather(*futures.values())
        lost = [c for c, f in futures.items() if not f.result()]
        flushed = tuple(c for c in request.chunk_ids if c not in lost)
        error = f"not readable from flash: {', '.join(c[:12] for c in lost)}" if lost else None
        return FlushReply(flushed=flushed, error=error).model_dump_json().encode()

    async def on_recall(self, msg: Msg) -> bytes:
        request = RecallRequest.model_validate_json(msg.data)
        reply = await self.recaller.recall(request.chunks)
        if reply.restored_fragments:
            log.info(
                "tier.recalled",
                extra={"fragments": reply.restored_fragments, "bytes": reply.restored_bytes},
            )
        return reply.model_dump_json().encode()

    async def on_reindex(self, msg: Msg) -> bytes:
        request = ReindexRequest.model_validate_json(msg.data)
        reply = await reindex(self.index, self.tierer.store(request.url), request.url)
        log.info("tier.reindexed", extra=reply.model_dump())
        return reply.model_dump_json().encode()

    # -- flushing ------------------------------------------------------------------------
    async def flush_loop(self) -> None:
        """Blobs one after another, the next one read from flash and packed while the
        one before is being PUT (the two take about as long: one at a time would halve
        the drain rate)."""
        await self._caught_up.wait()
        upload: asyncio.Task[None] | None = None
        try:
            while True:
                if upload is not None and upload.done():
                    await upload  # its failure is the loop's
                    upload = None
                config = self.config()
                batch = self._due(config) if config is not None else []
                if not batch:
                    self._wake.clear()
                    woken = asyncio.ensure_future(self._wake.wait())
                    try:  # until new work, the upload's end, or the next blob is due
                        await asyncio.wait(
                            [woken, *([upload] if upload else [])],
                            timeout=self._next_due_s(config),
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    finally:
                        await cancel_and_wait(woken)
                    if upload is None:
                        await self._maybe_probe(config)
                        await self._purge()  # one deferred by a timeout is tried again
                    continue
                assert config is not None and config.url is not None
                builder = await self._prepare(batch)
                if upload is not None:
                    await upload
                    upload = None
                if builder is not None:
                    self._uploading = set(builder.chunk_ids)
                    self._uploading_blob = builder.blob_id
                    upload = asyncio.create_task(self._upload(config.url, builder))
                else:
                    await self._purge()
        finally:
            await cancel_and_wait(upload)

    def _due(self, config: TierConfig) -> list[Pending]:
        """The next blob's chunks when a blob is due: full, old enough, or asked for."""
        queue = self.queue
        if not queue.pending:
            return []
        urgent = [c for c in self.urgent if c in queue.pending]
        oldest = queue.oldest_ms() or 0
        old = system_wall_ms() - oldest >= config.flush_after_s * 1000
        if not (urgent or old or queue.bytes >= config.blob_target_bytes):
            return []
        batch = queue.take(config.blob_target_bytes, first=urgent, busy=self._uploading)
        taken = {p.chunk.chunk_id for p in batch}
        self.urgent = [c for c in urgent if c not in taken]
        return batch

    def _next_due_s(self, config: TierConfig | None) -> float:
        if config is None or not self.queue.pending:
            return self.settings.probe_s
        age_s = (system_wall_ms() - (self.queue.oldest_ms() or 0)) / 1000
        return max(0.05, min(self.settings.probe_s, config.flush_after_s - age_s))

    async def _maybe_probe(self, config: TierConfig | None) -> None:
        """While idle, one cheap call tells whether S3 still answers (s3-health)."""
        last = self.health.last_ok_ms or 0
        if self.health.reachable and system_wall_ms() - last < self.settings.probe_s * 1000:
            return
        await self.probe(config)

    async def probe(self, config: TierConfig | None) -> None:
        """A HEAD on the tier's bucket: its outcome is S3's health (a wrong bucket, bad
        keys or an unreachable endpoint is one clear line, and `s3-health` says it)."""
        if config is None or not config.enabled or config.url is None:
            return
        try:
            await self.tierer.store(config.url).head(blob_object_key("probe"))
        except ObjectStoreError as exc:
            self.health.failed(exc)
        else:
            self.health.ok()

    async def _prepare(self, batch: list[Pending]) -> BlobBuilder | None:
        """The next blob: the batch's chunks not in S3 yet, read from flash and checked
        (those already in the index, or unreadable, leave the queue here)."""
        known = await asyncio.gather(*(self._in_index(p.chunk.chunk_id) for p in batch))
        todo = [p for p, indexed in zip(batch, known, strict=True) if not indexed]
        for entry in batch:
            if entry not in todo:
                self._done(entry.chunk.chunk_id, 0)
        if not todo:
            return None
        builder = BlobBuilder(new_id())
        read = await self._read_all(todo)
        for entry in todo:
            data = read.get(entry.chunk.chunk_id)
            if data is None:
                self._done(entry.chunk.chunk_id, 0, in_s3=False)  # logged by `_read`
            else:
                builder.add(entry.chunk.chunk_id, data, sha256=bytes.fromhex(entry.chunk.chunk_id))
        return builder if len(builder) else None

    async def _in_index(self, chunk_id: str) -> bool:
        """Whether the chunk is in S3 already; if so its location says it was queued
        again now (a new reference may be committing: not garbage before the grace)."""
        async with self.recaller.locks.hold(chunk_id):
            return await change_location(
                self.index,
                chunk_id,
                lambda where: where.model_copy(update={"requeued_ms": system_wall_ms()}),
            )

    async def _read_all(self, todo: list[Pending]) -> dict[str, bytes]:
        limit = asyncio.Semaphore(self.settings.read_concurrency)
        found: dict[str, bytes] = {}

        async def one(entry: Pending) -> None:
            async with limit:
                data = await self._read(entry.chunk)
            if data is not None:
                found[entry.chunk.chunk_id] = data

        await asyncio.gather(*(one(entry) for entry in todo))
        return found

    async def _read(self, chunk: ChunkQueued) -> bytes | None:
        """The chunk from flash, checked against its id; None (logged) when it cannot be
        read: a chunk whose write failed and whose fragments were collected since."""
        scheme = Scheme.parse(chunk.scheme)
        holders = dict(enumerate(chunk.fragments))
        try:
            got = await gather(self.chunks, chunk.chunk_id, scheme, holders)
        except Unrecoverable as exc:
            log.warning(
                "tier.chunk_unreadable",
                extra={"chunk": chunk.chunk_id, "ino": chunk.ino, "error": str(exc)},
            )
            return None
        data = await asyncio.to_thread(decode, scheme, got, chunk.length)
        if _sha256(data) != chunk.chunk_id:
            log.error("tier.chunk_mismatch", extra={"chunk": chunk.chunk_id, "ino": chunk.ino})
            return None
        return data

    async def _upload(self, url: str, builder: BlobBuilder) -> None:
        """PUT until it succeeds (S3 may be down for hours: the queue holds), then the
        blob's record, then each chunk's location. Each attempt goes to the tier's URL
        of the moment: after an `s3-failover` the waiting blob goes to the new bucket."""
        blob, index = await asyncio.to_thread(builder.seal)
        backoff = Backoff(
            RetryPolicy(
                "tier blob upload",
                temporary=lambda _: True,
                deadline_s=None,
                first_delay_s=0.5,
                max_delay_s=2.0,  # S3 back: the queue drains within seconds
            ),
            extra={"blob": builder.blob_id},
        )
        while True:
            config = self.config()
            url = config.url if config is not None and config.url is not None else url
            try:
                await self.tierer.store(url).put(blob_object_key(builder.blob_id), blob)
                break
            except ObjectStoreError as exc:
                self.health.failed(exc)
                await backoff.wait(exc)
        self.health.ok()
        crash_point("tier.blob_put")  # in S3, nowhere else: an orphan, re-uploaded
        record = BlobRecord(
            blob_id=builder.blob_id,
            url=url,
            bytes=len(blob),
            chunks=len(index.entries),
            created_ms=system_wall_ms(),
        )
        await self.index.put(blob_record_key(builder.blob_id), record.model_dump_json().encode())
        if url != self._clean_url:
            self._clean_url = None  # written under the URL of before a failover: copy it
        await asyncio.gather(
            *(
                self.index.put(
                    chunk_location_key(entry.chunk_id),
                    ChunkLocation(
                        blob_id=builder.blob_id,
                        offset=entry.offset,
                        length=entry.length,
                        sha256=entry.sha256,
                    )
                    .model_dump_json()
                    .encode(),
                )
                for entry in index.entries
            )
        )
        crash_point("tier.blob_indexed")  # indexed, still queued: found in the index
        for entry in index.entries:
            self._done(entry.chunk_id, entry.length)
        self._uploading = set()
        self._uploading_blob = None
        self.blobs += 1
        log.info(
            "tier.blob_written",
            extra={"blob": builder.blob_id, "chunks": len(index.entries), "bytes": len(blob)},
        )
        await self._purge()

    def _done(self, chunk_id: str, uploaded: int, *, in_s3: bool = True) -> None:
        """The chunk leaves the queue: in S3 (uploaded now, or found in the index), or
        not readable from flash (`in_s3=False`: logged where it was found)."""
        entry = self.queue.done(chunk_id)
        if in_s3:
            self._flushed_recently[chunk_id] = None
            while len(self._flushed_recently) > 100_000:
                self._flushed_recently.popitem(last=False)
        if entry is not None:
            self._drained.append((time.monotonic(), 1, entry.chunk.length))
        if uploaded:
            self.flushed_chunks += 1
            self.flushed_bytes += uploaded
        for future in self.waiters.pop(chunk_id, []):
            if not future.done():
                future.set_result(in_s3)

    async def _purge(self) -> None:
        below = self.queue.purge_below()
        if below <= max(self._purged_below, 1):
            return  # nothing flushed since the last purge
        try:
            await self.bus.js.purge_stream(TIER.name, seq=below)
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("tier.purge_deferred", extra={"below": below, "error": str(exc)})
            return
        self._purged_below = below

    # -- failover copy ---------------------------------------------------------------------
    async def copy_loop(self) -> None:
        """After `s3-failover` (or `--back`): every blob recorded under another URL is
        copied to the current one (unless it is there already), then its record moved,
        so the current bucket alone holds every chunk again. A source that fails is
        tried again every `copy_retry_s`; new blobs never wait for this."""
        while True:
            config = self.config()
            if config is not None and config.url is not None and config.url != self._clean_url:
                await self._copy_strays(config.url)
            await asyncio.sleep(self.settings.copy_retry_s)

    async def _copy_strays(self, url: str) -> None:
        strays = [r for r in await read_blob_records(self.index) if r.url != url]
        self.stray_blobs, self.stray_bytes = len(strays), sum(r.bytes for r in strays)
        target = self.tierer.store(url)
        for record in strays:
            config = self.config()
            if config is None or config.url != url:
                return  # failed over again: the next round copies toward the new URL
            key = blob_object_key(record.blob_id)
            try:
                there = await target.head(key)
                if there is None or there.size != record.bytes:
                    data = await self.tierer.store(record.url).get(key)
                    await target.put(key, data)
            except ObjectStoreError as exc:
                if self.copy_error != str(exc):
                    log.warning(
                        "tier.copy_failed", extra={"blob": record.blob_id, "error": str(exc)}
                    )
                self.copy_error = str(exc)
                return
            moved = record.model_copy(update={"url": url})
            await self.index.put(blob_record_key(record.blob_id), moved.model_dump_json().encode())
            self.copied_blobs += 1
            self.stray_blobs -= 1
            self.stray_bytes -= record.bytes
        if strays:
            log.info("tier.copy_done", extra={"url": url, "blobs": len(strays)})
        self.copy_error = None
        self._clean_url = url  # new blobs go to `url`: none can stray until it changes

    # -- garbage and compaction ------------------------------------------------------------
    async def on_forget(self, msg: Msg) -> bytes:
        reply = await self.compactor.forget(ForgetRequest.model_validate_json(msg.data))
        self.forgotten_chunks += reply.forgotten
        return reply.model_dump_json().encode()

    async def compact_loop(self) -> None:
        """Every `compact_s`: blobs of the tier's URL whose live share fell below
        `compact_below` are rewritten (or deleted when nothing in them is live)."""
        await self._caught_up.wait()
        while True:
            await asyncio.sleep(self.settings.compact_s)
            config = self.config()
            if config is not None and config.enabled and self.health.reachable:
                due = time.monotonic() - self._orphans_swept >= self.settings.orphan_sweep_s
                await self.compact(config, orphans=due)

    async def on_compact(self, msg: Msg) -> bytes:
        """`s3-compact`: a pass now (after the one running, if any)."""
        await self._caught_up.wait()
        config = self.config()
        if config is None or not config.enabled:
            reply = CompactReply(errors=("no data tier is configured",))
        else:
            reply = await self.compact(config, orphans=True)
        return reply.model_dump_json().encode()

    async def compact(self, config: TierConfig, *, orphans: bool) -> CompactReply:
        async with self._compacting:
            started = time.monotonic()
            busy = {self._uploading_blob} if self._uploading_blob else set()
            result = await self.compactor.run(config, busy, orphans=orphans)
            if orphans:
                self._orphans_swept = time.monotonic()
        self.garbage.add(result)
        reply = CompactReply(
            compacted=result.compacted,
            deleted=result.deleted,
            orphans=result.orphans,
            reclaimed_bytes=result.reclaimed,
            errors=tuple(result.errors),
            seconds=round(time.monotonic() - started, 3),
        )
        if result.compacted or result.deleted or result.orphans or result.errors:
            log.info("tier.compact_pass", extra=reply.model_dump())
        return reply

    # -- backfill: what no client queued ---------------------------------------------------
    async def backfill_loop(self) -> None:
        """A pass when the schedule says (`backfill.Schedule`: after a new tier is seen,
        then every `backfill_s`)."""
        await self._caught_up.wait()
        while True:
            key = tier_key(self.config())
            reason = self.backfill_schedule.due(key, time.monotonic())
            if key is not None and reason is not None:
                await self.backfill(key, reason)
            await asyncio.sleep(BACKFILL_TICK_S)

    async def on_backfill(self, msg: Msg) -> bytes:
        """`s3-backfill`: a pass now (after the one running, if any)."""
        await self._caught_up.wait()
        key = tier_key(self.config())
        if key is None:
            reply = BackfillReply(error="no data tier is configured")
        else:
            reply = await self.backfill(key, "asked for (cfs admin s3-backfill)")
        return reply.model_dump_json().encode()

    async def backfill(self, key: TierKey, reason: str) -> BackfillReply:
        async with self._backfilling:
            started, started_ms = time.monotonic(), system_wall_ms()
            try:
                result = await self.backfiller.run(pending=lambda c: c in self.queue.pending)
            except (FsError, BusError, nats.errors.Error, TimeoutError) as exc:
                # metadata or JetStream not answering: tried again in RETRY_S; a WARNING
                # once it failed twice in a row (a leader election is over by then)
                again = self.backfill_note is not None
                self.backfill_schedule.failed(time.monotonic())
                self.backfill_note = str(exc) or type(exc).__name__
                log.log(
                    logging.WARNING if again else logging.INFO,
                    "tier.backfill_failed",
                    extra={"reason": reason, "error": self.backfill_note},
                )
                seconds = round(time.monotonic() - started, 3)
                return BackfillReply(error=self.backfill_note, seconds=seconds)
            self.backfill_schedule.ran(key, started)
        self.backfilled_chunks += result.queued
        self.backfilled_bytes += result.queued_bytes
        self.backfill_pass_ms, self.backfill_note = started_ms, None
        reply = BackfillReply(
            files=result.files,
            chunks=result.chunks,
            queued=result.queued,
            queued_bytes=result.queued_bytes,
            seconds=round(time.monotonic() - started, 3),
        )
        log.info(
            "tier.backfill_pass", extra={"reason": reason, **reply.model_dump(exclude={"error"})}
        )
        return reply

    # -- eviction (tiered mode) -------------------------------------------------------------
    async def evict_loop(self) -> None:
        """A pass over every file every quarter of `evict_after_s` (bounded), while the
        mode is tiered and S3 answers: what is cold and in S3 leaves flash."""
        await self._caught_up.wait()
        while True:
            config = self.config()
            if config is not None and config.enabled and config.mode is TierMode.TIERED:
                await self._evict_pass(config)
                pause = min(600.0, max(0.5, config.evict_after_s / 4))
            else:
                pause = self.settings.probe_s
            await asyncio.sleep(pause)

    async def _evict_pass(self, config: TierConfig) -> None:
        if not self.health.reachable:
            self.evict_note = "S3 unreachable: nothing leaves flash"
            return
        facts = self.nodes.facts()
        # Every store that may serve reads (draining and full ones too): each one's
        # answer counts for coldness.
        stores = sorted(
            n for n in self.nodes.records if facts.in_service(n) and facts.store_fresh(n)
        )
        started = time.monotonic()
        try:
            result = await self.evictor.run(config, stores)
        except (PassAborted, FsError) as exc:
            if self.evict_note != str(exc):
                log.info("tier.evict_skipped", extra={"reason": str(exc)})
            self.evict_note = str(exc)
            return
        self.evicted_chunks += result.chunks
        self.evicted_bytes += result.bytes
        self.evict_pass_ms = system_wall_ms()
        self.evict_note = "; ".join(result.errors[:3]) or None
        if result.chunks or result.unfinished or result.errors:
            log.info(
                "tier.evict_pass",
                extra={
                    "files": result.files_scanned,
                    "chunks": result.chunks,
                    "bytes": result.bytes,
                    "unfinished": result.unfinished,
                    "errors": len(result.errors),
                    "seconds": round(time.monotonic() - started, 2),
                },
            )

    # -- the watermark ---------------------------------------------------------------------
    async def status_loop(self) -> None:
        """Every `status_s`: each node's reading through the watermark machine, the
        transitions as events, and `tier.state` for clients and commands."""
        kv = await self.bus.key_value(NODES.bucket)
        while True:
            config = self.config()
            if config is not None and self._caught_up.is_set():
                await self._settle(config)
                state = self.state(config)
                record_tier_state(state, system_wall_ms())
                try:
                    await kv.put(TIER_STATE_KEY, state.model_dump_json().encode())
                except (nats.errors.Error, TimeoutError, BusError) as exc:
                    log.info("tier.state_unsaved", extra={"error": str(exc)})
            await asyncio.sleep(self.settings.status_s)

    def readings(self, config: TierConfig) -> list[Reading]:
        nodes = set(self.nodes.records) | set(self.queue.unflushed)
        readings = []
        for node in sorted(nodes):
            record = self.nodes.records.get(node)
            capacity = config.flash_bytes or (record.capacity_bytes if record else 0)
            readings.append(
                Reading(
                    node=node,
                    capacity_bytes=capacity,
                    unflushed_bytes=self.queue.unflushed.get(node, 0),
                    queue_entries=len(self.queue.pending),
                    s3_reachable=self.health.reachable,
                )
            )
        return readings

    async def _settle(self, config: TierConfig) -> None:
        thresholds = Thresholds(
            high=config.high,
            critical=config.critical,
            full=config.full,
            resume_margin=config.resume_margin,
        )
        for reading in self.readings(config):
            level = self.levels.get(reading.node, Level.NORMAL)
            for step in settle(level, reading, thresholds):
                log.log(
                    logging.WARNING if step.after > step.before else logging.INFO,
                    "tier.watermark",
                    extra={"node": step.node, "reason": step.reason},
                )
                await self._announce(step.node, step.before, step.after, step.fill, step.reason)
                if step.alert is not None:
                    await self._alert(step.node, step.alert)
                level = step.after
            self.levels[reading.node] = level
        self.level = worst(self.levels.values())

    async def _announce(
        self, node: str, before: Level, after: Level, fill: float, why: str
    ) -> None:
        event = WatermarkChanged(
            node_id=node, before=before.name, after=after.name, fill=round(fill, 4), reason=why
        )
        try:
            await self.bus.publish(self.bus.event(event), timeout=5.0)
        except BusError as exc:
            log.warning("tier.event_unsent", extra={"node": node, "error": str(exc)})

    async def _alert(self, node: str, summary: str) -> None:
        alert = AlertRaised(
            rule="flash_critical",
            severity=Severity.CRITICAL,
            summary=summary,
            dedupe_key=f"tier.flash.{node}",
        )
        log.critical("tier.alert", extra={"node": node, "summary": summary})
        try:
            await self.bus.publish(self.bus.event(alert), timeout=5.0)
        except BusError as exc:
            log.warning("tier.event_unsent", extra={"node": node, "error": str(exc)})

    def state(self, config: TierConfig) -> TierState:
        now = time.monotonic()
        while self._drained and now - self._drained[0][0] > DRAIN_WINDOW_S:
            self._drained.popleft()
        span = min(DRAIN_WINDOW_S, max(1.0, now - (self._drained[0][0] if self._drained else now)))
        readings = {r.node: r for r in self.readings(config)}
        return TierState(
            holder=self.bus.node,
            holder_since_ms=self.since_ms,
            updated_ms=system_wall_ms(),
            mode=config.mode,
            level=self.level.name,
            policy=policy(self.level),
            nodes=tuple(
                NodeFlash(
                    node=node,
                    level=self.levels.get(node, Level.NORMAL).name,
                    fill=round(reading.fill, 4),
                    unflushed_bytes=reading.unflushed_bytes,
                    capacity_bytes=reading.capacity_bytes,
                )
                for node, reading in readings.items()
            ),
            queue_entries=len(self.queue.pending),
            queue_bytes=self.queue.bytes,
            flushed_below_seq=self.queue.purge_below(),
            oldest_queued_ms=self.queue.oldest_ms(),
            drain_entries_per_s=round(sum(n for _, n, _ in self._drained) / span, 2),
            drain_bytes_per_s=round(sum(b for _, _, b in self._drained) / span, 1),
            flushed_chunks=self.flushed_chunks,
            flushed_bytes=self.flushed_bytes,
            blobs_written=self.blobs,
            s3=self.health.record(config.url),
            stray_blobs=max(0, self.stray_blobs),
            stray_bytes=max(0, self.stray_bytes),
            copied_blobs=self.copied_blobs,
            copy_error=self.copy_error,
            complete_url=self._clean_url,
            forgotten_chunks=self.forgotten_chunks,
            compacted_blobs=self.garbage.compacted,
            deleted_blobs=self.garbage.deleted,
            orphan_blobs=self.garbage.orphans,
            reclaimed_bytes=self.garbage.reclaimed,
            compact_note="; ".join(self.garbage.errors[:3]) or None,
            backfilled_chunks=self.backfilled_chunks,
            backfilled_bytes=self.backfilled_bytes,
            backfill_pass_ms=self.backfill_pass_ms,
            backfill_note=self.backfill_note,
            evicted_chunks=self.evicted_chunks,
            evicted_bytes=self.evicted_bytes,
            evict_pass_ms=self.evict_pass_ms,
            evict_note=self.evict_note,
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def start(ctx: Context) -> Tierer:
    tierer = Tierer(ctx.bus, ctx.settings)
    ctx.on_stop(tierer.close)
    return tierer


async def lead(ctx: Context) -> None:
    """The active instance: follow the queue, flush it, rule the watermark."""
    tierer: Tierer = ctx.service
    nodes = await ctx.nodes()
    index = await until_jetstream_answers(
        f"{TIER_INDEX.bucket} bucket", lambda: ctx.bus.key_value(TIER_INDEX.bucket)
    )
    term = Term(tierer, ctx.bus, nodes, index)
    await term.probe(term.config())  # at start-up; the service runs on, queueing, if it fails
    site = ctx.bus.site
    subs = [
        await ctx.bus.serve(tier_flush_subject(site), term.on_flush),
        await ctx.bus.serve(tier_recall_subject(site), term.on_recall),
        await ctx.bus.serve(tier_reindex_subject(site), term.on_reindex),
        await ctx.bus.serve(tier_forget_subject(site), term.on_forget),
        await ctx.bus.serve(tier_compact_subject(site), term.on_compact),
        await ctx.bus.serve(tier_backfill_subject(site), term.on_backfill),
    ]
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(term.follow(), name="tier queue")
            tasks.create_task(term.flush_loop(), name="tier flush")
            tasks.create_task(term.status_loop(), name="tier status")
            tasks.create_task(term.copy_loop(), name="tier failover copy")
            tasks.create_task(term.evict_loop(), name="tier eviction")
            tasks.create_task(term.compact_loop(), name="tier compaction")
            tasks.create_task(term.backfill_loop(), name="tier backfill")
    finally:
        if not ctx.bus.nc.is_closed:
            for sub in subs:
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await sub.unsubscribe()


def main(argv: list[str] | None = None) -> None:
    from cfs_tierer.spec import SPEC

    run_spec(SPEC, argv)


QUEUE_ENTRIES = gauge("tier_queue_entries", "chunks queued for S3 and not yet flushed")
QUEUE_BYTES = gauge("tier_queue_bytes", "bytes queued for S3 and not yet flushed")
S3_LAG = gauge("tier_s3_lag_seconds", "age of the oldest chunk not yet in S3 (0: queue empty)")
WATERMARK = gauge(
    "tier_watermark_level",
    "the site's worst flash watermark: 0 normal, 1 write-through, 2 critical, 3 full",
)
NODE_WATERMARK = gauge(
    "tier_node_watermark_level", "a node's flash watermark level (as above)", ("node",)
)
NODE_FILL = gauge("tier_node_flash_fill_ratio", "unflushed bytes over flash capacity", ("node",))


def record_tier_state(state: TierState, now_ms: int) -> None:
    """The active tierer's `tier.state` as gauges, every `status_s`."""
    QUEUE_ENTRIES.set(state.queue_entries)
    QUEUE_BYTES.set(state.queue_bytes)
    oldest = state.oldest_queued_ms
    S3_LAG.set(max(0.0, (now_ms - oldest) / 1000) if oldest else 0.0)
    WATERMARK.set(Level[state.level])
    for node in state.nodes:
        NODE_WATERMARK.labels(node.node).set(Level[node.level])
        NODE_FILL.labels(node.node).set(node.fill)
