"""What `cfs admin metadata-repair` does about each finding (pure; `fsck_repair` acts).

The journal is the truth the checker rebuilt every shard from, so a replica that
differs from it is rebuilt from it, and every other repair is a journaled change
computed from the rebuilt records, applied by the shard's writer only if those
records are still what the checker saw.

Without `--auto-fix` only what cannot lose user data is repaired: replicas rebuilt,
link counts, parent pointers, entry kinds, directory sizes, inode counters,
orphans moved to `/lost+found`, damaged fragments rebuilt from the others.
`--auto-fix` adds what changes what users see: dangling entries removed, sizes set
to what the chunk map holds. The rest is reported with the reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cfs_contracts.data import scheme_shape
from cfs_contracts.fs.changes import BaseChange, DelDentry, PutDentry, PutInode, SetNextLocal
from cfs_contracts.fs.records import Dentry, Inode, Kind, shard_of
from cfs_contracts.fs.rpc import RemoteRecord
from cfs_metadata.check import NEXT_LOCAL_KEY, Finding, Problem
from cfs_metadata.txn import dentry_key, inode_key

LOST_FOUND = "lost+found"
NEEDS_AUTO_FIX = "changes what users see: run with --auto-fix"
RESTORE = (
    "cannot be repaired automatically: restore from a snapshot "
    "(cfs admin restore-metadata, guide scenario 5)"
)


class RecordView(Protocol):
    """The records the checker rebuilt from the journals (all shards)."""

    def inode(self, ino: int) -> Inode | None: ...

    def dentry(self, parent: int, name: str) -> Dentry | None: ...


@dataclass(frozen=True)
class RebuildReplica:
    shard: int
    node: str
    findings: tuple[Finding, ...]

    def describe(self) -> str:
        return f"rebuild the replica of shard {self.shard:03d} on {self.node} from its journal"


@dataclass(frozen=True)
class FixRecord:
    """One record (or a shard counter) rewritten through the shard's writer."""

    shard: int
    problem: str
    what: str
    expected: tuple[RemoteRecord, ...]
    changes: tuple[BaseChange, ...]
    findings: tuple[Finding, ...]

    def describe(self) -> str:
        return f"{self.what} (shard {self.shard:03d})"


@dataclass(frozen=True)
class AdoptOrphan:
    """Name the orphan `/lost+found/#<ino>` (the directory is made if missing)."""

    ino: int
    kind: Kind
    findings: tuple[Finding, ...]

    @property
    def name(self) -> str:
        return f"#{self.ino}"

    def describe(self) -> str:
        return f"move orphan inode {self.ino} to /{LOST_FOUND}/{self.name}"


def adoption(orphan: Inode, lost: Inode, name: str) -> tuple[FixRecord, FixRecord | None]:
    """The two journaled steps that move an orphan into /lost+found: its entry there (and
    the directory's link count, for a subdirectory) in lost+found's shard, then its own
    record (a directory's parent pointer, a file's link count) in its shard, if it
    changes. Each applies only if the records are still as read."""
    entry = Dentry(parent=lost.ino, name=name, ino=orphan.ino, kind=orphan.kind)
    changes: list[BaseChange] = [PutDentry(dentry=entry)]
    if orphan.is_dir:
        changes.append(PutInode(inode=lost.model_copy(update={"nlink": lost.nlink + 1})))
    named = FixRecord(
        shard_of(lost.ino),
        Problem.ORPHAN.value,
        f"name inode {orphan.ino} /{LOST_FOUND}/{name}",
        (
            RemoteRecord(key=inode_key(lost.ino), inode=lost),
            RemoteRecord(key=dentry_key(lost.ino, name), dentry=None),
        ),
        tuple(changes),
        (),
    )
    adopted = orphan.model_copy(update={"parent": lost.ino} if orphan.is_dir else {"nlink": 1})
    if adopted == orphan:
        return named, None
    pointed = FixRecord(
        shard_of(orphan.ino),
        Problem.ORPHAN.value,
        f"inode {orphan.ino}: " + ("parent -> /lost+found" if orphan.is_dir else "link count 1"),
        (RemoteRecord(key=inode_key(orphan.ino), inode=orphan),),
        (PutInode(inode=adopted),),
        (),
    )
    return named, pointed


