"""Consistency checks of the metadata, the pure parts (STYLE.md #9: ship the checker).

`cfs admin metadata-consistency-check` (`cfs_metadata.fsck`) rebuilds every shard
from its journal and feeds the records to a `TreeCheck`: every inode first, then
every directory entry, of all shards at once (the namespace spans shards: a
directory's entries live in the directory's shard, its subdirectories wherever
their hash put them). It finds, in the operator guide's words where it has them:

    Inode 12345: corrupted (expected_size=1024, actual=512)     size against chunk map
    Inode 67890: invalid parent pointer (...)                   directories
    Inode 4097: link count 3, expected 2
    Inode 5121: orphan (no directory entry names it)
    Entry 1/a.txt: dangling (inode 6145 does not exist)

Replica comparisons (`compare_buckets`, `compare_records`) and the stored-record
checksum lines (`Inode <n> checksum mismatch: expected 0x…, got 0x…`) are here too.
Each finding is one line plus what a repair needs (`cfs_metadata.repair_plan`).
`check_tree` and `check_replay` keep the shapes the tests use after each test.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from cfs_contracts.data import scheme_shape
from cfs_contracts.fs.check import StoredCorruption
from cfs_contracts.fs.records import ROOT_INO, SHARD_BITS, Dentry, Inode, Kind, shard_of
from cfs_metadata.state import MemoryShard
from cfs_metadata.txn import dentry_key, inode_key

MAX_CYCLE_REPORT = 100
NEXT_LOCAL_KEY = "m:local"  # COUNTER findings: which counter
INODE_COUNT_KEY = "m:inodes"


class Problem(StrEnum):
    CHECKSUM = "checksum"  # a stored record fails its checksum on one replica
    REPLICA = "replica"  # a replica's record differs from the journal's
    REPLAY = "replay"  # live state differs from the journal replayed (MemoryShard form)
    ROOT = "root"
    PARENT = "parent"  # a directory's parent pointer disagrees with the entry naming it
    NAMES = "names"  # a directory with more than one name
    NLINK = "nlink"
    DANGLING = "dangling"  # an entry naming no inode (or in no directory)
    KIND = "kind"  # an entry's kind is not its inode's
    ORPHAN = "orphan"  # an inode no entry names
    CYCLE = "cycle"  # named directories the root does not reach
    SIZE = "size"  # a file's size against its chunk map, a symlink's against its target
    DIR_SIZE = "dir_size"
    CHUNK_MAP = "chunk_map"  # a malformed chunk map
    COUNTER = "counter"  # a shard's inode counters
    FRAGMENT = "fragment"  # a chunk map names a fragment that is missing or damaged


@dataclass(frozen=True)
class Finding:
    """One problem: its line, and what a repair needs to know about it."""

    problem: Problem
    line: str
    ino: int = 0
    shard: int = 0
    node: str = ""  # the replica or chunk-store concerned
    parent: int = 0
    name: str = ""
    expected: int = 0
    actual: int = 0
    key: str = ""  # replica findings: the stored key (hex); fragments: the fragment key
    chunk: int = -1
    fragment: int = -1

    @property
    def identity(self) -> tuple[object, ...]:
        """Stable across two runs while the values in the line may move."""
        return (self.problem, self.ino, self.shard, self.node, self.parent, self.name, self.key)

    def to_dict(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["problem"] = self.problem.value
        return {k: v for k, v in document.items() if v not in ("", -1) or k == "line"}


class _Facts(NamedTuple):
    kind: Kind
    nlink: int
    parent: int


class TreeCheck:
    """The namespace's invariants over every shard: feed all inodes, then all entries.

    `in_flight`: record keys (`i:<ino>`, `d:<parent>:<name>`) locked by cross-shard
    transactions still being decided; findings touching them are counted in
    `skipped`, not reported (they are states the protocol passes through).
    Memory: a few small tuples per inode (no records are kept).
    """

    def __init__(self, in_flight: Iterable[str] = ()) -> None:
        self.in_flight = frozenset(in_flight)
        self.findings: list[Finding] = []
        self.skipped = 0
        self.inodes = 0
        self.entries = 0
        self._facts: dict[int, _Facts] = {}
        self._names: Counter[int] = Counter()
        self._subdirs: Counter[int] = Counter()
        self._dir_names: dict[int, list[tuple[int, str]]] = {}
        self._children: dict[int, list[int]] = {}
        self._entries_started = False

    # -- feeding -----------------------------------------------------------------------
    def add_inode(self, inode: Inode) -> None:
        if self._entries_started:
            raise RuntimeError("every inode must come before the first entry")
        self.inodes += 1
        self._facts[inode.ino] = _Facts(inode.kind, inode.nlink, inode.parent)
        for finding in inode_findings(inode):
            self._add(finding, inode_key(inode.ino))

    def add_entry(self, entry: Dentry) -> None:
        self._entries_started = True
        self.entries += 1
        key = dentry_key(entry.parent, entry.name)
        where = f"Entry {entry.parent}/{entry.name}"
        directory = self._facts.get(entry.parent)
        if directory is None or directory.kind is not Kind.DIR:
            what = "does not exist" if directory is None else "is not a directory"
            self._add(
                Finding(
                    Problem.DANGLING,
                    f"{where}: dangling (its directory {entry.parent} {what})",
                    ino=entry.ino,
                    parent=entry.parent,
                    name=entry.name,
                ),
                key,
            )
            return
        child = self._facts.get(entry.ino)
        if child is None:
            self._add(
                Finding(
                    Problem.DANGLING,
                    f"{where}: dangling (inode {entry.ino} does not exist)",
                    ino=entry.ino,
                    parent=entry.parent,
                    name=entry.name,
                    expected=int(entry.kind is Kind.DIR),
                ),
                key,
            )
            return
        self._names[entry.ino] += 1
        if child.kind is not entry.kind:
            self._add(
                Finding(
                    Problem.KIND,
                    f"{where}: says {_kind(entry.kind)}, inode {entry.ino} is {_kind(child.kind)}",
                    ino=entry.ino,
                    parent=entry.parent,
                    name=entry.name,
                ),
                key,
            )
        if child.kind is Kind.DIR:
            self._subdirs[entry.parent] += 1
            self._dir_names.setdefault(entry.ino, []).append((entry.parent, entry.name))
            self._children.setdefault(entry.parent, []).append(entry.ino)

    # -- conclusions -------------------------------------------------------------------
    def finish(self) -> list[Finding]:
        root = self._facts.get(ROOT_INO)
        if root is None or root.kind is not Kind.DIR:
            what = "missing" if root is None else f"a {_kind(root.kind)}"
            self._add(Finding(Problem.ROOT, f"Inode {ROOT_INO}: root directory is {what}"))
        elif root.parent != ROOT_INO:
            self._add(
                Finding(
                    Problem.PARENT,
                    f"Inode {ROOT_INO}: invalid parent pointer (root points to {root.parent})",
                    ino=ROOT_INO,
                    parent=ROOT_INO,
                    expected=ROOT_INO,
                    actual=root.parent,
                ),
                inode_key(ROOT_INO),
            )
        for ino, facts in sorted(self._facts.items()):
            self._links(ino, facts)
        self._reachability()
        return self.findings

    def _links(self, ino: int, facts: _Facts) -> None:
        key = inode_key(ino)
        if ino == ROOT_INO:
            self._nlink(ino, facts.nlink, 2 + self._subdirs[ino])
            return
        if facts.kind is not Kind.DIR:
            names = self._names[ino]
            if names == 0:
                self._add(_orphan(ino, facts.kind), key)
            else:
                self._nlink(ino, facts.nlink, names)
            return
        named = self._dir_names.get(ino, [])
        if not named:
            self._add(_orphan(ino, facts.kind), key)
            return
        self._nlink(ino, facts.nlink, 2 + self._subdirs[ino])
        if len(named) > 1:
            where = ", ".join(f"{p}/{n}" for p, n in named[:4])
            self._add(
                Finding(
                    Problem.NAMES,
                    f"Inode {ino}: directory has {len(named)} names ({where})",
                    ino=ino,
                ),
                key,
            )
            return
        parent, name = named[0]
        if facts.parent != parent:
            self._add(
                Finding(
                    Problem.PARENT,
                    f"Inode {ino}: invalid parent pointer (points to {facts.parent}, "
                    f"named by {parent}/{name})",
                    ino=ino,
                    parent=parent,
                    name=name,
                    expected=parent,
                    actual=facts.parent,
                ),
                key,
            )

    def _nlink(self, ino: int, actual: int, expected: int) -> None:
        if actual != expected:
            self._add(
                Finding(
                    Problem.NLINK,
                    f"Inode {ino}: link count {actual}, expected {expected}",
                    ino=ino,
                    expected=expected,
                    actual=actual,
                ),
                inode_key(ino),
            )

    def _reachability(self) -> None:
        """Named directories neither the root nor an orphan directory reaches are in a
        cycle (a rename bug); those under an orphan come back with it."""
        if ROOT_INO not in self._facts:
            return
        orphans = [
            ino
            for ino, facts in self._facts.items()
            if facts.kind is Kind.DIR and ino != ROOT_INO and ino not in self._dir_names
        ]
        reached = {ROOT_INO, *orphans}
        stack = [ROOT_INO, *orphans]
        while stack:
            for child in self._children.get(stack.pop(), ()):
                if child not in reached:
                    reached.add(child)
                    stack.append(child)
        lost = sorted(set(self._dir_names) - reached)
        for ino in lost[:MAX_CYCLE_REPORT]:
            self._add(
                Finding(
                    Problem.CYCLE,
                    f"Inode {ino}: directory not reachable from the root (a cycle of names)",
                    ino=ino,
                ),
                inode_key(ino),
            )

    def _add(self, finding: Finding, *keys: str) -> None:
        if self.in_flight and any(k in self.in_flight for k in keys):
            self.skipped += 1
            return
        # Where the record to repair lives: an entry in its directory's shard.
        entry = finding.problem in (Problem.DANGLING, Problem.KIND)
        owner = finding.parent if entry else finding.ino
        self.findings.append(dataclasses.replace(finding, shard=shard_of(owner or ROOT_INO)))


def inode_findings(inode: Inode) -> list[Finding]:
    """What one inode says about itself: sizes against chunk maps and targets."""
    ino = inode.ino
    found: list[Finding] = []
    if inode.kind is Kind.DIR and inode.size != 0:
        found.append(
            Finding(
                Problem.DIR_SIZE,
                f"Inode {ino}: directory size {inode.size}, expected 0",
                ino=ino,
                expected=0,
                actual=inode.size,
            )
        )
    if inode.kind is Kind.SYMLINK and inode.target is not None:
        length = len(inode.target.encode("utf-8", "surrogateescape"))
        if inode.size != length:
            found.append(_size(ino, length, inode.size))
    if inode.kind is not Kind.FILE:
        if inode.chunks:
            found.append(
                Finding(
                    Problem.CHUNK_MAP,
                    f"Inode {ino}: a {_kind(inode.kind)} with a chunk map of "
                    f"{len(inode.chunks)} chunks",
                    ino=ino,
                )
            )
        return found
    found += _chunk_map_findings(inode)
    extent = max((c.index * inode.chunk_size + c.length for c in inode.chunks), default=0)
    if extent > inode.size:
        found.append(_size(ino, extent, inode.size))
    return found


def _chunk_map_findings(inode: Inode) -> list[Finding]:
    found: list[Finding] = []
    seen: set[int] = set()
    for chunk in inode.chunks:
        problem = ""
        try:
            k, m = scheme_shape(chunk.scheme)
        except ValueError:
            k = m = 0
            problem = f"unknown scheme {chunk.scheme!r}"
        if chunk.index in seen:
            problem = "appears twice"
        elif not chunk.length <= chunk.stored_length <= inode.chunk_size:
            problem = (
                f"length {chunk.length} (coded {chunk.stored_length}) does not fit a "
                f"{inode.chunk_size}-byte chunk"
            )
        elif not problem and len(chunk.fragments) != k + m:
            problem = f"names {len(chunk.fragments)} fragments, {chunk.scheme} has {k + m}"
        seen.add(chunk.index)
        if problem:
            found.append(
                Finding(
                    Problem.CHUNK_MAP,
                    f"Inode {inode.ino}: chunk {chunk.index} {problem}",
                    ino=inode.ino,
                    chunk=chunk.index,
                )
            )
    return found


def shard_findings(shard: int, next_local: int, max_local: int) -> list[Finding]:
    """A shard's allocation counter must be past every number it handed out."""
    if next_local > max_local:
        return []
    return [
        Finding(
            Problem.COUNTER,
            f"shard {shard:03d}: next inode number {next_local} is not past inode "
            f"{max_local} already in use",
            shard=shard,
            expected=max_local + 1,
            actual=next_local,
            key=NEXT_LOCAL_KEY,
        )
    ]


