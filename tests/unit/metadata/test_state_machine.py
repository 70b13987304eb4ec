"""The metadata state machine (decide + apply + read) against an independent POSIX model.

Random operation sequences run through both `cfs_metadata` (one `MemoryShard`) and
`model_fs.ModelFS`; after every step the errno, the whole observable tree and the shard's
internal consistency must agree. The same run also checks journal replay (whole, resumed from
an applied sequence, and redelivered), retries by op_id, and group commit through an
`Overlay`.
"""

from __future__ import annotations

import base64
import errno
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cfs.ids import new_id
from cfs_contracts import REGISTRY
from cfs_contracts.envelope import HLC
from cfs_contracts.events.metadata import JournalEntry, MetaCommitted
from cfs_contracts.fs.records import (
    ROOT_INO,
    SHARD_BITS,
    ChunkRef,
    Inode,
    Kind,
    make_ino,
    name_cookie,
    shard_of,
)
from cfs_contracts.fs.rpc import (
    UNSUPPORTED_XATTRS,
    CommitChunks,
    Create,
    FsError,
    GetAttr,
    GetXattr,
    Link,
    ListXattr,
    Lookup,
    MkDir,
    MkNod,
    MutationOp,
    ReadDir,
    ReadLink,
    ReadOp,
    RemoveXattr,
    Rename,
    Reply,
    RmDir,
    SetAttr,
    SetXattr,
    Symlink,
    Unlink,
    listed_xattrs,
)
from cfs_contracts.registry import decode_envelope, encode_envelope
from cfs_metadata.decide import bootstrap_entry, decide
from cfs_metadata.reads import read
from cfs_metadata.state import MemoryShard, Overlay, ShardView, apply_entries

from .model_fs import ModelError, ModelFS, Node

T = TypeVar("T")
PAGE = 3  # readdir page size: small, so every listing pages
T0 = 1_700_000_000_000_000_000
TICK = 1_000
NEVER_ALLOCATED = make_ino(1, 10**6)

NAMES = ["a", "b", "c", "d"]
EDGE_NAMES = ["x" * 255, "é" * 127]  # 255 and 254 bytes: valid
BAD_NAMES = ["", ".", "..", "a/b", "x" * 256, "é" * 128]  # 128 x 2 bytes: too long
NAME_POOL = NAMES * 8 + EDGE_NAMES + BAD_NAMES
TARGETS = ["t", "../a", "/abs/x", "", "y" * 4095, "y" * 4096]
XATTR_NAMES = ["user.a", "user.b", "trusted.c", "", "user." + "n" * 251]
XATTR_VALUES = [b"", b"v1", b"\x00\xff" * 3]
CHUNK = 4 * 1024 * 1024


def errname(code: int) -> str:
    return "OK" if code == 0 else errno.errorcode.get(code, str(code))


Outcome = Reply | int  # the reply of a committed operation, or the errno of a failed one


def outcome_name(outcome: Outcome) -> str:
    return "OK" if isinstance(outcome, Reply) else errname(outcome)


# -- shard helpers --------------------------------------------------------------------
def clone(shard: MemoryShard) -> MemoryShard:
    """Records are frozen, so copying the containers is a full copy."""
    copy = MemoryShard(shard.shard)
    copy.inodes = dict(shard.inodes)
    copy.dirs = {parent: dict(entries) for parent, entries in shard.dirs.items()}
    copy.replies = dict(shard.replies)
    copy.local = shard.local
    return copy


def snapshot(shard: MemoryShard) -> dict[str, Any]:
    return {
        "inodes": shard.inodes,
        "dirs": shard.dirs,
        "replies": shard.replies,
        "local": shard.local,
    }


def assert_same_shard(actual: MemoryShard, expected: MemoryShard, what: str) -> None:
    got, want = snapshot(actual), snapshot(expected)
    for key in want:
        assert got[key] == want[key], f"{what}: {key} differ"


def replay(entries: list[JournalEntry], into: MemoryShard | None = None) -> MemoryShard:
    shard = into if into is not None else MemoryShard(1)
    apply_entries(shard, entries)
    return shard


def through_the_journal(entries: list[JournalEntry]) -> list[JournalEntry]:
    """The entries as a follower reads them: one MetaCommitted event, encoded and decoded.

    Both decoders must agree: the one-pass decode of current versions and the generic
    path that upcasts older ones.
    """
    payload = MetaCommitted(shard="001", term=1, entries=tuple(entries))
    envelope = REGISTRY.envelope(
        payload, event_id=new_id(), site="t", node="a", hlc=HLC(wall_ms=1, counter=0, node="a")
    )
    raw = encode_envelope(envelope)
    fast = REGISTRY.decode(raw, strict=True).payload
    generic = REGISTRY.parse(decode_envelope(raw), strict=True).payload
    assert fast == generic == payload, "the journal codec changed an entry"
    assert isinstance(fast, MetaCommitted)
    return list(fast.entries)


def read_outcome(shard: MemoryShard, op: ReadOp) -> Outcome:
    try:
        return read(shard, op)
    except FsError as exc:
        return exc.errno


