"""Drives cross-shard operations for the shard this replica leads (see txn.py).

One task per operation: read what `decide` needs from other shards, prepare
every participant, pass the commit point through the group-commit loop, answer
the client, then deliver the outcome to participants and forget the record.
Also resolves, after a leader change, transactions left in doubt.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from cfs.client import MetadataClient
from cfs.faults import crash_point
from cfs.ids import new_id
from cfs.kernel.runtime import cancel_and_wait
from cfs.retry import RetryPolicy, retry
from cfs_contracts.fs.rpc import (
    FsError,
    MutationOp,
    Reply,
    TxDecide,
    TxPrepare,
    TxRead,
    TxReserve,
    TxStatus,
)
from cfs_metadata.decide import Decision, Placement, decide
from cfs_metadata.metrics import op_finished
from cfs_metadata.projection import Projection
from cfs_metadata.txn import (
    NeedRemote,
    Remote,
    RemoteAwareView,
    expected_for,
    key_shard,
    split_changes,
)
from cfs_metadata.work import (
    ClientOp,
    CoordinatorCommit,
    Forget,
    Internal,
    Respond,
    WorkItem,
)

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 20
IN_DOUBT_AFTER_S = 2.0
DELIVER_BEFORE_REPLY_S = 2.0
# Delivering a transaction's outcome never gives up (the participant's records stay
# locked until it hears it); each failure already spent a whole metadata call's
# deadline, or is an error reply, so every retry is worth a warning.
_DELIVER_POLICY = RetryPolicy(
    "tx outcome delivery",
    temporary=lambda exc: isinstance(exc, FsError),
    deadline_s=None,
    first_delay_s=0.5,
    max_delay_s=5.0,
    quiet=0,
    loud_after=0,
)


@dataclass
class _Waiting:
    item: ClientOp
    msgs: list[Msg]


class Coordinator:
    def __init__(
        self,
        shard: int,
        projection: Projection,
        client: MetadataClient,
        submit: Callable[[WorkItem], None],
        respond: Respond,
        placement: Placement,
    ) -> None:
        self.shard = shard
        self.projection = projection
        self.client = client
        self.submit = submit
        self.respond = respond
        self.placement = placement
        self.in_flight: set[str] = set()  # tx ids whose outcome is not decided yet
        self._ops: dict[str, _Waiting] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- entry points ----------------------------------------------------------------
    def take(self, item: ClientOp) -> None:
        """A client operation that needs other shards; retries join the running one."""
        waiting = self._ops.get(item.op.op_id)
        if waiting is not None:
            waiting.msgs.append(item.msg)
            return
        self._ops[item.op.op_id] = _Waiting(item, [item.msg])
        self._spawn(self._run(item))

    def recover(self) -> None:
        """After becoming leader: finish what the journal says is committed or in doubt."""
        for tx in self.projection.txs():
            if tx.role == "coordinator" and tx.state == "committed":
                self._spawn(self._deliver(tx.tx_id, tx.participants, commit=True))
        self._spawn(self._resolve_in_doubt())

    async def stop(self) -> None:
        await asyncio.gather(*(cancel_and_wait(task) for task in list(self._tasks)))
        self._tasks.clear()
        self._ops.clear()
        self.in_flight.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("tx.task_failed", exc_info=task.exception(), extra={"shard": self.shard})

    # -- one operation ---------------------------------------------------------------
    async def _run(self, item: ClientOp) -> None:
        op = item.op
        remote = Remote()
        reply = Reply(errno=errno.EAGAIN, message="cross-shard operation kept conflicting")
        try:
            for _ in range(MAX_ATTEMPTS):
                now = time.time_ns()
                try:
                    planned = decide(
                        RemoteAwareView(self.projection, remote), op, now, self.placement
                    )
                except NeedRemote as need:
                    await self._fetch(need.key, remote)
                    continue
                except FsError as exc:
                    reply = Reply.error(exc)
                    break
                outcome = await self._transact(op, planned, remote, now)
                if outcome is not None:
                    reply = outcome
                    break
                remote = Remote(reserved=remote.reserved)  # re-read; keep reserved numbers
                await asyncio.sleep(0.01)
        except FsError as exc:
            reply = Reply.error(exc)
        finally:
            waiting = self._ops.pop(op.op_id, None)
        for msg in waiting.msgs if waiting else [item.msg]:
            await self.respond(msg, reply)
        if item.started:
            op_finished(type(op).__name__, item.started, item.span)

    async def _transact(
        self, op: MutationOp, planned: Decision, remote: Remote, now: int
    ) -> Reply | None:
        """Prepare, commit, deliver. None = conflicted or aborted: decide again."""
        parts = split_changes(planned.changes, self.shard)
        shards = set(parts) | {key_shard(k) for k in remote.records}
        participants = tuple(sorted(shards - {self.shard}))
        tx_id = new_id()
        self.in_flight.add(tx_id)
        prepared: list[int] = []
        try:
            for shard in participants:
                prepare = TxPrepare(
                    op_id=new_id(),
                    tx_id=tx_id,
                    coordinator=self.shard,
                    expected=expected_for(remote, shard),
                    changes=tuple(parts.get(shard, [])),
                )
                try:
                    await self.client.call(prepare, shard=shard, retry_conflicts=False)
                except FsError as exc:
                    if exc.errno != errno.EAGAIN:
                        raise
                    await self._deliver(tx_id, tuple(prepared), commit=False)
                    return None
                prepared.append(shard)
            crash_point("coordinator_prepared")
            commit = CoordinatorCommit(op, planned, remote, tx_id, participants, now)
            self.submit(commit)
            reply = await commit.outcome
            crash_point("coordinator_committed")
        finally:
            self.in_flight.discard(tx_id)
        if reply is None or (reply.errno == errno.EAGAIN and not reply.not_leader):
            await self._deliver(tx_id, participants, commit=False)
            return None
        if reply.not_leader:
            raise FsError(errno.EAGAIN, "lost the writer lease during a transaction")
        delivery = self._spawn(self._deliver(tx_id, participants, commit=True))
        # Answer once participants have applied the outcome, so the client's next
        # read on any shard sees it; an unreachable participant only delays the
        # answer by a bounded time (its locked records answer EAGAIN until then).
        done, _ = await asyncio.wait({delivery}, timeout=DELIVER_BEFORE_REPLY_S)
        if not done:
            log.warning("tx.reply_before_delivery", extra={"tx": tx_id, "shard": self.shard})
        return reply

    async def _fetch(self, key: str, remote: Remote) -> None:
        if key.startswith("a:"):
            shard = int(key[2:])
            reply = await self.client.call(TxReserve(op_id=new_id()), shard=shard)
            remote.reserved[shard] = reply.reserved
            return
        reply = await self.client.call(TxRead(keys=(key,)), shard=key_shard(key))
        for record in reply.records:
            remote.records[record.key] = record

    async def _deliver(self, tx_id: str, participants: tuple[int, ...], commit: bool) -> None:
        """Tell every participant the outcome (retried), then forget a committed record."""
        for shard in participants:
            await retry(
                functools.partial(self._tell_outcome, tx_id, shard, commit),
                _DELIVER_POLICY,
                extra={"tx": tx_id, "shard": shard},
                logger=log,
            )
        crash_point("coordinator_delivered" if commit else "coordinator_aborted")
        if commit:
            forget = Forget(tx_id)
            self.submit(forget)
            await forget.outcome

    async def _tell_outcome(self, tx_id: str, shard: int, commit: bool) -> None:
        await self.client.call(TxDecide(op_id=new_id(), tx_id=tx_id, commit=commit), shard=shard)

    async def _resolve_in_doubt(self) -> None:
        """Participant side: ask coordinators about transactions prepared long ago."""
        while True:
            await asyncio.sleep(IN_DOUBT_AFTER_S / 2)
            cutoff = time.time_ns() - int(IN_DOUBT_AFTER_S * 1e9)
            for tx in self.projection.txs():
                if tx.role != "participant" or tx.created_ns > cutoff:
                    continue
                try:
                    status = await self.client.call(
                        TxStatus(op_id=new_id(), tx_id=tx.tx_id), shard=tx.coordinator
                    )
                except FsError as exc:
                    log.warning("tx.status_unavailable", extra={"tx": tx.tx_id, "error": str(exc)})
                    continue
                if status.tx_state in ("committed", "aborted"):
                    step = Internal(
                        TxDecide(
                            op_id=new_id(), tx_id=tx.tx_id, commit=status.tx_state == "committed"
                        ),
                        self.in_flight,
                    )
                    self.submit(step)
                    await step.outcome
                    log.info("tx.resolved", extra={"tx": tx.tx_id, "outcome": status.tx_state})
