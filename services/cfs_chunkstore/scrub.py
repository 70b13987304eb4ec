"""Background scrub: re-read and checksum every fragment this node holds (DESIGN.md §6).

A `Scrubber` walks the store in key order (`list`, then `verify` one fragment at a
time in a worker thread, so client requests keep the event loop and most of the
disk), paced by a token bucket to at most `mb_s` MiB/s: before each fragment its
size is charged to the bucket and the scrubber sleeps off any debt, so it never
spins. A fragment that is missing or fails its checksum is reported once per pass
as `FragmentDamaged(reported_by="<node>/scrub")`; the repair coordinator consumes
those from the DATA stream and rebuilds it. A report that cannot be published is
retried (with backoff) before the scrubber moves on, so nothing it found is lost
while NATS is away.

After a full pass the scrubber rests `pass_interval_s`, then starts over from the
first key. Its position survives restarts: the cursor (last key checked, the pass
counters, when the last pass ended) is kept in a small JSON file next to the
store's index, rewritten every few seconds, after every damaged fragment, at the
end of a pass and on stop. A crash loses at most a few seconds of progress
(those fragments are simply checked again); a missing or unreadable cursor file
starts a new pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cfs.kernel.runtime import Spawn, cancel_and_wait, unsupervised
from cfs.ratelimit import TokenBucket
from cfs_chunkstore.store import FragmentCorrupt, FragmentNotFound, FragmentStore, StoreError
from cfs_contracts.data import FragmentInfo
from cfs_contracts.events.data import FragmentDamaged

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MIN_COST_BYTES = 4096  # a fragment costs at least one block: empty ones still pace
_DETAIL_MAX = 1024
_REPORT_BACKOFF_MAX_S = 30.0
_FAILURE_PAUSE_S = 60.0
MIN_REST_S = 0.1  # between passes, even when told 0: an empty store must not spin

Report = Callable[[FragmentDamaged], Awaitable[object]]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Cursor:
    """Where the scrub is (persisted): the pass in progress and the one before it."""

    after: str = ""  # last key checked in this pass ('' = from the start)
    pass_no: int = 1
    started_ms: int = 0  # wall clock when this pass started (0 = not started)
    fragments: int = 0
    bytes: int = 0
    damaged: int = 0
    last_finished_ms: int = 0  # wall clock when the previous pass ended (0 = never)


@dataclass(frozen=True)
class PassSummary:
    pass_no: int
    fragments: int
    bytes: int
    damaged: int
    seconds: float
    finished_ms: int


@dataclass(frozen=True)
class ScrubProgress:
    """Counters for operators (`stat` has no field for them yet)."""

    enabled: bool
    mb_s: float
    pass_no: int
    after: str
    fragments: int
    bytes: int
    damaged: int
    passes_done: int  # by this process
    damaged_total: int  # by this process
    last_pass: PassSummary | None


def load_cursor(path: Path | None) -> Cursor:
    """The saved cursor; a fresh one if there is none or it cannot be read."""
    if path is None:
        return Cursor()
    try:
        raw = json.loads(path.read_text())
        cursor = Cursor(**raw)
        if not isinstance(cursor.after, str) or cursor.pass_no < 1:
            raise ValueError(f"bad values {raw!r}")
        return cursor
    except FileNotFoundError:
        return Cursor()
    except (OSError, ValueError, TypeError) as exc:
        log.warning("scrub.cursor_unreadable", extra={"path": str(path), "error": str(exc)})
        return Cursor()


def save_cursor(path: Path, cursor: Cursor) -> None:
    """Write-then-rename (fsync'd), so a crash leaves the old cursor or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps(asdict(cursor)).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Scrubber:
    """Verifies every fragment of `store` in the background; see the module doc.

    `report` publishes a `FragmentDamaged` (raising if it was not published).
    `mb_s` <= 0 disables the scrubber (`start` does nothing). `clock` and `sleep`
    are for tests: by default monotonic time and a sleep that `stop` cuts short.
    """

    def __init__(
        self,
        store: FragmentStore,
        report: Report,
        *,
        cursor_path: Path | None = None,
        mb_s: float = 20.0,
        pass_interval_s: float = 24 * 3600.0,
        batch: int = 256,
        save_every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep | None = None,
    ) -> None:
        self.store = store
        self.node = store.node
        self.reporter = f"{store.node}/scrub"
        self.report = report
        self.cursor_path = cursor_path
        self.mb_s = mb_s
        self.pass_interval_s = pass_interval_s
        self.batch = batch
        self.save_every_s = save_every_s
        self._clock = clock
        self._sleep = sleep
        # Starts empty: a scrub that starts (or restarts) is paced from its first byte.
        self.bucket = TokenBucket(mb_s * MiB, full=False, now=clock()) if mb_s > 0 else None
        self.cursor = load_cursor(cursor_path)
        self._reported: set[str] = set()  # keys reported in this pass
        self._saved_at = clock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None
        self.passes_done = 0
        self.damaged_total = 0
        self.last_pass: PassSummary | None = None

    @property
    def enabled(self) -> bool:
        return self.bucket is not None

    def progress(self) -> ScrubProgress:
        c = self.cursor
        return ScrubProgress(
            enabled=self.enabled,
            mb_s=self.mb_s,
            pass_no=c.pass_no,
            after=c.after,
            fragments=c.fragments,
            bytes=c.bytes,
            damaged=c.damaged,
            passes_done=self.passes_done,
            damaged_total=self.damaged_total,
            last_pass=self.last_pass,
        )

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, spawn: Spawn = unsupervised) -> None:
        """`spawn`: the service runtime's, with DEGRADE: a scrub that fails leaves the
        store serving and the service visibly degraded."""
        if not self.enabled:
            log.info("scrub.disabled", extra={"node": self.node})
            return
        if self._task is None:
            self._task = spawn(self.run(), f"scrub-{self.node}")

    async def stop(self, timeout: float = 30.0) -> None:
        """Finish the fragment being checked, save the cursor, return."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                await cancel_and_wait(task)
            elif not task.cancelled() and task.exception() is not None:
                error = str(task.exception())
                log.error("scrub.crashed", extra={"node": self.node, "error": error})
        self._save_now()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Passes forever, resting `pass_interval_s` between them, until `stop`."""
        log.info(
            "scrub.started",
            extra={
                "node": self.node,
                "mb_s": self.mb_s,
                "pass_interval_s": self.pass_interval_s,
                "pass": self.cursor.pass_no,
                "after": self.cursor.after,
            },
        )
        await self._pause(self._rest_left())
        while not self.stopping:
            try:
                summary = await self.run_pass()
            except Exception as exc:  # a disk or index error: log, wait, carry on
                log.exception("scrub.failed", extra={"node": self.node, "error": str(exc)})
                await self._pause(min(_FAILURE_PAUSE_S, max(self.pass_interval_s, MIN_REST_S)))
                continue
            if summary is not None:
                await self._pause(max(self.pass_interval_s, MIN_REST_S))

    def _rest_left(self) -> float:
        """Seconds still to rest after the last pass (resuming between passes)."""
        c = self.cursor
        if c.after or c.started_ms or not c.last_finished_ms:
            return 0.0
        since = (_now_ms() - c.last_finished_ms) / 1000
        return min(self.pass_interval_s, max(0.0, self.pass_interval_s - since))

    # -- one pass ------------------------------------------------------------------------
    async def run_pass(self) -> PassSummary | None:
        """From the cursor to the last key; None if `stop` came first."""
        if not self.cursor.started_ms:
            self.cursor = replace(self.cursor, started_ms=_now_ms())
            self._reported.clear()
        while not self.stopping:
            page, more = await asyncio.to_thread(self.store.list, self.cursor.after, self.batch)
            for info in page:
                if self.stopping or not await self.check(info):
                    return None
                await self._maybe_save()
            if not more:
                return await self._finish_pass()
        return None

    async def check(self, info: FragmentInfo) -> bool:
        """Pace, verify one fragment, report damage; False if stopped before it was done."""
        assert self.bucket is not None, "scrub is disabled"
        await self._pause(self.bucket.take(max(info.size, MIN_COST_BYTES), self._clock()))
        if self.stopping:
            return False
        key = info.key
        damaged = False
        try:
            checked = await asyncio.to_thread(self.store.verify, key)
        except FragmentNotFound:
            checked = None  # deleted since it was listed
        except FragmentCorrupt as exc:
            checked = None
            if key not in self._reported:
                if not await self._report(exc):
                    return False  # not reported yet: checked again after a restart
                self._reported.add(key)
                damaged = True
        except StoreError as exc:  # replaced again and again while read: next pass
            checked = None
            log.warning("scrub.skipped", extra={"node": self.node, "key": key, "error": str(exc)})
        c = self.cursor
        self.cursor = replace(
            c,
            after=key,
            fragments=c.fragments + (1 if checked is not None else 0),
            bytes=c.bytes + (checked.size if checked is not None else 0),
            damaged=c.damaged + (1 if damaged else 0),
        )
        if damaged:
            self.damaged_total += 1
            await self._save()
        return True

    async def _report(self, damage: FragmentCorrupt) -> bool:
        """Publish until it is acknowledged (True) or the scrubber is stopped (False)."""
        event = FragmentDamaged(
            node_id=self.node,
            key=damage.key,
            reason=damage.reason,
            detail=damage.detail[:_DETAIL_MAX],
            reported_by=self.reporter,
        )
        log.warning(
            "fragment.damaged",
            extra={
                "node": self.node,
                "key": damage.key,
                "reason": damage.reason,
                "detail": damage.detail,
                "reported_by": self.reporter,
                "pass": self.cursor.pass_no,
            },
        )
        backoff = 1.0
        while True:
            try:
                await self.report(event)
                return True
            except Exception as exc:  # NATS away: keep the finding, try again
                log.error(
                    "fragment.damage_unreported",
                    extra={
                        "node": self.node,
                        "key": damage.key,
                        "error": str(exc) or type(exc).__name__,
                        "retry_s": backoff,
                    },
                )
            await self._pause(backoff)
            if self.stopping:
                return False
            backoff = min(backoff * 2, _REPORT_BACKOFF_MAX_S)

    async def _finish_pass(self) -> PassSummary:
        c = self.cursor
        finished = _now_ms()
        summary = PassSummary(
            pass_no=c.pass_no,
            fragments=c.fragments,
            bytes=c.bytes,
            damaged=c.damaged,
            seconds=max(0.0, (finished - c.started_ms) / 1000),
            finished_ms=finished,
        )
        log.info(
            "scrub.pass_done",
            extra={
                "node": self.node,
                "pass": summary.pass_no,
                "fragments": summary.fragments,
                "bytes": summary.bytes,
                "damaged": summary.damaged,
                "seconds": round(summary.seconds, 3),
            },
        )
        self.cursor = Cursor(pass_no=c.pass_no + 1, last_finished_ms=finished)
        self._reported.clear()
        self.passes_done += 1
        self.last_pass = summary
        await self._save()
        return summary

    # -- helpers -------------------------------------------------------------------------
    async def _pause(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self._sleep is not None:
            await self._sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _maybe_save(self) -> None:
        if self._clock() - self._saved_at >= self.save_every_s:
            await self._save()

    async def _save(self) -> None:
        self._saved_at = self._clock()
        if self.cursor_path is None:
            return
        try:
            await asyncio.to_thread(save_cursor, self.cursor_path, self.cursor)
        except OSError as exc:
            log.warning("scrub.cursor_not_saved", extra={"node": self.node, "error": str(exc)})

    def _save_now(self) -> None:
        if self.cursor_path is None or not self.enabled:
            return
        try:
            save_cursor(self.cursor_path, self.cursor)
        except OSError as exc:
            log.warning("scrub.cursor_not_saved", extra={"node": self.node, "error": str(exc)})
