"""From S3 back to flash: recall of chunks and the index rebuilt from the bucket alone.

Recall puts a chunk's fragments back on the chunk-stores its chunk map names (the
same keys, so the chunk map stays as it is): the chunk is read from its blob, checked
against its SHA-256, coded again, and only the fragments that do not verify on their
node are stored. The chunks of one request that lie near each other in a blob are
read with one ranged GET (requests are what S3 bills and what costs moto its CPU). A
read that found fewer than k fragments asks for its chunk and the ones it reads next;
`restore-data --from-s3` asks for every chunk of the metadata tree, so a second run
after an interruption only does what the first did not (resumable).

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
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import nats.js.errors
from nats.js.kv import KeyValue

from cfs.client.chunks import ChunkStoreClient, FragmentError
from cfs.client.tier import read_location
from cfs.erasure import Scheme, encode_some
from cfs.faults import crash_point
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
MiB = 1024 * 1024


class NotInS3(Exception):
    """The chunk has no location in the tier index (never flushed, or not reindexed)."""


class ChunkLocks:
    """One holder per chunk id at a time: a recall and an eviction of the same chunk
    never interleave (both run in the active tierer)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[asyncio.Lock, int]] = {}  # lock, users

    @contextlib.asynccontextmanager
    async def hold_all(self, chunk_ids: Iterable[str]) -> AsyncIterator[None]:
        """Each chunk's lock, taken in one global order (no two holders deadlock)."""
        async with contextlib.AsyncExitStack() as stack:
            for chunk_id in sorted(set(chunk_ids)):
                await stack.enter_async_context(self.hold(chunk_id))
            yield

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


@dataclass(frozen=True)
class Wanted:
    """A chunk to bring back and where it is in S3."""

    chunk_id: str
    where: ChunkLocation


@dataclass(frozen=True)
class Run:
    """One ranged GET of a blob that serves several chunks: S3 bills, and moto
    spends CPU, per request, so chunks near each other are read together."""

    blob_id: str
    offset: int
    length: int
    chunks: tuple[Wanted, ...]

    def piece(self, data: bytes, wanted: Wanted) -> bytes:
        start = wanted.where.offset - self.offset
        return data[start : start + wanted.where.length]


def plan_runs(wanted: Iterable[Wanted], *, max_gap: int, max_span: int) -> list[Run]:
    """The chunks grouped by blob into runs of ascending offset: a run takes the next
    chunk when the bytes skipped to reach it are at most `max_gap` and the run stays
    within `max_span` (a chunk longer than that is a run of its own)."""
    by_blob: dict[str, dict[str, Wanted]] = {}
    for one in wanted:
        by_blob.setdefault(one.where.blob_id, {})[one.chunk_id] = one
    runs: list[Run] = []
    for blob_id, chunks in sorted(by_blob.items()):
        current: list[Wanted] = []
        start = end = 0
        for one in sorted(chunks.values(), key=lambda w: (w.where.offset, w.chunk_id)):
            first, last = one.where.offset, one.where.offset + one.where.length
            if current and first - end <= max_gap and max(end, last) - start <= max_span:
                current.append(one)
                end = max(end, last)
                continue
            if current:
                runs.append(Run(blob_id, start, end - start, tuple(current)))
            current, start, end = [one], first, last
        if current:
            runs.append(Run(blob_id, start, end - start, tuple(current)))
    return runs


@dataclass
class Outcome:
    """One chunk's recall: fragments stored and found, bytes from S3, why it failed."""

    restored: int = 0
    present: int = 0
    restored_bytes: int = 0
    evicted: bool = False
    failed: str = ""


RECALL_ERRORS = (NotInS3, ObjectStoreError, BlobError, FragmentError, ValueError)


