"""Member records and CLUSTER events, written off the UDP loop.

The protocol loop only queues (`submit` never blocks); one task reads the
queue in order, merges each proposal with the stored `member.<node>` record
(`records.merge`), writes with compare-and-set on the revision it read, and
publishes the event only when its own write went in, so concurrent observers
produce one record and one event. Nothing is dropped: NATS trouble and lost
compare-and-set races are retried with backoff (`cfs.retry`), and the event of a
write that went in is published again, under the same id (deduplicated), until the
stream has it; the queue simply waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import ValidationError

from cfs.bus import Bus, BusError
from cfs.retry import Backoff, RetryPolicy, retry
from cfs_contracts.members import Liveness, MemberRecord, member_key
from cfs_membership.records import accuses, event_for, merge

log = logging.getLogger(__name__)

_TRANSPORT = (nats.errors.Error, TimeoutError, OSError)
# A lost race means another member wrote: re-read and merge at once, then spread out.
_CONTENDED = RetryPolicy("member record", deadline_s=None, first_delay_s=0.01, max_delay_s=0.5)


class RaceLost(Exception):
    """Another member wrote the record between our read and our write."""

    def __init__(self, node: str) -> None:
        super().__init__(f"member.{node} changed between read and write")


@dataclass(frozen=True)
class Proposal:
    record: MemberRecord
    own: bool  # the node's own record (refreshes and rejoins are allowed)


class RecordWriter:
    def __init__(
        self,
        bus: Bus,
        kv: KeyValue,
        *,
        op_timeout: float = 5.0,
        on_accused: Callable[[MemberRecord], None] | None = None,
    ) -> None:
        """`on_accused`: told the stored record when it calls this node SUSPECT or DOWN
        at an incarnation its own ALIVE record cannot override (`records.accuses`)."""
        self.bus = bus
        self.kv = kv
        self.op_timeout = op_timeout
        self.on_accused = on_accused
        self.written = 0
        self.events = 0
        self._queue: asyncio.Queue[Proposal] = asyncio.Queue()

    def submit(self, record: MemberRecord, *, own: bool = False) -> None:
        self._queue.put_nowait(Proposal(record, own))

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    async def drain(self, timeout: float) -> bool:
        """Until everything queued so far is written (False on timeout)."""
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            return False
        return True

    async def read(self, node: str) -> tuple[MemberRecord | None, int]:
        """The stored record and its revision ((None, 0 or delete marker) when absent)."""
        key = member_key(node)
        try:
            async with asyncio.timeout(self.op_timeout):
                entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError as exc:
            return None, (exc.entry.revision or 0) if exc.entry is not None else 0
        revision = entry.revision or 0
        try:
            return MemberRecord.model_validate_json(entry.value or b""), revision
        except ValidationError as exc:  # overwritten by the next proposal
            log.error("member.bad_record", extra={"key": key, "error": str(exc)})
            return None, revision

    async def run(self) -> None:
        while True:
            proposal = await self._queue.get()
            try:
                await self._write(proposal)
            finally:
                self._queue.task_done()

    async def _write(self, proposal: Proposal) -> None:
        ids = {"node_id": proposal.record.node, "state": proposal.record.state.value}
        unreachable = Backoff(
            RetryPolicy("member record", deadline_s=None, max_delay_s=2.0), extra=ids
        )
        contended = Backoff(_CONTENDED, extra=ids)
        while True:
            try:
                written = await self._write_once(proposal)
            except _TRANSPORT as exc:
                await unreachable.wait(exc)
                continue
            if written:
                return
            await contended.wait(RaceLost(proposal.record.node))

    async def _write_once(self, proposal: Proposal) -> bool:
        """Merge with the stored record and write it; False when another member wrote
        first (read again and merge with what it wrote)."""
        key = member_key(proposal.record.node)
        stored, revision = await self.read(proposal.record.node)
        if stored is not None and accuses(stored, proposal.record, own=proposal.own):
            log.warning(
                "member.accused",
                extra={"node_id": stored.node, "state": stored.state.value,
                       "incarnation": stored.incarnation, "by": stored.detected_by},
            )  # fmt: skip
            if self.on_accused is not None:
                self.on_accused(stored)  # refuted: our record comes again, incarnation up
            return True
        record = merge(stored, proposal.record, own=proposal.own)
        if record is None:
            return True  # someone already recorded this (or something newer)
        data = record.model_dump_json().encode()
        try:
            async with asyncio.timeout(self.op_timeout):
                if revision == 0:
                    await self.kv.create(key, data)
                else:
                    await self.kv.update(key, data, last=revision)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            # KeyNotFoundError: nats-py's `create` lost a race with a delete or a create
            # and re-read in between; either way another writer moved the key.
            return False
        self.written += 1
        await self._announce(stored, record)
        return True

    async def _announce(self, stored: MemberRecord | None, record: MemberRecord) -> None:
        payload = event_for(stored, record)
        extra = {
            "node_id": record.node,
            "state": record.state.value,
            "incarnation": record.incarnation,
            "detected_by": record.detected_by,
            "previous": stored.state.value if stored is not None else None,
        }
        if payload is None:
            log.debug("member.recorded", extra=extra)
            return
        event = self.bus.event(payload)
        extra["event_id"] = event.id
        extra["event_type"] = event.type
        policy = RetryPolicy(f"publish {event.type}", deadline_s=None, max_delay_s=2.0)
        try:  # the same event id every time: the stream keeps one copy
            await retry(lambda: self.bus.publish(event), policy, extra=extra)
        except BusError as exc:  # refused for good (a permission): nothing to wait for
            log.error("member.event_failed", extra={**extra, "error": str(exc)})
            return
        self.events += 1
        level = logging.WARNING if record.state is Liveness.DOWN else logging.INFO
        log.log(level, f"member.{record.state.value}", extra=extra)