def local_of(ino: int) -> int:
    return ino >> SHARD_BITS


# -- replicas ---------------------------------------------------------------------------
def corruption_finding(shard: int, node: str, bad: StoredCorruption, ino: int) -> Finding:
    """`Inode <n> checksum mismatch: expected 0x…, got 0x…` and where it is stored."""
    detail = f"; {bad.detail}" if bad.detail else ""
    return Finding(
        Problem.CHECKSUM,
        f"{bad.what} checksum mismatch: expected 0x{bad.expected:08x}, got "
        f"0x{bad.actual:08x} (shard {shard:03d}, replica on {node}{detail})",
        ino=ino,
        shard=shard,
        node=node,
        expected=bad.expected,
        actual=bad.actual,
        key=bad.key,
    )


def replica_finding(
    shard: int, node: str, seq: int, what: str, how: str, *, key: str = "", ino: int = 0
) -> Finding:
    """A record (or a whole shard) on one replica that is not what the journal says."""
    return Finding(
        Problem.REPLICA,
        f"{what}: {how} on the replica on {node} (shard {shard:03d} at seq {seq})",
        ino=ino,
        shard=shard,
        node=node,
        key=key,
        actual=seq,
    )


def compare_buckets(replica: Sequence[str], replay: Sequence[str]) -> list[int]:
    """Buckets whose digests differ (all of them when the shapes differ)."""
    if len(replica) != len(replay):
        return list(range(max(len(replica), len(replay))))
    return [i for i, (a, b) in enumerate(zip(replica, replay, strict=True)) if a != b]


