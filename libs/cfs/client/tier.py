"""What a write owes the data tier (DESIGN.md §7, guide scenario 7).

With a tier configured (`cfs admin tier-config`), every chunk stored on flash is queued
for S3 (a `ChunkQueued` event on the TIER stream) before the chunk map that refers to
it is committed, so no acknowledged write is forgotten by the flush. Then the
tierer's published policy rules:

    ack_on_flash   nothing more: the flush is in the background
    ack_after_s3   wait until the tierer has the chunk in S3 (write-through), bounded
    refuse         ENOSPC before anything is stored: flash is full of unflushed data

A read that finds fewer than k fragments of a chunk on flash (evicted in tiered mode,
or lost with every node after a total loss in cache mode) has the tierer put it back
from S3 (`recall`) and reads again.

The policy comes with the tierer's state in the `nodes` bucket, which every client
watches already; without a state yet (no tierer has run) writes are acknowledged on
flash and queued.
"""

from __future__ import annotations

import contextlib
import errno
import logging

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from cfs.bus import Bus, BusError, NoResponders, RequestTimeout
from cfs.client.nodes import NodeView
from cfs_contracts.events.tier import ChunkQueued
from cfs_contracts.fs.records import ChunkRef
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.streams import TIER_INDEX
from cfs_contracts.tier import (
    BlobRecord,
    ChunkLocation,
    ChunkPlacement,
    FlushReply,
    FlushRequest,
    RecallReply,
    RecallRequest,
    TierState,
    WritePolicy,
    blob_record_key,
    chunk_location_key,
    tier_flush_subject,
    tier_recall_subject,
)

log = logging.getLogger(__name__)

RECALL_TIMEOUT_S = 120.0  # one chunk from S3 back onto its nodes: a ranged GET and k puts


class TierGate:
    def __init__(self, bus: Bus, nodes: NodeView) -> None:
        self.bus = bus
        self.nodes = nodes

    def _policy(self) -> tuple[WritePolicy, TierState | None]:
        state = self.nodes.tier_state
        if self.nodes.tier_config is None or state is None:
            return WritePolicy.ACK_ON_FLASH, state
        return state.policy, state

    def check_room(self) -> None:
        """ENOSPC while the tier is FULL: flash holds all the unflushed data it may."""
        policy, state = self._policy()
        if policy is WritePolicy.REFUSE and state is not None:
            raise FsError(
                errno.ENOSPC,
                f"flash is full of data not yet in S3 ({_s3_words(state)}); "
                "writes resume as the flush queue drains",
            )

    async def queued(self, ref: ChunkRef, ino: int) -> None:
        """Queue a stored chunk for S3; under write-through, return once it is there."""
        config = self.nodes.tier_config
        if config is None:
            return
        event = ChunkQueued(
            chunk_id=ref.chunk_id,
            length=ref.length,
            scheme=ref.scheme,
            fragments=ref.fragments,
            ino=ino,
        )
        try:
            await self.bus.publish(self.bus.event(event))
        except BusError as exc:
            raise FsError(
                errno.EIO, f"chunk {ref.chunk_id[:12]} not queued for S3: {exc}"
            ) from None
        policy, state = self._policy()
        if policy is WritePolicy.ACK_ON_FLASH:
            return
        await self._through(ref.chunk_id, config.write_through_wait_s, state)

    async def _through(self, chunk_id: str, wait_s: float, state: TierState | None) -> None:
        request = FlushRequest(chunk_ids=(chunk_id,)).model_dump_json().encode()
        why = f"write-through (flash above the high watermark; {_s3_words(state)})"
        try:
            msg = await self.bus.request(tier_flush_subject(self.bus.site), request, timeout=wait_s)
        except NoResponders:
            raise FsError(errno.EIO, f"{why}: no s3-tierer is running") from None
        except RequestTimeout:
            raise FsError(
                errno.EIO, f"{why}: chunk {chunk_id[:12]} not in S3 within {wait_s:g}s"
            ) from None
        except BusError as exc:
            raise FsError(errno.EIO, f"{why}: {exc}") from None
        reply = FlushReply.model_validate_json(msg.data)
        if reply.error is not None or chunk_id not in reply.flushed:
            raise FsError(errno.EIO, f"{why}: {reply.error or 'chunk not flushed'}")

    async def recall(self, ref: ChunkRef, ino: int) -> str | None:
        """Have the tierer put a chunk with fewer than k fragments on flash back from
        S3; None when it did, else why not (for the read's EIO)."""
        placement = ChunkPlacement(
            chunk_id=ref.chunk_id, length=ref.length, scheme=ref.scheme, fragments=ref.fragments
        )
        request = RecallRequest(chunks=(placement,)).model_dump_json().encode()
        try:
            msg = await self.bus.request(
                tier_recall_subject(self.bus.site), request, timeout=RECALL_TIMEOUT_S
            )
        except NoResponders:
            return "no s3-tierer is running"
        except BusError as exc:
            return str(exc)
        reply = RecallReply.model_validate_json(msg.data)
        if reply.failed:
            return "; ".join(reply.failed)
        log.info(
            "data.recalled",
            extra={
                "ino": ino,
                "chunk": ref.chunk_id,
                "fragments": reply.restored_fragments,
                "evicted": ref.chunk_id in reply.evicted,
            },
        )
        return None


