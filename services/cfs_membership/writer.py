"""Member records and CLUSTER events, written off the UDP loop.

The protocol loop only queues (`submit` never blocks); one task reads the
queue in order, merges each proposal with the stored `member.<node>` record
(`records.merge`), writes with compare-and-set on the revision it read, and
publishes the event only when its own write went in, so concurrent observers
produce one record and one event. NATS trouble is retried with backoff, never
dropped: the queue simply waits.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import ValidationError

from cfs.bus import Bus, BusError
from cfs_contracts.members import Liveness, MemberRecord, member_key
from cfs_membership.records import event_for, merge

log = logging.getLogger(__name__)

_TRANSPORT = (nats.errors.Error, TimeoutError, OSError)
_CAS_ATTEMPTS = 20
_BACKOFF_MAX_S = 2.0


@dataclass(frozen=True)
class Proposal:
    record: MemberRecord
    own: bool  # the node's own record (refreshes and rejoins are allowed)


class RecordWriter:
    def __init__(self, bus: Bus, kv: KeyValue, *, op_timeout: float = 5.0) -> None:
        self.bus = bus
        self.kv = kv
        self.op_timeout = op_timeout
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
        delay = 0.1
        while True:
            try:
                await self._write_once(proposal)
                return
            except _TRANSPORT as exc:
                log.warning(
                    "member.write_retry",
                    extra={
                        "node_id": proposal.record.node,
                        "state": proposal.record.state.value,
                        "error": f"{type(exc).__name__}: {exc}",
                        "retry_in_s": delay,
                    },
                )
                await asyncio.sleep(delay)
                delay = min(_BACKOFF_MAX_S, delay * 2)

    async def _write_once(self, proposal: Proposal) -> None:
        key = member_key(proposal.record.node)
        for _ in range(_CAS_ATTEMPTS):
            stored, revision = await self.read(proposal.record.node)
            record = merge(stored, proposal.record, own=proposal.own)
            if record is None:
                return  # someone already recorded this (or something newer)
            data = record.model_dump_json().encode()
            try:
                async with asyncio.timeout(self.op_timeout):
                    if revision == 0:
                        await self.kv.create(key, data)
                    else:
                        await self.kv.update(key, data, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another member wrote first: merge with what it wrote
            self.written += 1
            await self._announce(stored, record)
            return
        log.warning("member.write_contended", extra={"node_id": proposal.record.node})

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
        try:
            await self.bus.publish(event)
        except BusError as exc:
            log.error("member.event_failed", extra={**extra, "error": str(exc)})
            return
        self.events += 1
        level = logging.WARNING if record.state is Liveness.DOWN else logging.INFO
        log.log(level, f"member.{record.state.value}", extra=extra)