def list_dir(
    shard: ShardView, ino: int, limit: int = PAGE, attrs: dict[int, Inode] | None = None
) -> list[tuple[str, Kind, int]]:
    """The whole listing of `ino`, page by page, checking cookies and `more` on the way;
    with `attrs`, as readdirplus, collecting the inodes the pages carry."""
    seen: list[tuple[str, Kind, int]] = []
    cookie, last = 0, 0
    for _ in range(10_000):
        reply = read(shard, ReadDir(ino=ino, cookie=cookie, limit=limit, plus=attrs is not None))
        assert len(reply.entries) <= limit
        if attrs is not None:
            assert {i.ino for i in reply.inodes} <= {e.ino for e in reply.entries}
            attrs.update((i.ino, i) for i in reply.inodes)
        assert not reply.more or len(reply.entries) == limit, "short page flagged `more`"
        for entry in reply.entries:
            assert entry.cookie > last, f"readdir {ino}: cookies not increasing"
            last = entry.cookie
            seen.append((entry.name, entry.kind, entry.ino))
        if not reply.more:
            break
        cookie = reply.entries[-1].cookie
    names = [name for name, _, _ in seen]
    assert len(names) == len(set(names)), f"readdir {ino}: duplicate names {names}"
    return seen


def check_shard(shard: MemoryShard) -> None:
    """Structural consistency of the shard, with no reference to the model."""
    inodes = shard.inodes
    root = inodes.get(ROOT_INO)
    assert root is not None and root.is_dir and root.parent == ROOT_INO
    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    dir_parent: dict[int, int] = {}
    for parent, entries in shard.dirs.items():
        holder = inodes.get(parent)
        assert holder is not None, f"entries under missing inode {parent}"
        assert holder.is_dir, f"entries under non-directory {parent}"
        for name, dentry in entries.items():
            assert (dentry.parent, dentry.name) == (parent, name), f"misfiled dentry {dentry}"
            child = inodes.get(dentry.ino)
            assert child is not None, f"dangling dentry {dentry}"
            assert child.kind is dentry.kind, f"dentry kind {dentry} vs inode {child.kind}"
            names[dentry.ino] += 1
            if child.is_dir:
                assert dentry.ino not in dir_parent, f"directory {dentry.ino} has two names"
                assert dentry.ino != ROOT_INO, "root has a name"
                dir_parent[dentry.ino] = parent
                subdirs[parent] += 1
    for ino, inode in inodes.items():
        assert inode.ino == ino
        assert shard_of(ino) == shard.shard
        assert ino >> SHARD_BITS < shard.local, f"inode {ino} not below the allocation counter"
        if inode.is_dir:
            assert inode.nlink == 2 + subdirs[ino], f"dir {ino}: nlink {inode.nlink}"
            if ino != ROOT_INO:
                assert inode.parent == dir_parent.get(ino), f"dir {ino}: parent {inode.parent}"
        else:
            assert names[ino] >= 1, f"orphan inode {ino}"
            assert inode.nlink == names[ino], f"inode {ino}: nlink {inode.nlink} != {names[ino]}"
        if inode.kind is Kind.FILE:
            indexes = [chunk.index for chunk in inode.chunks]
            assert len(indexes) == len(set(indexes)), f"inode {ino}: duplicate chunk indexes"
            beyond = [c.index for c in inode.chunks if c.index * inode.chunk_size >= inode.size]
            assert not beyond, f"inode {ino}: chunks {beyond} lie past EOF ({inode.size})"
    reached, todo = {ROOT_INO}, [ROOT_INO]
    while todo:
        for dentry in shard.dirs.get(todo.pop(), {}).values():
            if dentry.ino not in reached:
                reached.add(dentry.ino)
                if inodes[dentry.ino].is_dir:
                    todo.append(dentry.ino)
    assert reached == set(inodes), f"unreachable inodes {set(inodes) - reached}"


def expected_attrs(model: ModelFS, node: Node) -> dict[str, Any]:
    want: dict[str, Any] = {
        "ino": node.ino,
        "kind": node.kind,
        "nlink": model.nlink(node.ino),
        "mode": node.mode,
        "uid": node.uid,
        "gid": node.gid,
        "target": node.target,
    }
    if not node.is_dir:
        want["size"] = node.size
    else:
        want["parent"] = node.parent
    if node.kind in (Kind.CHAR, Kind.BLOCK):
        want["rdev"] = node.rdev
    if node.mtime is not None:
        want["mtime_ns"] = node.mtime
    if node.ctime is not None:
        want["ctime_ns"] = node.ctime
    return want


def assert_inode_matches(inode: Inode | None, model: ModelFS, ino: int, what: str) -> None:
    assert inode is not None, f"{what}: no inode in reply"
    node = model.nodes[ino]
    want = expected_attrs(model, node)
    got = {key: getattr(inode, key) for key in want}
    assert got == want, f"{what}: inode {ino} is {got}, model says {want}"
    values = {name: base64.b64decode(value) for name, value in inode.xattrs.items()}
    assert values == node.xattrs, f"{what}: inode {ino} xattrs {values} != {node.xattrs}"


