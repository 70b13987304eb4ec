"""The checker's pure parts: findings on namespaces spread over shards, the repair plan
that fixes them, record digests, and the writer's decision on a repair."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfs_contracts.events.metadata import JournalEntry, MetaCommitted
from cfs_contracts.fs.changes import DelDentry, DelInode, PutInode, SetNextLocal
from cfs_contracts.fs.records import ROOT_INO, ChunkRef, Dentry, Inode, Kind, make_ino, shard_of
from cfs_contracts.fs.rpc import RemoteRecord, Reply
from cfs_contracts.fs.shard_admin import RepairRecords
from cfs_metadata.check import Problem, TreeCheck, check_tree, compare_records, inode_findings
from cfs_metadata.digest import bucket_records, record_name, scan_pairs, stored_corruption
from cfs_metadata.projection import Projection
from cfs_metadata.repair_plan import AdoptOrphan, FixRecord, Unrepaired, adoption, plan_repairs
from cfs_metadata.shard_admin import ShardState, decide_repair
from cfs_metadata.state import MemoryShard, apply_change
from cfs_metadata.txn import inode_key

SHARDS = 3
CS = 4096
DIR, FILE, SYMLINK = Kind.DIR, Kind.FILE, Kind.SYMLINK


def _inode(ino: int, kind: Kind, **extra: object) -> Inode:
    fields: dict[str, object] = {
        "ino": ino,
        "kind": kind,
        "mode": 0o755,
        "uid": 0,
        "gid": 0,
        "nlink": 2 if kind is DIR else 1,
        "size": 0,
        "atime_ns": 1,
        "mtime_ns": 1,
        "ctime_ns": 1,
        "chunk_size": CS,
        **extra,
    }
    return Inode.model_validate(fields)


@dataclass
class Namespace:
    """A consistent namespace over SHARDS shards, built the way placement spreads it."""

    state: MemoryShard = field(default_factory=lambda: MemoryShard(1))
    locals: dict[int, int] = field(default_factory=lambda: dict.fromkeys(range(1, SHARDS + 1), 2))

    def new_ino(self, shard: int) -> int:
        self.locals[shard] += 1
        return make_ino(shard, self.locals[shard] - 1)

    def add(self, parent: int, name: str, kind: Kind, shard: int, size: int = 0) -> Inode:
        """A new inode and its first name (a directory in `shard`, the rest beside it)."""
        home = shard if kind is DIR else shard_of(parent)
        extra: dict[str, object] = {"parent": parent} if kind is DIR else {}
        if kind is SYMLINK:
            extra.update(target="t" * size, size=size)
        if kind is FILE and size:
            chunks = tuple(_chunk(i, min(CS, size - i * CS)) for i in range((size + CS - 1) // CS))
            extra.update(size=size, chunks=chunks)
        inode = _inode(self.new_ino(home), kind, **extra)
        self.state.put_inode(inode)
        self.state.put_dentry(Dentry(parent=parent, name=name, ino=inode.ino, kind=kind))
        if kind is DIR:
            self._bump(parent)
        return inode

    def hard_link(self, parent: int, name: str, ino: int) -> None:
        kind = self.state.inodes[ino].kind
        self.state.put_dentry(Dentry(parent=parent, name=name, ino=ino, kind=kind))
        self._bump(ino)

    def _bump(self, ino: int) -> None:
        current = self.state.inodes[ino]
        self.state.put_inode(current.model_copy(update={"nlink": current.nlink + 1}))


@st.composite
def namespaces(draw: st.DrawFn) -> Namespace:
    ns = Namespace()
    ns.state.put_inode(_inode(ROOT_INO, DIR, parent=ROOT_INO))
    dirs = [ROOT_INO]
    files: list[int] = []
    for i in range(draw(st.integers(0, 25))):
        parent = draw(st.sampled_from(dirs))
        what = draw(st.sampled_from(["dir", "file", "symlink", "link"]))
        if what == "link" and files:
            ns.hard_link(parent, f"h{i}", draw(st.sampled_from(files)))
            continue
        kind = {"dir": DIR, "symlink": SYMLINK}.get(what, FILE)
        size = draw(st.integers(0, 3 * CS)) if kind is not DIR else 0
        made = ns.add(parent, f"n{i}", kind, draw(st.integers(1, SHARDS)), size)
        (dirs if kind is DIR else files).append(made.ino)
    return ns


def _check(state: MemoryShard) -> list:
    check = TreeCheck()
    for inode in state.inodes.values():
        check.add_inode(inode)
    for entry in state.scan_dentries():
        check.add_entry(entry)
    return check.finish()


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(namespaces())
def test_a_consistent_namespace_over_shards_has_no_findings(ns: Namespace) -> None:
    assert _check(ns.state) == []
    assert check_tree(ns.state, ns.state.inodes) == []


DAMAGE = ["nlink", "orphan", "orphan_dir", "dangling", "parent", "size", "dir_size", "kind"]


def _damage(ns: Namespace, how: str, pick: int) -> tuple[Problem, int] | None:
    """Break one thing the way a buggy operation could; the finding it must cause."""
    state = ns.state
    others = [i for i in sorted(state.inodes) if i != ROOT_INO]
    files = [i for i in others if state.inodes[i].kind is FILE]
    dirs = [i for i in others if state.inodes[i].is_dir]
    entries = sorted(state.scan_dentries(), key=lambda d: (d.parent, d.name))
    if how == "nlink" and others:
        ino = others[pick % len(others)]
        state.put_inode(state.inodes[ino].model_copy(update={"nlink": state.inodes[ino].nlink + 7}))
        return Problem.NLINK, ino
    if how == "orphan" and files:
        ino = files[pick % len(files)]
        for entry in [e for e in entries if e.ino == ino]:
            state.del_dentry(entry.parent, entry.name)
        return Problem.ORPHAN, ino
    if how == "orphan_dir" and dirs:
        ino = dirs[pick % len(dirs)]
        (entry,) = [e for e in entries if e.ino == ino]
        state.del_dentry(entry.parent, entry.name)  # its parent's link count is now 1 too high
        return Problem.ORPHAN, ino
    if how == "dangling" and files:
        ino = files[pick % len(files)]
        state.del_inode(ino)
        return Problem.DANGLING, ino
    if how == "parent" and dirs:
        ino = dirs[pick % len(dirs)]
        state.put_inode(state.inodes[ino].model_copy(update={"parent": 999_999}))
        return Problem.PARENT, ino
    sized = [i for i in files if state.inodes[i].chunks]
    if how == "size" and sized:
        ino = sized[pick % len(sized)]
        state.put_inode(state.inodes[ino].model_copy(update={"size": 0}))
        return Problem.SIZE, ino
    if how == "dir_size" and dirs:
        ino = dirs[pick % len(dirs)]
        state.put_inode(state.inodes[ino].model_copy(update={"size": 4096}))
        return Problem.DIR_SIZE, ino
    if how == "kind" and entries:
        entry = entries[pick % len(entries)]
        wrong = FILE if entry.kind is DIR else DIR
        state.put_dentry(entry.model_copy(update={"kind": wrong}))
        return Problem.KIND, entry.ino
    return None


def _apply(state: MemoryShard, step: FixRecord) -> None:
    for record in step.expected:
        kind, _, rest = record.key.partition(":")
        if kind == "i":
            assert state.inode(int(rest)) == record.inode
        elif kind == "d":
            parent, _, name = rest.partition(":")
            assert state.dentry(int(parent), name) == record.dentry
    for change in step.changes:
        apply_change(state, change)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(namespaces(), st.sampled_from(DAMAGE), st.integers(0, 1000))
def test_each_damage_is_found_and_the_auto_fix_plan_repairs_it(
    ns: Namespace, how: str, pick: int
) -> None:
    caused = _damage(ns, how, pick)
    if caused is None:
        return
    problem, ino = caused
    findings = _check(ns.state)
    assert any(f.problem is problem and f.ino == ino for f in findings), (how, findings)
    plan = plan_repairs(findings, ns.state, auto_fix=True)
    assert not plan.unrepaired, plan.unrepaired
    lost: Inode | None = None
    for action in plan.actions:
        if isinstance(action, FixRecord):
            _apply(ns.state, action)
        else:
            assert isinstance(action, AdoptOrphan)
            if lost is None:
                lost = ns.add(ROOT_INO, "lost+found", DIR, 2)
            for step in adoption(
                ns.state.inodes[action.ino], ns.state.inodes[lost.ino], action.name
            ):
                if step is not None:
                    _apply(ns.state, step)
    assert _check(ns.state) == []


def test_without_auto_fix_entries_stay_and_sizes_are_reported() -> None:
    ns = Namespace()
    ns.state.put_inode(_inode(ROOT_INO, DIR, parent=ROOT_INO))
    f = ns.add(ROOT_INO, "f", FILE, 1, size=CS + 10)
    g = ns.add(ROOT_INO, "g", FILE, 1)
    ns.state.put_inode(f.model_copy(update={"size": 3}))
    ns.state.del_inode(g.ino)
    findings = _check(ns.state)
    assert sorted(x.line for x in findings) == [
        f"Entry 1/g: dangling (inode {g.ino} does not exist)",
        f"Inode {f.ino}: corrupted (expected_size={CS + 10}, actual=3)",
    ]
    plan = plan_repairs(findings, ns.state, auto_fix=False)
    assert plan.actions == []
    assert {u.why for u in plan.unrepaired} == {"changes what users see: run with --auto-fix"}
    assert all(isinstance(u, Unrepaired) for u in plan.unrepaired)


def test_findings_read_like_the_guide() -> None:
    big = _inode(make_ino(1, 5), FILE, size=512, chunks=(_chunk(0, CS), _chunk(1, 1024)))
    assert [f.line for f in inode_findings(big)] == [
        f"Inode {big.ino}: corrupted (expected_size={CS + 1024}, actual=512)"
    ]
    ns = Namespace()
    ns.state.put_inode(_inode(ROOT_INO, DIR, parent=ROOT_INO))
    d = ns.add(ROOT_INO, "d", DIR, 2)
    ns.state.put_inode(d.model_copy(update={"parent": 77}))
    assert [f.line for f in _check(ns.state)] == [
        f"Inode {d.ino}: invalid parent pointer (points to 77, named by 1/d)"
    ]


def _chunk(index: int, length: int) -> ChunkRef:
    return ChunkRef(
        index=index, chunk_id="0" * 64, length=length, scheme="ec2+1", fragments=("a", "b", "c")
    )


def test_malformed_chunk_maps_are_named() -> None:
    inode = _inode(
        make_ino(1, 3),
        FILE,
        size=3 * CS,
        chunks=(_chunk(0, CS), _chunk(0, 10), _chunk(2, CS + 1)),
    )
    lines = [f.line for f in inode_findings(inode)]
    assert f"Inode {inode.ino}: chunk 0 appears twice" in lines
    assert any("chunk 2 length 4097" in line for line in lines), lines
    short = _inode(
        make_ino(1, 4),
        FILE,
        size=10,
        chunks=(_chunk(0, 10).model_copy(update={"fragments": ("a",)}),),
    )
    assert [f.line for f in inode_findings(short)] == [
        f"Inode {short.ino}: chunk 0 names 1 fragments, ec2+1 has 3"
    ]


def test_in_flight_records_are_skipped_not_reported() -> None:
    ns = Namespace()
    ns.state.put_inode(_inode(ROOT_INO, DIR, parent=ROOT_INO))
    f = ns.add(ROOT_INO, "f", FILE, 1)
    ns.state.del_dentry(ROOT_INO, "f")  # mid-rename: gone here, not yet there
    check = TreeCheck(in_flight=[inode_key(f.ino)])
    for inode in ns.state.inodes.values():
        check.add_inode(inode)
    assert check.finish() == [] and check.skipped == 1


# -- digests and stored records ---------------------------------------------------------
def test_a_flipped_byte_in_a_stored_record_is_named_and_changes_one_bucket(tmp_path: Path) -> None:
    projection = Projection(tmp_path / "p", 1)
    entries = [
        JournalEntry(
            op_id=f"o{i}",
            op="test",
            changes=(PutInode(inode=_inode(make_ino(1, i), FILE)),),
            reply=Reply(),
        )
        for i in range(2, 50)
    ]
    projection.apply(1, entries)
    before = scan_pairs(projection.image_pairs())
    assert before.corrupt == [] and before.records == 48 + 1  # + the inode counter
    key = Projection.inode_key(make_ino(1, 7))
    raw = bytearray(projection.raw_get(key) or b"")
    raw[-3] ^= 0x01
    projection.raw_put(key, bytes(raw))
    after = scan_pairs(projection.image_pairs())
    (bad,) = after.corrupt
    assert bad.what == f"Inode {make_ino(1, 7)}" and bad.expected != bad.actual
    changed = [
        i for i, (a, b) in enumerate(zip(before.buckets, after.buckets, strict=True)) if a != b
    ]
    assert len(changed) == 1
    listed = {r.key: r.digest for r in bucket_records(projection.image_pairs(), changed)}
    assert key.hex() in listed
    projection.close()
    assert record_name(key) == f"Inode {make_ino(1, 7)}"
    assert stored_corruption(key, b"\x00\x01") is not None


def test_record_comparison_says_how_each_key_differs() -> None:
    replica = {"aa": "1", "bb": "2", "cc": "3"}
    journal = {"aa": "1", "bb": "9", "dd": "4"}
    assert compare_records(replica, journal) == [
        ("bb", "differs"),
        ("cc", "not in the journal"),
        ("dd", "missing"),
    ]


# -- the writer's decision ---------------------------------------------------------------
def _state(shard: int = 1) -> ShardState:
    return ShardState(f"{shard:03d}", 3, 10, 2, None, None, 0)


def test_a_repair_applies_once_and_only_on_what_was_checked() -> None:
    view = MemoryShard(1)
    f = _inode(make_ino(1, 2), FILE, nlink=4)
    view.put_inode(f)
    fixed = f.model_copy(update={"nlink": 1})
    op = RepairRecords(
        repair_id="r1",
        problem="nlink",
        finding="Inode 2050: link count 4, expected 1",
        expected=(RemoteRecord(key=inode_key(f.ino), inode=f),),
        changes=(PutInode(inode=fixed), SetNextLocal(value=1)),
    )
    decision = decide_repair(_state(), view, set(), op)
    assert isinstance(decision.event, MetaCommitted)
    (entry,) = decision.event.entries
    assert entry.op == "repair.nlink" and entry.changes == (PutInode(inode=fixed),)
    view.put_inode(fixed)
    view.record_reply("r1", entry.reply)
    again = decide_repair(_state(), view, set(), op)
    assert again.event is None and again.reply.errno == 0  # a retry changes nothing
    stale = op.model_copy(update={"repair_id": "r2"})
    assert decide_repair(_state(), view, set(), stale).reply.errno == errno.ESTALE
    locked = decide_repair(_state(), view, {inode_key(f.ino)}, stale)
    assert locked.reply.errno == errno.EAGAIN
    foreign = RepairRecords(
        repair_id="r3", problem="x", finding="", changes=(DelInode(ino=make_ino(2, 5)),)
    )
    assert decide_repair(_state(), view, set(), foreign).reply.errno == errno.EINVAL
    entry_op = RepairRecords(
        repair_id="r4", problem="dangling", finding="", changes=(DelDentry(parent=1, name="x"),)
    )
    assert decide_repair(_state(), view, set(), entry_op).event is not None
