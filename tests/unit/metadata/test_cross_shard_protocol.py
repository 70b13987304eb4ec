"""The cross-shard protocol with its pure parts only: several MemoryShards in one
process, random operations, and a simulated crash at a random step of a random
transaction. After recovery and the client's retry (same op id) the sharded
namespace must equal a single-shard reference run of the same operations."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from cfs_contracts.events.metadata import JournalEntry, TxClear
from cfs_contracts.fs import rpc
from cfs_contracts.fs.records import ROOT_INO, shard_of
from cfs_contracts.fs.rpc import FsError, Reply
from cfs_metadata.check import check_tree
from cfs_metadata.decide import Decision, bootstrap_entry, decide
from cfs_metadata.state import MemoryShard, apply_entries
from cfs_metadata.txn import (
    NeedRemote,
    Remote,
    RemoteAwareView,
    coordinator_commit,
    decide_tx,
    expected_for,
    key_shard,
    locked_keys,
    placement,
    read_records,
    split_changes,
)

SHARDS = 3
NOW = 1_700_000_000_000_000_000
STEPS = ["prepared", "committed", "delivered", None]


class Crash(Exception):
    pass


@dataclass
class Cluster:
    shards: dict[int, MemoryShard]
    counter: int = 0

    @classmethod
    def new(cls, count: int) -> Cluster:
        shards = {i: MemoryShard(i) for i in range(1, count + 1)}
        apply_entries(shards[1], [bootstrap_entry(NOW, "boot")])
        return cls(shards)

    def op_id(self) -> str:
        self.counter += 1
        return f"{self.counter:026d}"

    def commit(self, shard: int, op_id: str, name: str, decision: Decision) -> Reply:
        entry = JournalEntry(
            op_id=op_id, op=name, changes=tuple(decision.changes), reply=decision.reply
        )
        apply_entries(self.shards[shard], [entry])
        return decision.reply

    def tx_step(self, shard: int, op: rpc.TxOp) -> Reply:
        state = self.shards[shard]
        decision = decide_tx(state, op, NOW, locked_keys(state.txs.values()))
        return self.commit(shard, op.op_id, op.op, decision)

    def run(self, op: rpc.MutationOp, crash_at: str | None, victim: int) -> int:
        """One operation through the protocol; returns its errno (0 = done)."""
        home = shard_of(getattr(op, "new_parent", None) or getattr(op, "parent", None) or op.ino)  # type: ignore[attr-defined]
        state = self.shards[home]
        place = placement(len(self.shards))
        remote = Remote()
        while True:
            try:
                planned = decide(RemoteAwareView(state, remote), op, NOW, place)
                break
            except NeedRemote as need:
                if need.key.startswith("a:"):
                    shard = int(need.key[2:])
                    reply = self.tx_step(shard, rpc.TxReserve(op_id=self.op_id()))
                    remote.reserved[shard] = reply.reserved
                else:
                    owner = self.shards[key_shard(need.key)]
                    for record in read_records(owner, [need.key]):
                        remote.records[record.key] = record
            except FsError as exc:
                return exc.errno
        parts = split_changes(planned.changes, home)
        others = sorted((set(parts) | {key_shard(k) for k in remote.records}) - {home})
        if not others:
            self.commit(home, op.op_id, op.op, planned)
            return 0
        tx_id = f"tx{self.counter}"
        for shard in others:
            self.tx_step(
                shard,
                rpc.TxPrepare(
                    op_id=self.op_id(),
                    tx_id=tx_id,
                    coordinator=home,
                    expected=expected_for(remote, shard),
                    changes=tuple(parts.get(shard, ())),
                ),
            )
            if crash_at == "prepared" and shard == others[victim % len(others)]:
                raise Crash
        changes = coordinator_commit(planned, tx_id, home, others, NOW)
        self.commit(home, op.op_id, op.op, Decision(changes, planned.reply))
        if crash_at == "committed":
            raise Crash
        for shard in others:
            self.tx_step(shard, rpc.TxDecide(op_id=self.op_id(), tx_id=tx_id, commit=True))
            if crash_at == "delivered" and shard == others[victim % len(others)]:
                raise Crash
        self.commit(home, self.op_id(), "tx_forget", Decision([TxClear(tx_id=tx_id)], Reply()))
        return 0

    def recover(self) -> None:
        """What new leaders do: deliver committed outcomes, resolve what is in doubt."""
        for home, state in self.shards.items():
            for tx in list(state.txs.values()):
                if tx.role == "coordinator" and tx.state == "committed":
                    for shard in tx.participants:
                        self.tx_step(
                            shard, rpc.TxDecide(op_id=self.op_id(), tx_id=tx.tx_id, commit=True)
                        )
                    self.commit(
                        home,
                        self.op_id(),
                        "tx_forget",
                        Decision([TxClear(tx_id=tx.tx_id)], Reply()),
                    )
        for shard, state in self.shards.items():
            for tx in list(state.txs.values()):
                if tx.role != "participant":
                    continue
                status = self.tx_step(
                    tx.coordinator, rpc.TxStatus(op_id=self.op_id(), tx_id=tx.tx_id)
                )
                self.tx_step(
                    shard,
                    rpc.TxDecide(
                        op_id=self.op_id(), tx_id=tx.tx_id, commit=status.tx_state == "committed"
                    ),
                )

    def merged(self) -> MemoryShard:
        out = MemoryShard(1)
        for state in self.shards.values():
            out.inodes.update(state.inodes)
            for parent, entries in state.dirs.items():
                out.dirs.setdefault(parent, {}).update(entries)
        return out


def tree(state: MemoryShard, ino: int = ROOT_INO, path: str = "") -> dict[str, tuple]:
    """Path -> (kind, nlink) plus hard-link groups, independent of inode numbers."""
    out: dict[str, tuple] = {}
    for entry in state.dentries(ino):
        node = state.inodes[entry.ino]
        out[f"{path}/{entry.name}"] = (node.kind, node.nlink)
        if node.is_dir:
            out.update(tree(state, entry.ino, f"{path}/{entry.name}"))
    return out


NAMES = ["a", "b", "c"]
KINDS = ["mkdir", "mkdir", "create", "create", "rename", "rename", "link", "unlink", "rmdir"]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), count=st.integers(5, 25))
def test_sharded_namespace_equals_single_shard_reference_despite_crashes(data, count) -> None:
    sharded = Cluster.new(SHARDS)
    reference = Cluster.new(1)
    for step in range(count):
        # Operations are chosen by path, so one op means the same in both runs.
        paths = tree(reference.merged())
        dirs = ["", *sorted(p for p, (kind, _) in paths.items() if kind.value == "d")]
        files = sorted(p for p, (kind, _) in paths.items() if kind.value == "f")
        kind = data.draw(st.sampled_from(KINDS))
        parent, other = data.draw(st.sampled_from(dirs)), data.draw(st.sampled_from(dirs))
        name, name2 = data.draw(st.sampled_from(NAMES)), data.draw(st.sampled_from(NAMES))
        linked = data.draw(st.sampled_from(files)) if files else None
        crash_at = data.draw(st.sampled_from(STEPS))
        victim = data.draw(st.integers(0, 5))
        ops = [
            _build(kind, _resolver(c.merged()), parent, other, name, name2, linked, f"op{step}")
            for c in (reference, sharded)
        ]
        expected = reference.run(ops[0], None, 0)
        try:
            got = sharded.run(ops[1], crash_at, victim)
        except Crash:
            sharded.recover()
            got = sharded.run(ops[1], None, 0)  # the client retries with the same op id
        assert got == expected, (
            f"{ops[1]}: sharded {errno.errorcode.get(got, got)}, "
            f"reference {errno.errorcode.get(expected, expected)}"
        )
        sharded.recover()
        merged = sharded.merged()
        assert check_tree(merged, merged.inodes) == []
        assert tree(merged) == tree(reference.merged())
        assert all(t.state != "prepared" for s in sharded.shards.values() for t in s.txs.values())


def _resolver(state: MemoryShard):
    def resolve(path: str) -> int:
        ino = ROOT_INO
        for part in filter(None, path.split("/")):
            entry = state.dentry(ino, part)
            assert entry is not None
            ino = entry.ino
        return ino

    return resolve


def _build(kind, resolve, parent, other, name, name2, linked, op_id) -> rpc.MutationOp:
    p, o = resolve(parent), resolve(other)
    if kind == "mkdir":
        return rpc.MkDir(op_id=op_id, parent=p, name=name)
    if kind == "create":
        return rpc.Create(op_id=op_id, parent=p, name=name)
    if kind == "rename":
        return rpc.Rename(op_id=op_id, parent=p, name=name, new_parent=o, new_name=name2)
    if kind == "link" and linked is not None:
        return rpc.Link(op_id=op_id, ino=resolve(linked), new_parent=o, new_name=name2)
    if kind == "unlink":
        return rpc.Unlink(op_id=op_id, parent=p, name=name)
    return rpc.RmDir(op_id=op_id, parent=p, name=name)
