"""Shard state seen by the pure state machine, and how changes apply to it.

`ShardView` is what `decide` reads; `ShardWriter` is what `apply` writes.
`MemoryShard` implements both (tests, reference); `Overlay` stages a group
commit's changes over the committed state so later operations in the same
batch see earlier ones; the rocksdict projection implements both for real.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from cfs_contracts.events.metadata import (
    Change,
    DelDentry,
    DelInode,
    JournalEntry,
    PutDentry,
    PutInode,
    SetNextLocal,
    SetRemoteApplied,
    TxClear,
    TxPut,
)
from cfs_contracts.fs.changes import TxRecord
from cfs_contracts.fs.records import Dentry, Inode
from cfs_contracts.fs.rpc import Reply


class ShardView(Protocol):
    shard: int

    def inode(self, ino: int) -> Inode | None: ...

    def dentry(self, parent: int, name: str) -> Dentry | None: ...

    def dentries(self, parent: int, after_cookie: int = 0) -> Iterator[Dentry]:
        """Entries of `parent` in cookie order, strictly after `after_cookie`."""
        ...

    def has_entries(self, parent: int) -> bool: ...

    def next_local(self) -> int: ...

    def inode_count(self) -> int: ...

    def reserved_local(self, shard: int) -> int:
        """A local number reserved in another shard (cross-shard mkdir); composite views only."""
        ...

    def op_reply(self, op_id: str) -> Reply | None: ...

    def tx(self, tx_id: str) -> TxRecord | None: ...

    def tombstone(self, ino: int) -> DelInode | None:
        """How `ino` was deleted, while the shard keeps it (cross-site merge)."""
        ...

    def remote_applied(self, peer: str) -> int:
        """The last message of `peer`'s journal applied here (0: none)."""
        ...


class Scannable(Protocol):
    """Whole-shard iteration, for repair and lost-data reports (not on the hot path)."""

    def scan_inodes(self, after_ino: int = 0) -> Iterator[Inode]:
        """Inodes in inode-number order, strictly after `after_ino`."""
        ...

    def scan_dentries(self) -> Iterator[Dentry]: ...


class ShardWriter(Protocol):
    def put_inode(self, inode: Inode) -> None: ...

    def del_inode(self, ino: int) -> None: ...

    def put_dentry(self, dentry: Dentry) -> None: ...

    def del_dentry(self, parent: int, name: str) -> None: ...

    def set_next_local(self, value: int) -> None: ...

    def record_reply(self, op_id: str, reply: Reply) -> None: ...

    def put_tx(self, tx: TxRecord) -> None: ...

    def clear_tx(self, tx_id: str) -> None: ...

    def put_tombstone(self, deleted: DelInode) -> None: ...

    def set_remote_applied(self, peer: str, seq: int) -> None: ...


def apply_change(target: ShardWriter, change: Change) -> None:
    match change:
        case PutInode(inode=inode):
            target.put_inode(inode)
        case DelInode(ino=ino, inode=gone):
            target.del_inode(ino)
            if gone is not None:
                target.put_tombstone(change)
        case PutDentry(dentry=dentry):
            target.put_dentry(dentry)
        case DelDentry(parent=parent, name=name):
            target.del_dentry(parent, name)
        case SetNextLocal(value=value):
            target.set_next_local(value)
        case TxPut(tx=tx):
            target.put_tx(tx)
        case TxClear(tx_id=tx_id):
            target.clear_tx(tx_id)
        case SetRemoteApplied(peer=peer, seq=seq):
            target.set_remote_applied(peer, seq)


def apply_entries(target: ShardWriter, entries: Iterable[JournalEntry]) -> None:
    """Pure replay rule: the changes in order, then the reply kept for retries."""
    for entry in entries:
        for change in entry.changes:
            apply_change(target, change)
        target.record_reply(entry.op_id, entry.reply)


class SingleShard:
    """Views of one shard never hold numbers reserved in another shard."""

    def reserved_local(self, shard: int) -> int:
        raise RuntimeError(f"no inode number reserved in shard {shard} by this view")


