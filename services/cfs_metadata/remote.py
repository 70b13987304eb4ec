"""A peer site's journal entries, applied to this site's shard (DESIGN.md §8). Pure.

Each remote entry becomes one local entry, op id `geo.<peer>.<its op id>`, journaled
under `...journal.remote` (so it is never shipped back). The op id makes the apply
idempotent: an entry applied before is skipped, and the conflicts its first apply
found are answered again (from the reply the journal kept), so a replicator killed
between the apply and its acknowledgement neither applies twice nor loses a report.

Per change:

    PutInode      merged field group by field group (`merge.merge_inode`); link count
                  and parent follow the remote version (the namespace change that
                  came with it)
    DelInode      the inode goes
    PutDentry     a free name, or one leading to the same file: bound (the later
                  stamp kept). A name leading to another file here: a name conflict.
                  The later binding keeps the name (site, then inode number, breaks a
                  tie); the other file stays in the same directory as
                  `<name>.conflict-<its site>-<ino>`, on both sites alike
    DelDentry     removed if it still leads to the file the peer unlinked
    counters and cross-shard transaction records: the peer's own, not applied
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from cfs_contracts.events.metadata import (
    Change,
    DelDentry,
    DelInode,
    JournalEntry,
    PutDentry,
    PutInode,
)
from cfs_contracts.fs.conflicts import FieldConflict
from cfs_contracts.fs.records import MAX_NAME_BYTES, Dentry, Stamp
from cfs_contracts.fs.rpc import FsError, Reply
from cfs_metadata.merge import merge_inode
from cfs_metadata.state import Overlay, ShardView, apply_change, apply_entries
from cfs_metadata.txn import change_locks


def remote_op_id(there: str, op_id: str) -> str:
    return f"geo.{there}.{op_id}"


@dataclass
class RemoteApplied:
    entries: list[JournalEntry] = field(default_factory=list)  # to journal, in order
    conflicts: list[FieldConflict] = field(default_factory=list)
    skipped: int = 0  # remote entries this shard had applied already


def decide_remote(
    view: ShardView,
    remote: Iterable[JournalEntry],
    here: str,
    there: str,
    locked: AbstractSet[str] = frozenset(),
) -> RemoteApplied:
    """The local entries that apply `remote` (the peer's, in its journal order)."""
    overlay = Overlay(view)
    out = RemoteApplied()
    for entry in remote:
        op_id = remote_op_id(there, entry.op_id)
        earlier = overlay.op_reply(op_id)
        if earlier is not None:
            out.skipped += 1
            out.conflicts += earlier.conflicts
            continue
        changes, found = merge_changes(overlay, entry.changes, here, there)
        busy = change_locks(changes) & locked
        if busy:
            raise FsError(
                errno.EAGAIN, f"records {sorted(busy)[:3]} are locked by a local transaction"
            )
        local = JournalEntry(
            op_id=op_id, op=f"geo.{entry.op}", changes=tuple(changes), reply=Reply(conflicts=found)
        )
        apply_entries(overlay, [local])
        out.entries.append(local)
        out.conflicts += found
    return out


def merge_changes(
    view: ShardView, changes: Iterable[Change], here: str, there: str
) -> tuple[list[Change], tuple[FieldConflict, ...]]:
    """The local changes for one remote entry's `changes`, and the conflicts found."""
    overlay = Overlay(view)  # later changes of the entry see the earlier ones
    out: list[Change] = []
    conflicts: list[FieldConflict] = []

    def emit(change: Change) -> None:
        apply_change(overlay, change)
        out.append(change)

    for change in changes:
        match change:
            case PutInode(inode=remote):
                local = overlay.inode(remote.ino)
                merged = merge_inode(local, remote, here, there)
                inode = merged.inode
                if local is not None:
                    namespace = {"nlink": remote.nlink, "parent": remote.parent}
                    inode = inode.model_copy(update=namespace)
                conflicts += merged.conflicts
                if inode != local:
                    emit(PutInode(inode=inode))
            case DelInode(ino=ino):
                if overlay.inode(ino) is not None:
                    emit(change)
            case PutDentry(dentry=theirs):
                ours = overlay.dentry(theirs.parent, theirs.name)
                if ours is None:
                    emit(change)
                elif ours.ino == theirs.ino:
                    if _binding_key(theirs) > _binding_key(ours):
                        emit(change)
                else:
                    conflict, bound = _name_conflict(ours, theirs, here, there)
                    conflicts.append(conflict)
                    for dentry in bound:
                        emit(PutDentry(dentry=dentry))
            case DelDentry(parent=parent, name=name, ino=ino):
                ours = overlay.dentry(parent, name)
                if ours is not None and (ino is None or ours.ino == ino):
                    emit(DelDentry(parent=parent, name=name, ino=ours.ino))
            case _:
                pass  # SetNextLocal, TxPut, TxClear: the peer's own bookkeeping
    return out, tuple(conflicts)


def kept_name(loser: Dentry) -> str:
    """Where a name conflict's losing file stays: the same name on both sites."""
    site = loser.stamp.site if loser.stamp is not None else "unknown"
    suffix = f".conflict-{site}-{loser.ino}"
    name = loser.name
    while len((name + suffix).encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        name = name[:-1]
    return name + suffix


def _binding_key(dentry: Dentry) -> tuple[int, str, int]:
    """Total order of two bindings of one name: later stamp, then site, then inode."""
    stamp = dentry.stamp or Stamp(ns=0, site="")
    return (stamp.ns, stamp.site, dentry.ino)


def _name_conflict(
    ours: Dentry, theirs: Dentry, here: str, there: str
) -> tuple[FieldConflict, list[Dentry]]:
    remote_wins = _binding_key(theirs) > _binding_key(ours)
    loser = ours if remote_wins else theirs
    kept = loser.model_copy(update={"name": kept_name(loser)})
    bound = [theirs, kept] if remote_wins else [kept]
    conflict = FieldConflict(
        kind="name",
        ino=(theirs if remote_wins else ours).ino,
        group=ours.name,
        local={"ino": ours.ino},
        remote={"ino": theirs.ino},
        local_stamp=ours.stamp,
        remote_stamp=theirs.stamp,
        here=here,
        there=there,
        winner=there if remote_wins else here,
        parent=ours.parent,
        kept_as=kept.name,
    )
    return conflict, bound
