"""Seeded fault schedules: which fault, on what, when and for how long (pure).

A schedule is drawn from a seed alone, so a failing seed replays exactly the same
faults (`replay_command`). `single` schedules hold one fault at a time, each healed
before the next: the "no application error from a single fault" property. `multi`
schedules overlap up to two faults on different nodes, which a 3-node 2+1 site may
not survive without errors but must survive without losing anything acknowledged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    KILL_NODE = "kill-node"  # kill -9 every service of a node and its NATS server
    KILL_NATS = "kill-nats"  # kill -9 a node's NATS server only
    KILL_SERVICE = "kill-service"  # kill -9 one service process (its supervisor restarts it)
    STOP_PROCESS = "stop-process"  # SIGSTOP one service process or NATS server, then SIGCONT
    RESTART_NATS = "restart-nats"  # SIGTERM a NATS server, start it again
    SWIM_CUT = "swim-cut"  # every SWIM datagram to and from a node lost (UDP)
    DISK_FULL = "disk-full"  # the disk under a node's chunk-store filled to the last byte
    PARTITION = "partition"  # a node cut off from the rest of its site (TCP and UDP)
    S3_FAIL = "s3-fail"  # the S3 server failing (errors, hanging, connections cut)


SINGLE_KINDS = tuple(Kind)
# What a node runs that a fault can hit (the supervisor's process names).
SERVICES = ("chunk-store", "metadata-raft", "membership", "repair")
NATS = "nats"
SITE = "site"  # what a fault of the whole site's S3 names instead of a node
# How S3 fails (`S3FaultProxy` modes): answering 503 or 500, hanging, cutting replies.
S3_FAILURES = ("status-503", "status-500", "slow", "cut")


@dataclass(frozen=True)
class Fault:
    at_s: float  # from the start of the workload
    kind: Kind
    node: str
    process: str  # a service name, or "nats"
    hold_s: float  # how long it lasts before it is healed
    how: str = ""  # S3_FAIL: one of S3_FAILURES

    def describe(self) -> str:
        if self.kind is Kind.S3_FAIL:
            what = f"S3 ({self.how})"
        elif self.kind in (Kind.KILL_NODE, Kind.PARTITION):
            what = self.node
        else:
            what = f"{self.process}@{self.node}"
        return f"{self.kind.value} {what} at {self.at_s:.1f}s for {self.hold_s:.1f}s"


@dataclass(frozen=True)
class Schedule:
    name: str  # "single" | "multi"
    seed: int
    faults: tuple[Fault, ...]

    @property
    def end_s(self) -> float:
        return max((f.at_s + f.hold_s for f in self.faults), default=0.0)


def draw(
    name: str,
    seed: int,
    nodes: list[str],
    *,
    nats_nodes: list[str] | None = None,
    faults: int = 2,
    hold_s: tuple[float, float] = (3.0, 8.0),
    stop_s: float | None = 30.0,
    s3_hold_s: tuple[float, float] = (10.0, 30.0),
    settle_s: float = 4.0,
    kinds: tuple[Kind, ...] = SINGLE_KINDS,
) -> Schedule:
    """The schedule `name` for `seed`: `faults` faults of `kinds` over `nodes` (a NATS
    server's only on `nats_nodes`, those that run one; default: all); each fault held
    between `hold_s` bounds, S3's between `s3_hold_s` (a tier outage must outlast
    its retries to be one), a SIGSTOP for `stop_s` (issue 19's 30 s) unless None;
    `single` leaves `settle_s` between one heal and the next fault (time for the site
    to be whole again)."""
    if name not in ("single", "multi"):
        raise ValueError(f"unknown schedule {name!r} (single, multi)")
    rng = random.Random(f"{name}:{seed}")
    drawn: list[Fault] = []
    at = 2.0  # the workload runs a little before the first fault
    for _ in range(faults):
        kind = rng.choice(kinds)
        how = ""
        if kind in (Kind.KILL_NATS, Kind.RESTART_NATS):
            process = NATS
        elif kind is Kind.SWIM_CUT:
            process = "membership"
        elif kind is Kind.STOP_PROCESS:
            process = rng.choice((*SERVICES, NATS))
        elif kind is Kind.KILL_SERVICE:
            process = rng.choice(SERVICES)
        elif kind is Kind.DISK_FULL:
            process = "chunk-store"
        elif kind is Kind.S3_FAIL:
            process, how = SITE, rng.choice(S3_FAILURES)
        else:
            process = "*"
        candidates = (nats_nodes or nodes) if process == NATS else nodes
        node = SITE if kind is Kind.S3_FAIL else rng.choice(candidates)
        hold = round(rng.uniform(*(s3_hold_s if kind is Kind.S3_FAIL else hold_s)), 1)
        if kind is Kind.STOP_PROCESS and stop_s is not None:
            hold = stop_s
        if (
            name == "multi" and drawn and rng.random() < 0.5
            and not node == drawn[-1].node == SITE  # one S3 to fail at a time
        ):  # fmt: skip
            # Overlap the previous fault, on another node.
            last = drawn[-1]
            if node != SITE:
                node = rng.choice([n for n in candidates if n != last.node] or candidates)
            start = round(last.at_s + rng.uniform(0.0, last.hold_s), 1)
        else:
            start = round(at, 1)
        drawn.append(Fault(start, kind, node, process, hold, how))
        at = max(at, start + hold + settle_s)
    return Schedule(name, seed, tuple(sorted(drawn, key=lambda f: f.at_s)))


def overlapping(schedule: Schedule) -> bool:
    """Whether two faults of the schedule are ever in effect at once."""
    healed_by = float("-inf")
    for start, end in sorted((f.at_s, f.at_s + f.hold_s) for f in schedule.faults):
        if start < healed_by:
            return True
        healed_by = max(healed_by, end)
    return False


def replay_command(schedule: Schedule, nodes: int) -> str:
    return (
        f"make chaos CHAOS_SCHEDULES={schedule.name} CHAOS_SEEDS={schedule.seed} "
        f"CHAOS_NODES={nodes}"
    )
