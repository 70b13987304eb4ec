"""Continuous journal archive: every shard journal and AUDIT shipped to S3 in segments.

One task per stream tails it with an ordered consumer from where the archive ends
(listed from the bucket, so a new holder after a kill -9 continues exactly after
the last segment it finds), buffers messages and PUTs a segment when it is big or
old enough (`segments.py`). While S3 is unreachable the buffer stops growing at its
cut size, reading pauses, and the lag figure grows from the oldest unshipped
message: the outage shows. `progress.json` tells a replay how far every stream is
known to be complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from cfs.backup.segments import (
    PROGRESS,
    ArchiveProgress,
    Message,
    SegmentBuffer,
    StreamProgress,
    encode_segment,
    parse_segment_key,
    segment_key,
)
from cfs.bus import Bus
from cfs.faults import crash_point
from cfs.objstore import ObjectStore, ObjectStoreError
from cfs.retry import Backoff, RetryPolicy, any_bus_error, retry
from cfs_contracts.backup import ArchiveStream
from cfs_contracts.envelope import Envelope

log = logging.getLogger(__name__)


def _s3_wait(what: str) -> RetryPolicy:
    """S3 trouble outlasting the store's own retries: waited out (the archive lag shows
    meanwhile), at a term's start as for every segment."""
    return RetryPolicy(
        what,
        temporary=lambda exc: isinstance(exc, ObjectStoreError),
        deadline_s=None,
        max_delay_s=5.0,
    )


WallMs = Callable[[], int]


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class ArchiveSettings:
    segment_bytes: int = 4 * 1024 * 1024
    segment_s: float = 1.0
    clock_offset_ms: int = 1000  # delivery delay plus clock offset a "complete" claim allows
    progress_s: float = 1.0
    # Per stream: archived segments older than this are deleted (guide: audit logs 3 years).
    retention_s: Mapping[str, float] = field(default_factory=dict)
    expire_every_s: float = 3600.0


@dataclass
class _StreamState:
    name: str
    subject: str
    archived_seq: int = 0
    last_hlc_wall: int = 0
    last: StreamProgress | None = None
    journal_seq: int = 0  # highest sequence seen in the stream
    caught_up_ms: int = 0  # wall ms when nothing was waiting to be archived
    oldest_unshipped_ms: int | None = None
    error: str | None = None
    buffer: SegmentBuffer = field(default_factory=lambda: SegmentBuffer(0, 0.0))


