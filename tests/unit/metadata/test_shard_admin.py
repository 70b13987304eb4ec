"""The writer's backup/restore steps (`decide_admin`): idempotent, never skipping."""

from __future__ import annotations

import errno

from cfs_contracts.envelope import HLC
from cfs_contracts.events.metadata import Lineage, MetaReplayed, ShardImageChunk, ShardRestored
from cfs_contracts.fs.shard_admin import (
    OpenShard,
    ReplayBatch,
    ReplayedMessage,
    RestoreBegin,
    RestoreChunk,
)
from cfs_metadata.shard_admin import ShardState, decide_admin

STAMP = HLC(wall_ms=1, counter=0, node="n")


def _lineage(seq: int = 10, held: bool = True) -> Lineage:
    return Lineage(cluster_id="c", shard="001", seq=seq, snapshot_id="S", held=held)


def _state(**changes: object) -> ShardState:
    base = {
        "shard": "001",
        "term": 3,
        "applied_seq": 5,
        "inodes": 1,
        "lineage": None,
        "installing": None,
        "next_chunk": 0,
    }
    return ShardState(**{**base, **changes})  # type: ignore[arg-type]


def test_a_restore_begins_then_takes_chunks_in_order_and_retries_are_answered() -> None:
    begin = RestoreBegin(lineage=_lineage(), chunks=2, records=3, sha256="x")
    assert isinstance(decide_admin(_state(), begin).event, ShardRestored)
    installing = _state(installing="S", next_chunk=1)
    assert decide_admin(installing, begin).event is None  # retried begin: continue
    chunk = RestoreChunk(snapshot_id="S", index=1, data_b64="")
    assert isinstance(decide_admin(installing, chunk).event, ShardImageChunk)
    again = decide_admin(installing, RestoreChunk(snapshot_id="S", index=0, data_b64=""))
    assert again.event is None and not again.reply.errno  # applied already
    ahead = decide_admin(installing, RestoreChunk(snapshot_id="S", index=2, data_b64=""))
    assert ahead.reply.errno == errno.EINVAL and "expects chunk 1" in ahead.reply.message
    done = decide_admin(_state(lineage=_lineage()), chunk)
    assert done.event is None and not done.reply.errno  # the last chunk's retry


def _batch(first: int, last: int, cluster: str = "c") -> ReplayBatch:
    message = ReplayedMessage(seq=last, hlc=STAMP, entries=())
    return ReplayBatch(cluster_id=cluster, first=first, last=last, messages=(message,))


def test_replay_continues_exactly_after_the_restored_position() -> None:
    state = _state(lineage=_lineage(seq=10))
    assert isinstance(decide_admin(state, _batch(11, 12)).event, MetaReplayed)
    assert decide_admin(state, _batch(5, 10)).event is None  # twice changes nothing
    gap = decide_admin(state, _batch(13, 14))
    assert gap.reply.errno == errno.EINVAL and "skipped" in gap.reply.message
    other = decide_admin(state, _batch(11, 12, cluster="other"))
    assert other.reply.errno == errno.EINVAL


def test_replay_is_refused_once_the_shard_took_writes() -> None:
    opened = _state(lineage=_lineage(seq=10, held=False))
    refused = decide_admin(opened, _batch(11, 12))
    assert refused.reply.errno == errno.EROFS
    assert decide_admin(opened, OpenShard(reason="again")).event is None
    assert decide_admin(_state(), _batch(1, 2)).reply.errno == errno.EINVAL  # not restored