class MemoryShard(SingleShard):
    """Dict-backed shard state; the reference implementation of both protocols."""

    def __init__(self, shard: int = 1) -> None:
        self.shard = shard
        self.inodes: dict[int, Inode] = {}
        self.dirs: dict[int, dict[str, Dentry]] = {}
        self.replies: dict[str, Reply] = {}
        self.txs: dict[str, TxRecord] = {}
        self.tombstones: dict[int, DelInode] = {}
        self.remote: dict[str, int] = {}
        self.local = 1

    def inode(self, ino: int) -> Inode | None:
        return self.inodes.get(ino)

    def dentry(self, parent: int, name: str) -> Dentry | None:
        return self.dirs.get(parent, {}).get(name)

    def dentries(self, parent: int, after_cookie: int = 0) -> Iterator[Dentry]:
        entries = sorted(self.dirs.get(parent, {}).values(), key=lambda d: d.cookie)
        return (d for d in entries if d.cookie > after_cookie)

    def has_entries(self, parent: int) -> bool:
        return bool(self.dirs.get(parent))

    def scan_inodes(self, after_ino: int = 0) -> Iterator[Inode]:
        return (self.inodes[i] for i in sorted(self.inodes) if i > after_ino)

    def scan_dentries(self) -> Iterator[Dentry]:
        return (d for entries in self.dirs.values() for d in entries.values())

    def next_local(self) -> int:
        return self.local

    def inode_count(self) -> int:
        return len(self.inodes)

    def op_reply(self, op_id: str) -> Reply | None:
        return self.replies.get(op_id)

    def tx(self, tx_id: str) -> TxRecord | None:
        return self.txs.get(tx_id)

    def tombstone(self, ino: int) -> DelInode | None:
        return self.tombstones.get(ino)

    def put_tombstone(self, deleted: DelInode) -> None:
        self.tombstones[deleted.ino] = deleted

    def remote_applied(self, peer: str) -> int:
        return self.remote.get(peer, 0)

    def set_remote_applied(self, peer: str, seq: int) -> None:
        self.remote[peer] = seq

    def put_tx(self, tx: TxRecord) -> None:
        self.txs[tx.tx_id] = tx

    def clear_tx(self, tx_id: str) -> None:
        self.txs.pop(tx_id, None)

    def put_inode(self, inode: Inode) -> None:
        self.inodes[inode.ino] = inode

    def del_inode(self, ino: int) -> None:
        self.inodes.pop(ino, None)

    def put_dentry(self, dentry: Dentry) -> None:
        self.dirs.setdefault(dentry.parent, {})[dentry.name] = dentry

    def del_dentry(self, parent: int, name: str) -> None:
        entries = self.dirs.get(parent)
        if entries is not None:
            entries.pop(name, None)
            if not entries:
                del self.dirs[parent]

    def set_next_local(self, value: int) -> None:
        self.local = value

    def record_reply(self, op_id: str, reply: Reply) -> None:
        self.replies[op_id] = reply


class Overlay:
    """Uncommitted changes of the batch being built, layered over committed state."""

    def __init__(self, base: ShardView) -> None:
        self.base = base
        self.shard = base.shard
        self._inodes: dict[int, Inode | None] = {}
        self._dentries: dict[tuple[int, str], Dentry | None] = {}
        self._replies: dict[str, Reply] = {}
        self._txs: dict[str, TxRecord | None] = {}
        self._tombstones: dict[int, DelInode] = {}
        self._remote: dict[str, int] = {}
        self._local: int | None = None

    def inode(self, ino: int) -> Inode | None:
        if ino in self._inodes:
            return self._inodes[ino]
        return self.base.inode(ino)

    def dentry(self, parent: int, name: str) -> Dentry | None:
        key = (parent, name)
        if key in self._dentries:
            return self._dentries[key]
        return self.base.dentry(parent, name)

    def dentries(self, parent: int, after_cookie: int = 0) -> Iterator[Dentry]:
        staged = {name: d for (p, name), d in self._dentries.items() if p == parent}
        merged = [d for d in self.base.dentries(parent, after_cookie) if d.name not in staged]
        merged += [d for d in staged.values() if d is not None and d.cookie > after_cookie]
        return iter(sorted(merged, key=lambda d: d.cookie))

    def has_entries(self, parent: int) -> bool:
        if any(d is not None for (p, _), d in self._dentries.items() if p == parent):
            return True
        staged = {name for (p, name) in self._dentries if p == parent}
        if not staged:
            return self.base.has_entries(parent)
        return any(d.name not in staged for d in self.base.dentries(parent))

    def next_local(self) -> int:
        return self._local if self._local is not None else self.base.next_local()

    def inode_count(self) -> int:
        return self.base.inode_count()  # staged creates are not counted until committed

    def reserved_local(self, shard: int) -> int:
        return self.base.reserved_local(shard)

    def op_reply(self, op_id: str) -> Reply | None:
        return self._replies.get(op_id) or self.base.op_reply(op_id)

    def tx(self, tx_id: str) -> TxRecord | None:
        if tx_id in self._txs:
            return self._txs[tx_id]
        return self.base.tx(tx_id)

    def tombstone(self, ino: int) -> DelInode | None:
        return self._tombstones.get(ino) or self.base.tombstone(ino)

    def put_tombstone(self, deleted: DelInode) -> None:
        self._tombstones[deleted.ino] = deleted

    def remote_applied(self, peer: str) -> int:
        return self._remote[peer] if peer in self._remote else self.base.remote_applied(peer)

    def set_remote_applied(self, peer: str, seq: int) -> None:
        self._remote[peer] = seq

    def put_tx(self, tx: TxRecord) -> None:
        self._txs[tx.tx_id] = tx

    def clear_tx(self, tx_id: str) -> None:
        self._txs[tx_id] = None

    def put_inode(self, inode: Inode) -> None:
        self._inodes[inode.ino] = inode

    def del_inode(self, ino: int) -> None:
        self._inodes[ino] = None

    def put_dentry(self, dentry: Dentry) -> None:
        self._dentries[(dentry.parent, dentry.name)] = dentry

    def del_dentry(self, parent: int, name: str) -> None:
        self._dentries[(parent, name)] = None

    def set_next_local(self, value: int) -> None:
        self._local = value

    def record_reply(self, op_id: str, reply: Reply) -> None:
        self._replies[op_id] = reply
