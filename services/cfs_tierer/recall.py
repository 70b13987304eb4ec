"""From S3 back to flash: recall of chunks and the index rebuilt from the bucket alone.

Recall puts a chunk's fragments back on the chunk-stores its chunk map names (the
same keys, so the chunk map stays as it is): the chunk is read from its blob with one
ranged GET, checked against its SHA-256, coded again, and only the fragments that do
not verify on their node are stored. A read that found fewer than k fragments asks
for it; `restore-data --from-s3` asks for every chunk of the metadata tree, so a
second run after an interruption only does what the first did not (resumable).

Reindex walks the blobs under a URL (LIST: a recovery tool) and reads each one's
footer (two ranged GETs; a damaged footer: the whole blob, scanned record by record)
into the `tier` bucket, so after the loss of everything but the bucket, recall works
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import nats.js.errors
from nats.js.kv import KeyValue

from cfs.client.chunks import ChunkStoreClient, FragmentError
from cfs.client.tier import read_location
from cfs.erasure import Scheme, encode_some
from cfs.hlc import system_wall_ms
from cfs.objstore import ObjectStore, ObjectStoreError
from cfs_contracts.data import fragment_key
from cfs_contracts.tier import (
    BLOB_KEY_PREFIX,
    BlobEntry,
    BlobRecord,
    ChunkLocation,
    ChunkPlacement,
    FlashCopy,
    RecallReply,
    ReindexReply,
    blob_object_key,
    blob_record_key,
    chunk_location_key,
)
from cfs_tierer.blob import TAIL_BYTES, BlobError, index_range, parse_index, scan

log = logging.getLogger(__name__)


class NotInS3(Exception):
    """The chunk has no location in the tier index (never flushed, or not reindexed)."""


class ChunkLocks:
    """One holder per chunk id at a time: a recall and an eviction of the same chunk
    never interleave (both run in the active tierer)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[asyncio.Lock, int]] = {}  # lock, users

    @contextlib.asynccontextmanager
    async def hold(self, chunk_id: str) -> AsyncIterator[None]:
        lock, users = self._held.get(chunk_id, (asyncio.Lock(), 0))
        self._held[chunk_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._held[chunk_id]
            if users == 1:
                del self._held[chunk_id]
            else:
                self._held[chunk_id] = (lock, users - 1)


async def change_location(
    index: KeyValue, chunk_id: str, change: Callable[[ChunkLocation], ChunkLocation | None]
) -> bool:
    """Compare-and-set the chunk's location to `change(location)` (None: leave it as it
    is), read again and retried if another writer got there first. False when the
    chunk is not located or `change` declined; the caller holds the chunk's lock, so
    only another process (a deposed holder, a reindex) can race."""
    key = chunk_location_key(chunk_id)
    for _ in range(5):
        try:
            entry = await index.get(key)
        except nats.js.errors.KeyNotFoundError:
            return False
        changed = change(ChunkLocation.model_validate_json(entry.value or b""))
        if changed is None:
            return False
        try:
            await index.update(key, changed.model_dump_json().encode(), last=entry.revision)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            continue
    raise nats.js.errors.KeyWrongLastSequenceError(
        description=f"chunk {chunk_id[:12]}: its location kept changing"
    )


class Recaller:
    def __init__(
        self,
        index: KeyValue,
        chunks: ChunkStoreClient,
        stores: Callable[[str], ObjectStore],
        *,
        concurrency: int = 8,
    ) -> None:
        self.index = index
        self.chunks = chunks
        self._store = stores  # url -> its ObjectStore (the Tierer's, shared)
        self._limit = asyncio.Semaphore(concurrency)
        self._records: dict[str, BlobRecord] = {}
        self.locks = ChunkLocks()

    async def recall(self, chunks: tuple[ChunkPlacement, ...]) -> RecallReply:
        results = await asyncio.gather(*(self._guarded(c) for c in chunks))
        failed = tuple(
            f"{c.chunk_id}: {why}" for c, (*_, why) in zip(chunks, results, strict=True) if why
        )
        return RecallReply(
            restored_fragments=sum(r[0] for r in results),
            present_fragments=sum(r[1] for r in results),
            restored_bytes=sum(r[2] for r in results),
            failed=failed,
            evicted=tuple(c.chunk_id for c, r in zip(chunks, results, strict=True) if r[3]),
        )

    async def _guarded(self, chunk: ChunkPlacement) -> tuple[int, int, int, bool, str]:
        async with self._limit, self.locks.hold(chunk.chunk_id):
            try:
                restored = await self._one(chunk)
                return (*restored, await self._back_on_flash(chunk.chunk_id), "")
            except (NotInS3, ObjectStoreError, BlobError, FragmentError, ValueError) as exc:
                log.warning(
                    "tier.recall_failed", extra={"chunk": chunk.chunk_id, "error": str(exc)}
                )
                return 0, 0, 0, False, str(exc)

    async def _back_on_flash(self, chunk_id: str) -> bool:
        """Mark an evicted chunk PRESENT again; True if it was off flash on purpose."""

        def back(where: ChunkLocation) -> ChunkLocation | None:
            if not where.off_flash:
                return None
            return where.model_copy(
                update={"flash": FlashCopy.PRESENT, "flash_changed_ms": system_wall_ms()}
            )

        return await change_location(self.index, chunk_id, back)

    async def _one(self, chunk: ChunkPlacement) -> tuple[int, int, int]:
        """(fragments stored, fragments already there, bytes read from S3)."""
        scheme = Scheme.parse(chunk.scheme)
        if len(chunk.fragments) != scheme.total:
            raise ValueError(f"chunk map names {len(chunk.fragments)} holders for {scheme.name}")
        keys = [fragment_key(chunk.chunk_id, scheme.name, i) for i in range(scheme.total)]
        checks = await asyncio.gather(
            *(self._state(node, key) for node, key in zip(chunk.fragments, keys, strict=True))
        )
        missing = [i for i, state in enumerate(checks) if state == "absent"]
        present = checks.count("present")
        if not missing:
            if present < scheme.k:
                raise ValueError(f"only {present} of {scheme.total} holders answer")
            return 0, present, 0
        data = await self.read(chunk.chunk_id)
        fragments = await asyncio.to_thread(encode_some, scheme, data, missing)
        await asyncio.gather(
            *(self.chunks.put(chunk.fragments[i], keys[i], fragments[i]) for i in missing)
        )
        return len(missing), present, len(data)

    async def _state(self, node: str, key: str) -> str:
        """present, absent (or corrupt: stored again), or unreachable (left to repair,
        which rebuilds a lost node's fragments elsewhere and updates the chunk map)."""
        try:
            await self.chunks.verify(node, key)
        except FragmentError as exc:
            return "unreachable" if exc.unreachable else "absent"
        return "present"

    async def read(self, chunk_id: str) -> bytes:
        """The chunk's bytes from its blob, checked against its id."""
        where = await read_location(self.index, chunk_id)
        if where is None:
            raise NotInS3(f"chunk {chunk_id[:12]} is not in the S3 tier's index")
        record = await self._record(where.blob_id)
        data = await self._store(record.url).get_range(
            blob_object_key(where.blob_id), where.offset, where.length
        )
        if len(data) != where.length or hashlib.sha256(data).hexdigest() != chunk_id:
            raise BlobError(f"chunk {chunk_id[:12]} in blob {where.blob_id} does not match its id")
        return data

    async def _record(self, blob_id: str) -> BlobRecord:
        record = self._records.get(blob_id)
        if record is None:
            try:
                entry = await self.index.get(blob_record_key(blob_id))
            except nats.js.errors.KeyNotFoundError:
                raise NotInS3(f"blob {blob_id} has no record in the tier index") from None
            record = BlobRecord.model_validate_json(entry.value or b"")
            if len(self._records) > 10_000:
                self._records.clear()
            self._records[blob_id] = record
        return record


async def reindex(index: KeyValue, store: ObjectStore, url: str) -> ReindexReply:
    """Every blob under `url` into the index: its record (if missing) and each chunk's
    location (if the chunk has none: a location already there stays)."""
    started = time.monotonic()
    blobs = indexed = chunks = 0
    damaged: list[str] = []
    async for info in store.list(BLOB_KEY_PREFIX):
        blob_id = info.key.removeprefix(BLOB_KEY_PREFIX)
        blobs += 1
        try:
            entries = await blob_entries(store, info.key, blob_id, info.size)
        except BlobError as exc:
            damaged.append(f"{blob_id}: {exc}")
            log.warning("tier.reindex_damaged", extra={"blob": blob_id, "error": str(exc)})
            continue
        except ObjectStoreError:
            raise
        try:
            await index.get(blob_record_key(blob_id))
        except nats.js.errors.KeyNotFoundError:
            record = BlobRecord(
                blob_id=blob_id,
                url=url,
                bytes=info.size,
                chunks=len(entries),
                created_ms=info.last_modified_ms,
            )
            await index.put(blob_record_key(blob_id), record.model_dump_json().encode())
            indexed += 1
        for entry in entries:
            location = ChunkLocation(
                blob_id=blob_id, offset=entry.offset, length=entry.length, sha256=entry.sha256
            )
            try:
                await index.create(
                    chunk_location_key(entry.chunk_id), location.model_dump_json().encode()
                )
                chunks += 1
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # located already (another blob holds it too: either serves)
    return ReindexReply(
        blobs=blobs,
        blobs_indexed=indexed,
        chunks_indexed=chunks,
        damaged=tuple(damaged),
        seconds=round(time.monotonic() - started, 3),
    )


async def blob_entries(store: ObjectStore, key: str, blob_id: str, size: int) -> list[BlobEntry]:
    """The blob's index from its footer; a damaged footer: the records, scanned."""
    try:
        tail = await store.get_range(key, -TAIL_BYTES, 0)
        offset, length, digest = index_range(tail, size)
        return list(
            parse_index(await store.get_range(key, offset, length), digest, blob_id).entries
        )
    except BlobError as exc:
        log.warning("tier.footer_damaged", extra={"blob": blob_id, "error": str(exc)})
        return list(scan(await store.get(key), blob_id))
