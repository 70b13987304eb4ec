"""The repair coordinator: one active per site (lease `service.repair`), resumable.

The kernel runs `lead` only while this process holds the lease. It watches the nodes
view (no polling): on every change of a member or lifecycle record, and when a DOWN
node's grace period ends (`next_check_s`), it decides which nodes need their
fragments re-protected (`due`, pure) and works through them one at a time: every
shard's files that name the node, in inode order, chunk by chunk, writing the cursor
`repair.<node>` after every page with compare-and-set, so the next holder resumes
exactly there and a deposed holder can never overwrite it. While it holds the lease
the kernel also feeds it `FragmentDamaged` reports (`on_damage`), rebuilt in place.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue

from cfs.bus import Bus, BusError, Delivery, Retry
from cfs.client.chunks import FragmentError, Unrecoverable
from cfs.client.metadata import MetadataClient
from cfs.client.nodes import NodeView
from cfs.client.tier import TierIndex
from cfs.ids import new_id
from cfs.kernel.runtime import until_jetstream_answers
from cfs.lease import leases_held
from cfs.retry import Backoff, RetryPolicy, any_bus_error
from cfs.telemetry import counter, gauge
from cfs_contracts import DecodedEvent
from cfs_contracts.data import parse_fragment_key
from cfs_contracts.events.cluster import NodeDrained
from cfs_contracts.events.data import FragmentDamaged
from cfs_contracts.events.repair import (
    ChunkLost,
    FragmentRebuilt,
    RepairCompleted,
    RepairProgress,
    RepairStarted,
)
from cfs_contracts.fs import rpc
from cfs_contracts.fs.records import ChunkRef, Inode
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.members import (
    Lifecycle,
    Liveness,
    MemberRecord,
    NodeAdmin,
    RepairJob,
    admin_key,
    repair_key,
)
from cfs_contracts.streams import NODES
from cfs_repair.plan import Reason, plan_chunk
from cfs_repair.rebuild import NoTarget, Placed, Rebuilder, path_of

log = logging.getLogger(__name__)

# Repair progress (README: telemetry); the per-job figures are RepairProgress events.
RUNNING = gauge("repair_jobs_running", "node repairs this coordinator is running now")
COMPLETED = counter("repair_jobs_completed", "node repairs finished by this coordinator")
FILES_SCANNED = counter("repair_files_scanned", "files scanned for fragments of repaired nodes")
FRAGMENTS_REBUILT = counter("repair_fragments_rebuilt", "fragments rebuilt onto other nodes")
BYTES_REBUILT = counter("repair_rebuilt_bytes", "bytes of rebuilt fragments written")
CHUNKS_LOST = counter("repair_chunks_lost", "chunks found with too few fragments to rebuild")

PAGE = 32
COMMIT_CHUNKS = 64  # chunks of one file whose moves share one MoveFragments
PROGRESS_EVERY_S = 2.0
DRAIN_LEASE_WAIT_S = 30.0


def due(
    members: dict[str, MemberRecord],
    admin: dict[str, NodeAdmin],
    jobs: dict[str, RepairJob],
    now_ms: int,
    grace_s: float,
) -> list[tuple[str, Reason, int]]:
    """(node, reason, trigger_ms) for every node whose fragments must move now.

    Removed and draining nodes go at once; a DOWN node (or one that left the
    membership gracefully: its fragments are just as unreachable) after
    `grace_s`, as it may only be rebooting. A finished job for the same trigger is not repeated.
    """
    found: list[tuple[str, Reason, int]] = []
    for node in sorted(set(members) | set(admin)):
        record, lifecycle = members.get(node), admin.get(node)
        if lifecycle is not None and lifecycle.lifecycle is Lifecycle.REMOVED:
            wanted: tuple[Reason, int] | None = (Reason.REMOVED, lifecycle.since_ms)
        elif lifecycle is not None and lifecycle.lifecycle is Lifecycle.DRAINING:
            wanted = (Reason.DRAINING, lifecycle.since_ms)
        elif (
            record is not None
            and record.state in (Liveness.DOWN, Liveness.LEFT)
            and now_ms - record.since_ms >= grace_s * 1000
        ):
            wanted = (Reason.DOWN, record.since_ms)
        else:
            wanted = None
        if wanted is None:
            continue
        job = jobs.get(node)
        if (
            job is not None
            and job.done_ms
            and (job.reason, job.trigger_ms)
            == (
                wanted[0].value,
                wanted[1],
            )
        ):
            continue
        found.append((node, wanted[0], wanted[1]))
    return found


IDLE_CHECK_S = 60.0  # a safety net: every change of interest wakes the coordinator at once


def next_check_s(
    members: dict[str, MemberRecord], now_ms: int, grace_s: float, idle_s: float = IDLE_CHECK_S
) -> float:
    """Seconds until the earliest DOWN (or LEFT) node's grace period ends, at most `idle_s`."""
    waits = [
        (record.since_ms + grace_s * 1000 - now_ms) / 1000
        for record in members.values()
        if record.state in (Liveness.DOWN, Liveness.LEFT)
    ]
    pending = [wait for wait in waits if wait > 0]
    return min([idle_s, *pending])