class Recaller:
    """Chunks back from S3 a request at a time: every chunk's fragments checked, the
    ones with some missing read in runs (`plan_runs`), coded again and stored, each
    chunk under its lock from the check to its location marked PRESENT."""

    def __init__(
        self,
        index: KeyValue,
        chunks: ChunkStoreClient,
        stores: Callable[[str], ObjectStore],
        *,
        concurrency: int = 8,
        runs_at_once: int = 2,
        max_gap: int = 4 * MiB,
        max_span: int = 32 * MiB,
    ) -> None:
        self.index = index
        self.chunks = chunks
        self._store = stores  # url -> its ObjectStore (the Tierer's, shared)
        self._limit = asyncio.Semaphore(concurrency)  # chunks checked or stored at once
        self._runs = asyncio.Semaphore(runs_at_once)  # GETs (and their bytes) in memory
        self._max_gap = max_gap
        self._max_span = max_span
        self._records: dict[str, BlobRecord] = {}
        self.locks = ChunkLocks()

    async def recall(self, chunks: tuple[ChunkPlacement, ...]) -> RecallReply:
        placements = {c.chunk_id: c for c in chunks}
        outcomes = {chunk_id: Outcome() for chunk_id in placements}
        async with self.locks.hold_all(placements):
            missing = await self._check_all(placements.values(), outcomes)
            runs = plan_runs(
                await self._locate(missing, outcomes),
                max_gap=self._max_gap,
                max_span=self._max_span,
            )
            await asyncio.gather(*(self._run(run, placements, missing, outcomes) for run in runs))
            recalled = [c for c, outcome in outcomes.items() if not outcome.failed]
            back = await asyncio.gather(*(self._back_on_flash(c) for c in recalled))
            for chunk_id, evicted in zip(recalled, back, strict=True):
                outcomes[chunk_id].evicted = evicted
        if runs:
            log.info(
                "tier.recall_read",
                extra={"chunks": sum(len(r.chunks) for r in runs), "gets": len(runs),
                       "bytes": sum(r.length for r in runs)},
            )  # fmt: skip
        return RecallReply(
            restored_fragments=sum(o.restored for o in outcomes.values()),
            present_fragments=sum(o.present for o in outcomes.values()),
            restored_bytes=sum(o.restored_bytes for o in outcomes.values()),
            failed=tuple(f"{c}: {o.failed}" for c, o in outcomes.items() if o.failed),
            evicted=tuple(c for c, o in outcomes.items() if o.evicted),
        )

    def _failed(self, outcome: Outcome, chunk_id: str, exc: Exception) -> None:
        outcome.failed = str(exc)
        log.warning("tier.recall_failed", extra={"chunk": chunk_id, "error": str(exc)})

    async def _check_all(
        self, placements: Iterable[ChunkPlacement], outcomes: dict[str, Outcome]
    ) -> dict[str, list[int]]:
        """The fragments each chunk lacks (chunks lacking none are left out)."""
        missing: dict[str, list[int]] = {}

        async def check(chunk: ChunkPlacement) -> None:
            async with self._limit:
                try:
                    absent = await self._check(chunk, outcomes[chunk.chunk_id])
                except RECALL_ERRORS as exc:
                    self._failed(outcomes[chunk.chunk_id], chunk.chunk_id, exc)
                    return
            if absent:
                missing[chunk.chunk_id] = absent

        await asyncio.gather(*(check(c) for c in placements))
        return missing

    async def _check(self, chunk: ChunkPlacement, outcome: Outcome) -> list[int]:
        scheme = Scheme.parse(chunk.scheme)
        if len(chunk.fragments) != scheme.total:
            raise ValueError(f"chunk map names {len(chunk.fragments)} holders for {scheme.name}")
        states = await asyncio.gather(
            *(
                self._state(node, fragment_key(chunk.chunk_id, scheme.name, i))
                for i, node in enumerate(chunk.fragments)
            )
        )
        outcome.present = states.count("present")
        absent = [i for i, state in enumerate(states) if state == "absent"]
        if not absent and outcome.present < scheme.k:
            raise ValueError(f"only {outcome.present} of {scheme.total} holders answer")
        return absent

    async def _state(self, node: str, key: str) -> str:
        """present, absent (or corrupt: stored again), or unreachable (left to repair,
        which rebuilds a lost node's fragments elsewhere and updates the chunk map)."""
        try:
            await self.chunks.verify(node, key)
        except FragmentError as exc:
            return "unreachable" if exc.unreachable else "absent"
        return "present"

    async def _locate(self, chunk_ids: Iterable[str], outcomes: dict[str, Outcome]) -> list[Wanted]:
        async def locate(chunk_id: str) -> Wanted | None:
            try:
                return Wanted(chunk_id, await self._location(chunk_id))
            except NotInS3 as exc:
                self._failed(outcomes[chunk_id], chunk_id, exc)
                return None

        found = await asyncio.gather(*(locate(c) for c in chunk_ids))
        return [w for w in found if w is not None]

    async def _run(
        self,
        run: Run,
        placements: dict[str, ChunkPlacement],
        missing: dict[str, list[int]],
        outcomes: dict[str, Outcome],
    ) -> None:
        """One GET, then each of its chunks checked against its id and stored."""
        async with self._runs:
            try:
                data = await self._get(run.blob_id, run.offset, run.length)
            except RECALL_ERRORS as exc:
                for one in run.chunks:
                    self._failed(outcomes[one.chunk_id], one.chunk_id, exc)
                return

            async def store(one: Wanted) -> None:
                outcome = outcomes[one.chunk_id]
                async with self._limit:
                    try:
                        chunk = _checked(one.chunk_id, one.where, run.piece(data, one))
                        outcome.restored = await self._store_fragments(
                            placements[one.chunk_id], chunk, missing[one.chunk_id]
                        )
                        crash_point("tier.recall_stored")  # some on flash, not marked PRESENT
                        outcome.restored_bytes = len(chunk)
                    except RECALL_ERRORS as exc:
                        self._failed(outcome, one.chunk_id, exc)

            await asyncio.gather(*(store(one) for one in run.chunks))

    async def _store_fragments(self, chunk: ChunkPlacement, data: bytes, missing: list[int]) -> int:
        scheme = Scheme.parse(chunk.scheme)
        fragments = await asyncio.to_thread(encode_some, scheme, data, missing)
        await asyncio.gather(
            *(
                self.chunks.put(
                    chunk.fragments[i], fragment_key(chunk.chunk_id, scheme.name, i), fragments[i]
                )
                for i in missing
            )
        )
        return len(missing)

    async def _back_on_flash(self, chunk_id: str) -> bool:
        """Mark an evicted chunk PRESENT again; True if it was off flash on purpose."""

        def back(where: ChunkLocation) -> ChunkLocation | None:
            if not where.off_flash:
                return None
            return where.model_copy(
                update={"flash": FlashCopy.PRESENT, "flash_changed_ms": system_wall_ms()}
            )

        return await change_location(self.index, chunk_id, back)

    async def read(self, chunk_id: str) -> bytes:
        """The chunk's bytes from its blob, checked against its id."""
        where = await self._location(chunk_id)
        return _checked(chunk_id, where, await self._get(where.blob_id, where.offset, where.length))

    async def _location(self, chunk_id: str) -> ChunkLocation:
        where = await read_location(self.index, chunk_id)
        if where is None:
            raise NotInS3(f"chunk {chunk_id[:12]} is not in the S3 tier's index")
        return where

    async def _get(self, blob_id: str, offset: int, length: int) -> bytes:
        record = await self._record(blob_id)
        data = await self._store(record.url).get_range(blob_object_key(blob_id), offset, length)
        if len(data) != length:
            raise BlobError(f"blob {blob_id}: {len(data)} bytes at {offset}, {length} expected")
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


def _checked(chunk_id: str, where: ChunkLocation, data: bytes) -> bytes:
    if len(data) != where.length or hashlib.sha256(data).hexdigest() != chunk_id:
        raise BlobError(f"chunk {chunk_id[:12]} in blob {where.blob_id} does not match its id")
    return data


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