def compare_with_model(shard: MemoryShard, model: ModelFS) -> None:
    """Everything a client can observe through `read` equals the model."""
    assert set(shard.inodes) == set(model.nodes), (
        f"inodes: extra {set(shard.inodes) - set(model.nodes)}, "
        f"missing {set(model.nodes) - set(shard.inodes)}"
    )
    for ino, node in model.nodes.items():
        assert_inode_matches(read(shard, GetAttr(ino=ino)).inode, model, ino, "getattr")
        names = read(shard, ListXattr(ino=ino)).names
        assert list(names) == sorted(node.xattrs), f"listxattr {ino}: {names}"
        for name, value in node.xattrs.items():
            got = read(shard, GetXattr(ino=ino, name=name)).value_b64
            assert got is not None and base64.b64decode(got) == value
        if node.kind is Kind.SYMLINK:
            assert read(shard, ReadLink(ino=ino)).target == node.target
        if node.is_dir:
            attrs: dict[int, Inode] = {}
            listing = sorted(list_dir(shard, ino, attrs=attrs))
            want = sorted((n, model.nodes[c].kind, c) for n, c in node.entries.items())
            assert listing == want, f"readdir {ino}: {listing} != model {want}"
            assert set(attrs) == set(node.entries.values())  # one shard holds them all
            for child, inode in attrs.items():
                assert inode.chunks == (), "readdirplus carries no chunk maps"
                assert_inode_matches(inode, model, child, "readdirplus")
            for name, child in node.entries.items():
                found = read(shard, Lookup(parent=ino, name=name)).inode
                assert found is not None and found.ino == child, f"lookup {ino}/{name}"


def model_apply(model: ModelFS, op: MutationOp, now: int, alloc: Callable[[], int]) -> int | None:
    match op:
        case Create():
            return model.create(
                op.parent, op.name, op.mode, op.uid, op.gid, op.exclusive, now, alloc
            )
        case MkNod():
            return model.mknod(
                op.parent, op.name, op.kind, op.mode, op.rdev, op.uid, op.gid, now, alloc
            )
        case MkDir():
            return model.mkdir(op.parent, op.name, op.mode, op.uid, op.gid, now, alloc)
        case Symlink():
            return model.symlink(op.parent, op.name, op.target, op.uid, op.gid, now, alloc)
        case Link():
            return model.link(op.ino, op.new_parent, op.new_name, now)
        case Unlink():
            model.unlink(op.parent, op.name, now)
        case RmDir():
            model.rmdir(op.parent, op.name, now)
        case Rename():
            model.rename(op.parent, op.name, op.new_parent, op.new_name, op.flags, now)
        case SetAttr():
            model.setattr(
                op.ino,
                now,
                mode=op.mode,
                owner=op.owner,
                group=op.group,
                size=op.size,
                mtime_now=op.mtime_now,
            )
            return op.ino
        case SetXattr():
            model.setxattr(op.ino, op.name, op.value_b64, op.flags, now)
        case RemoveXattr():
            model.removexattr(op.ino, op.name, now)
        case CommitChunks():
            model.commit_chunks(op.ino, op.size, now)
    return None


def model_read(model: ModelFS, op: ReadOp) -> Any:
    match op:
        case Lookup():
            return model.lookup(op.parent, op.name)
        case GetAttr():
            return model.node(op.ino).ino
        case ReadLink():
            return model.readlink(op.ino)
        case ReadDir():
            return model.listdir(op.ino)
        case GetXattr():
            return model.getxattr(op.ino, op.name)
        case ListXattr():
            return model.listxattr(op.ino)
    raise AssertionError(op)


def reply_value(op: ReadOp, reply: Reply) -> Any:
    match op:
        case Lookup() | GetAttr():
            return reply.inode.ino if reply.inode else None
        case ReadLink():
            return reply.target
        case GetXattr():
            return base64.b64decode(reply.value_b64 or "")
        case ListXattr():
            return list(reply.names)
    raise AssertionError(op)


# -- the system under test, checked against the model ----------------------------------
class Harness:
    """One shard: committed state, journal, clock and op ids, and the model beside it."""

    def __init__(self) -> None:
        self.now = T0
        self.state = MemoryShard(1)
        self.journal = [bootstrap_entry(self.now, "bootstrap")]
        apply_entries(self.state, self.journal)
        self.model = ModelFS(self.now)
        self.serial = 0
        self.committed: dict[str, tuple[MutationOp, Reply]] = {}
        self.times: dict[int, tuple[int, int]] = {}

    def op_id(self) -> str:
        self.serial += 1
        return f"{self.serial:026d}"

    def tick(self) -> int:
        self.now += TICK
        return self.now

    def submit(self, op: MutationOp, now: int) -> tuple[Outcome, int]:
        """decide + apply on the live shard; returns the outcome and the number of changes.

        `decide` must be pure: it leaves the view alone and answers the same twice.
        """
        before = clone(self.state)
        try:
            decision = decide(self.state, op, now)
        except FsError as exc:
            assert exc.errno != 0
            assert_same_shard(self.state, before, f"failed {op!r} touched the state")
            return exc.errno, 0
        assert_same_shard(self.state, before, f"deciding {op!r} touched the state")
        again = decide(self.state, op, now)
        assert (again.changes, again.reply) == (decision.changes, decision.reply), (
            f"{op!r}: decided differently twice"
        )
        assert decision.reply.errno == 0, f"{op!r}: error reply {decision.reply} not raised"
        entry = decision.entry(op)
        apply_entries(self.state, [entry])
        self.journal.append(entry)
        return decision.reply, len(decision.changes)

    def execute(self, op: MutationOp) -> Outcome:
        now = self.tick()
        outcome, changes = self.submit(op, now)
        known = self.committed.get(op.op_id)
        if known is not None:  # a retry: the original answer, nothing changes
            assert outcome == known[1], f"retry of {op!r} answered {outcome}, first {known[1]}"
            assert changes == 0, f"retry of {op!r} made {changes} changes"
            return outcome
        self.check(op, now, outcome)
        if isinstance(outcome, Reply):
            self.committed[op.op_id] = (op, outcome)
        return outcome

    def check(self, op: MutationOp, now: int, outcome: Outcome) -> None:
        def alloc() -> int:
            assert isinstance(outcome, Reply), (
                f"{op!r}: model succeeds, system says {outcome_name(outcome)}"
            )
            assert outcome.inode is not None, f"{op!r}: created without an inode in the reply"
            return outcome.inode.ino

        try:
            result = model_apply(self.model, op, now, alloc)
        except ModelError as exc:
            got = outcome if isinstance(outcome, int) else 0
            assert got in exc.codes, f"{op!r}: system says {errname(got)}, model says {exc}"
            return
        assert isinstance(outcome, Reply), (
            f"{op!r}: system says {outcome_name(outcome)}, model succeeds"
        )
        if result is not None:
            assert_inode_matches(outcome.inode, self.model, result, f"reply to {op!r}")

    def check_all(self) -> None:
        check_shard(self.state)
        compare_with_model(self.state, self.model)
        for ino, inode in self.state.inodes.items():
            before = self.times.get(ino)
            if before is not None:
                assert inode.mtime_ns >= before[0], f"inode {ino}: mtime went back"
                assert inode.ctime_ns >= before[1], f"inode {ino}: ctime went back"
            assert inode.mtime_ns <= self.now and inode.ctime_ns <= self.now
            self.times[ino] = (inode.mtime_ns, inode.ctime_ns)


