"""One shard on one node: a hot follower that becomes the fenced writer.

Follower: tail the journal, apply each message to the projection.
Leader (holds the shard lease): catch up to the end of the journal, append
`LeaderFenced{term}` with the expected last sequence, then serve requests:
reads from the projection, mutations through group commit. Every append
carries the expected last sequence, so a deposed writer's append fails and it
steps down; it can never fork the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import Span
from pydantic import ValidationError

from cfs.bus import Bus, BusError, SequenceConflict
from cfs.client import MetadataClient
from cfs.cluster import read_config
from cfs.faults import crash_point, fault_point
from cfs.hlc import observe
from cfs.ids import new_id
from cfs.kernel.runtime import Spawn, unsupervised
from cfs.lease import Lease
from cfs.retry import Backoff, RetryPolicy
from cfs.telemetry import child_span, server_span, traced_request
from cfs_contracts import ContractError, DecodedEvent
from cfs_contracts.envelope import HLC, EventPayload
from cfs_contracts.events.metadata import (
    JournalEntry,
    LeaderFenced,
    MetaCommitted,
    ShardImageChunk,
    ShardRestored,
)
from cfs_contracts.events.ops import CorruptionDetected
from cfs_contracts.fs.changes import PutInode
from cfs_contracts.fs.records import ROOT_INO, site_floor
from cfs_contracts.fs.rpc import (
    FindNames,
    FsError,
    MutationOp,
    Reply,
    Request,
    ScanChunks,
    TxDecide,
    TxOp,
    TxPrepare,
)
from cfs_contracts.fs.shard_admin import (
    ApplyRemote,
    RepairRecords,
    Republish,
    ShardAdminReply,
    ShardAdminRequest,
)
from cfs_contracts.geo import ActiveSite
from cfs_contracts.streams import (
    meta_admin_subject,
    meta_rpc_subject,
    shard_lease_key,
    shard_name,
)
from cfs_metadata.coordinator import Coordinator
from cfs_metadata.decide import bootstrap_entry, floor_entry
from cfs_metadata.journal import (
    Journal,
    JournalRecord,
    apply_record,
    cancel_and_wait,
    position_mismatch,
)
from cfs_metadata.merge import stamp_entry
from cfs_metadata.metrics import (
    APPLIED_SEQ,
    COMMITTED_OPS,
    JOURNAL_APPEND_SECONDS,
    JOURNAL_APPENDS,
    JOURNAL_APPLIED,
    LEADER,
    REPLICA_LAG,
    op_finished,
)
from cfs_metadata.pacing import CommitPacer
from cfs_metadata.projection import Projection
from cfs_metadata.reads import read, scan
from cfs_metadata.records import CorruptRecord
from cfs_metadata.shard_admin import (
    ShardState,
    decide_admin,
    decide_apply_remote,
    decide_repair,
    decide_republish,
)
from cfs_metadata.state import Overlay, apply_entries
from cfs_metadata.txn import change_lock_grants, locked_keys, placement
from cfs_metadata.work import AdminStep, ClientOp, Diverted, LockedView, ShardTxOp, WorkItem

log = logging.getLogger(__name__)


class Role(StrEnum):
    FOLLOWER = "follower"
    FENCING = "fencing"
    LEADER = "leader"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ReplicaSettings:
    lease_s: float = 0.8
    renew_s: float = 0.2
    max_batch_ops: int = 512
    max_batch_bytes: int = 512 * 1024
    commit_linger_s: float = 0.004  # see cfs_metadata.pacing
    append_timeout_s: float = 5.0
    shard_count: int = 1


class ShardReplica:
    def __init__(
        self,
        bus: Bus,
        shard_index: int,
        projection: Projection,
        settings: ReplicaSettings | None = None,
        may_lead: Callable[[], bool] = lambda: True,
        acquire_delay: Callable[[], float] = lambda: 0.0,
        spawn: Spawn = unsupervised,
        active_site: Callable[[], ActiveSite | None] = lambda: None,
    ) -> None:
        """`may_lead`: False while this node is draining (its leases move elsewhere).
        `active_site`: the replicated active-site record; while it fences this site,
        client mutations are refused (a failover drains the journal first).
        `acquire_delay`: extra wait before taking a free lease (spreads leases).
        `spawn`: starts the follower, leader and lease tasks; the service runtime's, so
        an unexpected failure in any of them ends the process (another replica takes
        the lease within a lease time) instead of leaving a holder that serves nobody."""
        self.bus = bus
        self._spawn = spawn
        self._active_site = active_site
        self.shard_index = shard_index
        self.shard = shard_name(shard_index)
        self.projection = projection
        self.settings = settings or ReplicaSettings()
        self.journal = Journal(bus, shard_index)
        self.role = Role.STOPPED
        self.term = projection.term
        self._caught_up = False
        self._release_first = False  # stepped down still holding the lease (see _may_hold)
        self._locked: set[str] = set()  # keys held by prepared transactions (leader only)
        self._queue: asyncio.Queue[WorkItem | AdminStep] = asyncio.Queue()
        self._pacer = CommitPacer(self.settings.commit_linger_s)
        self.placement = placement(self.settings.shard_count)
        self.coordinator = Coordinator(
            shard_index,
            projection,
            MetadataClient(bus, deadline_s=self.settings.append_timeout_s * 3),
            self._queue.put_nowait,
            self._respond,
            self.placement,
        )
        self._follower: asyncio.Task[None] | None = None
        self._leader: asyncio.Task[None] | None = None
        self._lag = REPLICA_LAG.labels(self.shard)
        self._applied_seq = APPLIED_SEQ.labels(self.shard)
        self._leading = LEADER.labels(self.shard)
        self._append_seconds = JOURNAL_APPEND_SECONDS
        self._site_index_read: int | None = None
        self._rpc: Subscription | None = None
        self._admin_rpc: Subscription | None = None
        self.lease = Lease(
            bus,
            shard_lease_key(self.shard),
            bus.node,
            lease_s=self.settings.lease_s,
            renew_s=self.settings.renew_s,
            eligible=lambda: self._may_hold(may_lead),
            acquire_delay=acquire_delay,
            on_acquired=self._on_acquired,
            on_lost=self._on_lost,
            spawn=spawn,
        )

    def _site_fence(self) -> tuple[int, Reply | None]:
        return fenced_reply(self._active_site(), self.bus.site)

    def _may_hold(self, may_lead: Callable[[], bool]) -> bool:
        """Lease eligibility: caught up and allowed to lead.

        After stepping down while still holding the lease (an append refused although
        the record names us, e.g. by a journal re-seeded after quorum loss), not
        eligible until the lease loop has let it go: leading only starts on an
        acquisition, and a fast catch-up must not keep a lease that leads nobody.
        """
        if self._release_first:
            if self.lease.is_holder:
                return False
            self._release_first = False
        return self._caught_up and may_lead()

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self.role = Role.FOLLOWER
        self._follower = self._spawn(self._follow(), f"follow-{self.shard}")
        # Learnt now, while JetStream answers: a takeover after a server's loss must not
        # wait out the `nodes` bucket's own election to read it (up to 11 s measured).
        self._spawn(self._site_index(lambda: False), f"site-index-{self.shard}")
        await self.lease.start()

    async def stop(self) -> None:
        self.role = Role.STOPPED
        await self.lease.stop(release=True)
        await self._stop_serving()
        await cancel_and_wait(self._leader)
        await cancel_and_wait(self._follower)

    @property
    def caught_up(self) -> bool:
        return self._caught_up

    async def rebuild(self, reason: str) -> None:
        """Wipe the projection and replay the shard from its journal, the truth, while
        the process runs (`cfs admin metadata-repair`: records damaged or different on
        this replica). A writer steps down first; as it is not caught up, its lease is
        released and a healthy replica takes it. Leading is possible again once the
        replay has reached the journal's end."""
        if self.role is Role.STOPPED:
            return
        log.info(
            "projection.rebuild",
            extra={
                "shard": self.shard,
                "role": self.role.value,
                "applied_seq": self.projection.applied_seq,
                "reason": reason,
            },
        )
        await self._step_down(f"rebuild: {reason}")
        follower = self._follower
        while follower is not None and not follower.done():
            # Again if needed: a cancel landing as a reply arrives can be swallowed by
            # Python 3.11's wait_for (inside nats-py), and the tail would go on applying.
            follower.cancel()
            await asyncio.wait([follower], timeout=1.0)
        self._caught_up = False
        self.projection.reset()
        self.term = 0
        self._follower = self._spawn(self._follow(), f"follow-{self.shard}")

    # -- follower --------------------------------------------------------------------
    async def _follow(self) -> None:
        """Tail the journal from the projection's position; flag when caught up."""
        backoff = Backoff(
            RetryPolicy(f"journal tail of shard {self.shard}", deadline_s=None, max_delay_s=2.0),
            extra={"shard": self.shard},
        )
        while True:
            try:
                # Tail at once: stream info may time out for seconds while JetStream
                # re-elects after a server loss, and the tail does not need it.
                with contextlib.suppress(BusError, TimeoutError):
                    last = await asyncio.wait_for(self.journal.last_seq(), 1.0)
                    await self._check_position(last)
                    if last <= self.projection.applied_seq:
                        self._mark_caught_up()
                async for record in self.journal.tail(self.projection.applied_seq + 1):
                    self._apply_record(record)
                    if record.pending is not None:
                        self._lag.set(record.pending)
                    backoff.reset()
                    if record.pending == 0:
                        self._mark_caught_up()
            except BusError as exc:
                await backoff.wait(exc)
            except ContractError as exc:
                # A journal message this release cannot read: never skip it silently.
                log.error(
                    "follower.unreadable_journal",
                    extra={
                        "shard": self.shard,
                        "seq": self.projection.applied_seq + 1,
                        "error": str(exc),
                    },
                )
                await asyncio.sleep(5.0)

    def _mark_caught_up(self) -> None:
        """The follower reached the journal's end: it may take the lease from now on."""
        if not self._caught_up:
            self._caught_up = True
            log.info(
                "follower.caught_up",
                extra={"shard": self.shard, "seq": self.projection.applied_seq},
            )

    async def _check_position(self, last: int) -> None:
        """Rebuild the projection if the journal no longer holds what it applied.

        After a quorum-loss re-seed the journal is the survivor's copy: it may end
        before the projection's sequence (a quorum of lost servers acknowledged
        messages this replica applied), or hold another message at that sequence
        (new appends after the re-seed). The journal is the truth: wipe and replay.
        """
        reason = await position_mismatch(self.journal, self.projection, last)
        if not reason:
            return
        log.warning(
            "projection.rebuilt",
            extra={
                "shard": self.shard,
                "applied_seq": self.projection.applied_seq,
                "journal_last_seq": last,
                "reason": reason,
            },
        )
        self._caught_up = False
        self.projection.reset()
        self.term = 0

    def _apply_record(self, record: JournalRecord) -> None:
        if record.seq <= self.projection.applied_seq:
            return  # already applied (we wrote it as leader, or a redelivery)
        self._observe(record.event.envelope.hlc)
        apply_record(self.projection, record)
        self.term = self.projection.term
        JOURNAL_APPLIED.inc()
        self._applied_seq.set(record.seq)

    def _observe(self, stamp: HLC | None) -> None:
        """Keep this node's clock past every stamp it has seen: a writer's next message
        is then stamped after everything that caused it (snapshot cuts rely on it)."""
        if stamp is not None:
            observe(self.bus.clock, stamp)

    # -- leadership ------------------------------------------------------------------
    async def _on_acquired(self, term: int) -> None:
        if self.role is Role.STOPPED:
            return
        await cancel_and_wait(self._leader)
        self._leader = self._spawn(self._lead(term), f"lead-{self.shard}")

    async def _on_lost(self, term: int, reason: str) -> None:
        # INFO: the lease loop has logged why (a WARNING when it had to step down, INFO
        # for a release it chose: stopping, draining, a requested handoff).
        log.info("leader.lost", extra={"shard": self.shard, "term": term, "reason": reason})
        await self._step_down(reason)

    async def _lead(self, term: int) -> None:
        self.role = Role.FENCING
        await cancel_and_wait(self._follower)
        try:
            fenced_at = await self._fence(term)
        except (BusError, SequenceConflict) as exc:
            log.warning(
                "leader.fence_failed", extra={"shard": self.shard, "term": term, "error": str(exc)}
            )
            await self._step_down(f"fence failed: {exc}")
            return
        log.info("leader.fenced", extra={"shard": self.shard, "term": term, "seq": fenced_at})
        needs_root = self.shard_index == 1 and self.projection.inode(ROOT_INO) is None
        if needs_root and not await self._commit([bootstrap_entry(time.time_ns(), new_id())]):
            return  # stepped down; the next writer creates the root
        site_index = await self._site_index(lambda: not self.lease.is_holder)
        if site_index is None:
            await self._step_down("lease lost while reading the site index")
            return
        floor = site_floor(site_index)
        moved = floor_entry(floor, new_id())
        if self.projection.next_local() < floor and not await self._commit([moved]):
            return  # stepped down; the next writer moves the counter
        self._locked = locked_keys(self.projection.txs())
        self.role = Role.LEADER
        self._leading.set(1)
        self._lag.set(0)
        if not self.projection.held:  # a held shard waits for its replay first
            self.coordinator.recover()
        self._rpc = await self.bus.nc.subscribe(
            meta_rpc_subject(self.bus.site, self.shard), queue="leader", cb=self._on_request
        )
        self._admin_rpc = await self.bus.nc.subscribe(
            meta_admin_subject(self.bus.site, self.shard), queue="leader", cb=self._on_admin
        )
        await self._commit_loop()

    async def _site_index(self, give_up: Callable[[], bool]) -> int | None:
        """This site's index among replicated sites (its inode numbers' range: fixed at
        init, so read once); None if `give_up()` (the lease went) while JetStream did
        not answer."""
        if self._site_index_read is None:
            backoff = Backoff(
                RetryPolicy(f"site index for shard {self.shard}", deadline_s=None, max_delay_s=1.0),
                extra={"shard": self.shard},
            )
            while self._site_index_read is None:
                try:
                    config = await read_config(self.bus)
                    self._site_index_read = config.site_index if config is not None else 0
                except nats.js.errors.BucketNotFoundError:
                    self._site_index_read = 0  # a bare test journal: one site
                except (BusError, nats.errors.Error, TimeoutError) as exc:
                    if give_up():
                        return None
                    await backoff.wait(exc)
        return self._site_index_read

    async def _fence(self, term: int) -> int:
        """Catch up to the journal's end, then append LeaderFenced at exactly that point.

        While the journal's own Raft group elects a leader, reads and appends fail
        for a few seconds: keep trying as long as the lease is ours.
        """
        fence = LeaderFenced(shard=self.shard, term=term, leader=self.bus.node)
        backoff = Backoff(
            RetryPolicy(f"fence of shard {self.shard}", deadline_s=None, max_delay_s=1.0),
            extra={"shard": self.shard, "term": term},
        )
        while True:
            try:
                return await self._fence_once(fence)
            except SequenceConflict:
                raise
            except BusError as exc:
                if not self.lease.is_holder:
                    raise
                await backoff.wait(exc)

    async def _fence_once(self, fence: LeaderFenced) -> int:
        term = fence.term
        while True:
            last = await self.journal.last_seq()
            mismatch = await position_mismatch(self.journal, self.projection, last)
            if mismatch:  # a re-seeded journal: step down, the follower rebuilds
                raise SequenceConflict(
                    self.journal.stream,
                    self.journal.subject,
                    self.projection.applied_seq,
                    f"{mismatch} (journal ends at {last})",
                )
            async for record in self.journal.read_range(self.projection.applied_seq + 1, last):
                self._apply_record(record)
            envelope = self.bus.event(fence)
            try:
                ack = await self.journal.append(
                    envelope,
                    self.projection.applied_seq,
                    self.settings.append_timeout_s,
                )
            except SequenceConflict:
                if not self.lease.is_holder:
                    raise
                continue  # the old writer appended meanwhile: read it, then fence again
            self.projection.apply(ack.seq, term=term, msg_id=envelope.id)
            self.term = term
            return ack.seq

    async def _step_down(self, reason: str) -> None:
        if self.role in (Role.LEADER, Role.FENCING):
            log.info("leader.step_down", extra={"shard": self.shard, "reason": reason})
            # Not eligible until the follower has caught up again: if we still hold the
            # lease, the lease loop releases it (`_may_hold`), so a new term starts from
            # the journal. A running follower's tail keeps `_caught_up` itself (a
            # quiet journal delivers nothing that would set it again).
            self._caught_up = False
            self._release_first = self.lease.is_holder
        await self._stop_serving()
        self._leading.set(0)
        if self.role is Role.STOPPED:
            return
        self.role = Role.FOLLOWER
        current = asyncio.current_task()
        if self._leader is not None and self._leader is not current:
            await cancel_and_wait(self._leader)
        if self._follower is None or self._follower.done():
            self._follower = self._spawn(self._follow(), f"follow-{self.shard}")

    async def _stop_serving(self) -> None:
        for sub in (self._rpc, self._admin_rpc):
            if sub is not None and not self.bus.nc.is_closed:
                await sub.unsubscribe()
        self._rpc = self._admin_rpc = None
        await self.coordinator.stop()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, AdminStep):
                await item.finish(_admin_not_leader(self.shard))
            else:
                await item.finish(_not_leader(self.shard))

    # -- serving ---------------------------------------------------------------------
    async def _on_request(self, msg: Msg) -> None:
        try:
            request = Request.model_validate_json(msg.data)
        except ValidationError as exc:
            err = exc.errors()[0]
            await self._respond(
                msg, Reply(errno=errno.EINVAL, message=f"bad request: {err['msg']}")
            )
            return
        if self.role is not Role.LEADER or not self.lease.is_holder:
            await self._respond(msg, _not_leader(self.shard))
            return
        self._observe(request.hlc)
        op = request.body
        if isinstance(op, TxOp):
            self._queue.put_nowait(ShardTxOp(op, msg, self._respond, self.coordinator.in_flight))
            return
        started = time.perf_counter()
        span = None
        if traced_request(msg.headers):  # the untraced request builds no span name
            span = server_span(f"metadata {type(op).__name__}", msg.headers)
        if isinstance(op, MutationOp):
            self._queue.put_nowait(ClientOp(op, msg, self._respond, started, span))
            return
        try:
            if isinstance(op, ScanChunks | FindNames):
                reply = scan(self.projection, op)
            else:
                reply = read(LockedView(self.projection, self._locked), op)
        except FsError as exc:
            reply = Reply.error(exc)
        except CorruptRecord as exc:
            reply = await self._corruption(exc)
        await self._respond(msg, reply)
        op_finished(type(op).__name__, started, span)

    async def _commit_loop(self) -> None:
        """Group commit: everything that queued up while the last append was in flight."""
        carry: list[WorkItem] = []
        step: AdminStep | None = None
        while True:
            if step is not None:
                if not await self._admin_step(step):
                    return
                step = None
            first = carry[0] if carry else await self._queue.get()
            if isinstance(first, AdminStep):
                step = first
                continue
            batch = carry or [first]
            fault_point("commit_loop")
            step = self._take_queued(batch)
            if step is None:
                step = await self._wait_for_company(batch)
            self._pacer.committed(len(batch))
            committed, carry = await self._decide_and_commit(batch)
            if not committed:
                for item in carry:
                    await item.finish(_not_leader(self.shard))
                if step is not None:
                    await step.finish(_admin_not_leader(self.shard))
                return

    async def _wait_for_company(self, batch: list[WorkItem]) -> AdminStep | None:
        """Let requests that usually come together join `batch`, for at most the
        pacer's linger (`cfs_metadata.pacing`); an admin step ends the wait."""
        limit = self.settings.max_batch_ops
        deadline = asyncio.get_running_loop().time() + self._pacer.linger_s
        while self._pacer.wants_more(len(batch), limit):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            try:
                item = await asyncio.wait_for(self._queue.get(), left)
            except TimeoutError:
                return None
            if isinstance(item, AdminStep):
                return item
            batch.append(item)
            step = self._take_queued(batch)
            if step is not None:
                return step
        return None

    def _take_queued(self, batch: list[WorkItem]) -> AdminStep | None:
        """Move what is queued into `batch` (up to the limit); an admin step stops it
        and is returned, to run after this batch, alone."""
        while not self._queue.empty() and len(batch) < self.settings.max_batch_ops:
            item = self._queue.get_nowait()
            if isinstance(item, AdminStep):
                return item
            batch.append(item)
        return None

    async def _decide_and_commit(self, batch: list[WorkItem]) -> tuple[bool, list[WorkItem]]:
        """Decide items in order over an overlay, append them as one message, then answer.

        Returns (committed, items left for the next batch because this one is full).
        """
        overlay = Overlay(self.projection)
        held = _held_reply(self.projection)
        fenced = self._site_fence()[1]
        locked = set(self._locked)
        now = time.time_ns()
        entries: list[JournalEntry] = []
        answered: list[tuple[WorkItem, Reply]] = []
        carry: list[WorkItem] = []
        size = 0
        for index, item in enumerate(batch):
            if size >= self.settings.max_batch_bytes:
                carry = batch[index:]
                break
            if held and isinstance(item, ClientOp | ShardTxOp):
                answered.append((item, held))
                continue
            if fenced and isinstance(item, ClientOp):  # steps of transactions finish
                answered.append((item, fenced))
                continue
            try:
                decision = item.decide(overlay, now, locked, self.placement)
            except Diverted:
                assert isinstance(item, ClientOp)
                self.coordinator.take(item)  # answered by the transaction driver
                continue
            except FsError as exc:
                answered.append((item, Reply.error(exc)))
                continue
            except CorruptRecord as exc:
                answered.append((item, await self._corruption(exc)))
                continue
            if not decision.changes:
                answered.append((item, decision.reply))
            else:
                # stamped against the state before it, for the other site's merge
                entry = stamp_entry(item.entry(decision), overlay, now + index, self.bus.site)
                answered.append((item, with_directories(entry)))
                apply_entries(overlay, [entry])
                locked |= change_lock_grants(entry.changes)
                entries.append(entry)
                size += _approx_bytes(entry)
        # Error replies may depend on earlier items of this batch: answer all after the commit.
        if entries:
            # The commit joins the trace of the first traced request it carries.
            with child_span("metadata commit", _first_span(batch)):
                committed = await self._commit(entries)
            COMMITTED_OPS.inc(len(entries))
        else:
            committed = True
        if committed:
            if any(c.c in ("tx", "tx_clear") for e in entries for c in e.changes):
                self._locked = locked_keys(self.projection.txs())
            _participant_crash_points(answered)
        for item, reply in answered:
            await item.finish(reply if committed else _not_leader(self.shard))
        return committed, carry

    async def _commit(self, entries: list[JournalEntry]) -> bool:
        """Append one batch; True once it is durable in the journal and applied."""
        payload = MetaCommitted(shard=self.shard, term=self.term, entries=tuple(entries))
        return await self._append(payload) is not None

    async def _append(self, payload: EventPayload, *, remote: bool = False) -> int | None:
        """Append one message and apply it; its sequence, or None when deposed.

        The same envelope (same id) is retried while the lease is ours, so an
        append whose ack was lost during a journal leader election is stored once.
        """
        envelope = self.bus.event(payload)
        while True:
            if not self.lease.is_holder:
                await self._step_down("lease expired before the append was acknowledged")
                return None
            try:
                started = time.perf_counter()
                ack = await self.journal.append(
                    envelope,
                    self.projection.applied_seq,
                    self.settings.append_timeout_s,
                    remote=remote,
                )
                self._append_seconds.observe(time.perf_counter() - started)
                JOURNAL_APPENDS.inc()
                break
            except SequenceConflict as exc:
                await self._step_down(f"deposed: {exc}")
                return None
            except BusError as exc:
                # Outcome unknown: never answer without the ack; retry the same event.
                log.warning("leader.append_retry", extra={"shard": self.shard, "error": str(exc)})
        decoded = DecodedEvent(envelope=envelope, payload=payload, stored_version=envelope.v)
        self._apply_record(JournalRecord(ack.seq, decoded))
        return ack.seq

    # -- backup and restore steps (DESIGN.md §9) ---------------------------------------
    async def _on_admin(self, msg: Msg) -> None:
        try:
            request = ShardAdminRequest.model_validate_json(msg.data)
        except ValidationError as exc:
            err = exc.errors()[0]
            reply = ShardAdminReply(errno=errno.EINVAL, message=f"bad request: {err['msg']}")
            await self._respond_admin(msg, reply)
            return
        if self.role is not Role.LEADER or not self.lease.is_holder:
            await self._respond_admin(msg, _admin_not_leader(self.shard))
            return
        self._observe(request.hlc)
        cut = getattr(request.body, "cut", None)
        self._observe(cut)  # a snapshot marker is stamped after its cut
        self._queue.put_nowait(AdminStep(request.body, msg, self._respond_admin))

    async def _admin_step(self, step: AdminStep) -> bool:
        """One backup/restore step, alone in the commit loop; False when deposed."""
        installing = self.projection.installing
        state = ShardState(
            shard=self.shard,
            term=self.term,
            applied_seq=self.projection.applied_seq,
            inodes=self.projection.inode_count(),
            lineage=self.projection.lineage,
            installing=installing.snapshot_id if installing else None,
            next_chunk=installing.next_chunk if installing else 0,
            fence_epoch=self._site_fence()[0],
        )
        if isinstance(step.op, RepairRecords):
            decision = decide_repair(state, self.projection, self._locked, step.op)
        elif isinstance(step.op, ApplyRemote):
            decision = decide_apply_remote(
                state, self.projection, self._locked, step.op, self.bus.site
            )
        elif isinstance(step.op, Republish):
            decision = decide_republish(
                state, self.projection, step.op, time.time_ns(), self.bus.site
            )
        else:
            decision = decide_admin(state, step.op)
        reply = decision.reply
        if decision.event is not None and not reply.errno:
            was_held = self.projection.held
            seq = await self._append(decision.event, remote=decision.remote)
            if seq is None:
                await step.finish(_admin_not_leader(self.shard))
                return False
            reply = reply.model_copy(
                update={
                    "seq": seq,
                    "applied_seq": seq,
                    "inodes": self.projection.inode_count(),
                    "lineage": self.projection.lineage,
                }
            )
            if was_held and not self.projection.held:
                self.coordinator.recover()
        if isinstance(decision.event, ShardRestored | ShardImageChunk):
            self._locked = locked_keys(self.projection.txs())
        await step.finish(reply)
        return True

    async def _respond_admin(self, msg: Msg, reply: ShardAdminReply) -> None:
        if msg.reply:
            stamped = reply.model_copy(update={"hlc": self.bus.clock.now()})
            await self.bus.nc.publish(msg.reply, stamped.model_dump_json().encode())

    async def _corruption(self, exc: CorruptRecord) -> Reply:
        log.error("metadata.corruption", extra={"shard": self.shard, "error": str(exc)})
        event = CorruptionDetected(
            component="metadata-raft",
            object_id=exc.what,
            detail=str(exc),
            expected_checksum=f"0x{exc.expected:08x}",
            actual_checksum=f"0x{exc.actual:08x}",
        )
        try:
            await self.bus.publish(self.bus.event(event), timeout=2.0)
        except BusError as err:
            log.error("metadata.corruption_event_failed", extra={"error": str(err)})
        return Reply(errno=errno.EIO, message=str(exc))

    async def _respond(self, msg: Msg, reply: Reply) -> None:
        if msg.reply:
            stamped = reply.model_copy(update={"hlc": self.bus.clock.now()})
            await self.bus.nc.publish(msg.reply, stamped.model_dump_json().encode())


