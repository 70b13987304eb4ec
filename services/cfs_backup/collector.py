"""Fragment garbage collection, the runner: mark a keep set, sweep every chunk-store.

The active backup service runs it (it knows the snapshot destinations and their
retention, and reads every journal already), every `gc_interval_s` and on request
(`cfs admin gc [--dry-run]`, `rpc.backup.gc`). The decision is `gc.decide`; here:

Mark, at wall time M: each shard's journal end; the service's projection of each
shard (`shadow.py`, the snapshots' own) brought to it and held while read; the oldest
retained snapshot (the newest-first retention at the schedule's destination, the
destinations snapshots were uploaded to, and `gc_snapshot_urls`), its image's chunks
(cached per snapshot id) and every journal message after its cut. Anything that
cannot be read blocks the run: nothing is deleted on a partial keep set.

Sweep: every chunk-store with a `store.*` record lists its fragments in pages; each
page is judged and its deletions sent as conditional deletes (`Cfs-Stored-Ms`). A
chunk-store that does not answer is skipped and reported (next run). A kill -9
anywhere is harmless: nothing is recorded between runs but the report, a deleted
fragment is gone and a listed one is judged again; a delete that already happened
answers ENOENT (counted as already gone).

Not tracked: snapshot files written with `--output` (a local path or an S3 key the
CLI uploads itself) and destinations never used by this service nor configured.
Those are protected by the grace period only.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import nats.js.errors

from cfs.backup.image import ImageFormatError, iter_pairs
from cfs.backup.snapshot_file import Snapshot, SnapshotInvalid, read_snapshot
from cfs.bus import Bus, BusError, NoResponders
from cfs.bus.kv import bucket_keys
from cfs.client.chunks import ChunkStoreClient, FragmentError
from cfs.cluster import read_config
from cfs.faults import crash_point
from cfs.ids import new_id
from cfs.objstore import ObjectStoreError, ServiceS3Settings, open_store
from cfs_backup.gc import Candidate, Judgement, KeepSet, Verdict, chunks_of_image, decide
from cfs_backup.gc import chunks_of_payload as message_chunks
from cfs_backup.shadow import ClockBehind, Shadows
from cfs_contracts.backup import (
    GC_DESTINATIONS_KEY,
    GC_REPORT_KEY,
    SCHEDULE_KEY,
    SNAPSHOT_PREFIX,
    GcDeletion,
    GcReport,
    SnapshotSchedule,
)
from cfs_contracts.data import ListRequest
from cfs_contracts.streams import NODES, TIER_INDEX
from cfs_contracts.tier import ForgetReply, ForgetRequest, tier_forget_subject
from cfs_metadata.journal import Journal, JournalRecord
from cfs_metadata.records import CorruptRecord

log = logging.getLogger(__name__)

LIST_PAGE = 1000
DELETES_AT_ONCE = 8
REPORTED_DELETIONS = 1000
STORE_PREFIX = "store."
TIER_CHUNK_PREFIX = "chunk."  # chunk_location_key's
FORGET_BATCH = 1000


class GcBlocked(Exception):
    """The keep set cannot be proven complete: nothing is deleted; the message says why."""


_BLOCKING = (
    GcBlocked,
    ClockBehind,
    BusError,
    ObjectStoreError,
    SnapshotInvalid,
    CorruptRecord,
    ImageFormatError,
    nats.errors.Error,
    TimeoutError,
    ValueError,
)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Tally:
    nodes: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    fragments: int = 0
    referenced: int = 0
    young: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    gone: int = 0
    again: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    deletions: list[GcDeletion] = field(default_factory=list)
    tier_candidates: int = 0
    tier_forgotten: int = 0
    tier_young: int = 0
    tier_note: str = ""


@dataclass(frozen=True)
class Retained:
    url: str  # destination/key of the oldest retained snapshot
    destination: str
    key: str


class Collector:
    def __init__(
        self,
        bus: Bus,
        root: Path,
        shadows: Shadows,
        *,
        grace_s: float,
        snapshot_urls: Iterable[str] = (),
        s3: ServiceS3Settings | None = None,
        active: Callable[[], bool] = lambda: True,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        """`root`: this service's directory for caches; `shadows`: its projections of
        the live metadata (`shadow.py`).
        `active`: whether this process still holds the backup lease (checked before
        every delete; a deposed collector stops deleting)."""
        self.bus = bus
        self.root = root
        self.shadows = shadows
        self.grace_ms = int(grace_s * 1000)
        self.snapshot_urls = tuple(snapshot_urls)
        self.s3 = s3 or ServiceS3Settings()
        self._active = active
        self._wall_ms = wall_ms
        self._lock = asyncio.Lock()
        self.chunks = ChunkStoreClient(bus, timeout_s=30.0)

    async def run(self, dry_run: bool = False) -> GcReport:
        """One collection (one at a time); the report is logged and kept in the KV."""
        async with self._lock:
            run_id, started, clock = new_id(), self._wall_ms(), time.monotonic()
            base = dict(
                run_id=run_id,
                node=self.bus.node,
                dry_run=dry_run,
                started_ms=started,
                grace_s=self.grace_ms / 1000,
            )
            try:
                keep, retained = await self.mark()
            except _BLOCKING as exc:
                report = GcReport(
                    **base, ok=False, message=f"blocked, nothing deleted: {exc}", seconds=0.0
                )
                log.warning("gc.blocked", extra={"run": run_id, "error": str(exc)})
                await self._save(report)
                return report
            tally = _Tally()
            try:
                await self.sweep(keep, dry_run, tally)
                await self.sweep_tier(keep, dry_run, tally)
            except _BLOCKING as exc:  # what went is in the report; a rerun continues
                tally.failed += 1
                tally.errors.insert(0, f"sweep stopped: {exc}")
                log.warning("gc.sweep_stopped", extra={"run": run_id, "error": str(exc)})
            report = _report(base, keep, retained, tally, time.monotonic() - clock)
            log.info(
                "gc.run",
                extra={
                    "run": run_id,
                    "dry_run": dry_run,
                    "keep_chunks": report.keep_chunks,
                    "protected_snapshot": report.protected_snapshot,
                    "fragments": report.fragments,
                    "kept_referenced": report.kept_referenced,
                    "kept_young": report.kept_young,
                    "deleted": report.deleted,
                    "deleted_bytes": report.deleted_bytes,
                    "already_gone": report.already_gone,
                    "stored_again": report.stored_again,
                    "failed": report.failed,
                    "unreachable": list(report.unreachable),
                    "seconds": round(report.seconds, 3),
                },
            )
            await self._save(report)
            return report

    # -- mark --------------------------------------------------------------------------
    async def mark(self) -> tuple[KeepSet, Retained | None]:
        marked_ms = self._wall_ms()  # before anything is read: ages count from here
        config = await read_config(self.bus)
        if config is None:
            raise GcBlocked("the cluster is not initialized (`cfs cluster init`)")
        ends = {i: await Journal(self.bus, i).last_seq() for i in range(1, config.shards + 1)}
        chunks: set[str] = set()
        for index, end in ends.items():
            live, ends[index] = await self._live(index, end)
            chunks.update(live)
        retained = await self.oldest_retained()
        if retained is not None:
            snapshot = await self._fetch(retained)
            manifest = snapshot.manifest
            if manifest.cluster_id != config.cluster_id:
                raise GcBlocked(
                    f"the oldest retained snapshot {retained.url} is of cluster "
                    f"{manifest.cluster_id}, not this one ({config.cluster_id}): the journal "
                    "a restore from it replays is not this cluster's"
                )
            chunks.update(await self._snapshot_chunks(manifest.snapshot_id, snapshot.images))
            for cut in manifest.shards:
                index = int(cut.shard)
                async for record in _read(Journal(self.bus, index), cut.seq + 1, ends[index]):
                    chunks.update(message_chunks(record.event.payload))
        return KeepSet(frozenset(chunks), marked_ms), retained

    async def _live(self, index: int, end: int) -> tuple[set[str], int]:
        """Chunks of shard `index`'s state at journal `end` or later (the service's
        shadow of it, which follows the journal: brought to `end` if behind and held
        while its chunks are read), and the sequence that state is at."""
        shadow = self.shadows.by_index.get(index)
        if shadow is None:
            raise GcBlocked(f"no projection of shard {index:03d} here (shards changed?)")
        async with shadow.lock:
            await shadow.catch_up(end)
            pairs = shadow.projection.image_pairs()
            chunks = await asyncio.to_thread(lambda: set(chunks_of_image(pairs)))
            return chunks, shadow.projection.applied_seq

    async def destinations(self) -> list[str]:
        """Where retained snapshots are: the schedule's destination, every destination
        this service uploaded to, and the configured extra ones."""
        found: list[str] = []
        kv = await self.bus.key_value(NODES.bucket)
        for key in (SCHEDULE_KEY, GC_DESTINATIONS_KEY):
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if not entry.value:
                continue
            if key == SCHEDULE_KEY:
                found.append(SnapshotSchedule.model_validate_json(entry.value).destination)
            else:
                found.extend(str(url) for url in json.loads(entry.value))
        found.extend(self.snapshot_urls)
        return list(dict.fromkeys(url.rstrip("/") for url in found))

    async def oldest_retained(self) -> Retained | None:
        """The oldest snapshot at any destination (names sort by their time stamp)."""
        oldest: tuple[str, Retained] | None = None
        for destination in await self.destinations():
            async with open_store(destination, self.s3) as store:
                async for info in store.list(SNAPSHOT_PREFIX):
                    name = info.key.rsplit("/", 1)[-1]
                    if not name.endswith(".tar.gz"):
                        continue
                    found = Retained(f"{destination}/{info.key}", destination, info.key)
                    if oldest is None or name < oldest[0]:
                        oldest = (name, found)
        return oldest[1] if oldest else None

    async def _fetch(self, retained: Retained) -> Snapshot:
        path = self.root / "gc" / "retained.tar.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            async with open_store(retained.destination, self.s3) as store:
                await store.get_file(retained.key, path)
            snapshot = await asyncio.to_thread(read_snapshot, path)
        finally:
            path.unlink(missing_ok=True)
        return snapshot

    async def _snapshot_chunks(self, snapshot_id: str, images: dict[str, bytes]) -> set[str]:
        """A snapshot's chunk ids, computed from its images once and cached by id."""
        cache = self.root / "gc" / f"snapshot-{snapshot_id}.chunks"
        if cache.is_file():
            return set(cache.read_text().split())

        def compute() -> set[str]:
            found: set[str] = set()
            for image in images.values():
                found.update(chunks_of_image(iter_pairs(image)))
            return found

        found = await asyncio.to_thread(compute)
        for old in cache.parent.glob("snapshot-*.chunks"):
            old.unlink(missing_ok=True)  # only the oldest retained one is ever needed
        tmp = cache.with_suffix(".partial")
        tmp.write_text("\n".join(sorted(found)))
        tmp.replace(cache)
        return found

    # -- sweep -------------------------------------------------------------------------
    async def sweep(self, keep: KeepSet, dry_run: bool, tally: _Tally) -> None:
        for key in sorted(await bucket_keys(self.bus, NODES.bucket, STORE_PREFIX)):
            node = key[len(STORE_PREFIX) :]
            tally.nodes.append(node)
            await self._sweep_node(node, keep, dry_run, tally)

    async def _sweep_node(self, node: str, keep: KeepSet, dry_run: bool, tally: _Tally) -> None:
        after = ""
        while True:
            try:
                page = await self.chunks.list(node, ListRequest(after=after, limit=LIST_PAGE))
            except FragmentError as exc:
                tally.unreachable.append(node)
                log.info("gc.node_skipped", extra={"node": node, "error": str(exc)})
                return
            found = [Candidate(node, f.key, f.size, f.stored_ms) for f in page.fragments]
            judged = decide(found, keep, self.grace_ms, self._wall_ms())
            tally.fragments += len(judged)
            tally.referenced += sum(
                j.verdict in (Verdict.REFERENCED, Verdict.UNKNOWN_KEY) for j in judged
            )
            tally.young += sum(j.verdict is Verdict.YOUNG for j in judged)
            doomed = [j for j in judged if j.delete]
            for start in range(0, len(doomed), DELETES_AT_ONCE):
                group = doomed[start : start + DELETES_AT_ONCE]
                await asyncio.gather(*(self._delete(j, dry_run, tally) for j in group))
            if not page.more or not found:
                return
            after = found[-1].key

    async def sweep_tier(self, keep: KeepSet, dry_run: bool, tally: _Tally) -> None:
        """The S3 tier's chunks outside the keep set go to the tierer, which drops each
        one's location unless it is young (flushed or queued again within the grace):
        its compaction then frees the space. The same keep set as the fragments', so no
        chunk a retained snapshot or the archived journal names ever leaves S3."""
        keys = await bucket_keys(self.bus, TIER_INDEX.bucket, TIER_CHUNK_PREFIX)
        doomed = [
            chunk_id
            for key in keys
            if (chunk_id := key[len(TIER_CHUNK_PREFIX) :]) not in keep.chunks
        ]
        tally.tier_candidates = len(doomed)
        if dry_run or not doomed:
            return
        for start in range(0, len(doomed), FORGET_BATCH):
            if not self._active():
                raise GcBlocked("this backup process lost its lease mid-sweep")
            request = ForgetRequest(
                chunk_ids=tuple(doomed[start : start + FORGET_BATCH]),
                marked_ms=keep.marked_ms,
                grace_ms=self.grace_ms,
            )
            try:
                msg = await self.bus.request(
                    tier_forget_subject(self.bus.site),
                    request.model_dump_json().encode(),
                    timeout=60.0,
                )
            except NoResponders:
                tally.tier_note = "no s3-tierer is running: the S3 tier was not collected"
                return
            reply = ForgetReply.model_validate_json(msg.data)
            tally.tier_forgotten += reply.forgotten
            tally.tier_young += reply.young

    async def _delete(self, judged: Judgement, dry_run: bool, tally: _Tally) -> None:
        c = judged.candidate
        if not dry_run:
            if not self._active():
                raise GcBlocked("this backup process lost its lease mid-sweep")
            try:
                await self.chunks.delete(c.node, c.key, stored_ms=c.stored_ms)
            except FragmentError as exc:
                if exc.errno == errno.ENOENT:
                    tally.gone += 1
                elif exc.errno == errno.ESTALE:
                    tally.again += 1
                else:
                    tally.failed += 1
                    if len(tally.errors) < 5:
                        tally.errors.append(str(exc))
                return
            crash_point("backup.gc_deleted")  # one deleted, the rest of the sweep not yet
        tally.deleted += 1
        tally.deleted_bytes += c.size
        if len(tally.deletions) < REPORTED_DELETIONS:
            tally.deletions.append(
                GcDeletion(node=c.node, key=c.key, size=c.size, age_s=judged.age_ms / 1000)
            )

    async def _save(self, report: GcReport) -> None:
        try:
            kv = await self.bus.key_value(NODES.bucket)
            await kv.put(GC_REPORT_KEY, report.model_dump_json().encode())
        except (nats.errors.Error, TimeoutError, BusError) as exc:
            log.info("gc.report_unsaved", extra={"error": str(exc)})