# -- drawing operations from the current state -----------------------------------------
class Draw:
    def __init__(self, harness: Harness, data: st.DataObject) -> None:
        self.h = harness
        self.data = data

    def pick(self, options: Sequence[T]) -> T:
        return self.data.draw(st.sampled_from(options))

    def chance(self, times: int, out_of: int) -> bool:
        return self.pick([True] * times + [False] * (out_of - times))

    def gone(self) -> int:
        return self.pick([*sorted(self.h.model.ever - set(self.h.model.nodes)), NEVER_ALLOCATED])

    def dir(self, *, full: bool = False) -> int:
        """Mostly a directory (`full`: one with entries, if any); sometimes any inode
        (ENOTDIR) or a missing one (ENOENT)."""
        how = self.pick(["dir"] * 8 + ["any", "gone"])
        if how == "dir":
            dirs = self.h.model.dirs()
            if full and any(d.entries for d in dirs):
                dirs = [d for d in dirs if d.entries]
            return self.pick(sorted(d.ino for d in dirs))
        if how == "any":
            return self.pick(sorted(self.h.model.nodes))
        return self.gone()

    def ino(self) -> int:
        return (
            self.gone()
            if self.pick([False] * 9 + [True])
            else self.pick(sorted(self.h.model.nodes))
        )

    def name(self) -> str:
        return self.pick(NAME_POOL)

    def entry(self, parent: int, kinds: tuple[Kind, ...] = ()) -> str:
        """Mostly a name present in `parent` (of one of `kinds`, if given); else any name."""
        node = self.h.model.nodes.get(parent)
        present = sorted(
            name
            for name, ino in (node.entries.items() if node is not None else ())
            if not kinds or self.h.model.nodes[ino].kind in kinds
        )
        if present and self.chance(3, 4):
            return self.pick(present)
        return self.name()

    def file(self) -> int:
        files = sorted(n.ino for n in self.h.model.nodes.values() if n.kind is Kind.FILE)
        if files and self.chance(3, 4):
            return self.pick(files)
        return self.ino()

    def ids(self) -> dict[str, Any]:
        return {"op_id": self.h.op_id(), "uid": self.pick([0, 1000]), "gid": self.pick([0, 1000])}

    def create(self) -> MutationOp:
        return Create(
            parent=self.dir(),
            name=self.name(),
            mode=self.pick([0o644, 0o600, 0o755]),
            exclusive=self.pick([True, True, False]),
            **self.ids(),
        )

    def mknod(self) -> MutationOp:
        kinds = [Kind.FIFO, Kind.SOCKET, Kind.CHAR, Kind.BLOCK, Kind.FILE, Kind.DIR, Kind.SYMLINK]
        return MkNod(
            parent=self.dir(),
            name=self.name(),
            kind=self.pick(kinds),
            mode=self.pick([0o644, 0o600]),
            rdev=self.pick([0, 0x0801]),
            **self.ids(),
        )

    def mkdir(self) -> MutationOp:
        return MkDir(
            parent=self.dir(),
            name=self.name(),
            mode=self.pick([0o755, 0o700, 0o1777, 0o2775]),
            **self.ids(),
        )

    def symlink(self) -> MutationOp:
        return Symlink(parent=self.dir(), name=self.name(), target=self.pick(TARGETS), **self.ids())

    def link(self) -> MutationOp:
        return Link(ino=self.ino(), new_parent=self.dir(), new_name=self.name(), **self.ids())

    def unlink(self) -> MutationOp:
        parent = self.dir(full=True)
        return Unlink(parent=parent, name=self.entry(parent), **self.ids())

    def rmdir(self) -> MutationOp:
        parent = self.dir(full=True)
        return RmDir(parent=parent, name=self.entry(parent, (Kind.DIR,)), **self.ids())

    def rename(self) -> MutationOp:
        flags = self.pick([0, 0, 0, 0, 1, 2, 2, 3, 4])
        names = sorted((d.ino, name) for d in self.h.model.dirs() for name in d.entries)
        if names and self.chance(1, 2):  # two existing names anywhere in the tree
            (parent, name), (new_parent, new_name) = self.pick(names), self.pick(names)
            if self.chance(1, 3):
                new_name = self.name()
            return Rename(
                parent=parent,
                name=name,
                new_parent=new_parent,
                new_name=new_name,
                flags=flags,
                **self.ids(),
            )
        parent, new_parent = self.dir(full=True), self.dir()
        return Rename(
            parent=parent,
            name=self.entry(parent),
            new_parent=new_parent,
            new_name=self.entry(new_parent),
            flags=flags,
            **self.ids(),
        )

    def exchange(self) -> MutationOp:
        """Two existing names, in different directories when there are such (any flags)."""
        names = sorted((d.ino, name) for d in self.h.model.dirs() for name in d.entries)
        if not names:
            return self.rename()
        parent, name = self.pick(names)
        elsewhere = [(p, n) for p, n in names if p != parent] or names
        new_parent, new_name = self.pick(elsewhere)
        return Rename(
            parent=parent,
            name=name,
            new_parent=new_parent,
            new_name=new_name,
            flags=self.pick([2, 2, 0, 1]),
            **self.ids(),
        )

    def setattr(self) -> MutationOp:
        return SetAttr(
            ino=self.file() if self.pick([True, False]) else self.ino(),
            mode=self.pick([None, 0o600, 0o755, 0o1777, 0o2775]),
            owner=self.pick([None, None, 0, 1000]),
            group=self.pick([None, None, 0, 1000]),
            size=self.pick([None, None, 0, 100, CHUNK + 7]),
            mtime_now=self.pick([False, True]),
            **self.ids(),
        )

    def setxattr(self) -> MutationOp:
        how = self.pick(["ok"] * 8 + ["not base64", "too big"])
        if how == "ok":
            value = base64.b64encode(self.pick(XATTR_VALUES)).decode()
        elif how == "not base64":
            value = "!!not base64!!"
        else:
            value = base64.b64encode(b"z" * (64 * 1024 + 1)).decode()
        return SetXattr(
            ino=self.ino(),
            name=self.pick(XATTR_NAMES),
            value_b64=value,
            flags=self.pick([0, 0, 1, 2, 3, 4]),
            **self.ids(),
        )

    def removexattr(self) -> MutationOp:
        having = sorted((n.ino, x) for n in self.h.model.nodes.values() for x in n.xattrs)
        if having and self.chance(2, 3):
            ino, name = self.pick(having)
            return RemoveXattr(ino=ino, name=name, **self.ids())
        return RemoveXattr(ino=self.ino(), name=self.pick(XATTR_NAMES), **self.ids())

    def commit_chunks(self) -> MutationOp:
        """A write of chunks first..last; the size may also shrink (a writer with a stale size)."""
        ino = self.file()
        end = self.pick([1, CHUNK, CHUNK + 5, 2 * CHUNK + 9])
        last = (end - 1) // CHUNK
        first = self.data.draw(st.integers(0, last))
        node = self.h.model.nodes.get(ino)
        size = self.pick([max(end, node.size if node is not None else 0), end, 2 * CHUNK + 9])
        chunks = tuple(
            ChunkRef(
                index=i,
                chunk_id=f"{i:064x}",
                length=min(CHUNK, end - i * CHUNK),
                scheme="copy2",
                fragments=("n1", "n2"),
            )
            for i in range(first, last + 1)
        )
        return CommitChunks(ino=ino, chunks=chunks, size=size, **self.ids())

    def mutation(self) -> MutationOp:
        kinds: list[Callable[[], MutationOp]] = [
            self.create,
            self.mknod,
            self.mkdir,
            self.mkdir,
            self.symlink,
            self.link,
            self.unlink,
            self.rmdir,
            self.rename,
            self.exchange,
            self.setattr,
            self.setxattr,
            self.removexattr,
            self.commit_chunks,
        ]
        return self.pick(kinds)()

    def read_op(self) -> ReadOp:
        make = self.pick(["lookup", "getattr", "readlink", "readdir", "getxattr", "listxattr"])
        if make == "lookup":
            return Lookup(parent=self.dir(), name=self.name())
        if make == "readdir":
            return ReadDir(ino=self.dir(), limit=self.pick([1, 2, 1000]))
        if make == "getxattr":
            return GetXattr(ino=self.ino(), name=self.pick(XATTR_NAMES))
        ops: dict[str, Callable[..., ReadOp]] = {
            "getattr": GetAttr,
            "readlink": ReadLink,
            "listxattr": ListXattr,
        }
        return ops[make](ino=self.ino())


class MetadataMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.h = Harness()

    def run(self, data: st.DataObject, make: Callable[[Draw], MutationOp]) -> None:
        self.h.execute(make(Draw(self.h, data)))

    @rule(data=st.data())
    def create(self, data: st.DataObject) -> None:
        self.run(data, Draw.create)

    @rule(data=st.data())
    def mknod(self, data: st.DataObject) -> None:
        self.run(data, Draw.mknod)

    @rule(data=st.data())
    def mkdir(self, data: st.DataObject) -> None:
        self.run(data, Draw.mkdir)

    @rule(data=st.data())
    def symlink(self, data: st.DataObject) -> None:
        self.run(data, Draw.symlink)

    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        self.run(data, Draw.link)

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        self.run(data, Draw.unlink)

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        self.run(data, Draw.rmdir)

    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        self.run(data, Draw.rename)

    @rule(data=st.data())
    def exchange(self, data: st.DataObject) -> None:
        self.run(data, Draw.exchange)

    @rule(data=st.data())
    def setattr(self, data: st.DataObject) -> None:
        self.run(data, Draw.setattr)

    @rule(data=st.data())
    def setxattr(self, data: st.DataObject) -> None:
        self.run(data, Draw.setxattr)

    @rule(data=st.data())
    def removexattr(self, data: st.DataObject) -> None:
        self.run(data, Draw.removexattr)

    @rule(data=st.data())
    def commit_chunks(self, data: st.DataObject) -> None:
        self.run(data, Draw.commit_chunks)

    @rule(data=st.data())
    def read_anything(self, data: st.DataObject) -> None:
        op = Draw(self.h, data).read_op()
        got = read_outcome(self.h.state, op)
        try:
            want = model_read(self.h.model, op)
        except ModelError as exc:
            code = got if isinstance(got, int) else 0
            assert code in exc.codes, f"{op!r}: system says {errname(code)}, model says {exc}"
            return
        assert isinstance(got, Reply), f"{op!r}: system says {errname(got)}, model succeeds"
        if isinstance(op, ReadDir):  # the first page, in cookie order
            listing = sorted(want.items(), key=lambda item: name_cookie(item[0]))
            page = [(entry.name, entry.ino) for entry in got.entries]
            assert page == listing[: op.limit], f"{op!r}: page {page} != model {listing}"
            assert got.more == (len(listing) > op.limit)
            return
        assert reply_value(op, got) == want, f"{op!r}: {got} != model {want}"

    @precondition(lambda self: any(len(d.entries) > 2 for d in self.h.model.dirs()))
    @rule(data=st.data())
    def readdir_across_a_mutation(self, data: st.DataObject) -> None:
        """A listing resumed by cookie after a change returns every name that stayed, once."""
        draw = Draw(self.h, data)
        ino = draw.pick(sorted(d.ino for d in self.h.model.dirs() if len(d.entries) > 2))
        before = dict(self.h.model.nodes[ino].entries)
        first = read(self.h.state, ReadDir(ino=ino, limit=2))
        assert first.more
        self.h.execute(draw.mutation())
        if ino not in self.h.model.nodes:
            return
        after = self.h.model.nodes[ino].entries
        names = [entry.name for entry in first.entries]
        cookie = first.entries[-1].cookie
        while True:
            page = read(self.h.state, ReadDir(ino=ino, cookie=cookie, limit=PAGE))
            names += [entry.name for entry in page.entries]
            if not page.more:
                break
            cookie = page.entries[-1].cookie
        assert len(names) == len(set(names)), f"resumed listing repeats a name: {names}"
        assert set(before) & set(after) <= set(names), f"resumed listing lost a name: {names}"
        assert set(names) <= set(before) | set(after), f"listing invented a name: {names}"

    @precondition(lambda self: self.h.committed)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """A client retry with the same op_id gets the first reply and changes nothing."""
        op_id = data.draw(st.sampled_from(sorted(self.h.committed)))
        before = clone(self.h.state)
        self.h.execute(self.h.committed[op_id][0])
        assert self.h.state.inodes == before.inodes and self.h.state.dirs == before.dirs

    @rule(data=st.data())
    def crash_and_replay(self, data: st.DataObject) -> None:
        journal = self.h.journal
        assert_same_shard(replay(journal), self.h.state, "full replay")
        assert_same_shard(
            replay(through_the_journal(journal)), self.h.state, "replay of the encoded journal"
        )
        # a restart resumes after the last applied sequence number: no entry twice
        applied = data.draw(st.integers(0, len(journal)))
        resumed = replay(journal[:applied])
        replay(journal[applied:], into=resumed)
        assert_same_shard(resumed, self.h.state, f"replay resumed at {applied}")
        # at-least-once delivery: entries applied again after a lost ack change nothing
        again = data.draw(st.integers(0, applied))
        redelivered = replay(journal[:applied])
        replay(journal[again:], into=redelivered)
        assert_same_shard(redelivered, self.h.state, f"replay {again}.. after {applied}")

    @rule(data=st.data(), size=st.integers(2, 6))
    def group_commit(self, data: st.DataObject, size: int) -> None:
        """A batch decided against one Overlay commits what one-at-a-time decisions do."""
        draw = Draw(self.h, data)
        ops = [draw.mutation() for _ in range(size)]
        if data.draw(st.booleans()):  # a retry inside the batch
            ops.insert(data.draw(st.integers(1, size)), ops[data.draw(st.integers(0, size - 1))])
        batch = clone(self.h.state)
        overlay = Overlay(batch)
        entries: list[JournalEntry] = []
        grouped: list[Outcome] = []
        for i, op in enumerate(ops, start=1):
            try:
                decision = decide(overlay, op, self.h.now + i * TICK)
            except FsError as exc:
                grouped.append(exc.errno)
                continue
            entry = decision.entry(op)
            apply_entries(overlay, [entry])
            entries.append(entry)
            grouped.append(decision.reply)
        committed = clone(batch)
        apply_entries(committed, entries)
        # before the commit, the overlay already reads as the committed state will
        for ino in set(batch.inodes) | set(committed.inodes):
            inode = committed.inodes.get(ino)
            assert overlay.inode(ino) == inode, f"overlay has another inode {ino}"
            if inode is not None and inode.is_dir:
                staged, final = list_dir(overlay, ino), list_dir(committed, ino)
                assert staged == final, f"overlay lists {ino} as {staged}, not {final}"
        assert overlay.next_local() == committed.local
        assert all(overlay.op_reply(e.op_id) == e.reply for e in entries)
        batch = committed
        one_by_one = [self.h.execute(op) for op in ops]
        assert [outcome_name(o) for o in grouped] == [outcome_name(o) for o in one_by_one]
        assert grouped == one_by_one
        assert_same_shard(batch, self.h.state, "group commit")

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "h"):
            self.h.check_all()


