"""Backup, restore and repair steps on a shard writer: one pure decide per step.

`decide_admin` looks at the writer's position and returns the journal event to
append (if any) and the reply; the replica appends and applies it like any other
message, so followers and a replica rebuilt later see exactly the same steps.
Every step is idempotent: a retried chunk, a replay batch already applied or an
open of an open shard answer with where the shard is and change nothing.
A repair (`decide_repair`) also reads the records it changes: it applies only if
they are still what the checker saw, and its id makes a retry a no-op.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from cfs_contracts.envelope import EventPayload
from cfs_contracts.events.metadata import (
    Change,
    JournalEntry,
    Lineage,
    MetaCommitted,
    MetaReplayed,
    PutDentry,
    PutInode,
    SetNextLocal,
    SetRemoteApplied,
    ShardImageChunk,
    ShardOpened,
    ShardRestored,
)
from cfs_contracts.fs.conflicts import FieldConflict
from cfs_contracts.fs.rpc import FsError, Reply
from cfs_contracts.fs.shard_admin import (
    ApplyRemote,
    MarkCut,
    OpenShard,
    RepairRecords,
    ReplayBatch,
    Republish,
    RestoreBegin,
    RestoreChunk,
    ShardAdminReply,
    ShardPosition,
)
from cfs_contracts.streams import JOURNAL_MAX_MSG_BYTES
from cfs_metadata.merge import restamp_dentry, restamp_inode
from cfs_metadata.remote import decide_remote, remote_op_id
from cfs_metadata.state import ShardView
from cfs_metadata.txn import change_locks, key_shard, read_records

SNAPSHOT_CUT_OP = "snapshot_cut"
REPAIR_OP_PREFIX = "repair."
REPUBLISH_OP = "replication-sync"
AdminOp = (
    MarkCut
    | ShardPosition
    | RestoreBegin
    | RestoreChunk
    | ReplayBatch
    | OpenShard
    | RepairRecords
    | ApplyRemote
    | Republish
)


@dataclass(frozen=True)
class ShardState:
    shard: str
    term: int
    applied_seq: int
    inodes: int
    lineage: Lineage | None
    installing: str | None  # snapshot id of a restore in progress
    next_chunk: int
    fence_epoch: int = 0  # client writes refused for a failover (see ActiveSite.fenced)


@dataclass(frozen=True)
class AdminDecision:
    event: EventPayload | None  # to append; None: answer at once
    reply: ShardAdminReply
    remote: bool = False  # the peer site's entries: journaled where they are not shipped back


def decide_admin(state: ShardState, op: AdminOp) -> AdminDecision:
    here = _here(state)
    if isinstance(op, RepairRecords | ApplyRemote | Republish):
        raise TypeError(f"{op.op} reads the shard: decide_repair, _apply_remote, _republish")
    if isinstance(op, ShardPosition):
        return AdminDecision(None, here)
    if isinstance(op, MarkCut):
        entry = JournalEntry(op_id=op.snapshot_id, op=SNAPSHOT_CUT_OP, changes=(), reply=Reply())
        return AdminDecision(
            MetaCommitted(shard=state.shard, term=state.term, entries=(entry,)), here
        )
    if isinstance(op, RestoreBegin):
        if op.lineage.shard != state.shard:
            return _refuse(
                here, errno.EINVAL, f"image of shard {op.lineage.shard} sent to shard {state.shard}"
            )
        if state.installing == op.lineage.snapshot_id and state.next_chunk > 0:
            return AdminDecision(None, here)  # a retried begin: continue where it is
        restored = ShardRestored(
            shard=state.shard,
            term=state.term,
            lineage=op.lineage,
            chunks=op.chunks,
            records=op.records,
            sha256=op.sha256,
        )
        return AdminDecision(
            restored,
            here.model_copy(update={"installing": op.lineage.snapshot_id, "next_chunk": 0}),
        )
    if isinstance(op, RestoreChunk):
        if state.installing != op.snapshot_id:
            done = state.lineage is not None and state.lineage.snapshot_id == op.snapshot_id
            if done:
                return AdminDecision(None, here)  # the last chunk's retry: installed
            return _refuse(
                here,
                errno.EINVAL,
                f"no restore of {op.snapshot_id} in progress on shard {state.shard}",
            )
        if op.index < state.next_chunk:
            return AdminDecision(None, here)
        if op.index > state.next_chunk:
            return _refuse(
                here,
                errno.EINVAL,
                f"chunk {op.index} sent, shard {state.shard} expects chunk {state.next_chunk}",
            )
        chunk = ShardImageChunk(
            shard=state.shard,
            term=state.term,
            snapshot_id=op.snapshot_id,
            index=op.index,
            data_b64=op.data_b64,
        )
        return AdminDecision(chunk, here.model_copy(update={"next_chunk": op.index + 1}))
    if isinstance(op, ReplayBatch):
        return _decide_replay(state, op, here)
    assert isinstance(op, OpenShard)
    if state.lineage is None or not state.lineage.held:
        return AdminDecision(None, here)
    return AdminDecision(ShardOpened(shard=state.shard, term=state.term, reason=op.reason), here)


def _decide_replay(state: ShardState, op: ReplayBatch, here: ShardAdminReply) -> AdminDecision:
    lineage = state.lineage
    if lineage is None:
        return _refuse(
            here,
            errno.EINVAL,
            f"shard {state.shard} was not restored from a "
            "snapshot: there is nothing to replay onto",
        )
    if op.cluster_id != lineage.cluster_id:
        return _refuse(
            here,
            errno.EINVAL,
            f"journal of cluster {op.cluster_id} sent, shard "
            f"{state.shard} was restored from {lineage.cluster_id}",
        )
    if op.last <= lineage.seq:
        return AdminDecision(None, here)  # applied already: replaying twice changes nothing
    if not lineage.held:
        return _refuse(
            here,
            errno.EROFS,
            f"shard {state.shard} accepts writes since its "
            "restore: replaying older journal entries would overwrite them",
        )
    if op.first != lineage.seq + 1:
        return _refuse(
            here,
            errno.EINVAL,
            f"replay from source seq {op.first}, shard "
            f"{state.shard} holds up to {lineage.seq}: entries would be skipped",
        )
    if not op.messages:
        return _refuse(here, errno.EINVAL, "empty replay batch")
    replayed = MetaReplayed(
        shard=state.shard,
        term=state.term,
        source_first=op.first,
        source_last=op.last,
        source_hlc=op.messages[-1].hlc,
        entries=tuple(e for m in op.messages for e in m.entries),
    )
    return AdminDecision(replayed, here)


def _refuse(here: ShardAdminReply, code: int, message: str) -> AdminDecision:
    return AdminDecision(None, here.model_copy(update={"errno": code, "message": message}))


def _here(state: ShardState) -> ShardAdminReply:
    return ShardAdminReply(
        applied_seq=state.applied_seq,
        inodes=state.inodes,
        lineage=state.lineage,
        installing=state.installing,
        next_chunk=state.next_chunk,
        fence_epoch=state.fence_epoch,
    )


def decide_republish(
    state: ShardState, view: ShardView, op: Republish, now_ns: int, site: str
) -> AdminDecision:
    """The named records as they are here, every field group and binding stamped now
    (over the stamp it had), in one local entry: shipped, they win on the peer."""
    here = _here(state)
    if view.op_reply(op.sync_id) is not None:
        return AdminDecision(None, here.model_copy(update={"message": "journaled already"}))
    if state.lineage is not None and state.lineage.held:
        return _refuse(here, errno.EROFS, f"shard {state.shard} is held for replay-journal")
    changes: list[Change] = []
    for ino in op.inodes:
        if (inode := view.inode(ino)) is not None:
            changes.append(PutInode(inode=restamp_inode(inode, now_ns, site)))
    for parent, name in op.dentries:
        if (dentry := view.dentry(parent, name)) is not None:
            changes.append(PutDentry(dentry=restamp_dentry(dentry, now_ns, site)))
    if not changes:
        return AdminDecision(None, here.model_copy(update={"message": "none of them is here"}))
    entry = JournalEntry(op_id=op.sync_id, op=REPUBLISH_OP, changes=tuple(changes), reply=Reply())
    return AdminDecision(MetaCommitted(shard=state.shard, term=state.term, entries=(entry,)), here)


def decide_repair(
    state: ShardState, view: ShardView, locked: set[str], op: RepairRecords
) -> AdminDecision:
    """Journal a repair if the records it was computed from have not changed since.

    Changes to other shards' records are refused (each shard repairs its own); a
    `SetNextLocal` only ever raises the counter (numbers handed out meanwhile stay
    taken), so it is dropped when the shard is already past it.
    """
    here = _here(state)
    if view.op_reply(op.repair_id) is not None:
        return AdminDecision(None, here.model_copy(update={"message": "applied already"}))
    if state.lineage is not None and state.lineage.held:
        return _refuse(here, errno.EROFS, f"shard {state.shard} is held for replay-journal")
    index = int(state.shard)
    keys = change_locks(op.changes) | {r.key for r in op.expected}
    foreign = sorted(k for k in keys if key_shard(k) != index)
    if foreign:
        return _refuse(
            here, errno.EINVAL, f"repair of shard {state.shard} touches {', '.join(foreign[:3])}"
        )
    if busy := sorted(keys & locked):
        return _refuse(
            here,
            errno.EAGAIN,
            f"{', '.join(busy[:3])} locked by a cross-shard transaction; run the repair again",
        )
    current = {r.key: r for r in read_records(view, sorted(r.key for r in op.expected))}
    for record in op.expected:
        if current[record.key] != record:
            return _refuse(
                here,
                errno.ESTALE,
                f"{record.key} changed since the check; run the check and repair again",
            )
    changes = tuple(
        c for c in op.changes if not isinstance(c, SetNextLocal) or c.value > view.next_local()
    )
    entry = JournalEntry(
        op_id=op.repair_id,
        op=REPAIR_OP_PREFIX + op.problem,
        changes=changes,
        reply=Reply(message=op.finding[:1024]),
    )
    return AdminDecision(MetaCommitted(shard=state.shard, term=state.term, entries=(entry,)), here)


def decide_apply_remote(
    state: ShardState, view: ShardView, locked: set[str], op: ApplyRemote, site: str
) -> AdminDecision:
    """The peer's messages past the shard's position merged into it (`cfs_metadata.remote`)
    and the new position, as one journal message. Messages at or before the position
    are not applied again; the conflicts their entries found are answered again (from
    the replies the shard keeps), for a replicator that died before reporting them."""
    here = _here(state)
    position = view.remote_applied(op.origin)
    if not op.messages:
        return AdminDecision(None, here.model_copy(update={"remote_applied": position}))
    if state.lineage is not None and state.lineage.held:
        return _refuse(here, errno.EROFS, f"shard {state.shard} is held for replay-journal")
    if op.origin == site:
        return _refuse(here, errno.EINVAL, f"entries of {site} sent back to {site}")
    fresh = [e for m in op.messages if m.seq > position for e in m.entries]
    again = [e for m in op.messages if m.seq <= position for e in m.entries]
    try:
        applied = decide_remote(view, fresh, site, op.origin, locked)
    except FsError as exc:
        return _refuse(here, exc.errno, exc.message)
    told = [c for e in again for c in _recorded_conflicts(view, op.origin, e)]
    last = max(position, op.messages[-1].seq)
    reply = here.model_copy(
        update={
            "applied": len(applied.entries),
            "skipped": applied.skipped + len(again),
            "conflicts": (*told, *applied.conflicts),
            "remote_applied": last,
        }
    )
    if last == position:
        return AdminDecision(None, reply)
    moved = JournalEntry(
        op_id=f"{remote_op_id(op.origin, 'position')}.{last}",
        op="geo.position",
        changes=(SetRemoteApplied(peer=op.origin, seq=last),),
        reply=Reply(),
    )
    entries = (*applied.entries, moved)
    event = MetaCommitted(shard=state.shard, term=state.term, entries=entries)
    size = len(event.model_dump_json())
    if size > JOURNAL_MAX_MSG_BYTES * 9 // 10:  # never an append the journal refuses
        return _refuse(
            here,
            errno.E2BIG,
            f"{len(op.messages)} messages of {op.origin} merge into {size} bytes, past the "
            "journal's message limit: send fewer at once",
        )
    return AdminDecision(event, reply, remote=True)


def _recorded_conflicts(
    view: ShardView, origin: str, entry: JournalEntry
) -> tuple[FieldConflict, ...]:
    reply = view.op_reply(remote_op_id(origin, entry.op_id))
    return reply.conflicts if reply is not None else ()
