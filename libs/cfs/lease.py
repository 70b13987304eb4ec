"""The writer lease of a metadata shard or singleton service (DESIGN.md §4).

A record per key in the `leases` bucket, changed only by CAS on the KV revision;
each acquisition bumps `term`, the fencing token. No overlap while monotonic clocks
behave: a holder counts from when it *sent* its last successful write and stops
`margin_s` before `lease_s`; a contender takes over only by CAS on the revision it
saw, `lease_s` after first seeing it (never before the write). Advisory: the
journal's expected-last-sequence check is what rejects a deposed writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import StrEnum

import nats.errors
import nats.js.errors
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel, ConfigDict, ValidationError

from cfs.bus import Bus
from cfs.bus.kv import bucket_keys
from cfs.kernel.runtime import Spawn, cancel_and_wait, unsupervised
from cfs_contracts.streams import SHARD_LEASE_PREFIX

log = logging.getLogger(__name__)


class LeaseError(Exception):
    """A lease record that cannot be read, or an operator request that cannot apply."""


class LeaseRecord(BaseModel):
    """The JSON value under a lease key; the wall times are for display only."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # newer writers may add fields

    holder: str  # node id of the writer; "" once released
    term: int  # fencing token, +1 on every acquisition
    lease_s: float  # seconds others wait after the last change before taking over
    acquired_ms: int
    renewed_ms: int
    handoff_to: str | None = None  # node asked to take over (raft-force-election)


class Action(StrEnum):
    ACQUIRE = "acquire"
    RENEW = "renew"
    RELEASE = "release"
    STEP_DOWN = "step_down"
    WAIT = "wait"


@dataclass(frozen=True)
class Snapshot:
    """What one node knows; monotonic seconds throughout."""

    node: str
    lease_s: float = 3.0
    renew_s: float = 1.0
    margin_s: float = 0.6
    record: LeaseRecord | None = None
    revision: int = 0  # KV revision of `record`; 0 = absent or never read
    observed_at: float = 0.0  # when this node first saw `revision`
    held_term: int | None = None  # the term this node believes it holds
    renewed_at: float = 0.0  # when the last successful write of ours was sent
    eligible: bool = True  # caught up and not draining (the owner says)
    # Extra wait before taking a free or expired lease: the node's place in the key's
    # preference order times a small step, so preferred replicas win and leases spread.
    acquire_delay_s: float = 0.0

    def holds(self, now: float) -> bool:
        return self.held_term is not None and now < self.valid_until

    @property
    def valid_until(self) -> float:
        return self.renewed_at + self.lease_s - self.margin_s


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def decide(s: Snapshot, now: float) -> Decision:
    """One decision per cycle; `reason` becomes the log line."""
    rec = s.record
    if s.held_term is not None:
        age = now - s.renewed_at
        if now >= s.valid_until:
            return Decision(Action.STEP_DOWN, f"last renewal {age:.2f}s ago, lease {s.lease_s:g}s")
        if rec is None or rec.holder != s.node or rec.term != s.held_term:
            who = f"{rec.holder or 'nobody'} term {rec.term}" if rec else "nobody (deleted)"
            return Decision(Action.STEP_DOWN, f"record now names {who}")
        if not s.eligible:
            return Decision(Action.RELEASE, "no longer eligible")
        if rec.handoff_to not in (None, s.node):
            return Decision(Action.RELEASE, f"handoff to {rec.handoff_to} requested")
        if age >= s.renew_s:
            return Decision(Action.RENEW, f"holding term {s.held_term}")
        return Decision(Action.WAIT, f"holding term {s.held_term}")
    if not s.eligible:
        return Decision(Action.WAIT, "not eligible")
    if rec is None:
        return Decision(Action.ACQUIRE, "no lease record")
    silent = now - s.observed_at
    delay = 0.0 if rec.handoff_to == s.node else s.acquire_delay_s
    if rec.holder == "" and rec.handoff_to in (None, s.node):
        if silent < delay:
            return Decision(Action.WAIT, f"released; preferred replicas first ({delay:.2f}s)")
        return Decision(Action.ACQUIRE, f"released by term {rec.term}")
    if silent >= rec.lease_s + delay:
        who = rec.holder or f"handoff to {rec.handoff_to}"
        return Decision(Action.ACQUIRE, f"{who} silent for {silent:.2f}s (lease {rec.lease_s:g}s)")
    return Decision(Action.WAIT, f"held by {rec.holder or '-'} term {rec.term}")


def wake_in(s: Snapshot, now: float) -> float:
    """Seconds until `decide` could change its mind without news from the bucket."""
    tick = s.renew_s / 2
    if s.held_term is not None:
        deadline = s.valid_until - now
    elif s.record is not None:
        wait = 0.0 if s.record.holder == "" else s.record.lease_s
        deadline = s.observed_at + wait + s.acquire_delay_s - now
    else:
        return tick
    # Once a deadline has passed, failed attempts are retried at the tick, not in a spin.
    return min(tick, deadline + 0.001) if deadline > 0 else tick


