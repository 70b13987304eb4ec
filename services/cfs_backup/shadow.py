"""The backup service's own projection of each shard, kept near its journal's end.

A snapshot brings every shadow to its cut (`cut.py`). Between snapshots `follow`
applies what the shard journals, so a snapshot has only its last moments to apply
(from empty, a million-inode journal takes minutes: the cost would land on the
snapshot and on the RPO of whoever waits for it).

The one rule that keeps a followed shadow valid for any later cut: a record is
applied only once this node's clock is past its stamp (the follower observes every
stamp, as replicas do). A cut is stamped later from the same clock, so it is past
every record a shadow holds; and a snapshot holds every shadow's lock from before
it takes its stamp until its images are read, so nothing is applied past a cut
while it is being taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from cfs.bus import Bus
from cfs.hlc import observe
from cfs.retry import Backoff, RetryPolicy, any_bus_error
from cfs_backup.cut import before
from cfs_contracts.streams import shard_name
from cfs_metadata.journal import Journal, JournalRecord, apply_record, position_mismatch
from cfs_metadata.projection import Projection

log = logging.getLogger(__name__)

SKEW_WAIT_S = 1.0


class ClockBehind(Exception):
    """A journal message is stamped further ahead of this node's clock than it accepts."""


class Shadow:
    """One shard's shadow projection; `lock` is held by whoever moves it."""

    def __init__(self, bus: Bus, index: int, path: Path) -> None:
        self.bus = bus
        self.index = index
        self.journal = Journal(bus, index)
        self.path = path
        self.lock = asyncio.Lock()
        self._projection: Projection | None = None

    @property
    def projection(self) -> Projection:
        if self._projection is None:
            self._projection = Projection(self.path, self.index)
        return self._projection

    def close(self) -> None:
        if self._projection is not None and not self.lock.locked():
            self._projection.close()
            self._projection = None

    async def check_position(self) -> None:
        """Start over when the journal no longer continues the shadow (a re-seeded
        journal after quorum loss): a snapshot must hold what the journal proves."""
        last = await self.journal.last_seq()
        reason = await position_mismatch(self.journal, self.projection, last)
        if reason:
            log.warning(
                "shadow.rebuilt",
                extra={
                    "shard": self.index,
                    "applied_seq": self.projection.applied_seq,
                    "journal_last_seq": last,
                    "reason": reason,
                },
            )
            self.projection.reset()

    async def follow(self) -> None:
        """Apply the journal as it grows, for as long as the service leads."""
        backoff = Backoff(
            RetryPolicy(
                f"shadow of {self.journal.stream}", temporary=any_bus_error, deadline_s=None
            ),
            extra={"shard": self.index},
            logger=log,
        )
        while True:  # a tail ends only with an error: the next starts where it stopped
            try:
                await self._follow(backoff)
            except Exception as exc:
                if not any_bus_error(exc):
                    raise
                await backoff.wait(exc)

    async def _follow(self, backoff: Backoff) -> None:
        async with self.lock:
            await self.check_position()
            start = self.projection.applied_seq + 1
        async for record in self.journal.tail(start):
            backoff.reset()
            while True:
                if self._admitted(record):
                    break
                await asyncio.sleep(SKEW_WAIT_S)  # stamped too far ahead (`hlc.skew`)
            async with self.lock:
                if record.seq > self.projection.applied_seq:  # else a snapshot applied it
                    apply_record(self.projection, record)

    async def catch_up(self, end: int) -> None:
        """Apply the journal through `end` now, by the same rule; the caller holds
        `lock` (fragment GC: the live metadata at its mark)."""
        await self.check_position()
        if self.projection.applied_seq >= end:
            return
        async for record in self.journal.tail(self.projection.applied_seq + 1):
            if not self._admitted(record):
                raise ClockBehind(
                    f"shard {self.index:03d}: message {record.seq} is stamped "
                    f"{record.event.envelope.hlc}, ahead of this node's clock"
                )
            apply_record(self.projection, record)
            if record.seq >= end:
                return

    def _admitted(self, record: JournalRecord) -> bool:
        """Observe the record's stamp; True when this node's clock is past it."""
        stamp = record.event.envelope.hlc
        observe(self.bus.clock, stamp)
        return before(stamp, self.bus.clock.last)


class Shadows:
    """Every shard's shadow, under `<backup dir>/shadow/shard-NNN`."""

    def __init__(self, bus: Bus, root: Path, shards: int) -> None:
        self.by_index = {
            index: Shadow(bus, index, root / "shadow" / f"shard-{index:03d}")
            for index in range(1, shards + 1)
        }

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[list[Shadow]]:
        """Every shadow, none moving but by the holder (in index order: no deadlock)."""
        async with contextlib.AsyncExitStack() as stack:
            for shadow in self.by_index.values():
                await stack.enter_async_context(shadow.lock)
            yield list(self.by_index.values())

    async def follow(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            for shadow in self.by_index.values():
                tasks.create_task(shadow.follow(), name=f"shadow {shadow.index:03d}")

    def positions(self) -> dict[str, int]:
        return {
            shard_name(index): shadow.projection.applied_seq
            for index, shadow in self.by_index.items()
        }

    def close(self) -> None:
        for shadow in self.by_index.values():
            shadow.close()
