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

from cfs.admin.decide import NodeFacts, Verdict, decide_force_election
from cfs.admin.snapshot import read_node_facts
from cfs.bus import Bus, BusError, BusUnavailable
from cfs.kernel.runtime import Context
from cfs.kernel.spec import CommandHandler
from cfs.lease import Lease, LeaseError, LeaseStatus
from cfs_contracts.events.admin import AdminCommandIssued
from cfs_contracts.streams import meta_stream, shard_lease_key, shard_name

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
        lease = await Lease.read_status(bus, shard_lease_key(shard))
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
    admin = Lease(bus, shard_lease_key(shard), node="cfs-admin")
    await admin.request_handoff(target or ANY_NODE)


def force_election_verb(ctx: Context) -> CommandHandler:
    return force_election_handler(ctx.bus, ctx.settings.shards)


def force_election_handler(bus: Bus, shard_count: int) -> CommandHandler:
    """`cfs admin raft-force-election`: validated by `decide_force_election`, then
    `force_election`; a refused stepdown or lease handoff is a failed verdict, transport
    trouble is raised (the executor retries it: the action is idempotent)."""
    shards = [shard_name(i) for i in range(1, shard_count + 1)]

    async def handle(cmd: AdminCommandIssued) -> Verdict:
        target = cmd.arguments.get("to") or None
        facts = await read_node_facts(bus) if target else NodeFacts()
        verdict = decide_force_election(facts, cmd.target, shards, target)
        if not verdict.ok:
            return verdict
        try:
            await force_election(bus, cmd.target, target)
        except BusError as exc:
            if "stepdown refused" not in str(exc):
                raise  # transport trouble: retried
            return Verdict("failed", str(exc))
        except LeaseError as exc:
            return Verdict("failed", f"shard {cmd.target}: {exc}")
        return verdict

    return handle
