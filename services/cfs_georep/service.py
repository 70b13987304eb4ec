"""geo-replicator: the peer site's journal, applied on this site (DESIGN.md §8).

One active instance per site (lease). While it leads, per shard:

    GEO_IN (the peer's journal of that shard, sourced over the site link)
        │  durable consumer geo-<shard>: a batch of messages, in the peer's order
        ▼
    Localizer: every chunk map's data copied here from the peer's chunk-stores
        ▼
    apply_remote on the shard writer: merged, journaled under ...journal.remote
        ▼
    ConflictDetected for each conflict the merge found (message id per conflict)
        ▼
    ack of the batch's last message (the consumer acknowledges all before it)

Killed anywhere in between, the next leader fetches the unacknowledged batch again:
the writer skips the entries it applied (op ids) and answers their conflicts again,
whose events the CONFLICTS stream's duplicate window drops. Nothing is applied twice
or skipped, and nothing waits on the peer being reachable except the copying of data.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from pydantic import Field

from cfs.admin.snapshot import read_record
from cfs.bus import Bus, BusError
from cfs.client import FileStore, MetadataClient
from cfs.client.chunks import ChunkStoreClient, FragmentError
from cfs.client.shard_admin import ShardAdminRefused, shard_admin
from cfs.faults import crash_point
from cfs.ids import stable_id
from cfs.kernel.runtime import Context, until_jetstream_answers
from cfs.retry import Backoff, RetryPolicy, any_bus_error, retry
from cfs.service_main import ServiceSettings, run_spec
from cfs_contracts import ContractError
from cfs_contracts.events.geo import ConflictDetected
from cfs_contracts.events.metadata import JournalEntry, MetaCommitted
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.fs.shard_admin import ApplyRemote, ShardAdminReply
from cfs_contracts.geo import (
    GEO_PEER_KEY,
    INBOUND_STREAM,
    GeoPeer,
    inbound_durable,
    peer_journal_subject,
)
from cfs_contracts.streams import shard_name
from cfs_georep.ship import ChunkUnavailable, Localizer

log = logging.getLogger(__name__)


class GeoSettings(ServiceSettings):
    batch: int = Field(default=128, ge=1, description="peer journal messages per fetch")
    apply_bytes: int = Field(
        default=256 * 1024, ge=4096, description="entries per apply_remote request (JSON bytes)"
    )
    copy_parallel: int = Field(default=4, ge=1, description="chunks copied from the peer at once")
    peer_poll_s: float = Field(default=2.0, gt=0, description="while no peer is linked")
    ack_wait_s: float = Field(
        default=300.0, gt=0, description="an unacknowledged batch is delivered again after this"
    )


class Replicator:
    """What outlives a lease: the settings."""

    def __init__(self, bus: Bus, settings: GeoSettings) -> None:
        self.bus = bus
        self.settings = settings


async def start(ctx: Context) -> Replicator:
    return Replicator(ctx.bus, ctx.settings)


async def lead(ctx: Context) -> None:
    """The active instance: follow every shard's messages from the peer."""
    replicator: Replicator = ctx.service
    bus, settings = ctx.bus, replicator.settings
    peer = await _wait_for_peer(bus, settings.peer_poll_s)
    log.info("geo.leading", extra={"peer": peer.site, "shards": peer.shards})
    meta = MetadataClient(bus, deadline_s=30)
    store = FileStore(bus, meta, client_id=f"geo-replicator@{bus.node}")
    await until_jetstream_answers("nodes view", store.start)
    peer_chunks = ChunkStoreClient(bus, site=peer.site, timeout_s=10.0)
    localizer = Localizer(peer_chunks, store, parallel=settings.copy_parallel)
    try:
        async with asyncio.TaskGroup() as tasks:
            for shard in range(1, peer.shards + 1):
                follower = ShardFollower(bus, settings, peer.site, shard, localizer)
                tasks.create_task(follower.run(), name=f"geo shard {shard_name(shard)}")
    finally:
        await store.close()


async def _wait_for_peer(bus: Bus, poll_s: float) -> GeoPeer:
    """The site this one replicates with (`cfs admin replication-link`), once linked."""
    while True:
        peer = await read_record(bus, GEO_PEER_KEY, GeoPeer)
        if peer is not None:
            return peer
        await asyncio.sleep(poll_s)


def _retried(exc: BaseException) -> bool:
    """Everything a batch can meet is worth another attempt: the writer changing or
    refusing for now (locked records, a held shard), the peer's data out of reach."""
    return isinstance(
        exc, ChunkUnavailable | ShardAdminRefused | FragmentError | FsError
    ) or any_bus_error(exc)


