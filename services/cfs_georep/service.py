"""geo-replicator: the peer site's journal, applied on this site (DESIGN.md §8).

One active instance per site (lease). While it leads, per shard:

    the shard's position: the last GEO_IN message it applied (journaled with them)
        ▼
    GEO_IN (the peer's journal of that shard, sourced over the site link), read with
    an ordered consumer from the position on, in batches
        ▼
    Localizer: every chunk map's data copied here from the peer's chunk-stores
        ▼
    apply_remote on the shard writer: merged, journaled under ...journal.remote
    together with the new position
        ▼
    ConflictDetected for each conflict the merge found (message id per conflict)

Killed anywhere in between, the next leader starts from the position the shard
journaled: nothing is applied twice or skipped. A batch sent again (the apply was
journaled, its answer lost) is not applied again; the writer answers the conflicts
its entries found once more, whose events the CONFLICTS stream's duplicate window
drops. Nothing waits on the peer being reachable except the copying of data.

The active instance also keeps the active-site record (`active.ActiveWatch`): it adopts
the peer's when newer, and takes over when the active peer has been silent for
`failover_after_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Sequence

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import Field

from cfs.admin.snapshot import read_record
from cfs.bus import Bus, BusError
from cfs.client import FileStore, MetadataClient
from cfs.client.chunks import ChunkStoreClient, FragmentError
from cfs.client.shard_admin import ShardAdminRefused, shard_admin
from cfs.faults import crash_point
from cfs.hlc import system_wall_ms
from cfs.ids import stable_id
from cfs.kernel.runtime import Context, until_jetstream_answers
from cfs.retry import Backoff, RetryPolicy, any_bus_error, retry
from cfs.service_main import ServiceSettings, run_spec
from cfs.telemetry import gauge
from cfs_contracts import ContractError
from cfs_contracts.events.geo import ConflictDetected
from cfs_contracts.events.metadata import JournalEntry, MetaCommitted
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.fs.shard_admin import ApplyRemote, RemoteMessage, ShardAdminReply
from cfs_contracts.geo import (
    GEO_APPLIED_KEY,
    GEO_PEER_KEY,
    INBOUND_STREAM,
    GeoApplied,
    GeoPeer,
    ShardApplied,
    peer_journal_subject,
)
from cfs_contracts.streams import NODES, shard_name
from cfs_georep.active import ActiveWatch
from cfs_georep.ship import ChunkUnavailable, Localizer

log = logging.getLogger(__name__)


class GeoSettings(ServiceSettings):
    batch: int = Field(default=128, ge=1, description="peer journal messages per fetch")
    apply_bytes: int = Field(
        default=256 * 1024, ge=4096, description="entries per apply_remote request (JSON bytes)"
    )
    copy_parallel: int = Field(default=4, ge=1, description="chunks copied from the peer at once")
    peer_poll_s: float = Field(default=2.0, gt=0, description="while no peer is linked")
    status_s: float = Field(default=1.0, gt=0, description="progress record period")
    failover_after_s: float = Field(
        default=30.0,
        ge=0,
        description="the active peer unreachable this long: this site becomes active (0: never)",
    )
    active_every_s: float = Field(default=1.0, gt=0, description="active-site record check")
    resubscribe_quiet_s: float = Field(
        default=30.0, gt=0, description="silence after which the peer's messages are read anew"
    )


async def lead(ctx: Context) -> None:
    """The active instance: follow every shard's messages from the peer."""
    bus, settings = ctx.bus, ctx.settings
    peer = await _wait_for_peer(bus, settings.peer_poll_s)
    log.info("geo.leading", extra={"peer": peer.site, "shards": peer.shards})
    meta = MetadataClient(bus, deadline_s=30)
    store = FileStore(bus, meta, client_id=f"geo-replicator@{bus.node}")
    await until_jetstream_answers("nodes view", store.start)
    peer_chunks = ChunkStoreClient(bus, site=peer.site, timeout_s=10.0)
    localizer = Localizer(peer_chunks, store, parallel=settings.copy_parallel)
    followers = [
        ShardFollower(bus, settings, peer.site, shard, localizer)
        for shard in range(1, peer.shards + 1)
    ]
    try:
        async with asyncio.TaskGroup() as tasks:
            for follower in followers:
                tasks.create_task(follower.run(), name=f"geo shard {shard_name(follower.shard)}")
            tasks.create_task(_publish_progress(bus, peer.site, followers, settings.status_s))
            watch = ActiveWatch(bus, peer.site, settings.failover_after_s, settings.active_every_s)
            tasks.create_task(watch.run(), name="geo active site")
    finally:
        await store.close()


