"""Chunks the chunk maps name that S3 lacks and nobody queued: queued now.

A client queues a chunk it stores only once it has seen the tier's config (its watch
of the `nodes` bucket), so what it wrote before that was never queued, and neither was
any file written before the tier was configured at all. In cache mode S3 is the copy
that survives the site, so the tierer walks every file's chunk map (`ScanChunks`, a
page at a time, as eviction does) and queues each chunk that is neither in the tier
index nor in its queue:

    `grace_s` after it first sees the tier's URL or mode (after the tier was off, and
                  as a new lease holder too): clients see the config meanwhile, and
                  their writes queue themselves
    every `every_s` after that: a client slow to see the config committed its chunk
                  map after the pass that followed the change
    on `cfs admin s3-backfill`: a pass now

A pass queues through the TIER stream as a client does, so a kill -9 mid-pass loses
nothing: what it queued is in the stream, the rest is the next holder's first pass.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nats.js.kv import KeyValue

from cfs.bus import Bus
from cfs.client.metadata import MetadataClient
from cfs.client.tier import read_location
from cfs.faults import crash_point
from cfs_contracts.events.tier import ChunkQueued
from cfs_contracts.fs.records import Inode
from cfs_contracts.tier import TierConfig

log = logging.getLogger(__name__)

PAGE = 200  # files per ScanChunks call
LOOKUPS_AT_ONCE = 64  # tier index reads in flight
RETRY_S = 10.0  # after a pass that failed (metadata or the bus unavailable)

TierKey = tuple[str, str]  # what a pass ran under: the tier's URL and mode


def tier_key(config: TierConfig | None) -> TierKey | None:
    """What makes a new pass due when it changes; None while no tier is on."""
    if config is None or not config.enabled or config.url is None:
        return None
    return (config.url, config.mode.value)


# -- the decisions (pure) ------------------------------------------------------------------
@dataclass
class Schedule:
    """When the next pass is due, and why (the reason is the log line)."""

    grace_s: float
    every_s: float
    passed: TierKey | None = None  # the tier the last pass ran under
    last_pass: float = -math.inf  # when it started (monotonic)
    seen: tuple[TierKey, float] | None = None  # a tier not passed yet, first seen at
    not_before: float = -math.inf  # after a failed pass

    def due(self, key: TierKey | None, now: float) -> str | None:
        if key is None:  # no tier: writes are not queued, so the next tier is new
            self.passed = self.seen = None
            return None
        if now < self.not_before:
            return None
        if key != self.passed:
            if self.seen is None or self.seen[0] != key:
                self.seen = (key, now)
            if now - self.seen[1] >= self.grace_s:
                return f"the tier is {key[1]} at {key[0]}, with no pass under it yet"
            return None
        if now - self.last_pass >= self.every_s:
            return f"the last pass began {self.every_s:g} s ago"
        return None

    def ran(self, key: TierKey, started: float) -> None:
        self.passed, self.last_pass, self.seen = key, started, None

    def failed(self, now: float) -> None:
        self.not_before = now + RETRY_S


def unqueued(inodes: Iterable[Inode], known: Callable[[str], bool]) -> dict[str, ChunkQueued]:
    """Chunk id -> the event that queues it, for each chunk of these files that
    `known` (queued, being flushed) does not cover; a chunk shared by files once."""
    found: dict[str, ChunkQueued] = {}
    for inode in inodes:
        for ref in inode.chunks:
            if ref.chunk_id in found or known(ref.chunk_id):
                continue
            found[ref.chunk_id] = ChunkQueued(
                chunk_id=ref.chunk_id,
                length=ref.stored_length,  # what was coded and hashed (a truncate may cut less)
                scheme=ref.scheme,
                fragments=ref.fragments,
                ino=inode.ino,
            )
    return found


# -- the pass (I/O) ------------------------------------------------------------------------
@dataclass
class PassResult:
    files: int = 0
    chunks: int = 0  # distinct chunks looked up (not pending already)
    queued: int = 0
    queued_bytes: int = 0


class Backfiller:
    def __init__(self, bus: Bus, meta: MetadataClient, index: KeyValue, *, shards: int) -> None:
        self.bus = bus
        self.meta = meta
        self.index = index
        self.shards = shards
        self._lookups = asyncio.Semaphore(LOOKUPS_AT_ONCE)

    async def run(self, pending: Callable[[str], bool]) -> PassResult:
        """One pass over every shard's files; `pending`: the chunks queued already."""
        result = PassResult()
        async for inodes in self.meta.scan_chunk_maps(self.shards, PAGE):
            result.files += len(inodes)
            await self._page(inodes, pending, result)
        return result

    async def _page(
        self, inodes: Iterable[Inode], pending: Callable[[str], bool], result: PassResult
    ) -> None:
        candidates = unqueued(inodes, pending)
        result.chunks += len(candidates)
        indexed = await asyncio.gather(*(self._indexed(c) for c in candidates))
        missing = [e for e, known in zip(candidates.values(), indexed, strict=True) if not known]
        if not missing:
            return
        await self.bus.publish_many(self.bus.event(event) for event in missing)
        crash_point("tier.backfill_queued")  # part of a pass queued: the next one does the rest
        result.queued += len(missing)
        result.queued_bytes += sum(e.length for e in missing)
        for event in missing:
            log.debug("tier.backfill_queued", extra={"chunk": event.chunk_id, "ino": event.ino})

    async def _indexed(self, chunk_id: str) -> bool:
        async with self._lookups:
            return await read_location(self.index, chunk_id) is not None
