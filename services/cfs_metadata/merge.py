"""Two sites' versions of an inode, merged field group by field group (DESIGN.md §8).

Pure. The shard writer stamps every change it journals (`stamp_entry`): each group
of `FIELD_GROUPS` whose values an operation changed gets a `Stamp` (the writer's
clock, the site, and the stamp it replaced). A site applying the other's version
of an inode (`merge_inode`) takes, per group:

    the same stamp            nothing to do
    remote.base == local      a successor of what we have: the remote value
    local.base == remote      we built on it already: ours
    anything else             concurrent changes: a conflict; the later stamp wins
                              (the site name breaks a tie), and both values are kept
                              in the `FieldConflict` for `show-conflicts` (unless they
                              are access times or a directory's size and mtime: those
                              just take the later)

Per group this is a last-writer-wins register whose winner does not depend on the
order versions arrive in, so two sites that have seen the same changes hold the same
inode. Conflicts are reported on each site that sees both versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cfs_contracts.events.metadata import DelDentry, DelInode, JournalEntry, PutDentry, PutInode
from cfs_contracts.fs.conflicts import FieldConflict
from cfs_contracts.fs.records import FIELD_GROUPS, Dentry, Inode, Stamp
from cfs_metadata.state import ShardView


@dataclass(frozen=True)
class Merged:
    inode: Inode
    conflicts: tuple[FieldConflict, ...]


def values(inode: Inode, group: str) -> dict[str, Any]:
    return {name: getattr(inode, name) for name in FIELD_GROUPS[group]}


def changed_groups(before: Inode, after: Inode) -> list[str]:
    return [g for g in FIELD_GROUPS if values(before, g) != values(after, g)]


def stamp_inode(before: Inode | None, after: Inode, ns: int, site: str) -> Inode:
    """`after` with a new stamp on each group it changed from `before` (a new inode:
    none; its values are the ones it was created with)."""
    if before is None:
        return after
    update: dict[str, Any] = {}
    if after.ctime_ns < before.ctime_ns:  # a writer whose clock is behind: ctime
        update["ctime_ns"] = before.ctime_ns  # never goes back (merges take the later)
    groups = changed_groups(before, after)
    if groups:
        stamps = dict(after.stamps)
        for group in groups:
            stamps[group] = _next_stamp(before.stamps.get(group), ns, site)
        update["stamps"] = stamps
    return after.model_copy(update=update) if update else after


def _next_stamp(replaced: Stamp | None, ns: int, site: str) -> Stamp:
    if replaced is None:
        return Stamp(ns=ns, site=site)
    # later than what it replaces, whatever this writer's clock says: the newest stamp
    # is then also the last write, so every site keeps the same
    return Stamp(ns=max(ns, replaced.ns + 1), site=site, base=replaced.key())


def restamp_inode(inode: Inode, ns: int, site: str) -> Inode:
    """Every field group stamped now over its stamp, and changed now (`replication-sync`:
    this version is to win on the peer whatever it changed there)."""
    stamps = {
        group: _next_stamp(inode.stamps.get(group), ns, site)
        for group, fields in FIELD_GROUPS.items()
        if fields
    }
    ctime = max(inode.ctime_ns, ns)  # merges take the later ctime: this one
    return inode.model_copy(update={"stamps": {**inode.stamps, **stamps}, "ctime_ns": ctime})


def restamp_dentry(dentry: Dentry, ns: int, site: str) -> Dentry:
    """The binding stamped now over its stamp (as `restamp_inode`)."""
    return dentry.model_copy(update={"stamp": _next_stamp(dentry.stamp, ns, site)})


def _stamp_group(inode: Inode, before: Inode, group: str, ns: int, site: str) -> Inode:
    stamps = {**inode.stamps, group: _next_stamp(before.stamps.get(group), ns, site)}
    return inode.model_copy(update={"stamps": stamps})


def stamp_entry(entry: JournalEntry, before: ShardView, ns: int, site: str) -> JournalEntry:
    """The entry with its changes stamped against `before`, the shard's view just
    before the operation: inode field groups, names bound anew, and the file each
    removed name led to."""
    changes = list(entry.changes)
    stamped: dict[int, Inode] = {}
    touched = False
    removed = _removed_names(entry, before)
    renamed = _named_anew(entry, before)
    for i, change in enumerate(changes):
        if isinstance(change, PutInode):
            previous = before.inode(change.inode.ino)
            inode = stamp_inode(previous, change.inode, ns, site)
            if previous is not None and inode.ino in renamed:
                inode = _stamp_group(inode, previous, "names", ns, site)
            if inode is not change.inode:
                changes[i] = PutInode(inode=inode)
                stamped[inode.ino] = inode
        elif isinstance(change, PutDentry) and change.dentry.stamp is None:
            bound = before.dentry(change.dentry.parent, change.dentry.name)
            update: dict[str, Any] = {}
            if bound is not None and bound.ino == change.dentry.ino:
                update["stamp"] = bound.stamp
            else:  # a new binding; `base`: the one it replaces (a rename over a file)
                update["stamp"] = _next_stamp(bound.stamp if bound else None, ns, site)
            if bound is not None and bound.shadowed:  # the name's conflict history
                update["shadowed"] = bound.shadowed
            if update["stamp"] is not None:
                dentry = change.dentry.model_copy(update=update)
                changes[i], touched = PutDentry(dentry=dentry), True
        elif isinstance(change, DelInode) and change.inode is None:
            gone = before.inode(change.ino)
            if gone is not None:  # the tombstone: what this site had seen of it
                names = tuple(removed.get(change.ino, ()))
                changes[i] = change.model_copy(update={"inode": gone, "names": names})
                touched = True
        elif isinstance(change, DelDentry) and change.removed is None:
            bound = before.dentry(change.parent, change.name)
            if bound is not None:
                changes[i] = change.model_copy(update={"removed": bound})
                touched = True
    if not stamped:
        return entry.model_copy(update={"changes": tuple(changes)}) if touched else entry
    reply = entry.reply
    if reply.inode is not None and reply.inode.ino in stamped:  # the record as stored
        reply = reply.model_copy(update={"inode": stamped[reply.inode.ino]})
    return entry.model_copy(update={"changes": tuple(changes), "reply": reply})


def _removed_names(entry: JournalEntry, before: ShardView) -> dict[int, list[Dentry]]:
    """Inode -> the names of it the entry removes or rebinds to another file."""
    removed: dict[int, list[Dentry]] = {}
    for change in entry.changes:
        if isinstance(change, DelDentry):
            where, ino = (change.parent, change.name), None
        elif isinstance(change, PutDentry):
            where, ino = (change.dentry.parent, change.dentry.name), change.dentry.ino
        else:
            continue
        bound = before.dentry(*where)
        if bound is not None and bound.ino != ino:
            removed.setdefault(bound.ino, []).append(bound)
    return removed


def _named_anew(entry: JournalEntry, before: ShardView) -> set[int]:
    """Inodes the entry gives a name they did not have (renamed, linked)."""
    named: set[int] = set()
    for change in entry.changes:
        if isinstance(change, PutDentry):
            bound = before.dentry(change.dentry.parent, change.dentry.name)
            if bound is None or bound.ino != change.dentry.ino:
                named.add(change.dentry.ino)
    return named


def merge_inode(local: Inode | None, remote: Inode, here: str, there: str) -> Merged:
    """The inode after site `here` (holding `local`) sees site `there`'s `remote`."""
    if local is None:
        return Merged(remote, ())
    update: dict[str, Any] = {}
    stamps = dict(local.stamps)
    conflicts: list[FieldConflict] = []
    for group in FIELD_GROUPS:
        ours, theirs = local.stamps.get(group), remote.stamps.get(group)
        if _same(ours, theirs):
            continue
        if _builds_on(theirs, ours):
            take = True
        elif _builds_on(ours, theirs):
            take = False
        else:
            take = _later(theirs, ours)
            if _reported(local, group) and values(local, group) != values(remote, group):
                conflicts.append(
                    FieldConflict(
                        ino=local.ino,
                        group=group,
                        local=_plain(values(local, group)),
                        remote=_plain(values(remote, group)),
                        local_stamp=ours,
                        remote_stamp=theirs,
                        here=here,
                        there=there,
                        winner=there if take else here,
                    )
                )
        if take:
            update.update(values(remote, group))
            if theirs is None:
                stamps.pop(group, None)
            else:
                stamps[group] = theirs
    update["ctime_ns"] = max(local.ctime_ns, remote.ctime_ns)
    update["stamps"] = stamps
    return Merged(local.model_copy(update=update), tuple(conflicts))


def _reported(inode: Inode, group: str) -> bool:
    """Whether concurrent changes of `group` are a conflict worth an operator's look:
    not access times, nor a directory's size and mtime (they follow its entries, which
    merge on their own)."""
    return group != "atime" and not (group == "content" and inode.is_dir)


def _plain(found: dict[str, Any]) -> dict[str, Any]:
    """Field values as JSON has them (chunk maps as dicts), for the conflict record."""
    return {
        name: [c.model_dump() for c in value] if name == "chunks" else value
        for name, value in found.items()
    }


def _same(a: Stamp | None, b: Stamp | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.key() == b.key())


def _builds_on(newer: Stamp | None, older: Stamp | None) -> bool:
    """`newer` replaced `older` (None: the creation value) on its site."""
    if newer is None:
        return False
    return newer.base == (older.key() if older is not None else None)


def _later(a: Stamp | None, b: Stamp | None) -> bool:
    """Whether `a` wins over `b` (no stamp: the creation value, earliest of all)."""
    if a is None:
        return False
    return b is None or a.key() > b.key()