def _report(
    base: dict[str, object],
    keep: KeepSet,
    retained: Retained | None,
    tally: _Tally,
    seconds: float,
) -> GcReport:
    failures = (
        [f"{tally.failed} deletes failed: " + "; ".join(tally.errors)] if tally.failed else []
    )
    return GcReport.model_validate(
        {
            **base,
            "ok": not tally.failed,
            "message": " ".join(failures),
            "marked_ms": keep.marked_ms,
            "seconds": seconds,
            "protected_snapshot": retained.url if retained else None,
            "keep_chunks": len(keep.chunks),
            "nodes": tuple(tally.nodes),
            "unreachable": tuple(tally.unreachable),
            "fragments": tally.fragments,
            "kept_referenced": tally.referenced,
            "kept_young": tally.young,
            "deleted": tally.deleted,
            "deleted_bytes": tally.deleted_bytes,
            "already_gone": tally.gone,
            "stored_again": tally.again,
            "failed": tally.failed,
            "deletions": tuple(tally.deletions),
            "tier_candidates": tally.tier_candidates,
            "tier_forgotten": tally.tier_forgotten,
            "tier_young": tally.tier_young,
            "tier_note": tally.tier_note,
        }
    )


async def _read(journal: Journal, first: int, last: int) -> AsyncIterator[JournalRecord]:
    """Journal messages `first`..`last` (none when first > last)."""
    if first > last:
        return
    async for record in journal.tail(first):
        yield record
        if record.seq >= last:
            return