async def _publish_progress(
    bus: Bus, peer: str, followers: list[ShardFollower], every_s: float
) -> None:
    """`geo.applied` in the nodes bucket: the lag `replication-status` shows."""
    kv = await until_jetstream_answers(
        f"{NODES.bucket} bucket", lambda: bus.key_value(NODES.bucket)
    )
    while True:
        record = GeoApplied(
            peer=peer,
            shards={f.shard: f.progress() for f in followers},
            updated_ms=system_wall_ms(),
        )
        record_applied(record)
        try:
            await kv.put(GEO_APPLIED_KEY, record.model_dump_json().encode())
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("geo.progress_unpublished", extra={"error": str(exc) or type(exc).__name__})
        await asyncio.sleep(every_s)


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


class _Stalled(Exception):
    """The ordered consumer went quiet with messages still to come (its server moved)."""


class ShardFollower:
    """One shard's messages from the peer, applied in the peer's order.

    Where it is comes from the shard itself (the position journaled with each apply),
    so it resumes exactly after the last message applied, whoever ran before it and
    however it ended; the messages are read with an ordered consumer from there."""

    def __init__(
        self, bus: Bus, settings: GeoSettings, peer: str, shard: int, localizer: Localizer
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.peer = peer
        self.shard = shard
        self.localizer = localizer
        self.subject = peer_journal_subject(peer, shard)
        self.ids = {"peer": peer, "shard": shard_name(shard)}
        self.position = 0
        self.pending = 0  # GEO_IN messages of the shard after the last one read
        self.newest_ms: int | None = None  # when the peer wrote the last message applied

    def progress(self) -> ShardApplied:
        return ShardApplied(position=self.position, pending=self.pending, newest_ms=self.newest_ms)

    async def run(self) -> None:
        reading = Backoff(
            RetryPolicy(f"read {self.subject}", temporary=_resumed, deadline_s=None),
            extra=self.ids,
        )
        while True:
            try:
                self.position = await self._apply(())  # where the shard is
                await self._follow()
            except Exception as exc:
                if not _resumed(exc):
                    raise
                await reading.wait(exc)

    async def _follow(self) -> None:
        """Apply batches from the position on, until the consumer fails or stalls."""
        sub = await self.bus.js.subscribe(
            self.subject,
            stream=INBOUND_STREAM,
            ordered_consumer=True,
            idle_heartbeat=2.0,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.position + 1
            ),
        )
        try:
            quiet = 0.0
            while True:
                try:
                    first = await sub.next_msg(timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    quiet += 1.0
                    if quiet >= self.settings.resubscribe_quiet_s:
                        raise _Stalled(f"nothing from {self.subject} for {quiet:.0f}s") from None
                    continue
                quiet = 0.0
                batch = [first]
                while len(batch) < self.settings.batch and sub.pending_msgs:
                    batch.append(await sub.next_msg(timeout=1.0))
                await self._apply_batch(batch)
        finally:
            if not self.bus.nc.is_closed:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    async def _apply_batch(self, msgs: list[Msg]) -> None:
        """Apply the batch, retrying as long as it takes (never skipped, never reordered)."""
        batch, newest_ms = self._messages(msgs)
        policy = RetryPolicy(
            f"apply {len(batch)} messages of {self.peer} to shard {shard_name(self.shard)}",
            temporary=_retried,
            deadline_s=None,
            first_delay_s=0.2,
            max_delay_s=5.0,
        )
        self.position = await retry(lambda: self._apply(batch), policy, extra=self.ids)
        self.pending = msgs[-1].metadata.num_pending
        self.newest_ms = newest_ms
        crash_point("geo.applied")

    def _messages(self, msgs: list[Msg]) -> tuple[list[RemoteMessage], int]:
        """The peer writers' entries that change something, by GEO_IN sequence, and
        when the peer wrote the last message."""
        out: list[RemoteMessage] = []
        written_ms = 0
        for msg in msgs:
            try:
                event = self.bus.registry.decode(msg.data)
            except ContractError as exc:  # a newer peer's event: never silently lost
                raise RuntimeError(f"cannot read the peer's message: {exc}") from exc
            entries: tuple[JournalEntry, ...] = ()
            if isinstance(event.payload, MetaCommitted):
                entries = tuple(entry for entry in event.payload.entries if entry.changes)
            out.append(RemoteMessage(seq=msg.metadata.sequence.stream, entries=entries))
            written_ms = event.envelope.hlc.wall_ms
        return out, written_ms

    async def _apply(self, messages: Sequence[RemoteMessage]) -> int:
        """Copy the data the messages' chunk maps need, have the shard apply them (in
        parts of about `apply_bytes`), report the conflicts; the shard's position."""
        if not messages:
            reply = await shard_admin(self.bus, self.shard, ApplyRemote(origin=self.peer))
            return reply.remote_applied
        position = self.position
        for part in _parts(list(messages), self.settings.apply_bytes):
            local = [
                m.model_copy(update={"entries": tuple(await self.localizer.localize(m.entries))})
                for m in part
            ]
            position = await self._send(local)
        return position

    async def _send(self, messages: list[RemoteMessage]) -> int:
        """One apply_remote; halved while the shard finds the merge too big to journal."""
        try:
            reply = await shard_admin(
                self.bus, self.shard, ApplyRemote(origin=self.peer, messages=tuple(messages))
            )
        except ShardAdminRefused as exc:
            if exc.reply.errno != errno.E2BIG or len(messages) == 1:
                raise
            half = len(messages) // 2
            await self._send(messages[:half])
            return await self._send(messages[half:])
        await self._report(reply)
        if reply.applied:
            log.info(
                "geo.applied",
                extra={**self.ids, "applied": reply.applied, "position": reply.remote_applied},
            )
        return reply.remote_applied

    async def _report(self, reply: ShardAdminReply) -> None:
        """One ConflictDetected per conflict, its id fixed by the entry that found it."""
        for conflict in reply.conflicts:
            conflict_id = conflict.conflict_id
            payload = ConflictDetected(conflict_id=conflict_id, shard=self.shard, conflict=conflict)
            envelope = self.bus.event(payload, event_id=stable_id(f"conflict/{conflict_id}"))
            try:
                await self.bus.publish(envelope, timeout=10.0)
            except BusError as exc:
                raise BusError(f"conflict {conflict_id} not recorded: {exc}") from exc
            log.warning(
                "geo.conflict",
                extra={**self.ids, "ino": conflict.ino, "group": conflict.group,
                       "winner": conflict.winner},
            )  # fmt: skip


def _parts(messages: list[RemoteMessage], limit: int) -> list[list[RemoteMessage]]:
    """Consecutive runs of `messages` of about `limit` JSON bytes each (one at least)."""
    parts: list[list[RemoteMessage]] = []
    size = limit
    for message in messages:
        cost = len(message.model_dump_json())
        if size + cost > limit and (not parts or parts[-1]):
            parts.append([])
            size = 0
        parts[-1].append(message)
        size += cost
    return parts


def _resumed(exc: BaseException) -> bool:
    """Failures the follower outlives by reading again from the shard's position."""
    return isinstance(exc, _Stalled) or _retried(exc)


def main(argv: list[str] | None = None) -> None:
    from cfs_georep.spec import SPEC

    run_spec(SPEC, argv)


APPLY_PENDING = gauge(
    "georep_pending_messages",
    "the peer's journal messages copied here, not yet applied",
    ("shard",),
)
APPLY_LAG = gauge(
    "georep_apply_lag_seconds",
    "replication lag: 0 with nothing pending, else the age of the last applied message",
    ("shard",),
)


def applied_lag_s(shard: ShardApplied, now_ms: int) -> float:
    """Seconds this site trails the peer on one shard (0 when nothing is pending)."""
    if shard.pending == 0 or shard.newest_ms is None:
        return 0.0
    return max(0.0, (now_ms - shard.newest_ms) / 1000)


def record_applied(record: GeoApplied) -> None:
    """The published progress as gauges, every `status_s`."""
    for index, shard in record.shards.items():
        name = shard_name(index)
        APPLY_PENDING.labels(name).set(shard.pending)
        APPLY_LAG.labels(name).set(applied_lag_s(shard, record.updated_ms))
