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

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from cfs.bus import Bus, BusError, NoResponders, RequestTimeout
from cfs.bus.kv import live_entries
from cfs.client.nodes import NodeView
from cfs.retry import RetryPolicy, retry
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

RECALL_ATTEMPT_S = 60.0  # one batch from S3 back onto its nodes: ranged GETs and puts
RECALL_RETRY = RetryPolicy("recall from S3", deadline_s=120.0, max_delay_s=5.0)  # then EIO
# The queue entry rides out what a metadata request does (a TIER stream leader being
# elected, the client moving to another server); `Bus.publish` resends it with the same
# id (deduplicated) until then, and EIO after.
QUEUE_WAIT_S = 30.0
HOLDER_CHECK_S = 1.0  # how often a request waiting on the tierer looks at its lease
RECALLS_IN_FLIGHT = 2  # recall requests one client has out at once; the rest wait
RECALL_BATCH = 16  # chunks in one request at most (64 MiB of 4 MiB chunks)


class TierGate:
    def __init__(
        self, bus: Bus, nodes: NodeView, spawn: Callable[[Coroutine[Any, Any, Any]], None]
    ) -> None:
        self.bus = bus
        self.nodes = nodes
        self.spawn = spawn  # the FileStore's: its tasks end with it
        self._recalls: dict[str, tuple[ChunkPlacement, asyncio.Future[str | None]]] = {}
        self._recalls_out = 0  # requests in flight

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
            await self.bus.publish(self.bus.event(event), timeout=QUEUE_WAIT_S)
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
        S3; None when it did, else why not (for the read's EIO).

        Recalls wait while RECALLS_IN_FLIGHT requests are out and then go together
        (as a group commit does): a sequential reader's chunk and its read-ahead
        reach the tierer as one request, whose neighbouring chunks it reads from S3
        with one GET."""
        waiting = self._recalls.get(ref.chunk_id)
        if waiting is None:
            placement = ChunkPlacement(
                chunk_id=ref.chunk_id, length=ref.length, scheme=ref.scheme, fragments=ref.fragments
            )
            waiting = (placement, asyncio.get_running_loop().create_future())
            self._recalls[ref.chunk_id] = waiting
            self._send_recalls()
        why = await asyncio.shield(waiting[1])
        if why is None:
            log.info("data.recalled", extra={"ino": ino, "chunk": ref.chunk_id})
        return why

    def _send_recalls(self) -> None:
        while self._recalls and self._recalls_out < RECALLS_IN_FLIGHT:
            batch = dict(list(self._recalls.items())[:RECALL_BATCH])
            for chunk_id in batch:
                del self._recalls[chunk_id]
            self._recalls_out += 1
            self.spawn(self._recall_batch(batch))

    async def _recall_batch(
        self, batch: dict[str, tuple[ChunkPlacement, asyncio.Future[str | None]]]
    ) -> None:
        """Every waiter of the batch gets its answer, whatever happens to the request."""
        why: dict[str, str | None] = dict.fromkeys(batch, "recall interrupted")
        closing = False
        try:
            why = await self._ask_recall(tuple(placement for placement, _ in batch.values()))
        except asyncio.CancelledError:  # the FileStore is closing
            why, closing = dict.fromkeys(batch, "the client is closing"), True
            raise
        except Exception as exc:
            log.exception("data.recall_failed", extra={"chunks": len(batch)})
            why = dict.fromkeys(batch, f"recall failed: {exc}")
        finally:
            for chunk_id, (_, future) in batch.items():
                if not future.done():
                    future.set_result(why.get(chunk_id))
            self._recalls_out -= 1
            if not closing:
                self._send_recalls()

    async def _ask_recall(self, chunks: tuple[ChunkPlacement, ...]) -> dict[str, str | None]:
        """Why each chunk was not recalled (absent: it was)."""
        request = RecallRequest(chunks=chunks).model_dump_json().encode()

        async def holder() -> Holder:
            return holder_of(self.nodes.tier_state)

        try:
            msg = await ask_tierer(
                self.bus,
                tier_recall_subject(self.bus.site),
                request,
                holder,
                attempt_s=RECALL_ATTEMPT_S,
                policy=RECALL_RETRY,
            )
        except NoResponders:
            return {c.chunk_id: "no s3-tierer is running" for c in chunks}
        except BusError as exc:
            return {c.chunk_id: str(exc) for c in chunks}
        reply = RecallReply.model_validate_json(msg.data)
        failed: dict[str, str | None] = {}
        for line in reply.failed:
            chunk_id, _, why = line.partition(": ")
            failed[chunk_id] = why or line
        return failed


Holder = tuple[str, int | None] | None  # the active tierer and when its term began


def holder_of(state: TierState | None) -> Holder:
    return (state.holder, state.holder_since_ms) if state is not None else None


async def ask_tierer(
    bus: Bus,
    subject: str,
    payload: bytes,
    holder: Callable[[], Awaitable[Holder]],
    *,
    attempt_s: float,
    policy: RetryPolicy,
) -> Msg:
    """An idempotent request to the active tierer, sent again while no tierer answers
    and at once when the lease changes hands while it waits: the holder asked died
    (kill -9 leaves a request unanswered; only the new holder's state tells)."""

    async def attempt() -> Msg:
        asked = await holder()
        reply = asyncio.ensure_future(bus.request(subject, payload, timeout=attempt_s))
        try:
            while not (await asyncio.wait({reply}, timeout=HOLDER_CHECK_S))[0]:
                if (now := await holder()) != asked:
                    log.info("tier.holder_changed", extra={"subject": subject, "asked": asked,
                                                           "holder": now})  # fmt: skip
                    raise RequestTimeout(subject, attempt_s)
            return reply.result()
        finally:
            reply.cancel()

    return await retry(attempt, policy)


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
        for _, value, _ in await live_entries(index, blob_record_key("*"))
    ]


async def read_locations(index: KeyValue) -> list[tuple[str, ChunkLocation, int]]:
    """Every chunk location: (chunk id, location, revision for a compare-and-set)."""
    prefix = chunk_location_key("")
    return [
        (key[len(prefix) :], ChunkLocation.model_validate_json(value), revision)
        for key, value, revision in await live_entries(index, chunk_location_key("*"))
    ]