TestMetadataStateMachine = MetadataMachine.TestCase
TestMetadataStateMachine.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- examples -------------------------------------------------------------------------
class Fs:
    """The harness with a path-free helper API for the example tests."""

    def __init__(self) -> None:
        self.h = Harness()

    def do(self, op_type: type[MutationOp], **fields: Any) -> Outcome:
        outcome = self.h.execute(op_type(op_id=self.h.op_id(), **fields))
        self.h.check_all()
        return outcome

    def new(self, op_type: type[MutationOp], **fields: Any) -> int:
        outcome = self.do(op_type, **fields)
        assert isinstance(outcome, Reply) and outcome.inode is not None, outcome
        return outcome.inode.ino

    def attr(self, ino: int) -> Inode:
        inode = read(self.h.state, GetAttr(ino=ino)).inode
        assert inode is not None
        return inode


def test_rename_directory_into_its_own_subtree_is_einval() -> None:
    fs = Fs()
    a = fs.new(MkDir, parent=ROOT_INO, name="a")
    b = fs.new(MkDir, parent=a, name="b")
    assert fs.do(Rename, parent=ROOT_INO, name="a", new_parent=b, new_name="x") == errno.EINVAL
    assert fs.do(Rename, parent=ROOT_INO, name="a", new_parent=a, new_name="x") == errno.EINVAL
    flags = 2  # RENAME_EXCHANGE of a directory with an entry inside it
    fs.new(Create, parent=b, name="f")
    assert fs.do(Rename, parent=ROOT_INO, name="a", new_parent=b, new_name="f", flags=flags) == (
        errno.EINVAL
    )