def proposal(s: Snapshot, action: Action, wall_ms: int) -> LeaseRecord:
    """The record to write for ACQUIRE, RENEW or RELEASE."""
    rec = s.record
    if action is Action.ACQUIRE:
        term = (rec.term if rec else 0) + 1
        return LeaseRecord(
            holder=s.node, term=term, lease_s=s.lease_s, acquired_ms=wall_ms, renewed_ms=wall_ms
        )
    if rec is None:
        raise LeaseError(f"cannot {action} without a record")
    if action is Action.RENEW:
        return rec.model_copy(
            update={"renewed_ms": wall_ms, "lease_s": s.lease_s, "handoff_to": None}
        )
    return rec.model_copy(update={"holder": "", "renewed_ms": wall_ms})


def observe(
    s: Snapshot, record: LeaseRecord | None, revision: int, now: float, *, fresh: bool = False
) -> Snapshot:
    """Take a read or watch result; older revisions than the one known are ignored, except
    from a `fresh` read of the server (after a quorum recovery re-seeded the bucket, its
    revisions start again lower, and a CAS can only succeed with the server's own)."""
    if revision == s.revision or (not fresh and 0 < revision < s.revision):
        return s
    return replace(s, record=record, revision=revision, observed_at=now)


def wrote(s: Snapshot, record: LeaseRecord, revision: int, sent_at: float, now: float) -> Snapshot:
    """Our write of `record` was acknowledged as `revision`."""
    if record.holder == s.node:
        s = replace(s, held_term=record.term, renewed_at=sent_at)
    return observe(s, record, revision, now)


def step_down(s: Snapshot) -> Snapshot:
    return replace(s, held_term=None)


@dataclass(frozen=True)
class LeaseStatus:
    """For `cfs admin raft-status`: holder ('' = released), term, age of the last write."""

    holder: str
    term: int
    age_s: float
    revision: int
    lease_s: float
    handoff_to: str | None


OnAcquired = Callable[[int], Awaitable[None]]
OnLost = Callable[[int, str], Awaitable[None]]
_TRANSPORT = (nats.errors.Error, TimeoutError, OSError)  # temporary: retried next tick


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _parse(key: str, value: bytes | None) -> LeaseRecord:
    try:
        return LeaseRecord.model_validate_json(value or b"")
    except ValidationError as exc:
        raise LeaseError(f"lease {key!r} holds an unreadable record: {exc}") from None


async def _read(kv: KeyValue, key: str, timeout: float) -> tuple[LeaseRecord | None, int]:
    """(record, revision); (None, revision of the delete marker or 0) when absent."""
    try:
        async with asyncio.timeout(timeout):
            entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError as exc:
        return None, (exc.entry.revision or 0) if exc.entry is not None else 0
    return _parse(key, entry.value), entry.revision or 0