def compare_records(replica: Mapping[str, str], replay: Mapping[str, str]) -> list[tuple[str, str]]:
    """(key, how) for every key whose value differs, is missing or is extra on the replica."""
    out: list[tuple[str, str]] = []
    for key in sorted(set(replica) | set(replay)):
        mine, truth = replica.get(key), replay.get(key)
        if mine == truth:
            continue
        how = "missing" if mine is None else "not in the journal" if truth is None else "differs"
        out.append((key, how))
    return out


# -- the shapes the tests use -------------------------------------------------------------
class _Merged(Protocol):
    inodes: dict[int, Inode]

    def scan_dentries(self) -> Iterable[Dentry]: ...


def check_tree(view: _Merged, inodes: Mapping[int, Inode] | None = None) -> list[str]:
    """Every finding of a whole namespace held in memory (all shards merged), as lines."""
    check = TreeCheck()
    for inode in (inodes if inodes is not None else view.inodes).values():
        check.add_inode(inode)
    for entry in view.scan_dentries():
        check.add_entry(entry)
    return [f.line for f in check.finish()]


def check_replay(live: MemoryShard, replayed: MemoryShard) -> list[str]:
    """Differences between the live state and one rebuilt from the journal."""
    problems = []
    for ino in sorted(set(live.inodes) | set(replayed.inodes)):
        if live.inodes.get(ino) != replayed.inodes.get(ino):
            problems.append(f"Inode {ino}: live state differs from journal replay")
    for parent in sorted(set(live.dirs) | set(replayed.dirs)):
        if live.dirs.get(parent) != replayed.dirs.get(parent):
            problems.append(f"directory {parent}: entries differ from journal replay")
    return problems


def _orphan(ino: int, kind: Kind) -> Finding:
    return Finding(
        Problem.ORPHAN,
        f"Inode {ino}: orphan {_kind(kind)} (no directory entry names it)",
        ino=ino,
        expected=int(kind is Kind.DIR),
    )


def _size(ino: int, expected: int, actual: int) -> Finding:
    return Finding(
        Problem.SIZE,
        f"Inode {ino}: corrupted (expected_size={expected}, actual={actual})",
        ino=ino,
        expected=expected,
        actual=actual,
    )


def _kind(kind: Kind) -> str:
    return {
        Kind.FILE: "file",
        Kind.DIR: "directory",
        Kind.SYMLINK: "symlink",
        Kind.FIFO: "fifo",
        Kind.SOCKET: "socket",
        Kind.CHAR: "character device",
        Kind.BLOCK: "block device",
    }[kind]