def _s3_words(state: TierState | None) -> str:
    if state is None:
        return "S3 state unknown"
    if state.s3.reachable:
        return "S3 reachable, flush behind"
    return f"S3 unreachable: {state.s3.error or 'no answer'}"


class TierIndex:
    """Reads of the `tier` bucket for those who only ask "is this chunk off flash on
    purpose?" (repair, the consistency check); opened on first use, never cached (a
    recalled chunk is on flash again, and its damage is damage)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None

    async def off_flash(self, chunk_id: str) -> bool:
        """True when the chunk was evicted (tiered mode): missing fragments are no damage."""
        if self._kv is None:
            try:
                self._kv = await self.bus.js.key_value(TIER_INDEX.bucket)
            except nats.js.errors.BucketNotFoundError:
                return False  # a cluster from before the data tier
        where = await read_location(self._kv, chunk_id)
        return where is not None and where.off_flash


async def read_location(index: KeyValue, chunk_id: str) -> ChunkLocation | None:
    """Where the chunk is in S3 (and whether it is on flash too), or None: not in S3."""
    try:
        entry = await index.get(chunk_location_key(chunk_id))
    except nats.js.errors.KeyNotFoundError:
        return None
    return ChunkLocation.model_validate_json(entry.value or b"")


async def read_blob_records(index: KeyValue) -> list[BlobRecord]:
    """Every blob's record in the `tier` bucket (a watch of `blob.*` only: the chunk
    locations, many more, are not read)."""
    return [
        BlobRecord.model_validate_json(value)
        for _, value, _ in await read_entries(index, blob_record_key("*"))
    ]


async def read_locations(index: KeyValue) -> list[tuple[str, ChunkLocation, int]]:
    """Every chunk location: (chunk id, location, revision for a compare-and-set)."""
    prefix = chunk_location_key("")
    return [
        (key[len(prefix) :], ChunkLocation.model_validate_json(value), revision)
        for key, value, revision in await read_entries(index, chunk_location_key("*"))
    ]


async def read_entries(index: KeyValue, pattern: str) -> list[tuple[str, bytes, int]]:
    """(key, value, revision) of every live key matching `pattern`, from one watch."""
    found = []
    watcher = await index.watch(pattern, ignore_deletes=True)
    try:
        async for entry in watcher:
            if entry is None:
                break
            if entry.value:
                found.append((entry.key, entry.value, entry.revision or 0))
    finally:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await watcher.stop()  # type: ignore[no-untyped-call]
    return found