# A sealed inode is ~400 bytes of JSON, each chunk of its map ~250 more; estimating
# avoids serializing every entry twice. The journal's 1 MiB message limit is enforced
# exactly when the batch is encoded.
_APPROX_CHANGE_BYTES = 600
_APPROX_CHUNK_REF_BYTES = 250


def _approx_bytes(entry: JournalEntry) -> int:
    """An entry's size in the journal, about: inodes (a deletion's tombstone too) weigh
    with their chunk maps, or a batch of big files' commits could pass the limit."""
    refs = 0
    for change in entry.changes:
        inode = getattr(change, "inode", None)
        if inode is not None:
            refs += len(inode.chunks)
    return _APPROX_CHANGE_BYTES * len(entry.changes) + _APPROX_CHUNK_REF_BYTES * refs


def with_directories(entry: JournalEntry) -> Reply:
    """The reply, and the directories the entry changed as they are now (not journaled):
    a mount answers the kernel's getattr of the parent after a create without asking."""
    if entry.reply.errno or entry.reply.inodes:
        return entry.reply
    dirs = tuple(c.inode for c in entry.changes if isinstance(c, PutInode) and c.inode.is_dir)
    return entry.reply.model_copy(update={"inodes": dirs}) if dirs else entry.reply


def _participant_crash_points(answered: list[tuple[WorkItem, Reply]]) -> None:
    """Recovery tests stop a participant right after it journaled a step, before replying."""
    for item, reply in answered:
        if isinstance(item, ShardTxOp) and not reply.errno:
            if isinstance(item.op, TxPrepare):
                crash_point("participant_prepared")
            elif isinstance(item.op, TxDecide):
                crash_point("participant_decided")


