"""Cross-shard operations, the pure parts (DESIGN.md §4).

The coordinator (the shard the client asked) runs the ordinary `decide` on a
view that answers for its own shard and, for other shards, from records it read
from them (`NeedRemote` says what is still missing). The changes are split by
owning shard; each participant *prepares* its share (checks that what the
coordinator read is still true, records the changes and locks their keys), the
coordinator then commits its share together with the outcome in one journal
append (the commit point), and participants apply or drop theirs. A crash at
any point leaves the old or the new state: participants ask the coordinator
about transactions they hold, and a coordinator that does not know a
transaction records it as aborted before answering.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from cfs_contracts.events.metadata import (
    Change,
    DelDentry,
    DelInode,
    PutDentry,
    PutInode,
    SetNextLocal,
    TxClear,
    TxPut,
)
from cfs_contracts.fs.changes import TxRecord
from cfs_contracts.fs.records import Dentry, Inode, shard_of
from cfs_contracts.fs.rpc import (
    FsError,
    RemoteRecord,
    Reply,
    TxDecide,
    TxOp,
    TxPrepare,
    TxReserve,
    TxStatus,
)
from cfs_metadata.decide import Decision, Placement
from cfs_metadata.state import ShardView


class NeedRemote(Exception):
    """`decide` touched a record of another shard that has not been read yet."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def inode_key(ino: int) -> str:
    return f"i:{ino}"


def dentry_key(parent: int, name: str) -> str:
    return f"d:{parent}:{name}"


def entries_key(parent: int) -> str:
    return f"e:{parent}"


def key_shard(key: str) -> int:
    return shard_of(int(key.split(":", 2)[1]))


def placement(shard_count: int) -> Placement:
    """Shard of a new directory: a hash of (parent, name), so load spreads."""

    def place(parent: int, name: str) -> int:
        digest = hashlib.blake2b(f"{parent}/{name}".encode(), digest_size=8).digest()
        return int.from_bytes(digest) % shard_count + 1

    return place


@dataclass
class Remote:
    """What the coordinator knows of other shards for one operation."""

    records: dict[str, RemoteRecord] = field(default_factory=dict)
    reserved: dict[int, int] = field(default_factory=dict)  # shard -> reserved local number


class RemoteAwareView:
    """Own shard from `local`; other shards from `remote`, else `NeedRemote`."""

    def __init__(self, local: ShardView, remote: Remote) -> None:
        self.local = local
        self.remote = remote
        self.shard = local.shard

    def _record(self, key: str) -> RemoteRecord:
        found = self.remote.records.get(key)
        if found is None:
            raise NeedRemote(key)
        return found

    def inode(self, ino: int) -> Inode | None:
        if shard_of(ino) == self.shard:
            return self.local.inode(ino)
        return self._record(inode_key(ino)).inode

    def dentry(self, parent: int, name: str) -> Dentry | None:
        if shard_of(parent) == self.shard:
            return self.local.dentry(parent, name)
        return self._record(dentry_key(parent, name)).dentry

    def dentries(self, parent: int, after_cookie: int = 0) -> Iterator[Dentry]:
        if shard_of(parent) == self.shard:
            return self.local.dentries(parent, after_cookie)
        raise NeedRemote(entries_key(parent))  # listings never cross shards

    def has_entries(self, parent: int) -> bool:
        if shard_of(parent) == self.shard:
            return self.local.has_entries(parent)
        return bool(self._record(entries_key(parent)).nonempty)

    def next_local(self) -> int:
        return self.local.next_local()

    def inode_count(self) -> int:
        return self.local.inode_count()

    def reserved_local(self, shard: int) -> int:
        if shard not in self.remote.reserved:
            raise NeedRemote(f"a:{shard}")
        return self.remote.reserved[shard]

    def op_reply(self, op_id: str) -> Reply | None:
        return self.local.op_reply(op_id)

    def tx(self, tx_id: str) -> TxRecord | None:
        return self.local.tx(tx_id)

    def tombstone(self, ino: int) -> DelInode | None:
        return self.local.tombstone(ino)

    def remote_applied(self, peer: str) -> int:
        return self.local.remote_applied(peer)


def read_records(view: ShardView, keys: Iterable[str]) -> tuple[RemoteRecord, ...]:
    """Participant side of TxRead: the current value under each key."""
    out = []
    for key in keys:
        kind, _, rest = key.partition(":")
        try:
            if kind == "d":
                parent, _, name = rest.partition(":")
                out.append(RemoteRecord(key=key, dentry=view.dentry(int(parent), name)))
            elif kind == "i":
                out.append(RemoteRecord(key=key, inode=view.inode(int(rest))))
            elif kind == "e":
                out.append(RemoteRecord(key=key, nonempty=view.has_entries(int(rest))))
            else:
                raise ValueError(kind)
        except ValueError:
            raise FsError(errno.EINVAL, f"bad record key {key!r}") from None
    return tuple(out)