class Archiver:
    def __init__(
        self,
        bus: Bus,
        store: ObjectStore,
        cluster_id: str,
        streams: list[tuple[str, str]],
        settings: ArchiveSettings | None = None,
        wall_ms: WallMs = _wall_ms,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        """`streams`: (stream name, subject filter) pairs. Keys in `store` are relative
        to the archive root; this cluster's segments live under `cluster_id/`.
        `active`: whether this process still holds the backup lease, checked before
        every upload so a deposed holder does not write a segment the next one also
        writes (the remaining window is one PUT; replay reads each sequence once)."""
        self.bus = bus
        self._active = active
        self.store = store
        self.cluster_id = cluster_id
        self.settings = settings or ArchiveSettings()
        self._wall_ms = wall_ms
        self.states = {
            name: _StreamState(
                name,
                subject,
                buffer=SegmentBuffer(self.settings.segment_bytes, self.settings.segment_s),
            )
            for name, subject in streams
        }

    # -- figures ---------------------------------------------------------------------
    def lag_s(self, name: str) -> float:
        """Age of the oldest message not yet in S3 (0 when everything is)."""
        state = self.states[name]
        if state.oldest_unshipped_ms is None:
            return 0.0
        return max(0.0, (self._wall_ms() - state.oldest_unshipped_ms) / 1000)

    def figures(self) -> tuple[ArchiveStream, ...]:
        return tuple(
            ArchiveStream(
                stream=s.name,
                archived_seq=s.archived_seq,
                journal_seq=max(s.journal_seq, s.archived_seq),
                lag_s=round(self.lag_s(s.name), 3),
                error=s.error,
            )
            for s in self.states.values()
        )

    def progress(self) -> ArchiveProgress:
        streams = []
        for s in self.states.values():
            if s.oldest_unshipped_ms is None and s.caught_up_ms:
                through = s.caught_up_ms - self.settings.clock_offset_ms
            else:
                through = s.last_hlc_wall
            streams.append(
                StreamProgress(
                    stream=s.name,
                    archived_seq=s.archived_seq,
                    last_hlc=s.last.last_hlc if s.last else None,
                    complete_through_ms=max(0, through),
                )
            )
        return ArchiveProgress(
            cluster_id=self.cluster_id, updated_ms=self._wall_ms(), streams=tuple(streams)
        )

    # -- running ---------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await retry(self.store.ensure_bucket, _s3_wait("archive bucket"), logger=log)
            async with asyncio.TaskGroup() as tasks:
                for state in self.states.values():
                    tasks.create_task(self._stream(state), name=f"archive {state.name}")
                tasks.create_task(self._publish_progress(), name="archive progress")
                if self.settings.retention_s:
                    tasks.create_task(self._expire_loop(), name="archive retention")
        finally:
            await self.store.close()

    async def resume_position(self, name: str) -> int:
        """The highest sequence already archived for `name` (0: none)."""
        last = 0
        async for info in self.store.list(f"{self.cluster_id}/{name}/"):
            parsed = parse_segment_key(info.key)
            if parsed is not None:
                last = max(last, parsed[1])
        return last

    async def _stream(self, state: _StreamState) -> None:
        state.archived_seq = await retry(
            lambda: self.resume_position(state.name),
            _s3_wait(f"archive resume of {state.name}"),
            extra={"stream": state.name},
            logger=log,
        )  # S3 down at a new term's start: waited out (the lag shows), never a crash
        state.journal_seq = state.archived_seq
        log.info("archive.resume", extra={"stream": state.name, "after_seq": state.archived_seq})
        backoff = Backoff(
            RetryPolicy(f"journal tail of {state.name}", temporary=any_bus_error, deadline_s=None),
            extra={"stream": state.name},
            logger=log,
        )
        while True:  # a tail ends only with an error: the next starts where it stopped
            try:
                await self._tail(state, backoff)
            except Exception as exc:
                if not any_bus_error(exc):
                    raise
                await backoff.wait(exc)

    async def _tail(self, state: _StreamState, backoff: Backoff) -> None:
        start = state.archived_seq + len(state.buffer.messages) + 1
        sub = await self.bus.js.subscribe(
            state.subject,
            stream=state.name,
            ordered_consumer=True,
            idle_heartbeat=1.0,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            ),
        )
        pending = -1
        try:
            while True:
                now = time.monotonic()
                if state.buffer.due(now) or (
                    state.buffer.messages
                    and pending == 0
                    and now - state.buffer.opened_at >= self.settings.segment_s
                ):
                    await self._ship(state)
                if not state.buffer.messages and pending == 0:
                    state.caught_up_ms = self._wall_ms()
                wait = self.settings.segment_s / 4
                try:
                    msg = await sub.next_msg(timeout=wait)
                except (TimeoutError, nats.errors.TimeoutError):
                    if pending < 0:
                        pending = 0 if await self._at_end(state) else -1
                    continue
                backoff.reset()
                seq = msg.metadata.sequence.stream
                pending = msg.metadata.num_pending
                hlc = Envelope.model_validate_json(msg.data).hlc
                state.buffer.add(Message(seq, hlc, msg.data), time.monotonic())
                state.journal_seq = max(state.journal_seq, seq + pending)
                if state.oldest_unshipped_ms is None:
                    state.oldest_unshipped_ms = hlc.wall_ms
        finally:
            if not self.bus.nc.is_closed:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    async def _at_end(self, state: _StreamState) -> bool:
        info = await self.bus.js.stream_info(state.name)
        state.journal_seq = max(state.journal_seq, int(info.state.last_seq))
        return int(info.state.last_seq) <= state.archived_seq + len(state.buffer.messages)

    async def _ship(self, state: _StreamState) -> None:
        """PUT the buffer as one segment, retrying until S3 takes it (lag shows meanwhile)."""
        messages = state.buffer.take()
        blob, manifest = encode_segment(state.name, messages)
        key = f"{self.cluster_id}/{segment_key(state.name, manifest.first, manifest.last)}"
        backoff = Backoff(
            _s3_wait(f"archive of {state.name}"),
            extra={"stream": state.name},
            logger=log,
        )
        while True:
            if not self._active():  # deposed: never upload; the kernel is cancelling us
                await asyncio.Event().wait()
            try:
                await self.store.put(
                    key,
                    blob,
                    metadata={
                        "first": str(manifest.first),
                        "last": str(manifest.last),
                        "count": str(manifest.count),
                        "sha256": manifest.sha256,
                    },
                )
                break
            except ObjectStoreError as exc:
                state.error = str(exc)
                await backoff.wait(exc)
        crash_point("backup.segment_uploaded")  # in S3, not yet recorded anywhere else
        state.error = None
        state.archived_seq = manifest.last
        state.last_hlc_wall = manifest.last_hlc.wall_ms
        state.last = StreamProgress(
            stream=state.name, archived_seq=manifest.last, last_hlc=manifest.last_hlc
        )
        state.oldest_unshipped_ms = None
        log.debug(
            "archive.segment",
            extra={
                "stream": state.name,
                "first": manifest.first,
                "last": manifest.last,
                "bytes": len(blob),
            },
        )

    async def expire(self) -> int:
        """Delete segments past their stream's retention; returns how many went.

        Only whole segments whose newest message is older than the retention, and never
        the newest segment of a stream (the resume point after a restart)."""
        deleted = 0
        now = self._wall_ms()
        for stream, keep_s in self.settings.retention_s.items():
            infos = [i async for i in self.store.list(f"{self.cluster_id}/{stream}/")]
            ranged = sorted(
                (parsed, info)
                for info in infos
                if (parsed := parse_segment_key(info.key)) is not None
            )
            for _, info in ranged[:-1]:
                if now - info.last_modified_ms > keep_s * 1000:
                    await self.store.delete(info.key)
                    deleted += 1
            if deleted:
                log.info("archive.expired", extra={"stream": stream, "segments": deleted})
        return deleted

    async def _expire_loop(self) -> None:
        while True:
            try:
                await self.expire()
            except ObjectStoreError as exc:
                log.info("archive.expire_failed", extra={"error": str(exc)})
            await asyncio.sleep(self.settings.expire_every_s)

    async def _publish_progress(self) -> None:
        key = f"{self.cluster_id}/{PROGRESS}"
        while True:
            await asyncio.sleep(self.settings.progress_s)
            try:
                await self.store.put(key, self.progress().model_dump_json().encode())
            except ObjectStoreError as exc:
                log.info("archive.progress_unsaved", extra={"error": str(exc)})