@dataclass(frozen=True)
class RebuildFragment:
    ino: int
    chunk: int
    fragment: int
    node: str
    key: str
    sources: dict[int, str]  # fragment index -> node, the healthy ones
    length: int  # the chunk's coded length, to check the decoded chunk
    needed: int  # k
    findings: tuple[Finding, ...]

    def describe(self) -> str:
        return (
            f"rebuild fragment {self.fragment} of inode {self.ino} chunk {self.chunk} "
            f"on {self.node} from {len(self.sources)} others"
        )


@dataclass(frozen=True)
class Unrepaired:
    finding: Finding
    why: str

    def describe(self) -> str:
        return f"{self.finding.line}: {self.why}"


Action = RebuildReplica | FixRecord | AdoptOrphan | RebuildFragment


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    unrepaired: list[Unrepaired] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "actions": [{"action": type(a).__name__, "what": a.describe()} for a in self.actions],
            "unrepaired": [{"finding": u.finding.to_dict(), "why": u.why} for u in self.unrepaired],
        }


_INODE_FIXES = (Problem.NLINK, Problem.PARENT, Problem.DIR_SIZE, Problem.SIZE)


def plan_repairs(findings: Iterable[Finding], view: RecordView, *, auto_fix: bool) -> Plan:
    plan = Plan()
    rebuilds: dict[tuple[int, str], list[Finding]] = defaultdict(list)
    inode_fixes: dict[int, list[Finding]] = defaultdict(list)
    fragments: list[Finding] = []
    orphans: list[AdoptOrphan] = []
    for finding in findings:
        problem = finding.problem
        if problem in (Problem.CHECKSUM, Problem.REPLICA):
            rebuilds[(finding.shard, finding.node)].append(finding)
        elif problem in _INODE_FIXES:
            if problem is Problem.SIZE and not auto_fix:
                plan.unrepaired.append(Unrepaired(finding, NEEDS_AUTO_FIX))
            else:
                inode_fixes[finding.ino].append(finding)
        elif problem is Problem.KIND:
            _fix_kind(plan, view, finding)
        elif problem is Problem.DANGLING:
            if auto_fix:
                _remove_entry(plan, view, finding)
            else:
                plan.unrepaired.append(Unrepaired(finding, NEEDS_AUTO_FIX))
        elif problem is Problem.ORPHAN:
            inode = view.inode(finding.ino)
            if inode is None:
                plan.unrepaired.append(Unrepaired(finding, "the inode is gone"))
            else:
                orphans.append(AdoptOrphan(finding.ino, inode.kind, (finding,)))
        elif problem is Problem.COUNTER and finding.key == NEXT_LOCAL_KEY:
            plan.actions.append(
                FixRecord(
                    finding.shard,
                    problem.value,
                    f"raise the next inode number to {finding.expected}",
                    (),
                    (SetNextLocal(value=finding.expected),),
                    (finding,),
                )
            )
        elif problem is Problem.FRAGMENT:
            fragments.append(finding)
        else:
            plan.unrepaired.append(Unrepaired(finding, RESTORE))
    for (shard, node), found in sorted(rebuilds.items()):
        plan.actions.append(RebuildReplica(shard, node, tuple(found)))
    for ino, found in sorted(inode_fixes.items()):
        _fix_inode(plan, view, ino, found)
    # After every fix computed from the checked records: making /lost+found changes the
    # root's link count, which a fix of the root compares against.
    plan.actions += orphans
    _rebuild_fragments(plan, view, fragments)
    return plan


