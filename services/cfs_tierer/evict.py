"""Tiered mode: files nobody wrote or read for `evict_after_s` leave flash.

A pass walks every shard's files with a chunk map (`ScanChunks`, a page at a time).
A file is a candidate when its mtime is before the cut (now - evict_after) and every
one of its chunks is in the tier index. The chunks of candidates still on flash are
asked about on every chunk-store (`touched`): one access since the cut keeps the whole
file. Each chunk of a cold file is then

    read back from its blob and checked against its SHA-256 (the upload is verified)
    marked EVICTING in the index   (from here on, missing fragments are no damage)
    deleted from every holder its chunk map names
    marked EVICTED

A kill -9 between leaves EVICTING, and the next pass finishes it; a holder that does
not answer leaves it EVICTING too. A read that finds fewer than k fragments has the
chunk recalled, which marks it PRESENT again. The marks and recall take the same
per-chunk lock, so an eviction never deletes what a recall just put back.

A pass evicts nothing unless every chunk-store in service answered with a history
that reaches back to the cut: a store that started after it cannot tell a cold chunk
from one it has not seen read.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import nats.js.errors
from nats.js.kv import KeyValue

from cfs.client.chunks import ChunkStoreClient, FragmentError
from cfs.client.metadata import MetadataClient
from cfs.client.tier import read_location
from cfs.faults import crash_point
from cfs.hlc import system_wall_ms
from cfs.objstore import ObjectStoreError
from cfs_contracts.data import fragment_key
from cfs_contracts.fs.records import ChunkRef, Inode
from cfs_contracts.tier import ChunkLocation, FlashCopy, TierConfig, chunk_location_key
from cfs_tierer.blob import BlobError
from cfs_tierer.recall import NotInS3, Recaller

log = logging.getLogger(__name__)

PAGE = 100  # files per ScanChunks call
TOUCHED_BATCH = 4096  # chunk ids per `touched` question (the request's limit)


# -- the decision (pure) -------------------------------------------------------------------
def cold_chunks(
    files: Iterable[Inode],
    where: dict[str, ChunkLocation],
    touched: set[str],
    cut_ms: int,
) -> dict[str, list[ChunkRef]]:
    """chunk id -> the chunk map entries (one per file) to evict it from.

    A file counts only if it was last written before the cut, all its chunks are in
    S3 (`where`), and none of its chunks still on flash was touched since the cut."""
    chosen: dict[str, list[ChunkRef]] = {}
    for inode in files:
        if not inode.chunks or inode.mtime_ns >= cut_ms * 1_000_000:
            continue
        if any(ref.chunk_id not in where for ref in inode.chunks):
            continue  # part of it is not in S3 yet
        on_flash = [r for r in inode.chunks if where[r.chunk_id].flash is not FlashCopy.EVICTED]
        if any(ref.chunk_id in touched for ref in on_flash):
            continue
        for ref in on_flash:
            chosen.setdefault(ref.chunk_id, []).append(ref)
    return chosen


def history_gap(histories: dict[str, int], cut_ms: int) -> str | None:
    """Why the stores' answers cannot show a chunk cold since the cut, or None."""
    late = sorted(node for node, since in histories.items() if since > cut_ms)
    if late:
        return f"chunk-stores {', '.join(late)} started after the cut; their reads are unknown"
    return None


# -- the pass (I/O) ------------------------------------------------------------------------
class PassAborted(Exception):
    """The pass cannot tell cold from warm (a store not answering, history too short)."""


@dataclass
class PassResult:
    files_scanned: int = 0
    chunks: int = 0
    bytes: int = 0
    unfinished: int = 0  # left EVICTING: a holder did not answer
    errors: list[str] = field(default_factory=list)