class ShardFollower:
    """One shard's messages from the peer, applied in the peer's order."""

    def __init__(
        self, bus: Bus, settings: GeoSettings, peer: str, shard: int, localizer: Localizer
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.peer = peer
        self.shard = shard
        self.localizer = localizer
        self.durable = inbound_durable(shard)
        self.ids = {"peer": peer, "shard": shard_name(shard)}

    async def run(self) -> None:
        sub = await until_jetstream_answers(f"consumer {self.durable}", self._subscribe)
        fetching = Backoff(
            RetryPolicy(f"fetch {self.durable}", temporary=any_bus_error, deadline_s=None),
            extra=self.ids,
        )
        while True:
            try:
                msgs = await sub.fetch(self.settings.batch, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as exc:
                await fetching.wait(exc)
                continue
            fetching.reset()
            await self._apply_batch(msgs)

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=peer_journal_subject(self.peer, self.shard),
            ack_wait=self.settings.ack_wait_s,
            max_ack_pending=100_000,
        )
        await self.bus.js.add_consumer(INBOUND_STREAM, config)
        return await self.bus.js.pull_subscribe_bind(self.durable, stream=INBOUND_STREAM)

    async def _apply_batch(self, msgs: list[Msg]) -> None:
        """Apply the batch until it is done (retrying as long as it takes), then ack."""
        entries = self._entries(msgs)
        policy = RetryPolicy(
            f"apply {len(entries)} entries of {self.peer} to shard {shard_name(self.shard)}",
            temporary=_retried,
            deadline_s=None,
            first_delay_s=0.2,
            max_delay_s=5.0,
        )
        await retry(lambda: self._apply(entries), policy, extra=self.ids)
        crash_point("geo.applied")  # applied, not acknowledged: fetched again
        await msgs[-1].ack_sync(timeout=10.0)

    def _entries(self, msgs: list[Msg]) -> list[JournalEntry]:
        """The peer writers' entries that change something, in order."""
        entries: list[JournalEntry] = []
        for msg in msgs:
            try:
                payload = self.bus.registry.decode(msg.data).payload
            except ContractError as exc:  # a newer peer's event: never silently lost
                raise RuntimeError(f"cannot read the peer's message: {exc}") from exc
            if isinstance(payload, MetaCommitted):
                entries += [entry for entry in payload.entries if entry.changes]
        return entries

    async def _apply(self, entries: list[JournalEntry]) -> None:
        local = await self.localizer.localize(entries)
        for part in _parts(local, self.settings.apply_bytes):
            reply = await shard_admin(
                self.bus, self.shard, ApplyRemote(origin=self.peer, entries=tuple(part))
            )
            await self._report(reply)
            if reply.applied:
                log.info(
                    "geo.applied",
                    extra={**self.ids, "applied": reply.applied, "skipped": reply.skipped},
                )

    async def _report(self, reply: ShardAdminReply) -> None:
        """One ConflictDetected per conflict, its id fixed by the entry that found it."""
        for conflict in reply.conflicts:
            conflict_id = conflict.conflict_id
            payload = ConflictDetected(conflict_id=conflict_id, shard=self.shard, conflict=conflict)
            envelope = self.bus.registry.envelope(
                payload,
                event_id=stable_id(f"conflict/{conflict_id}"),
                site=self.bus.site,
                node=self.bus.node,
                hlc=self.bus.clock.now(),
            )
            try:
                await self.bus.publish(envelope, timeout=10.0)
            except BusError as exc:
                raise BusError(f"conflict {conflict_id} not recorded: {exc}") from exc
            log.warning(
                "geo.conflict",
                extra={**self.ids, "ino": conflict.ino, "group": conflict.group,
                       "winner": conflict.winner},
            )  # fmt: skip


def _parts(entries: list[JournalEntry], limit: int) -> list[list[JournalEntry]]:
    """Consecutive runs of `entries` of about `limit` JSON bytes each (one at least)."""
    parts: list[list[JournalEntry]] = []
    size = limit
    for entry in entries:
        cost = len(entry.model_dump_json())
        if size + cost > limit and (not parts or parts[-1]):
            parts.append([])
            size = 0
        parts[-1].append(entry)
        size += cost
    return parts


def main(argv: list[str] | None = None) -> None:
    from cfs_georep.spec import SPEC

    run_spec(SPEC, argv)
