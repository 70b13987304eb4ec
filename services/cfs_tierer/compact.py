"""The S3 tier's garbage: chunks nothing can name any more, and the blobs they empty.

Which chunks are garbage is the backup service's fragment GC's keep set (live metadata
+ the oldest retained snapshot + the journal after its cut: every state a restore can
produce). Its sweep sends the tier's chunks outside that set here (`forget`); a chunk
whose blob was written, or which a write queued again, within the grace before the
mark is young (its new reference may be committing) and stays. The others lose their
location in the index, and nothing reads them again.

Compaction then rewrites, oldest first, every blob of the tier's URL whose live share
(bytes of located chunks over the blob's size) is below `compact_below`:

    GET the blob; the live chunks checked against their SHA-256 and packed anew
    PUT the new blob, write its record                         (tier.compact_written)
    move each live chunk's location to it, compare-and-set     (tier.compact_moved)
    DELETE the old blob, then its record

A blob with nothing live is just deleted. A kill -9 anywhere loses nothing: a chunk's
location points at one blob at every moment, and a half-moved blob is only emptier at
the next pass, which compacts it again. What a crash can leave is an unreferenced copy
(the new blob's unmoved chunks, or a new blob without its record): space, never data.
A location that changed meanwhile (a recall, an eviction, a write queued again) fails
its compare-and-set and is looked at again; only a blob no location names is deleted.

Orphans (a blob PUT whose writer died before recording it) are found by a LIST of the
tier's URL, at most every `orphan_sweep_s`: an unrecorded blob older than the minimum
age goes only when every chunk it holds is located in another, recorded blob. So the
index being empty (a total loss before `restore-data` reindexed the bucket) or a chunk
being only there can never make a blob an orphan: space may stay, data never goes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import nats.js.errors
from nats.js.kv import KeyValue

from cfs.client.tier import read_blob_records, read_location, read_locations
from cfs.faults import crash_point
from cfs.hlc import system_wall_ms
from cfs.ids import new_id
from cfs.objstore import ObjectStore, ObjectStoreError
from cfs_contracts.tier import (
    BLOB_KEY_PREFIX,
    BlobIndex,
    BlobRecord,
    ChunkLocation,
    ForgetReply,
    ForgetRequest,
    TierConfig,
    blob_object_key,
    blob_record_key,
    chunk_location_key,
)
from cfs_tierer.blob import BlobBuilder, BlobError, read_index
from cfs_tierer.recall import ChunkLocks, blob_entries, change_location

log = logging.getLogger(__name__)


# -- decisions (pure) ----------------------------------------------------------------------
def young(where: ChunkLocation, record: BlobRecord | None, marked_ms: int, grace_ms: int) -> bool:
    """Written to S3 or queued again too close to the mark to be judged by it: a write
    stores and queues its chunk before the commit that names it."""
    last = max(record.created_ms if record else 0, where.requeued_ms or 0)
    return last >= marked_ms - grace_ms


@dataclass(frozen=True)
class BlobUse:
    record: BlobRecord
    live: tuple[tuple[str, ChunkLocation, int], ...]  # chunk id, location, revision

    @property
    def live_bytes(self) -> int:
        return sum(where.length for _, where, _ in self.live)

    @property
    def share(self) -> float:
        return self.live_bytes / max(1, self.record.bytes)


def to_compact(
    records: Iterable[BlobRecord],
    locations: Iterable[tuple[str, ChunkLocation, int]],
    *,
    url: str,
    below: float,
    before_ms: int,
) -> list[BlobUse]:
    """The blobs under `url` created before `before_ms` whose live share is below
    `below`, oldest first (a blob written after `before_ms` may still be getting its
    locations; blobs under another URL wait for the failover copy)."""
    live: dict[str, list[tuple[str, ChunkLocation, int]]] = {}
    for chunk_id, where, revision in locations:
        live.setdefault(where.blob_id, []).append((chunk_id, where, revision))
    uses = [
        BlobUse(record, tuple(live.get(record.blob_id, ())))
        for record in records
        if record.url == url and record.created_ms < before_ms
    ]
    return sorted(
        (u for u in uses if u.share < below), key=lambda u: (u.record.created_ms, u.record.blob_id)
    )


def orphan(blob_id: str, held: Iterable[str], where: dict[str, ChunkLocation | None],
           recorded: set[str]) -> bool:  # fmt: skip
    """An unrecorded blob is garbage only if each chunk it holds is served by another
    recorded blob (an empty index makes nothing an orphan)."""
    if blob_id in recorded:
        return False
    for chunk_id in held:
        at = where.get(chunk_id)
        if at is None or at.blob_id == blob_id or at.blob_id not in recorded:
            return False
    return True


# -- the work (I/O) --------------------------------------------------------------------------
@dataclass
class CompactResult:
    compacted: int = 0
    deleted: int = 0
    orphans: int = 0
    reclaimed: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: CompactResult) -> None:
        """Count `other` in (a holder's totals); the errors are the latest pass's."""
        self.compacted += other.compacted
        self.deleted += other.deleted
        self.orphans += other.orphans
        self.reclaimed += other.reclaimed
        self.errors = list(other.errors)


class Compactor:
    def __init__(
        self,
        index: KeyValue,
        stores: Callable[[str], ObjectStore],
        locks: ChunkLocks,
        *,
        min_age_s: float,
        forgotten: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.index = index
        self._store = stores
        self.locks = locks
        self.min_age_s = min_age_s
        self._forgotten = forgotten  # the tierer's memory of what is in S3 drops it

    async def forget(self, request: ForgetRequest) -> ForgetReply:
        forgotten = young_count = gone = 0
        records: dict[str, BlobRecord | None] = {}
        for chunk_id in request.chunk_ids:
            key = chunk_location_key(chunk_id)
            async with self.locks.hold(chunk_id):
                try:
                    entry = await self.index.get(key)
                except nats.js.errors.KeyNotFoundError:
                    gone += 1
                    continue
                where = ChunkLocation.model_validate_json(entry.value or b"")
                if where.blob_id not in records:
                    records[where.blob_id] = await self._record(where.blob_id)
                if young(where, records[where.blob_id], request.marked_ms, request.grace_ms):
                    young_count += 1
                    continue
                try:
                    await self.index.delete(key, last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    young_count += 1  # changed since: judged again at the next run
                    continue
                self._forgotten(chunk_id)
                forgotten += 1
        if forgotten:
            log.info("tier.forgotten", extra={"chunks": forgotten, "young": young_count})
        return ForgetReply(forgotten=forgotten, young=young_count, gone=gone)

    async def run(
        self, config: TierConfig, busy: set[str], *, orphans: bool = False
    ) -> CompactResult:
        """One pass over the index (and the bucket's orphans if asked); `busy`: blobs
        being written right now."""
        assert config.url is not None
        result = CompactResult()
        records = await read_blob_records(self.index)
        if orphans:
            try:
                await self.sweep_orphans(config.url, {r.blob_id for r in records}, result)
            except ObjectStoreError as exc:
                result.errors.append(f"orphan sweep: {exc}")
        before_ms = system_wall_ms() - int(self.min_age_s * 1000)
        plan = to_compact(
            [r for r in records if r.blob_id not in busy],
            await read_locations(self.index),
            url=config.url,
            below=config.compact_below,
            before_ms=before_ms,
        )
        for use in plan:
            try:
                if use.live:
                    held = await self._rewrite(use, config.url)
                else:
                    key = blob_object_key(use.record.blob_id)
                    store = self._store(use.record.url)
                    entries = await blob_entries(store, key, use.record.blob_id, use.record.bytes)
                    held = [e.chunk_id for e in entries]
                if await self._delete_if_unnamed(use.record, held):
                    result.reclaimed += use.record.bytes
                    if use.live:
                        result.compacted += 1
                    else:
                        result.deleted += 1
            except (ObjectStoreError, BlobError) as exc:
                result.errors.append(f"blob {use.record.blob_id}: {exc}")
                log.warning(
                    "tier.compact_failed", extra={"blob": use.record.blob_id, "error": str(exc)}
                )
                break  # S3 is failing: the next pass tries again
        return result

    async def sweep_orphans(self, url: str, recorded: set[str], result: CompactResult) -> None:
        """Unrecorded blobs under `url` whose every chunk is served elsewhere (`orphan`);
        `recorded`: the blobs with a record, read before the LIST (a blob PUT since is
        younger than the minimum age)."""
        store = self._store(url)
        before_ms = system_wall_ms() - int(self.min_age_s * 1000)
        async for info in store.list(BLOB_KEY_PREFIX):
            blob_id = info.key.removeprefix(BLOB_KEY_PREFIX)
            if blob_id in recorded or info.last_modified_ms >= before_ms:
                continue
            try:
                entries = await blob_entries(store, info.key, blob_id, info.size)
            except BlobError as exc:
                log.warning("tier.orphan_unreadable", extra={"blob": blob_id, "error": str(exc)})
                continue
            held = [e.chunk_id for e in entries]
            found = await asyncio.gather(*(read_location(self.index, c) for c in held))
            if not orphan(blob_id, held, dict(zip(held, found, strict=True)), recorded):
                continue
            await store.delete(info.key)
            result.orphans += 1
            result.reclaimed += info.size
            log.info("tier.orphan_deleted", extra={"blob": blob_id, "bytes": info.size})

    async def _rewrite(self, use: BlobUse, url: str) -> list[str]:
        """The live chunks in a new blob; every chunk id the old one holds."""
        old = use.record
        data = await self._store(old.url).get(blob_object_key(old.blob_id))

        def repack() -> tuple[list[str], BlobBuilder, bytes, BlobIndex]:
            """(every chunk id the old blob holds, the new blob): hashing 64 MiB is no
            work for the event loop that renews the lease."""
            held = [entry.chunk_id for entry in read_index(data, old.blob_id).entries]
            builder = BlobBuilder(new_id())
            for chunk_id, where, _ in use.live:
                chunk = data[where.offset : where.offset + where.length]
                if len(chunk) != where.length or hashlib.sha256(chunk).hexdigest() != where.sha256:
                    raise BlobError(f"chunk {chunk_id[:12]} in blob {old.blob_id} is damaged")
                builder.add(chunk_id, chunk, sha256=bytes.fromhex(where.sha256))
            return held, builder, *builder.seal()

        held, builder, blob, index = await asyncio.to_thread(repack)
        moving = [chunk_id for chunk_id, _, _ in use.live]
        await self._store(url).put(blob_object_key(builder.blob_id), blob)
        record = BlobRecord(
            blob_id=builder.blob_id, url=url, bytes=len(blob), chunks=len(index.entries),
            created_ms=system_wall_ms(),
        )  # fmt: skip
        await self.index.put(blob_record_key(record.blob_id), record.model_dump_json().encode())
        crash_point("tier.compact_written")
        placed = {entry.chunk_id: entry for entry in index.entries}
        for n, chunk_id in enumerate(moving):
            entry = placed[chunk_id]
            await self._move(chunk_id, old.blob_id, builder.blob_id, entry.offset, entry.length)
            if n == 0:
                crash_point("tier.compact_moved")
        log.info(
            "tier.compacted",
            extra={
                "blob": old.blob_id,
                "into": builder.blob_id,
                "chunks": len(moving),
                "live_bytes": use.live_bytes,
                "bytes": old.bytes,
            },
        )
        return held

    async def _move(self, chunk_id: str, old: str, new: str, offset: int, length: int) -> None:
        """The location to the new blob, unless it changed blob meanwhile (forgotten, or
        uploaded again elsewhere): then the copy in the new blob is just unused."""

        def moved(where: ChunkLocation) -> ChunkLocation | None:
            if where.blob_id != old:
                return None
            return where.model_copy(update={"blob_id": new, "offset": offset, "length": length})

        async with self.locks.hold(chunk_id):
            await change_location(self.index, chunk_id, moved)

    async def _delete_if_unnamed(self, record: BlobRecord, held: list[str]) -> bool:
        """Delete the blob (then its record) when no location of a chunk it holds names
        it any more (a reindex may have pointed one there since the plan)."""
        found = await asyncio.gather(*(read_location(self.index, c) for c in held))
        still = [
            c
            for c, where in zip(held, found, strict=True)
            if where and where.blob_id == record.blob_id
        ]
        if still:
            log.info("tier.compact_deferred", extra={"blob": record.blob_id, "chunks": len(still)})
            return False
        await self._store(record.url).delete(blob_object_key(record.blob_id))
        crash_point("tier.compact_emptied")  # the object gone, its record not yet
        await self.index.delete(blob_record_key(record.blob_id))
        return True

    async def _record(self, blob_id: str) -> BlobRecord | None:
        try:
            entry = await self.index.get(blob_record_key(blob_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        return BlobRecord.model_validate_json(entry.value or b"")