class Evictor:
    def __init__(
        self,
        meta: MetadataClient,
        index: KeyValue,
        chunks: ChunkStoreClient,
        recaller: Recaller,
        *,
        shards: int,
        concurrency: int = 8,
    ) -> None:
        self.meta = meta
        self.index = index
        self.chunks = chunks
        self.recaller = recaller
        self.shards = shards
        self._limit = asyncio.Semaphore(concurrency)

    async def run(self, config: TierConfig, stores: Sequence[str]) -> PassResult:
        """One pass over every shard; PassAborted when coldness cannot be known."""
        if not stores:
            raise PassAborted("no chunk-store in service: nobody can say what is cold")
        cut_ms = system_wall_ms() - int(config.evict_after_s * 1000)
        result = PassResult()
        async for inodes in self.meta.scan_chunk_maps(self.shards, PAGE):
            result.files_scanned += len(inodes)
            await self._page(inodes, stores, cut_ms, result)
        return result

    async def _page(
        self, inodes: Sequence[Inode], stores: Sequence[str], cut_ms: int, result: PassResult
    ) -> None:
        old = [i for i in inodes if i.chunks and i.mtime_ns < cut_ms * 1_000_000]
        ids = sorted({ref.chunk_id for inode in old for ref in inode.chunks})
        if not ids:
            return
        found = await asyncio.gather(*(read_location(self.index, c) for c in ids))
        where = {c: loc for c, loc in zip(ids, found, strict=True) if loc is not None}
        on_flash = tuple(c for c, loc in where.items() if loc.flash is not FlashCopy.EVICTED)
        touched = await self._touched(on_flash, stores, cut_ms)
        chosen = cold_chunks(old, where, touched, cut_ms)
        outcomes = await asyncio.gather(*(self._guarded(c, refs) for c, refs in chosen.items()))
        for outcome in outcomes:
            if isinstance(outcome, str):
                result.errors.append(outcome)
            elif outcome < 0:
                result.unfinished += 1
            elif outcome > 0:
                result.chunks += 1
                result.bytes += outcome

    async def _touched(
        self, chunk_ids: tuple[str, ...], stores: Sequence[str], cut_ms: int
    ) -> set[str]:
        touched: set[str] = set()
        histories: dict[str, int] = {}
        for start in range(0, len(chunk_ids), TOUCHED_BATCH):
            batch = chunk_ids[start : start + TOUCHED_BATCH]
            try:
                answers = await asyncio.gather(
                    *(self.chunks.touched(node, batch, cut_ms) for node in stores)
                )
            except FragmentError as exc:
                raise PassAborted(
                    f"chunk-store {exc.node} did not say what was read: {exc}"
                ) from None
            for node, (some, since) in zip(stores, answers, strict=True):
                touched |= some
                histories[node] = max(histories.get(node, 0), since)
        gap = history_gap(histories, cut_ms)
        if gap is not None:
            raise PassAborted(gap)
        return touched

    async def _guarded(self, chunk_id: str, refs: list[ChunkRef]) -> int | str:
        """Bytes evicted (0: changed meanwhile, nothing done; -1: left EVICTING), or why not."""
        async with self._limit:
            try:
                return await self.evict(chunk_id, refs)
            except (NotInS3, ObjectStoreError, BlobError) as exc:
                log.warning("tier.evict_failed", extra={"chunk": chunk_id, "error": str(exc)})
                return f"{chunk_id[:12]}: {exc}"

    async def evict(self, chunk_id: str, refs: Sequence[ChunkRef]) -> int:
        key = chunk_location_key(chunk_id)
        async with self.recaller.locks.hold(chunk_id):
            try:
                entry = await self.index.get(key)
            except nats.js.errors.KeyNotFoundError:
                return 0
            where = ChunkLocation.model_validate_json(entry.value or b"")
            revision = entry.revision
            if where.flash is FlashCopy.EVICTED:
                return 0
            if where.flash is FlashCopy.PRESENT:
                await self.recaller.read(chunk_id)  # in S3, intact: or this raises
                revision = await self._mark(key, where, FlashCopy.EVICTING, revision)
                if revision is None:
                    return 0
                crash_point("tier.evict_marked")
            if not await self._delete_fragments(chunk_id, refs):
                return -1
            await self._mark(key, where, FlashCopy.EVICTED, revision)
        log.info("tier.evicted", extra={"chunk": chunk_id, "bytes": where.length})
        return max(1, where.length)

    async def _mark(
        self, key: str, where: ChunkLocation, flash: FlashCopy, revision: int | None
    ) -> int | None:
        """The location with `flash`, if nobody changed it since `revision`."""
        marked = where.model_copy(update={"flash": flash, "flash_changed_ms": system_wall_ms()})
        try:
            return int(
                await self.index.update(key, marked.model_dump_json().encode(), last=revision)
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            log.info("tier.evict_superseded", extra={"key": key})
            return None

    async def _delete_fragments(self, chunk_id: str, refs: Sequence[ChunkRef]) -> bool:
        """True when no holder any chunk map names still has a fragment of the chunk."""
        targets = {
            (node, fragment_key(chunk_id, ref.scheme, i))
            for ref in refs
            for i, node in enumerate(ref.fragments)
        }

        async def one(node: str, key: str) -> bool:
            try:
                await self.chunks.delete(node, key)
            except FragmentError as exc:
                if exc.errno == errno.ENOENT and not exc.unreachable:
                    return True
                log.info("tier.evict_deferred", extra={"node": node, "key": key, "error": str(exc)})
                return False
            return True

        done = await asyncio.gather(*(one(node, key) for node, key in sorted(targets)))
        return all(done)