def _first_span(batch: list[WorkItem]) -> Span | None:
    """The server span of the batch's first traced client request, if any."""
    for item in batch:
        if isinstance(item, ClientOp) and item.span is not None:
            return item.span
    return None


def _admin_not_leader(shard: str) -> ShardAdminReply:
    return ShardAdminReply(not_leader=True, message=f"not the writer of shard {shard}")


def _held_reply(projection: Projection) -> Reply | None:
    lineage = projection.lineage
    if lineage is None or not lineage.held:
        return None
    return Reply(
        errno=errno.EROFS,
        message=f"shard {projection.shard:03d} was restored from snapshot "
        f"{lineage.snapshot_id} and is read-only until `cfs admin replay-journal` "
        "finishes (or `cfs admin replay-journal --none`)",
    )


def fenced_reply(record: ActiveSite | None, site: str) -> tuple[int, Reply | None]:
    """(epoch, EROFS reply) while `record` fences `site`; (0, None) otherwise."""
    if record is None or record.fenced != site:
        return 0, None
    return record.epoch, Reply(
        errno=errno.EROFS,
        message=f"site {site} takes no new writes: {record.reason or 'fenced'} "
        f"({record.changed_by})",
    )


def _not_leader(shard: str) -> Reply:
    return Reply(
        errno=errno.EAGAIN, message=f"not the leader of shard {shard}; retry", not_leader=True
    )