def change_shard(change: Change, local_shard: int) -> int:
    match change:
        case PutInode(inode=inode):
            return shard_of(inode.ino)
        case DelInode(ino=ino):
            return shard_of(ino)
        case PutDentry(dentry=dentry):
            return shard_of(dentry.parent)
        case DelDentry(parent=parent):
            return shard_of(parent)
        case _:
            return local_shard


def split_changes(changes: Iterable[Change], local_shard: int) -> dict[int, list[Change]]:
    by_shard: dict[int, list[Change]] = {}
    for change in changes:
        by_shard.setdefault(change_shard(change, local_shard), []).append(change)
    return by_shard


def change_locks(changes: Iterable[Change]) -> set[str]:
    keys: set[str] = set()
    for change in changes:
        match change:
            case PutInode(inode=inode):
                keys.add(inode_key(inode.ino))
            case DelInode(ino=ino):
                keys.add(inode_key(ino))
            case PutDentry(dentry=dentry):
                keys |= {dentry_key(dentry.parent, dentry.name), entries_key(dentry.parent)}
            case DelDentry(parent=parent, name=name):
                keys |= {dentry_key(parent, name), entries_key(parent)}
    return keys


def expected_for(remote: Remote, shard: int) -> tuple[RemoteRecord, ...]:
    return tuple(r for k, r in sorted(remote.records.items()) if key_shard(k) == shard)


def locked_keys(txs: Iterable[TxRecord]) -> set[str]:
    return {key for tx in txs if tx.state == "prepared" for key in tx.locks}


def change_lock_grants(changes: Iterable[Change]) -> set[str]:
    """Keys newly locked by prepared transactions among `changes` (within one batch)."""
    return locked_keys(c.tx for c in changes if isinstance(c, TxPut))


# -- participant and coordinator handlers (pure) -------------------------------------
def decide_tx(view: ShardView, op: TxOp, now_ns: int, locked: set[str]) -> Decision:
    match op:
        case TxReserve():
            local = view.next_local()
            return Decision([SetNextLocal(value=local + 1)], Reply(reserved=local))
        case TxPrepare():
            return _prepare(view, op, now_ns, locked)
        case TxDecide():
            return _decide_outcome(view, op)
        case TxStatus():
            return _status(view, op)


def _prepare(view: ShardView, op: TxPrepare, now_ns: int, locked: set[str]) -> Decision:
    existing = view.tx(op.tx_id)
    if existing is not None:  # a retried prepare
        return Decision([], Reply(tx_state=existing.state))
    reads = {r.key for r in op.expected}
    locks = change_locks(op.changes) | reads
    busy = locks & locked
    if busy:
        raise FsError(errno.EAGAIN, f"records {sorted(busy)[:3]} are locked by another transaction")
    current = {r.key: r for r in read_records(view, sorted(reads))}
    for record in op.expected:
        if current[record.key] != record:
            raise FsError(errno.EAGAIN, f"{record.key} changed since it was read; retry")
    tx = TxRecord(
        tx_id=op.tx_id,
        role="participant",
        state="prepared",
        coordinator=op.coordinator,
        changes=op.changes,
        locks=tuple(sorted(locks)),
        created_ns=now_ns,
    )
    return Decision([TxPut(tx=tx)], Reply(tx_state="prepared"))


def _decide_outcome(view: ShardView, op: TxDecide) -> Decision:
    tx = view.tx(op.tx_id)
    if tx is None or tx.role != "participant":
        return Decision([], Reply(tx_state="unknown"))  # already resolved: idempotent
    changes: list[Change] = list(tx.changes) if op.commit else []
    changes.append(TxClear(tx_id=op.tx_id))
    return Decision(changes, Reply(tx_state="committed" if op.commit else "aborted"))


def _status(view: ShardView, op: TxStatus) -> Decision:
    """Coordinator side; the runner answers `pending` itself for transactions in flight."""
    tx = view.tx(op.tx_id)
    if tx is not None and tx.role == "coordinator":
        return Decision([], Reply(tx_state=tx.state))
    # Never heard of it: it did not commit. Record that, so it never will.
    record = TxRecord(tx_id=op.tx_id, role="coordinator", state="aborted", coordinator=view.shard)
    return Decision([TxPut(tx=record)], Reply(tx_state="aborted"))


def coordinator_commit(
    decision: Decision, tx_id: str, shard: int, participants: Iterable[int], now_ns: int
) -> list[Change]:
    """The coordinator's share of the changes plus the durable outcome, in one entry."""
    parts = tuple(sorted(participants))
    local = split_changes(decision.changes, shard).get(shard, [])
    record = TxRecord(
        tx_id=tx_id,
        role="coordinator",
        state="committed",
        coordinator=shard,
        participants=parts,
        created_ns=now_ns,
    )
    return [*local, TxPut(tx=record)]
