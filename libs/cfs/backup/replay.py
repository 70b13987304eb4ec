"""Journal sources for `replay-journal`, and the replay of one shard (DESIGN.md §9).

A restored shard knows where its state came from (`Lineage`: cluster, shard,
sequence). Replay reads that cluster's journal after the sequence — from the live
journal when it is this cluster's own, else from the S3 archive — and sends the
committed entries to the shard's writer in order. The writer refuses a batch that
would skip or repeat anything, so a replay can be interrupted and run again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from cfs.backup.segments import PROGRESS, ArchiveProgress, decode_segment, parse_segment_key
from cfs.bus import Bus, BusUnavailable
from cfs.client.shard_admin import shard_admin
from cfs.objstore import ObjectNotFound, ObjectStore
from cfs_contracts import REGISTRY, DecodedEvent
from cfs_contracts.envelope import HLC
from cfs_contracts.events.metadata import Lineage, MetaCommitted, MetaReplayed, ShardRestored
from cfs_contracts.fs.shard_admin import ReplayBatch, ReplayedMessage
from cfs_contracts.streams import meta_stream, shard_name

BATCH_BYTES = 256 * 1024
_APPROX_ENTRY_BYTES = 600

Source = AsyncIterator[tuple[int, DecodedEvent]]


class ReplayError(Exception):
    """The journal cannot be replayed as asked; the message says why."""


def until_ms(wall_ms: int) -> HLC:
    """The largest stamp within `wall_ms`: `--to` includes that whole millisecond."""
    return HLC(wall_ms=wall_ms, counter=2**62, node="\U0010ffff")


async def live_source(bus: Bus, shard: int, first: int) -> Source:
    """This cluster's journal of `shard` from `first` to its current end."""
    stream = meta_stream(shard_name(shard)).name
    try:
        info = await bus.js.stream_info(stream)
    except (nats.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot read {stream}: {exc or type(exc).__name__}") from None
    last = int(info.state.last_seq)
    if last < first:
        return
    sub = await bus.js.subscribe(
        f"cfs.{bus.site}.meta.{shard_name(shard)}.>",
        stream=stream,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first),
    )
    try:
        while True:
            msg = await sub.next_msg(timeout=10.0)
            seq = msg.metadata.sequence.stream
            yield seq, bus.registry.decode(msg.data)
            if seq >= last:
                return
    finally:
        await sub.unsubscribe()


async def archive_source(store: ObjectStore, stream: str, first: int) -> Source:
    """Archived messages of `stream` from `first` on, in order, each once (segments of
    two archivers that overlapped after a failover are read once per sequence)."""
    segments = []
    async for info in store.list(f"{stream}/"):
        parsed = parse_segment_key(info.key)
        if parsed is not None and parsed[1] >= first:
            segments.append((parsed[0], parsed[1], info.key))
    position = first - 1
    for _, _, key in sorted(segments):
        _, messages = decode_segment(await store.get(key))
        for seq, data in messages:
            if seq <= position:
                continue
            position = seq
            yield seq, REGISTRY.decode(data)


async def archive_complete_through(store: ObjectStore, streams: list[str]) -> int:
    """Wall ms up to which every one of `streams` is archived (0 when unknown)."""
    try:
        progress = ArchiveProgress.model_validate_json(await store.get(PROGRESS))
    except ObjectNotFound:
        return 0
    return progress.complete_through_ms(streams)


@dataclass
class ShardReplay:
    shard: str
    messages: int = 0
    first: int = 0
    last: int = 0
    last_hlc: HLC | None = None
    stopped: str = ""  # why it ended before the source's end, if it did


async def replay_shard(
    bus: Bus, shard: int, lineage: Lineage, source: Source, until: HLC | None
) -> ShardReplay:
    """Send the source's entries after `lineage.seq` (stamped up to `until`) in batches."""
    result = ShardReplay(shard_name(shard))
    expected = lineage.seq + 1
    batch: list[ReplayedMessage] = []
    batch_first = 0
    size = 0

    async def send(last: int) -> None:
        nonlocal batch, size, batch_first
        if batch:
            op = ReplayBatch(
                cluster_id=lineage.cluster_id, first=batch_first, last=last, messages=tuple(batch)
            )
            await shard_admin(bus, shard, op)
        batch, size, batch_first = [], 0, 0

    async for seq, event in source:
        if seq != expected:
            raise ReplayError(
                f"shard {result.shard}: the journal source continues at seq {seq}, the "
                f"restored state ends at seq {expected - 1}: {seq - expected} messages "
                "are missing (purged journal or a gap in the archive)"
            )
        expected = seq + 1
        stamp = event.envelope.hlc
        payload = event.payload
        if until is not None and stamp.key() > until.key():
            result.stopped = "reached --to / the archive's complete point"
            break
        if isinstance(payload, ShardRestored):
            if payload.lineage.snapshot_id != lineage.snapshot_id:
                result.stopped = f"the source was restored at seq {seq}: replay stops there"
            break
        if batch_first == 0:
            batch_first = seq
        if isinstance(payload, MetaCommitted | MetaReplayed) and payload.entries:
            batch.append(ReplayedMessage(seq=seq, hlc=stamp, entries=payload.entries))
            size += _APPROX_ENTRY_BYTES * sum(len(e.changes) + 1 for e in payload.entries)
            result.messages += 1
            result.first = result.first or seq
            result.last = seq
            result.last_hlc = stamp
        if size >= BATCH_BYTES:
            await send(seq)
    if batch:
        await send(result.last)
    return result
