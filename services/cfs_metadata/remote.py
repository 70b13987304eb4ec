"""A peer site's journal entries, applied to this site's shard (DESIGN.md §8). Pure.

Each remote entry becomes one local entry, op id `geo.<peer>.<its op id>`, journaled
under `...journal.remote` (so it is never shipped back), together with the shard's
new position in the peer's journal (`SetRemoteApplied`, see `shard_admin`). The op id
keeps an entry from being applied twice even if it is sent again, and its reply keeps
the conflicts the first apply found, to be answered again.

Per change:

    PutInode      merged field group by field group (`merge.merge_inode`); link count
                  and parent follow the remote version (the namespace change that
                  came with it). An inode deleted here (its tombstone: the DelInode
                  with the inode as deleted) comes back, merged with the peer's
                  version, with its names, if the peer changed it in a way the
                  deletion never saw and that wins; else it stays deleted
    DelInode      the inode goes, and its tombstone stays; unless it was changed here
                  in a way the peer never saw (written, chmod-ed, renamed, a
                  directory added to): then the deletion loses and the file keeps
                  its names
    PutDentry     a free name, or one leading to the same file: bound (the later
                  stamp kept); a binding made over the one here (a rename over a
                  file): it replaces it. A name leading to another file here: a name
                  conflict. The later binding keeps the name (site, then inode
                  number, breaks a tie); the other file stays in the same directory
                  as `<name>.conflict-<its site>-<ino>`, on both sites alike, and
                  gets the name back if the peer removes the winner without having
                  seen the conflict
    DelDentry     the binding the peer removed, wherever a name conflict put it here
                  (unless its file is one staying, above)
    counters and cross-shard transaction records: the peer's own, not applied

Every conflict is reported (`FieldConflict`, kinds field / name / deleted) on each
site where both versions met. Known limits: one file renamed on both sites during a
partition may keep both names (a reverse index of names would be needed to drop the
older one); where a file's name and its inode live in different shards (a hard link
or rename across shards, a directory's own name) the two shards decide apart, and a
deletion that loses in the inode's shard may still remove the name in the other,
leaving an orphan that `metadata-check --auto-fix` adopts into lost+found.
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
from cfs_contracts.fs.records import MAX_NAME_BYTES, Dentry, Inode, Kind, Stamp
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
    merge = _EntryMerge(Overlay(view), here, there)  # later changes see earlier ones
    changes = list(changes)
    merge.judge(changes)
    for change in changes:
        merge.take(change)
    merge.finish()
    return merge.out, tuple(merge.conflicts)


class _EntryMerge:
    def __init__(self, overlay: Overlay, here: str, there: str) -> None:
        self.overlay = overlay
        self.here = here
        self.there = there
        self.out: list[Change] = []
        self.conflicts: list[FieldConflict] = []
        self.kept: set[int] = set()  # deleted there, changed here: they stay
        self.back: dict[int, tuple[DelInode, Stamp]] = {}  # deleted here, changed there
        self.gone: set[int] = set()  # deleted here; what the peer did to them, it had seen
        self.named: set[int] = set()  # inodes the entry gives a name
        self.subdirs: dict[int, int] = {}  # directory -> subdirectory names added here

    def emit(self, change: Change) -> None:
        where = (
            (change.dentry.parent, change.dentry.name, change.dentry)
            if isinstance(change, PutDentry)
            else (change.parent, change.name, None)
            if isinstance(change, DelDentry)
            else None
        )
        if where is not None:  # a directory's link count follows its subdirectories
            parent, name, after = where
            delta = _is_dir(after) - _is_dir(self.overlay.dentry(parent, name))
            if delta:
                self.subdirs[parent] = self.subdirs.get(parent, 0) + delta
        apply_change(self.overlay, change)
        self.out.append(change)

    def judge(self, changes: list[Change]) -> None:
        """Before anything applies: which deletions lose (here or there), so the names
        of a file are kept, restored or dropped with it whatever their order."""
        for change in changes:
            match change:
                case DelInode(ino=ino, inode=gone) if gone is not None:
                    local = self.overlay.inode(ino)
                    unseen = None if local is None else _first_unseen(local.stamps, gone.stamps)
                    if unseen is not None:  # changed here in a way the peer never saw
                        self.kept.add(ino)
                        conflict = self._deleted(change, local_stamp=unseen, winner=self.here)
                        self.conflicts.append(conflict)
                case PutInode(inode=remote) if self.overlay.inode(remote.ino) is None:
                    tombstone = self.overlay.tombstone(remote.ino)
                    if tombstone is None or tombstone.inode is None:
                        continue  # new here
                    unseen = _first_unseen(remote.stamps, tombstone.inode.stamps)
                    if unseen is None:
                        self.gone.add(remote.ino)
                    else:
                        self.back[remote.ino] = (tombstone, unseen)
                case PutDentry(dentry=dentry):
                    self.named.add(dentry.ino)
                case _:
                    pass
        for change in changes:  # a name for an inode deleted here, and no change to it
            if isinstance(change, PutDentry):
                ino = change.dentry.ino
                absent = ino not in self.back and self.overlay.inode(ino) is None
                if absent and self.overlay.tombstone(ino) is not None:
                    self.gone.add(ino)

    def take(self, change: Change) -> None:
        match change:
            case PutInode(inode=remote):
                local = self.overlay.inode(remote.ino)
                if local is None:
                    if remote.ino not in self.gone:
                        self._new_or_back(remote)
                    return
                merged = merge_inode(local, remote, self.here, self.there)
                inode = merged.inode.model_copy(update=_namespace(remote, local))
                self.conflicts += merged.conflicts
                if inode != local:
                    self.emit(PutInode(inode=inode))
            case DelInode(ino=ino, names=names):
                if ino not in self.kept and self.overlay.inode(ino) is not None:
                    self.emit(change)
                    for name in names:  # a name a conflict here had moved aside
                        aside = self.overlay.dentry(name.parent, kept_name(name))
                        if aside is not None and aside.ino == ino:
                            self.emit(_unbind(aside))
            case PutDentry(dentry=theirs):
                if theirs.ino not in self.gone:
                    self._bind(theirs)
            case DelDentry(parent=parent, name=name, removed=removed):
                seen = removed.shadowed if removed is not None else ()
                ours = self._binding_here(parent, name, removed)
                if ours is None:
                    self._set_aside(seen)
                    return
                if ours.ino in self.kept:
                    return  # the name stays with the file that stays
                self.emit(_unbind(ours))
                self._unshadow(ours, seen)
                self._set_aside(seen)
            case _:
                pass  # SetNextLocal, TxPut, TxClear: the peer's own bookkeeping

    def finish(self) -> None:
        """Link counts of directories: ours, plus the subdirectory names this entry
        bound or unbound here (the peer's count is of its own namespace, which a
        conflict, a kept or a restored directory makes differ from ours)."""
        for parent, extra in self.subdirs.items():
            inode = self.overlay.inode(parent)
            if inode is not None and extra:
                self.emit(PutInode(inode=inode.model_copy(update={"nlink": inode.nlink + extra})))

    def _new_or_back(self, remote: Inode) -> None:
        """A new inode, or one deleted here that the peer changed (it comes back: with
        the names it had here, unless the peer's entry names it itself)."""
        if remote.ino not in self.back:
            self.emit(PutInode(inode=remote))
            return
        tombstone, unseen = self.back[remote.ino]
        assert tombstone.inode is not None
        # as the other site has it: its version merged with what was deleted here
        merged = merge_inode(tombstone.inode, remote, self.here, self.there)
        inode = merged.inode.model_copy(update=_namespace(remote, tombstone.inode))
        self.emit(PutInode(inode=inode))
        if remote.ino not in self.named:
            for dentry in tombstone.names:
                self._bind(dentry)
        self.conflicts.append(self._deleted(tombstone, remote_stamp=unseen, winner=self.there))

    def _unshadow(self, removed: Dentry, seen: tuple[Dentry, ...]) -> None:
        """The peer removed the binding that won a name conflict here without having seen
        that conflict (`seen`: the losers the peer had kept aside itself): the latest
        loser still kept aside here gets the name back, as the peer has it."""
        known = {_binding_key(loser) for loser in seen}
        waiting = sorted(
            (d for d in removed.shadowed if _binding_key(d) not in known), key=_binding_key
        )
        while waiting:
            loser = waiting.pop()
            aside = self.overlay.dentry(loser.parent, kept_name(loser))
            if aside is None or aside.ino != loser.ino:
                continue  # removed or renamed since
            self.emit(_unbind(aside))
            back = loser.model_copy(update={"shadowed": tuple(waiting)})
            self.emit(PutDentry(dentry=back))
            return

    def _staying(self, ino: int) -> bool:
        """A file a deletion lost to (here or there): a rename over it moves it aside."""
        return ino in self.kept or ino in self.back

    def _set_aside(self, known: tuple[Dentry, ...]) -> None:
        """Losers of a name conflict the peer had moved aside (`known`): aside here too,
        wherever they still hold the name."""
        for loser in known:
            holder = self.overlay.dentry(loser.parent, loser.name)
            if holder is not None and holder.ino == loser.ino:
                self.emit(_unbind(holder))
                aside = holder.model_copy(update={"name": kept_name(loser), "shadowed": ()})
                self.emit(PutDentry(dentry=aside))
            elif self.overlay.inode(loser.ino) is None:
                self._aside_when_back(loser)

    def _aside_when_back(self, loser: Dentry) -> None:
        """A loser deleted here: its tombstone names it aside, so that if the peer's
        change to it brings it back it comes back where the peer keeps it."""
        tombstone = self.overlay.tombstone(loser.ino)
        if tombstone is None or tombstone.inode is None:
            return
        names = tuple(
            d.model_copy(update={"name": kept_name(loser), "shadowed": ()})
            if (d.parent, d.name, d.ino) == (loser.parent, loser.name, loser.ino)
            else d
            for d in tombstone.names
        )
        if names != tombstone.names:
            self.emit(tombstone.model_copy(update={"names": names}))

    def _binding_here(self, parent: int, name: str, removed: Dentry | None) -> Dentry | None:
        """Where the binding the peer removed is here: under its name, or under the other
        name a name conflict gave it here or there; None if it is not here (any more)."""
        if removed is None:  # an older writer's: the name, whatever it leads to
            return self.overlay.dentry(parent, name)
        for where in (name, kept_name(removed), _original(name, removed)):
            found = None if where is None else self.overlay.dentry(parent, where)
            if found is not None and _same_binding(found, removed):
                return found
        return None

    def _bind(self, theirs: Dentry) -> None:
        ours = self.overlay.dentry(theirs.parent, theirs.name)
        if ours is None:
            self.emit(PutDentry(dentry=theirs))
        elif ours.ino == theirs.ino:
            if _binding_key(theirs) > _binding_key(ours):
                self.emit(PutDentry(dentry=_inherit(theirs, ours)))
        elif _replaces(theirs, ours) and not self._staying(ours.ino):
            self.emit(PutDentry(dentry=_inherit(theirs, ours)))  # renamed over it there
        elif _replaces(ours, theirs) and not self._staying(theirs.ino):
            pass  # we renamed over what the peer had
        else:
            conflict, bound = _name_conflict(ours, theirs, self.here, self.there)
            self.conflicts.append(conflict)
            for dentry in bound:
                self.emit(PutDentry(dentry=dentry))

    def _deleted(
        self,
        deleted: DelInode,
        *,
        winner: str,
        local_stamp: Stamp | None = None,
        remote_stamp: Stamp | None = None,
    ) -> FieldConflict:
        first = deleted.names[0] if deleted.names else None
        deleting = self.there if winner == self.here else self.here
        return FieldConflict(
            kind="deleted",
            ino=deleted.ino,
            group="deleted",
            local={"deleted": deleting == self.here},
            remote={"deleted": deleting == self.there},
            local_stamp=local_stamp,
            remote_stamp=remote_stamp,
            here=self.here,
            there=self.there,
            winner=winner,
            parent=first.parent if first else 0,
            kept_as=first.name if first else None,
        )


def _is_dir(dentry: Dentry | None) -> int:
    return int(dentry is not None and dentry.kind is Kind.DIR)


def _namespace(remote: Inode, local: Inode) -> dict[str, int]:
    """Parent and link count follow the peer's namespace change, but a directory's
    link count, which is ours plus the subdirectories bound here (`finish`)."""
    nlink = local.nlink if local.kind is Kind.DIR else remote.nlink
    return {"nlink": nlink, "parent": remote.parent}


def _first_unseen(have: dict[str, Stamp], seen: dict[str, Stamp]) -> Stamp | None:
    """The earliest change in `have` that the deleting site's view `seen` lacks and
    that would have won over what it saw (a concurrent change that lost to the value
    the deletion saw does not save the file); access times do not count (reading a
    file does not save it either)."""

    def unseen(group: str, stamp: Stamp) -> bool:
        if group == "atime":
            return False
        saw = seen.get(group)
        if saw is None:
            return True
        return stamp.key() != saw.key() and (stamp.base == saw.key() or stamp.key() > saw.key())

    found = [stamp for group, stamp in have.items() if unseen(group, stamp)]
    return min(found, key=lambda stamp: stamp.key(), default=None)


def kept_name(loser: Dentry) -> str:
    """Where a name conflict's losing file stays: the same name on both sites."""
    site = loser.stamp.site if loser.stamp is not None else "unknown"
    suffix = f".conflict-{site}-{loser.ino}"
    name = loser.name
    while len((name + suffix).encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        name = name[:-1]
    return name + suffix


def _inherit(theirs: Dentry, ours: Dentry) -> Dentry:
    """The peer's binding of a name, with the losers of the name's conflicts seen here."""
    known = {_binding_key(d) for d in theirs.shadowed}
    extra = tuple(d for d in ours.shadowed if _binding_key(d) not in known)
    return theirs.model_copy(update={"shadowed": (*theirs.shadowed, *extra)}) if extra else theirs


def _unbind(dentry: Dentry) -> DelDentry:
    return DelDentry(parent=dentry.parent, name=dentry.name, removed=dentry)


def _same_binding(a: Dentry, b: Dentry) -> bool:
    """One binding, wherever a name conflict put it (an older writer's: same file)."""
    if a.ino != b.ino:
        return False
    return a.stamp is None or b.stamp is None or a.stamp.key() == b.stamp.key()


def _original(name: str, binding: Dentry) -> str | None:
    """The name `kept_name` moved `binding` away from, if `name` is such a name."""
    suffix = kept_name(binding.model_copy(update={"name": ""}))
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None


def _replaces(newer: Dentry, older: Dentry) -> bool:
    """`newer` was bound over `older` by a site that had it (a rename over a file)."""
    if newer.stamp is None:
        return False
    return newer.stamp.base == (older.stamp.key() if older.stamp is not None else None)


def _binding_key(dentry: Dentry) -> tuple[int, str, int]:
    """Total order of two bindings of one name: later stamp, then site, then inode."""
    stamp = dentry.stamp or Stamp(ns=0, site="")
    return (stamp.ns, stamp.site, dentry.ino)


def _name_conflict(
    ours: Dentry, theirs: Dentry, here: str, there: str
) -> tuple[FieldConflict, list[Dentry]]:
    remote_wins = _binding_key(theirs) > _binding_key(ours)
    winner, loser = (theirs, ours) if remote_wins else (ours, theirs)
    plain = loser.model_copy(update={"shadowed": ()})
    kept = plain.model_copy(update={"name": kept_name(loser)})
    shadowed = (*ours.shadowed, *theirs.shadowed, plain)
    bound = [winner.model_copy(update={"shadowed": shadowed}), kept]
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