@dataclass
class Settings:
    node: str
    shards: int
    grace_s: float
    parallel_chunks: int


class LeaseLost(Exception):
    """Another coordinator wrote a repair cursor: this one no longer holds the lease."""


class RepairCoordinator:
    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        meta: MetadataClient,
        nodes: NodeView,
        rebuilder: Rebuilder,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.meta = meta
        self.nodes = nodes
        self.rebuilder = rebuilder
        self._kv: KeyValue | None = None
        self._revisions: dict[str, int] = {}  # repair.<node> revisions this holder wrote
        self.tier = TierIndex(bus)

    async def lead(self) -> None:
        """The singleton's work: decide and repair on every relevant change, until the
        kernel cancels it (lease lost) or another coordinator's cursor write shows that
        this one was deposed."""
        self._kv = await until_jetstream_answers(
            "nodes bucket", lambda: self.bus.key_value(NODES.bucket)
        )
        self._revisions.clear()
        retry = Backoff(
            RetryPolicy("repair cycle", deadline_s=None, first_delay_s=1.0, max_delay_s=30.0),
            extra={"node": self.settings.node},
        )
        while True:
            seen = self.nodes.version
            try:
                wait_s = await self.cycle()
            except LeaseLost as exc:
                log.warning("repair.deposed", extra={"node": self.settings.node, "error": str(exc)})
                return
            except Exception as exc:
                if not (isinstance(exc, FsError) or any_bus_error(exc)):
                    raise  # a bug: the kernel ends the process, another node leads
                await retry.wait(exc)  # logs the failure, louder as it repeats
                continue
            retry.reset()
            await self.nodes.wait_changed(seen, timeout=wait_s, kinds=("member", "admin"))

    async def cycle(self) -> float:
        """Repair every node that is due now; seconds until the next check is needed."""
        jobs = await self._jobs()
        now_ms = time.time_ns() // 1_000_000
        members, admin = dict(self.nodes.members), dict(self.nodes.admin)
        for node, reason, trigger in due(members, admin, jobs, now_ms, self.settings.grace_s):
            await self.repair_node(node, reason, trigger, jobs.get(node))
        return next_check_s(members, time.time_ns() // 1_000_000, self.settings.grace_s)

    # -- one node ------------------------------------------------------------------------
    async def repair_node(
        self, node: str, reason: Reason, trigger_ms: int, previous: RepairJob | None
    ) -> RepairJob:
        resumed = (
            previous is not None
            and not previous.done_ms
            and (previous.reason, previous.trigger_ms) == (reason.value, trigger_ms)
        )
        job = (
            previous
            if resumed and previous is not None
            else RepairJob(
                node=node,
                job_id=new_id(),
                reason=reason.value,
                trigger_ms=trigger_ms,
                started_ms=time.time_ns() // 1_000_000,
            )
        )
        await self._save(job)
        await self._event(
            RepairStarted(node_id=node, job_id=job.job_id, reason=reason.value, resumed=resumed)
        )
        log.info("repair.started", extra={"node": node, "job": job.job_id, "reason": reason})
        started = time.monotonic()
        ticker = asyncio.create_task(self._report_progress(lambda: job))
        RUNNING.inc()
        try:
            for shard in range(job.shard, self.settings.shards + 1):
                after = job.after_ino if shard == job.shard else 0
                while True:
                    reply = await self.meta.call(
                        rpc.ScanChunks(shard=shard, after_ino=after, node=node, limit=PAGE)
                    )
                    job = job.model_copy(
                        update={"files_scanned": job.files_scanned + len(reply.inodes)}
                    )
                    FILES_SCANNED.inc(len(reply.inodes))

                    def count(fragments: int, written: int, lost: int) -> None:
                        nonlocal job
                        FRAGMENTS_REBUILT.inc(fragments)
                        BYTES_REBUILT.inc(written)
                        CHUNKS_LOST.inc(lost)
                        job = job.model_copy(
                            update={
                                "fragments_rebuilt": job.fragments_rebuilt + fragments,
                                "bytes_rebuilt": job.bytes_rebuilt + written,
                                "chunks_lost": job.chunks_lost + lost,
                            }
                        )

                    await self._repair_files(node, reason, reply.inodes, count)
                    job = job.model_copy(
                        update={
                            "shard": shard,
                            "after_ino": reply.cursor,
                            "progress_ms": time.time_ns() // 1_000_000,
                        }
                    )
                    await self._save(job)
                    if not reply.cursor:
                        break
                    after = reply.cursor
                job = job.model_copy(update={"shard": min(shard + 1, self.settings.shards)})
        finally:
            RUNNING.dec()
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        if reason is Reason.DRAINING:
            await self._wait_leases_released(node)  # before "done": a failure retries
        job = job.model_copy(update={"done_ms": time.time_ns() // 1_000_000})
        await self._save(job)
        seconds = time.monotonic() - started
        COMPLETED.inc()
        await self._event(
            RepairCompleted(
                node_id=node,
                job_id=job.job_id,
                reason=reason.value,
                fragments_rebuilt=job.fragments_rebuilt,
                bytes_rebuilt=job.bytes_rebuilt,
                chunks_lost=job.chunks_lost,
                seconds=seconds,
            )
        )
        log.info(
            "repair.completed",
            extra={
                "node": node,
                "job": job.job_id,
                "fragments": job.fragments_rebuilt,
                "bytes": job.bytes_rebuilt,
                "lost": job.chunks_lost,
                "seconds": round(seconds, 2),
            },
        )
        if reason is Reason.DRAINING:
            admin = self.nodes.admin.get(node)
            await self._drained(node, job, len(admin.leases) if admin else 0)
        return job

    async def _repair_files(
        self,
        node: str,
        reason: Reason,
        inodes: tuple[Inode, ...],
        count: Callable[[int, int, int], None],
    ) -> None:
        """Every chunk of one page of files; `count(fragments, bytes, lost)` as each
        batch of a file is committed to its chunk map."""
        slots = asyncio.Semaphore(self.settings.parallel_chunks)

        async def chunk(ino: int, ref: ChunkRef) -> tuple[list[Placed], int]:
            async with slots:
                return await self._repair_chunk(node, reason, ino, ref)

        async def file(inode: Inode) -> None:
            for start in range(0, len(inode.chunks), COMMIT_CHUNKS):
                batch = inode.chunks[start : start + COMMIT_CHUNKS]
                done = await asyncio.gather(*(chunk(inode.ino, ref) for ref in batch))
                moved = await self.rebuilder.commit(inode.ino, [p for ps, _ in done for p in ps])
                if reason is Reason.DRAINING:
                    await self.rebuilder.release(node, moved)
                count(len(moved), sum(p.size for p in moved), sum(lost for _, lost in done))

        await asyncio.gather(*(file(inode) for inode in inodes))

    async def _report_progress(self, current: Callable[[], RepairJob]) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            try:
                await self._event(_progress(current()))
            except BusError as exc:
                log.warning("repair.progress_unpublished", extra={"error": str(exc)})

    async def _repair_chunk(
        self, node: str, reason: Reason, ino: int, chunk: ChunkRef
    ) -> tuple[list[Placed], int]:
        """The chunk's fragments re-created (not yet in the map), and 1 if it is lost."""
        down = {n for n, m in self.nodes.members.items() if m.state is not Liveness.ALIVE}
        plan = plan_chunk(
            ino,
            chunk,
            node,
            self.nodes.eligible(0),
            unusable=down - {node},
            copyable=reason is Reason.DRAINING,
        )
        if plan is None:
            return [], 0
        for attempt in range(3):
            try:
                return await self.rebuilder.place(plan, node), 0
            except Unrecoverable as exc:
                if await self.tier.off_flash(chunk.chunk_id):
                    # Evicted (tiered mode): S3 holds it; a read brings it back.
                    log.info("repair.chunk_in_s3", extra={"ino": ino, "chunk": chunk.index})
                    return [], 0
                path = await path_of(self.meta, ino)
                await self._event(
                    ChunkLost(
                        node_id=node,
                        ino=ino,
                        path=path,
                        chunk_index=chunk.index,
                        chunk_id=chunk.chunk_id,
                        scheme=chunk.scheme,
                        available=exc.available,
                        needed=exc.needed,
                    )
                )
                log.error(
                    "repair.chunk_lost",
                    extra={"ino": ino, "path": path, "chunk": chunk.index, "detail": str(exc)},
                )
                return [], 1
            except (NoTarget, FragmentError) as exc:
                log.warning(
                    "repair.chunk_retry",
                    extra={"ino": ino, "chunk": chunk.index, "attempt": attempt, "error": str(exc)},
                )
                await asyncio.sleep(1.0 + attempt)
        raise FsError(
            errno.EIO, f"inode {ino} chunk {chunk.index}: rebuild kept failing; retrying later"
        )

    async def _wait_leases_released(self, node: str) -> None:
        deadline = time.monotonic() + DRAIN_LEASE_WAIT_S
        while remaining := await leases_held(self.bus, node):
            if time.monotonic() > deadline:
                raise FsError(errno.EBUSY, f"{node} still holds leases {remaining}; retrying")
            await asyncio.sleep(0.5)

    async def _drained(self, node: str, job: RepairJob, leases: int) -> None:
        admin = NodeAdmin(
            node=node,
            lifecycle=Lifecycle.DRAINED,
            since_ms=time.time_ns() // 1_000_000,
            requested_by=f"repair@{self.settings.node}",
            reason=f"drain job {job.job_id} finished",
        )
        assert self._kv is not None
        # Compare-and-set from DRAINING only: a `node-remove` that came in while the job
        # ran must not be overwritten by "drained".
        try:
            entry = await self._kv.get(admin_key(node))
        except nats.js.errors.KeyNotFoundError:
            log.info("repair.drained_superseded", extra={"node_id": node, "lifecycle": None})
            return
        current = NodeAdmin.model_validate_json(entry.value) if entry.value else None
        if current is None or current.lifecycle is Lifecycle.DRAINING:
            try:
                await self._kv.update(
                    admin_key(node), admin.model_dump_json().encode(), last=entry.revision
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                log.info("repair.drained_superseded", extra={"node_id": node})
        else:
            log.info(
                "repair.drained_superseded",
                extra={"node_id": node, "lifecycle": current.lifecycle.value},
            )
        await self._event(
            NodeDrained(node_id=node, fragments_moved=job.fragments_rebuilt, leases_moved=leases)
        )

    # -- damaged fragments ---------------------------------------------------------------
    async def on_damage(self, event: DecodedEvent, delivery: Delivery) -> None:
        """The `repair-damaged` consumer's handler (the kernel runs it while leading)."""
        report = event.payload
        if not isinstance(report, FragmentDamaged) or report.reason == "unreachable":
            return  # an unreachable node is membership's and the node jobs' business
        if not self.nodes.usable(report.node_id):
            return  # the node's own repair job re-homes everything it held
        stores = [c.node for c in self.nodes.eligible(0)]
        try:
            written = await self.rebuilder.rebuild_in_place(report.node_id, report.key, stores)
        except Unrecoverable as exc:
            if await self.tier.off_flash(parse_fragment_key(report.key)[0]):
                log.info("repair.fragment_in_s3", extra={"key": report.key})
                return  # evicted on purpose (tiered mode): no damage
            log.error("repair.fragment_unrecoverable", extra={"key": report.key, "error": str(exc)})
            return
        except (FragmentError, NoTarget) as exc:
            raise Retry(str(exc)) from None
        source: Any = "scrub" if report.reported_by.endswith("/scrub") else "reader"
        await self._event(FragmentRebuilt(node_id=report.node_id, key=report.key, source=source))
        log.info(
            "repair.fragment_rebuilt",
            extra={"node": report.node_id, "key": report.key, "bytes": written},
        )

    # -- plumbing ------------------------------------------------------------------------
    async def _jobs(self) -> dict[str, RepairJob]:
        """Every node's job record, and its revision for the next compare-and-set."""
        assert self._kv is not None
        jobs: dict[str, RepairJob] = {}
        for node in set(self.nodes.members) | set(self.nodes.admin):
            try:
                entry = await self._kv.get(repair_key(node))
            except nats.js.errors.KeyNotFoundError:
                self._revisions[node] = 0
                continue
            self._revisions[node] = entry.revision or 0
            if entry.value:
                jobs[node] = RepairJob.model_validate_json(entry.value)
        return jobs

    async def _save(self, job: RepairJob) -> None:
        """Compare-and-set on the revision this holder last read or wrote: a write by
        any other coordinator in between means this one was deposed (LeaseLost)."""
        assert self._kv is not None
        key, data = repair_key(job.node), job.model_dump_json().encode()
        revision = self._revisions.get(job.node, 0)
        try:
            if revision:
                revision = await self._kv.update(key, data, last=revision)
            else:
                revision = await self._kv.create(key, data)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise LeaseLost(f"{key} changed under this coordinator") from None
        self._revisions[job.node] = revision

    async def _event(self, payload: Any) -> None:
        await self.bus.publish(self.bus.event(payload), timeout=10.0)


def _progress(job: RepairJob) -> RepairProgress:
    return RepairProgress(
        node_id=job.node,
        job_id=job.job_id,
        files_scanned=job.files_scanned,
        fragments_rebuilt=job.fragments_rebuilt,
        bytes_rebuilt=job.bytes_rebuilt,
        chunks_lost=job.chunks_lost,
    )