def _fix_inode(plan: Plan, view: RecordView, ino: int, found: list[Finding]) -> None:
    """Every fix of one inode in one change, compared against the record as checked."""
    inode = view.inode(ino)
    if inode is None:
        plan.unrepaired += [Unrepaired(f, "the inode is gone") for f in found]
        return
    update: dict[str, Any] = {}
    said: list[str] = []
    for finding in found:
        if finding.problem is Problem.NLINK:
            update["nlink"] = finding.expected
            said.append(f"link count {inode.nlink} -> {finding.expected}")
        elif finding.problem is Problem.PARENT:
            update["parent"] = finding.expected
            said.append(f"parent {inode.parent} -> {finding.expected}")
        elif finding.problem in (Problem.DIR_SIZE, Problem.SIZE):
            update["size"] = finding.expected
            said.append(f"size {inode.size} -> {finding.expected}")
    plan.actions.append(
        FixRecord(
            shard_of(ino),
            "+".join(sorted({f.problem.value for f in found})),
            f"inode {ino}: {', '.join(said)}",
            (RemoteRecord(key=inode_key(ino), inode=inode),),
            (PutInode(inode=inode.model_copy(update=update)),),
            tuple(found),
        )
    )


def _fix_kind(plan: Plan, view: RecordView, finding: Finding) -> None:
    entry = view.dentry(finding.parent, finding.name)
    inode = view.inode(finding.ino)
    if entry is None or inode is None:
        plan.unrepaired.append(Unrepaired(finding, "the entry or its inode is gone"))
        return
    plan.actions.append(
        FixRecord(
            shard_of(entry.parent),
            finding.problem.value,
            f"entry {entry.parent}/{entry.name}: kind {entry.kind.value} -> {inode.kind.value}",
            (RemoteRecord(key=dentry_key(entry.parent, entry.name), dentry=entry),),
            (PutDentry(dentry=entry.model_copy(update={"kind": inode.kind})),),
            (finding,),
        )
    )


def _remove_entry(plan: Plan, view: RecordView, finding: Finding) -> None:
    entry = view.dentry(finding.parent, finding.name)
    if entry is None:
        plan.unrepaired.append(Unrepaired(finding, "the entry is gone"))
        return
    plan.actions.append(
        FixRecord(
            shard_of(entry.parent),
            finding.problem.value,
            f"remove dangling entry {entry.parent}/{entry.name}",
            (RemoteRecord(key=dentry_key(entry.parent, entry.name), dentry=entry),),
            (DelDentry(parent=entry.parent, name=entry.name),),
            (finding,),
        )
    )


def _rebuild_fragments(plan: Plan, view: RecordView, found: list[Finding]) -> None:
    """Each bad fragment from the chunk's healthy ones (those not found bad too)."""
    bad: dict[tuple[int, int], set[int]] = defaultdict(set)
    for finding in found:
        bad[(finding.ino, finding.chunk)].add(finding.fragment)
    for finding in found:
        inode = view.inode(finding.ino)
        chunk = next((c for c in inode.chunks if c.index == finding.chunk), None) if inode else None
        if chunk is None or finding.fragment >= len(chunk.fragments):
            plan.unrepaired.append(Unrepaired(finding, "the chunk map changed since the check"))
            continue
        k, _ = scheme_shape(chunk.scheme)
        broken = bad[(finding.ino, finding.chunk)]
        sources = {i: n for i, n in enumerate(chunk.fragments) if i not in broken}
        if len(sources) < k:
            plan.unrepaired.append(
                Unrepaired(
                    finding,
                    f"only {len(sources)} of the {k} fragments needed are healthy: the "
                    "chunk is lost (restore the file from a backup)",
                )
            )
            continue
        plan.actions.append(
            RebuildFragment(
                ino=finding.ino,
                chunk=finding.chunk,
                fragment=finding.fragment,
                node=finding.node,
                key=finding.key,
                sources=sources,
                length=chunk.stored_length,
                needed=k,
                findings=(finding,),
            )
        )