def test_exchange_file_with_directory_across_parents_moves_the_link_count() -> None:
    fs = Fs()
    p = fs.new(MkDir, parent=ROOT_INO, name="p")
    q = fs.new(MkDir, parent=ROOT_INO, name="q")
    d = fs.new(MkDir, parent=p, name="d")
    f = fs.new(Create, parent=q, name="f")
    assert (fs.attr(p).nlink, fs.attr(q).nlink) == (3, 2)
    assert isinstance(fs.do(Rename, parent=p, name="d", new_parent=q, new_name="f", flags=2), Reply)
    assert (fs.attr(p).nlink, fs.attr(q).nlink) == (2, 3)
    assert fs.attr(d).parent == q
    assert read(fs.h.state, Lookup(parent=p, name="d")).inode.ino == f  # type: ignore[union-attr]


def test_rmdir_of_a_non_empty_directory_is_enotempty() -> None:
    fs = Fs()
    a = fs.new(MkDir, parent=ROOT_INO, name="a")
    fs.new(MkNod, parent=a, name="p", kind=Kind.FIFO)
    assert fs.do(RmDir, parent=ROOT_INO, name="a") == errno.ENOTEMPTY
    assert fs.do(Unlink, parent=ROOT_INO, name="a") == errno.EISDIR
    assert isinstance(fs.do(Unlink, parent=a, name="p"), Reply)
    assert isinstance(fs.do(RmDir, parent=ROOT_INO, name="a"), Reply)
    assert fs.attr(ROOT_INO).nlink == 2


def test_rename_over_a_non_empty_directory_is_enotempty() -> None:
    fs = Fs()
    fs.new(MkDir, parent=ROOT_INO, name="a")
    b = fs.new(MkDir, parent=ROOT_INO, name="b")
    fs.new(Create, parent=b, name="f")
    assert fs.do(Rename, parent=ROOT_INO, name="a", new_parent=ROOT_INO, new_name="b") == (
        errno.ENOTEMPTY
    )
    assert fs.do(Unlink, parent=b, name="f") != errno.ENOENT
    assert isinstance(
        fs.do(Rename, parent=ROOT_INO, name="a", new_parent=ROOT_INO, new_name="b"), Reply
    )
    assert fs.attr(ROOT_INO).nlink == 3
    assert b not in fs.h.state.inodes


