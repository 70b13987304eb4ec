"""One shard's journal (the `META_<shard>` stream): read, tail, fenced append."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from cfs.bus import Ack, Bus, BusUnavailable

# The replica's: it cancels again a task whose cancellation Python 3.11's wait_for (in
# nats-py) swallowed, so a journal tail cannot outlive its replica's stop.
from cfs.kernel.runtime import cancel_and_wait as cancel_and_wait
from cfs_contracts import DecodedEvent, Envelope
from cfs_contracts.events.metadata import (
    LeaderFenced,
    MetaCommitted,
    MetaReplayed,
    ShardImageChunk,
    ShardOpened,
    ShardRestored,
)
from cfs_contracts.streams import meta_stream, shard_name
from cfs_metadata.projection import Projection

log = logging.getLogger(__name__)


TAIL_STALL_CHECK_S = 1.0  # silence after which a tail checks it is not stuck


@dataclass(frozen=True)
class JournalRecord:
    seq: int
    event: DecodedEvent
    pending: int | None = None  # tail only: messages after this one (0 = at the end)


class Journal:
    def __init__(self, bus: Bus, shard_index: int) -> None:
        self.bus = bus
        self.shard = shard_name(shard_index)
        self.stream = meta_stream(self.shard).name
        self.subject = f"cfs.{bus.site}.meta.{self.shard}.journal"
        # The peer site's entries applied here: in the journal like any other message,
        # under a subject the peer's copy of this journal does not source (DESIGN.md §8)
        self.remote_subject = f"{self.subject}.remote"
        self._every_subject = f"cfs.{bus.site}.meta.{self.shard}.>"

    async def last_seq(self) -> int:
        try:
            info = await self.bus.js.stream_info(self.stream)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(
                f"cannot read {self.stream} state: {exc or type(exc).__name__}"
            ) from None
        return int(info.state.last_seq)

    async def get(self, seq: int) -> JournalRecord:
        """One message by sequence (direct get: answered by any replica)."""
        try:
            msg = await self.bus.js.get_msg(self.stream, seq=seq, direct=True)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(
                f"cannot read {self.stream} seq {seq}: {exc or type(exc).__name__}"
            ) from None
        return JournalRecord(seq, self.bus.registry.decode(msg.data or b""))

    async def read_range(self, first: int, last: int) -> AsyncIterator[JournalRecord]:
        for seq in range(first, last + 1):
            yield await self.get(seq)

    async def tail(self, from_seq: int) -> AsyncIterator[JournalRecord]:
        """Every message from `from_seq` on, in order, forever (ordered consumer)."""
        try:
            sub = await self.bus.js.subscribe(
                self._every_subject,
                stream=self.stream,
                ordered_consumer=True,
                idle_heartbeat=1.0,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=from_seq
                ),
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(
                f"cannot tail {self.stream}: {exc or type(exc).__name__}"
            ) from None
        position = from_seq - 1
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=TAIL_STALL_CHECK_S)
                except (TimeoutError, nats.errors.TimeoutError):
                    # Quiet, or stalled: an ordered consumer whose server died may never
                    # deliver again. Behind the stream = stalled; ahead of it = the journal
                    # was re-seeded shorter (quorum recovery). Either way the caller
                    # resubscribes, and checks its projection against the journal first.
                    last = await self.last_seq()
                    if last != position:
                        raise BusUnavailable(
                            f"tail of {self.stream} at seq {position}, journal ends at {last}"
                        ) from None
                    continue
                except nats.errors.Error as exc:
                    raise BusUnavailable(
                        f"tail of {self.stream} broke: {exc or type(exc).__name__}"
                    ) from None
                position = msg.metadata.sequence.stream
                yield JournalRecord(
                    position, self.bus.registry.decode(msg.data), msg.metadata.num_pending
                )
        finally:
            if not self.bus.nc.is_closed:
                with contextlib.suppress(
                    nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError
                ):
                    await sub.unsubscribe()

    async def append(
        self, envelope: Envelope, expected_last_seq: int, timeout: float, *, remote: bool = False
    ) -> Ack:
        """Fenced append: fails with SequenceConflict if anyone else appended.
        `remote`: the peer site's entries (`remote_subject`)."""
        return await self.bus.publish(
            envelope,
            subject=self.remote_subject if remote else self.subject,
            expected_last_seq=expected_last_seq,
            timeout=timeout,
        )


async def position_mismatch(journal: Journal, projection: Projection, last: int) -> str:
    """Why the journal (ending at `last`) does not continue the projection, or "".

    After a quorum-loss re-seed the journal is the survivor's copy: it may end before
    the projection's sequence, or hold another message at that sequence. The journal
    is the truth: a projection it does not continue is wiped and replayed."""
    applied = projection.applied_seq
    if applied == 0:
        return ""
    if last < applied:
        return "journal ends before the applied sequence"
    recorded = projection.applied_id
    if recorded is None:  # applied by a release that did not record ids
        return ""
    found = (await journal.get(applied)).event.envelope.id
    if found != recorded:
        return f"message {applied} is {found}, the projection applied {recorded}"
    return ""


def apply_record(projection: Projection, record: JournalRecord) -> None:
    """The one rule for applying a journal message to a projection: replicas and the
    backup service's snapshot projections both use it, so a snapshot is exactly the
    state a replica would hold at that sequence."""
    payload = record.event.payload
    msg_id = record.event.envelope.id
    extra = {"shard": projection.shard, "seq": record.seq}
    if isinstance(payload, LeaderFenced):
        projection.apply(record.seq, term=payload.term, msg_id=msg_id)
    elif isinstance(payload, MetaCommitted):
        projection.apply(record.seq, payload.entries, msg_id=msg_id)
    elif isinstance(payload, ShardRestored):
        projection.begin_install(record.seq, payload)
        log.info("restore.begin", extra={**extra, "snapshot": payload.lineage.snapshot_id})
    elif isinstance(payload, ShardImageChunk):
        if projection.install_chunk(record.seq, payload):
            log.info(
                "restore.installed",
                extra={
                    **extra,
                    "snapshot": payload.snapshot_id,
                    "inodes": projection.inode_count(),
                },
            )
    elif isinstance(payload, MetaReplayed):
        lineage = projection.lineage
        if lineage is None:
            raise ValueError(
                f"shard {projection.shard} seq {record.seq}: replayed entries "
                "on a shard that was never restored"
            )
        replayed = lineage.model_copy(
            update={"seq": payload.source_last, "hlc": payload.source_hlc}
        )
        projection.apply(record.seq, payload.entries, msg_id=msg_id, lineage=replayed)
    elif isinstance(payload, ShardOpened):
        lineage = projection.lineage
        opened = lineage.model_copy(update={"held": False}) if lineage else None
        projection.apply(record.seq, msg_id=msg_id, lineage=opened)
        log.info("restore.opened", extra={**extra, "reason": payload.reason})
    else:
        projection.apply(record.seq, msg_id=msg_id)  # foreign event: keep position
        log.warning("journal.unexpected_event", extra={**extra, "type": record.event.envelope.type})
