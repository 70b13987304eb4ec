"""Work items of the group-commit loop: what to decide and whom to answer.

The loop decides items in order over one overlay, appends all their entries as
one journal message, then calls `finish` on each. Client operations that turn
out to cross shards leave the loop (`Diverted`) and come back later as a
`CoordinatorCommit` once their participants have prepared.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from opentelemetry.trace import Span

from cfs.ids import new_id
from cfs_contracts.events.metadata import DelInode, JournalEntry, TxClear
from cfs_contracts.fs.changes import TxRecord
from cfs_contracts.fs.records import Dentry, Inode
from cfs_contracts.fs.rpc import FsError, MutationOp, Reply, TxOp, TxStatus
from cfs_contracts.fs.shard_admin import ShardAdminReply
from cfs_metadata.decide import Decision, Placement, decide
from cfs_metadata.metrics import op_finished
from cfs_metadata.shard_admin import AdminOp
from cfs_metadata.state import ShardView
from cfs_metadata.txn import (
    NeedRemote,
    Remote,
    RemoteAwareView,
    coordinator_commit,
    decide_tx,
    dentry_key,
    entries_key,
    inode_key,
)

Respond = Callable[[Msg, Reply], Awaitable[None]]


class Diverted(Exception):
    """The operation needs other shards; a transaction driver takes it over."""

    def __init__(self, need: NeedRemote) -> None:
        super().__init__(need.key)
        self.need = need


class LockedView:
    """Refuse (EAGAIN) to read records a prepared transaction has locked."""

    def __init__(self, base: ShardView, locked: set[str]) -> None:
        self.base = base
        self.locked = locked
        self.shard = base.shard

    def _check(self, key: str) -> None:
        if key in self.locked:
            raise FsError(errno.EAGAIN, f"{key} is locked by a cross-shard transaction; retry")

    def inode(self, ino: int) -> Inode | None:
        self._check(inode_key(ino))
        return self.base.inode(ino)

    def dentry(self, parent: int, name: str) -> Dentry | None:
        self._check(dentry_key(parent, name))
        return self.base.dentry(parent, name)

    def dentries(self, parent: int, after_cookie: int = 0) -> Iterator[Dentry]:
        self._check(entries_key(parent))
        return self.base.dentries(parent, after_cookie)

    def has_entries(self, parent: int) -> bool:
        self._check(entries_key(parent))
        return self.base.has_entries(parent)

    def next_local(self) -> int:
        return self.base.next_local()

    def inode_count(self) -> int:
        return self.base.inode_count()

    def reserved_local(self, shard: int) -> int:
        return self.base.reserved_local(shard)

    def op_reply(self, op_id: str) -> Reply | None:
        return self.base.op_reply(op_id)

    def tx(self, tx_id: str) -> TxRecord | None:
        return self.base.tx(tx_id)

    def tombstone(self, ino: int) -> DelInode | None:
        return self.base.tombstone(ino)

    def remote_applied(self, peer: str) -> int:
        return self.base.remote_applied(peer)


def _future() -> asyncio.Future[Reply | None]:
    return asyncio.get_running_loop().create_future()


class _Awaited:
    """Items the leader submits itself: `finish` resolves the future its task awaits."""

    outcome: asyncio.Future[Reply | None]

    async def finish(self, reply: Reply) -> None:
        if not self.outcome.done():
            self.outcome.set_result(reply)


@dataclass
class ClientOp:
    """A POSIX mutation from a client."""

    op: MutationOp
    msg: Msg
    respond: Respond
    started: float = 0.0  # perf_counter at arrival (0: not timed)
    span: Span | None = None  # the request's server span, when it came traced

    def decide(self, view: ShardView, now: int, locked: set[str], place: Placement) -> Decision:
        guarded = RemoteAwareView(LockedView(view, locked), Remote())
        try:
            return decide(guarded, self.op, now, place)
        except NeedRemote as need:
            raise Diverted(need) from None

    def entry(self, decision: Decision) -> JournalEntry:
        return decision.entry(self.op)

    async def finish(self, reply: Reply) -> None:
        await self.respond(self.msg, reply)
        if self.started:
            op_finished(type(self.op).__name__, self.started, self.span)


@dataclass
class ShardTxOp:
    """A transaction step sent by another shard (reserve, prepare, decide, status)."""

    op: TxOp
    msg: Msg
    respond: Respond
    in_flight: set[str]

    def decide(self, view: ShardView, now: int, locked: set[str], place: Placement) -> Decision:
        if isinstance(self.op, TxStatus) and self.op.tx_id in self.in_flight:
            return Decision([], Reply(tx_state="pending"))
        return decide_tx(view, self.op, now, locked)

    def entry(self, decision: Decision) -> JournalEntry:
        return decision.entry(self.op)

    async def finish(self, reply: Reply) -> None:
        await self.respond(self.msg, reply)


@dataclass
class CoordinatorCommit(_Awaited):
    """The commit point of a cross-shard operation, decided again on current state."""

    op: MutationOp
    planned: Decision
    remote: Remote
    tx_id: str
    participants: tuple[int, ...]
    now: int
    outcome: asyncio.Future[Reply | None] = field(default_factory=_future)

    def decide(self, view: ShardView, now: int, locked: set[str], place: Placement) -> Decision:
        again = decide(
            RemoteAwareView(LockedView(view, locked), self.remote), self.op, self.now, place
        )
        if again.changes != self.planned.changes:
            raise FsError(errno.EAGAIN, "local records changed during the transaction")
        changes = coordinator_commit(again, self.tx_id, view.shard, self.participants, self.now)
        return Decision(changes, again.reply)

    def entry(self, decision: Decision) -> JournalEntry:
        return decision.entry(self.op)


@dataclass
class Internal(_Awaited):
    """A transaction step the leader takes on its own (resolve in doubt, forget)."""

    op: TxOp
    in_flight: set[str]
    outcome: asyncio.Future[Reply | None] = field(default_factory=_future)

    def decide(self, view: ShardView, now: int, locked: set[str], place: Placement) -> Decision:
        return decide_tx(view, self.op, now, locked)

    def entry(self, decision: Decision) -> JournalEntry:
        return decision.entry(self.op)


@dataclass
class Forget(_Awaited):
    """Drop a coordinator's record once every participant has the outcome."""

    tx_id: str
    outcome: asyncio.Future[Reply | None] = field(default_factory=_future)

    def decide(self, view: ShardView, now: int, locked: set[str], place: Placement) -> Decision:
        return Decision([TxClear(tx_id=self.tx_id)], Reply())

    def entry(self, decision: Decision) -> JournalEntry:
        return JournalEntry(
            op_id=new_id(), op="tx_forget", changes=tuple(decision.changes), reply=decision.reply
        )


@dataclass
class AdminStep:
    """A backup or restore step (`cfs_contracts.fs.shard_admin`); runs alone in the loop."""

    op: AdminOp
    msg: Msg
    respond: Callable[[Msg, ShardAdminReply], Awaitable[None]]

    async def finish(self, reply: ShardAdminReply) -> None:
        await self.respond(self.msg, reply)


WorkItem = ClientOp | ShardTxOp | CoordinatorCommit | Internal | Forget