class Lease:
    """A fenced lease on one key of the `leases` bucket: a metadata shard's writer
    (`meta.<shard>`) or a site-singleton service (`service.<name>`). Runs `decide`;
    `is_holder` is what the owner checks before acting."""

    def __init__(
        self,
        bus: Bus,
        key: str,
        node: str,
        *,
        lease_s: float = 3.0,
        renew_s: float = 1.0,
        margin_s: float | None = None,
        bucket: str = "leases",
        eligible: Callable[[], bool] = lambda: True,
        acquire_delay: Callable[[], float] = lambda: 0.0,
        on_acquired: OnAcquired | None = None,
        on_lost: OnLost | None = None,
        spawn: Spawn | None = None,
    ) -> None:
        """`spawn` starts the lease loop's task: the service runtime's, so a loop that
        fails stops the service rather than leaving a holder that no longer renews."""
        margin = lease_s / 5 if margin_s is None else margin_s
        if not 0 < renew_s < lease_s - margin:
            raise ValueError(f"renew_s={renew_s} must be under lease_s - margin_s")
        self.key, self.node, self._bus, self._bucket = key, node, bus, bucket
        self._snap = Snapshot(node=node, lease_s=lease_s, renew_s=renew_s, margin_s=margin)
        self._eligible, self._on_acquired, self._on_lost = eligible, on_acquired, on_lost
        self._acquire_delay = acquire_delay
        self._spawn: Spawn = spawn or unsupervised
        self._op_timeout = max(renew_s, 0.5)
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._watch: KeyValue.KeyWatcher | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._reconnects = -1
        self._watch_failures = 0  # in a row
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._last_held: int | None = None
        self._stopping = False

    # -- what the owner reads ----------------------------------------------------------
    @property
    def is_holder(self) -> bool:
        return self._snap.holds(time.monotonic())

    @property
    def term(self) -> int:
        s = self._snap
        return s.held_term if s.held_term is not None else (s.record.term if s.record else 0)

    @property
    def holder(self) -> str | None:
        return (self._snap.record.holder or None) if self._snap.record else None

    @property
    def record(self) -> LeaseRecord | None:
        return self._snap.record

    @property
    def revision(self) -> int:
        return self._snap.revision

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"lease {self.key!r} already started")
        self._stopping = False
        self._task = self._spawn(self.run(), f"lease {self.key}")

    async def stop(self, release: bool = True) -> None:
        """Stop the loop (re-raising its failure, if any), then release our record."""
        task, self._task = self._task, None
        if task is not None:
            # Python 3.11's wait_for (inside nats-py requests) can swallow a cancel that
            # lands as a reply arrives; the flag ends the loop at its next wake-up anyway.
            self._stopping = True
            self._wake.set()
            await cancel_and_wait(task)
        s, rec = self._snap, self._snap.record
        if release and rec and rec.holder == self.node and rec.term == self._last_held:
            await self._release(s)
        failure = None if task is None or task.cancelled() else task.exception()
        if failure is not None:
            raise failure

    async def run(self) -> None:
        """The loop; for a task group (or use start/stop)."""
        try:
            while not self._stopping:
                await self._ensure_watch()
                self._wake.clear()
                await self._cycle()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wake_in(self._snap, _now())):
                        await self._wake.wait()
        except Exception:
            log.exception("lease.loop_failed", extra=self._extra(self.record, "crashed"))
            raise
        finally:
            await self._stop_watch()
            if self._snap.held_term is not None:
                await self._lose("lease loop stopped")

    # -- operator requests -------------------------------------------------------------
    async def request_handoff(self, target_node: str) -> None:
        """Ask the holder to hand over to `target_node` (`cfs admin raft-force-election`)."""
        kv = await self._kv_()
        for _ in range(10):  # the holder's renewals race with us
            record, revision = await _read(kv, self.key, self._op_timeout)
            if record is None:
                raise LeaseError(f"lease {self.key!r} has no record to hand off")
            if record.holder == target_node:
                return
            wanted = record.model_copy(update={"handoff_to": target_node})
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await kv.update(self.key, wanted.model_dump_json().encode(), last=revision)
                log.info("lease.handoff_requested", extra=self._extra(wanted, f"to {target_node}"))
                return
        raise LeaseError(f"lease {self.key!r} kept changing; handoff not requested")

    async def force_acquire(self) -> int:
        """DANGER (`raft-force-leader`): take the lease whoever holds it; returns the term.

        Still a CAS on the revision just read, so no two acquisitions share a term.
        """
        kv = await self._kv_()
        async with self._lock:
            for _ in range(10):
                record, revision = await _read(kv, self.key, self._op_timeout)
                self._snap = replace(self._snap, record=record, revision=revision)
                if await self._write(self._snap, Action.ACQUIRE, "forced by operator"):
                    return self.term
        raise LeaseError(f"lease {self.key!r} kept changing; not acquired")

    @staticmethod
    async def read_status(bus: Bus, key: str, *, bucket: str = "leases") -> LeaseStatus | None:
        record, revision = await _read(await bus.key_value(bucket), key, 5.0)
        if record is None:
            return None
        age = max(0, _wall_ms() - record.renewed_ms) / 1000
        return LeaseStatus(
            record.holder, record.term, age, revision, record.lease_s, record.handoff_to
        )

    # -- the runner --------------------------------------------------------------------
    async def _cycle(self) -> None:
        async with self._lock:
            s = self._snap = replace(
                self._snap, eligible=self._eligible(), acquire_delay_s=self._acquire_delay()
            )
            d = decide(s, _now())
            extra = self._extra(s.record, d.reason)
            quiet = d.action in (Action.WAIT, Action.RENEW)
            log.log(logging.DEBUG if quiet else logging.INFO, f"lease.{d.action}", extra=extra)
            if d.action is Action.STEP_DOWN:
                await self._lose(d.reason, logging.WARNING)
            elif d.action is Action.RELEASE:
                await self._lose(d.reason)  # before the release write: never two holders
            if d.action in (Action.ACQUIRE, Action.RENEW, Action.RELEASE):
                await self._write(s, d.action, d.reason)

    async def _release(self, s: Snapshot) -> None:
        """On stop: hand the lease back so a successor need not wait it out. Without NATS
        that cannot be done; the record lapses `lease_s` after our last renewal anyway."""
        if not self._bus.nc.is_connected:
            log.info("lease.release_skipped", extra=self._extra(s.record, "NATS unreachable"))
            return
        await self._write(s, Action.RELEASE, "stopping", failed_level=logging.INFO)

    async def _write(
        self, s: Snapshot, action: Action, reason: str, *, failed_level: int | None = None
    ) -> bool:
        """CAS-write `proposal(s, action)`; False on a lost race or a transport failure
        (logged at `failed_level`: by default INFO for an acquisition, else WARNING)."""
        kv = await self._kv_()
        record = proposal(s, action, _wall_ms())
        data, sent_at = record.model_dump_json().encode(), _now()
        try:
            async with asyncio.timeout(self._op_timeout):
                if s.revision == 0:
                    revision = await kv.create(self.key, data)
                else:
                    revision = await kv.update(self.key, data, last=s.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            log.info("lease.lost_race", extra=self._extra(s.record, f"{action}: revision moved"))
            await self._refresh()
            return False
        except _TRANSPORT as exc:
            level = failed_level or (logging.INFO if action is Action.ACQUIRE else logging.WARNING)
            why = f"{action} failed: {type(exc).__name__} {exc}".strip()
            log.log(level, "lease.write_failed", extra=self._extra(s.record, why))
            return False
        self._snap = wrote(self._snap, record, revision, sent_at, _now())
        if action is Action.ACQUIRE:
            self._last_held = record.term
            log.info("lease.acquired", extra=self._extra(record, reason))
            if self._on_acquired is not None:
                await self._on_acquired(record.term)
        return True

    async def _lose(self, reason: str, level: int = logging.INFO) -> None:
        term = self._snap.held_term
        self._snap = step_down(self._snap)
        if term is not None:
            log.log(
                level, "lease.lost", extra={**self._extra(self._snap.record, reason), "term": term}
            )
            if self._on_lost is not None:
                await self._on_lost(term, reason)

    async def _refresh(self) -> None:
        """Read the record now (start, lost race, watch restart)."""
        try:
            found = await _read(await self._kv_(), self.key, self._op_timeout)
        except _TRANSPORT as exc:  # the next tick tries again; the lease may lapse
            log.warning("lease.read_failed", extra=self._extra(self.record, repr(exc)))
        else:
            self._snap = observe(self._snap, *found, _now(), fresh=True)

    async def _ensure_watch(self) -> None:
        """A KV watch wakes the loop on every change; after a break, read and re-watch."""
        reconnects = self._bus.nc.stats["reconnects"]
        task = self._watch_task
        if task is not None and not task.done() and reconnects == self._reconnects:
            return
        if task is not None:
            failure = None if not task.done() or task.cancelled() else task.exception()
            why = repr(failure) if task.done() else "reconnected"
            level = logging.WARNING if task.done() else logging.INFO
            log.log(level, "lease.watch_restart", extra=self._extra(self.record, why))
            await self._stop_watch()
        await self._refresh()  # covers whatever a broken watch missed
        try:
            async with asyncio.timeout(self._op_timeout):
                self._watch = await (await self._kv_()).watch(self.key)
        except _TRANSPORT as exc:  # a get per tick until the watch is back
            self._watch_failures += 1
            # Once is a loaded server; repeatedly means this lease runs on reads alone.
            level = logging.INFO if self._watch_failures < 3 else logging.WARNING
            log.log(level, "lease.watch_failed", extra=self._extra(self.record, repr(exc)))
            return
        self._watch_failures = 0
        self._reconnects = reconnects
        self._watch_task = asyncio.create_task(self._follow(self._watch))

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # "initial values delivered" marker
                continue
            gone = entry.operation in (KV_DEL, KV_PURGE)
            record = None if gone else _parse(self.key, entry.value)
            self._snap = observe(self._snap, record, entry.revision or 0, _now())
            self._wake.set()

    async def _stop_watch(self) -> None:
        watcher, task, self._watch, self._watch_task = self._watch, self._watch_task, None, None
        await cancel_and_wait(task)
        if watcher is not None:
            with contextlib.suppress(*_TRANSPORT):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _kv_(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._bus.key_value(self._bucket)
        return self._kv

    def _extra(self, record: LeaseRecord | None, reason: str) -> dict[str, object]:
        term, holder = (record.term, record.holder) if record else (None, None)
        return dict(key=self.key, node=self.node, term=term, holder=holder, reason=reason)


def _now() -> float:
    return time.monotonic()


async def leases_held(bus: Bus, node: str, *, prefix: str = SHARD_LEASE_PREFIX) -> list[str]:
    """Keys of the leases (shard writers by default) that `node` holds right now."""
    held = []
    for key in await bucket_keys(bus, "leases", prefix):
        status = await Lease.read_status(bus, key)
        if status is not None and status.holder == node:
            held.append(key)
    return held