def test_hard_link_count_through_unlink_and_rename() -> None:
    fs = Fs()
    d = fs.new(MkDir, parent=ROOT_INO, name="d")
    f = fs.new(Create, parent=ROOT_INO, name="f")
    assert fs.do(Link, ino=d, new_parent=ROOT_INO, new_name="d2") == errno.EPERM
    fs.do(Link, ino=f, new_parent=d, new_name="g")
    fs.do(Link, ino=f, new_parent=ROOT_INO, new_name="h")
    assert fs.attr(f).nlink == 3
    # two names of one inode: rename does nothing and succeeds
    assert isinstance(fs.do(Rename, parent=ROOT_INO, name="f", new_parent=d, new_name="g"), Reply)
    assert fs.attr(f).nlink == 3
    assert fs.do(Rename, parent=ROOT_INO, name="f", new_parent=d, new_name="g", flags=1) == (
        errno.EEXIST
    )
    fs.do(Unlink, parent=ROOT_INO, name="f")
    fs.do(Unlink, parent=d, name="g")
    assert fs.attr(f).nlink == 1
    fs.do(Unlink, parent=ROOT_INO, name="h")
    assert f not in fs.h.state.inodes


def test_rename_replacing_a_file_drops_its_last_link() -> None:
    fs = Fs()
    a = fs.new(Create, parent=ROOT_INO, name="a")
    b = fs.new(Create, parent=ROOT_INO, name="b")
    assert isinstance(
        fs.do(Rename, parent=ROOT_INO, name="a", new_parent=ROOT_INO, new_name="b"), Reply
    )
    assert b not in fs.h.state.inodes and fs.attr(a).nlink == 1


def test_xattr_create_and_replace_flags() -> None:
    fs = Fs()
    f = fs.new(Create, parent=ROOT_INO, name="f")
    v = base64.b64encode(b"v").decode()
    assert fs.do(SetXattr, ino=f, name="user.k", value_b64=v, flags=2) == errno.ENODATA
    assert isinstance(fs.do(SetXattr, ino=f, name="user.k", value_b64=v, flags=1), Reply)
    assert fs.do(SetXattr, ino=f, name="user.k", value_b64=v, flags=1) == errno.EEXIST
    assert isinstance(fs.do(RemoveXattr, ino=f, name="user.k"), Reply)
    assert fs.do(RemoveXattr, ino=f, name="user.k") == errno.ENODATA


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name: str) -> None:
    fs = Fs()
    want = errno.ENAMETOOLONG if len(name.encode()) > 255 else errno.EINVAL
    assert fs.do(MkDir, parent=ROOT_INO, name=name) == want
    assert fs.do(Create, parent=ROOT_INO, name=name) == want


# -- regressions: bugs this suite found in decide.py ------------------------------------
def decide_and_apply(shard: MemoryShard, op: MutationOp, now: int) -> Outcome:
    try:
        decision = decide(shard, op, now)
    except FsError as exc:
        return exc.errno
    apply_entries(shard, [decision.entry(op)])
    return decision.reply


def test_commit_chunks_never_leaves_chunks_past_eof() -> None:
    fs = Fs()
    f = fs.new(Create, parent=ROOT_INO, name="f")
    refs = [ChunkRef(index=i, chunk_id=f"{i:064x}", length=CHUNK, scheme="copy2") for i in (0, 1)]
    state = fs.h.state
    decide_and_apply(state, CommitChunks(op_id="w1", ino=f, chunks=tuple(refs), size=2 * CHUNK), 1)
    # a second writer whose idea of the size is stale commits chunk 0 only
    one = ChunkRef(index=0, chunk_id="e" * 64, length=1, scheme="copy2")
    assert isinstance(
        decide_and_apply(state, CommitChunks(op_id="w2", ino=f, chunks=(one,), size=1), 2), Reply
    )
    inode = state.inodes[f]
    past_eof = [c.index for c in inode.chunks if c.index * inode.chunk_size >= inode.size]
    assert past_eof == [], f"size {inode.size}, chunks past EOF: {past_eof}"


def test_setxattr_with_unknown_flags_is_einval() -> None:
    state = Harness().state
    op = SetXattr(op_id="x1", ino=ROOT_INO, name="user.k", value_b64="", flags=4)
    assert decide_and_apply(state, op, T0 + 1) == errno.EINVAL


def test_acls_and_selinux_labels_are_refused_as_unsupported() -> None:
    """Stored, an ACL would be enforced by nobody: EOPNOTSUPP, as without ACL support."""
    state = Harness().state
    for i, name in enumerate(sorted(UNSUPPORTED_XATTRS)):
        op = SetXattr(op_id=f"x{i}", ino=ROOT_INO, name=name, value_b64="AA==")
        assert decide_and_apply(state, op, T0 + 1) == errno.EOPNOTSUPP
        remove = RemoveXattr(op_id=f"r{i}", ino=ROOT_INO, name=name)
        assert decide_and_apply(state, remove, T0 + 1) == errno.EOPNOTSUPP
    assert listed_xattrs(["user.b", "system.posix_acl_access", "user.a"]) == ("user.a", "user.b")


def test_symlink_target_of_path_max_bytes_is_enametoolong() -> None:
    state = Harness().state
    op = Symlink(op_id="s1", parent=ROOT_INO, name="s", target="y" * 4096)
    assert decide_and_apply(state, op, T0 + 1) == errno.ENAMETOOLONG
