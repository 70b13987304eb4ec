"""Operator views and actions on metadata shards (`cfs admin raft-*`).

"Raft status" has two layers (DESIGN.md §4): the JetStream Raft group that
replicates each shard's journal (leader server, replicas, current, lag) and
the metadata writer lease (holder, term, age).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import nats.errors
import nats.js.errors

from cfs.bus import Bus, BusUnavailable
from cfs.lease import LeaseStatus, ShardLease
from cfs_contracts.streams import meta_stream, shard_name

ANY_NODE = "*"


@dataclass(frozen=True)
class ReplicaState:
    server: str
    current: bool
    lag: int
    active_s: float


@dataclass(frozen=True)
class ShardStatus:
    shard: str
    stream_leader: str | None
    replicas: tuple[ReplicaState, ...]
    last_seq: int
    writer: str | None
    term: int
    lease_age_s: float | None
    handoff_to: str | None = None
    problems: tuple[str, ...] = field(default=())

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def lease_key(shard: str) -> str:
    return f"meta.{shard}"


async def shard_status(bus: Bus, shard: str) -> ShardStatus:
    stream = meta_stream(shard).name
    problems: list[str] = []
    leader: str | None = None
    replicas: tuple[ReplicaState, ...] = ()
    last_seq = 0
    try:
        info = await bus.js.stream_info(stream)
        last_seq = int(info.state.last_seq)
        cluster = info.cluster
        if cluster is not None:
            leader = cluster.leader
            replicas = tuple(
                ReplicaState(
                    r.name or "?", bool(r.current), int(r.lag or 0), float(r.active or 0) / 1e9
                )
                for r in cluster.replicas or ()
            )
    except nats.js.errors.NotFoundError:
        problems.append(f"stream {stream} does not exist")
    except (nats.errors.Error, TimeoutError):
        problems.append(f"stream {stream}: no Raft leader answered (quorum lost?)")
    lease: LeaseStatus | None = None
    try:
        lease = await ShardLease.read_status(bus, lease_key(shard))
    except (nats.errors.Error, TimeoutError):
        problems.append("lease bucket unreachable")
    if lease is None or not lease.holder:
        problems.append("no writer holds the lease")
    return ShardStatus(
        shard=shard,
        stream_leader=leader,
        replicas=replicas,
        last_seq=last_seq,
        writer=lease.holder if lease and lease.holder else None,
        term=lease.term if lease else 0,
        lease_age_s=lease.age_s if lease else None,
        handoff_to=lease.handoff_to if lease else None,
        problems=tuple(problems),
    )


async def raft_status(bus: Bus, shard_count: int) -> list[ShardStatus]:
    return [await shard_status(bus, shard_name(i)) for i in range(1, shard_count + 1)]


async def force_election(bus: Bus, shard: str, target: str | None = None) -> None:
    """Step down the journal's stream leader and hand the writer lease over.

    Without a target, the lease is released for any replica (after one lease time);
    with one, that node takes it at once with the next term.
    """
    stream = meta_stream(shard).name
    msg = await bus.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=5.0)
    error = json.loads(msg.data or b"{}").get("error")
    if error:
        raise BusUnavailable(f"stream {stream} leader stepdown refused: {error.get('description')}")
    admin = ShardLease(bus, lease_key(shard), node="cfs-admin")
    await admin.request_handoff(target or ANY_NODE)
