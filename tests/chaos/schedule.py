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


SINGLE_KINDS = tuple(Kind)
# What a node runs that a fault can hit (the supervisor's process names).
SERVICES = ("chunk-store", "metadata-raft", "membership", "repair")
NATS = "nats"


@dataclass(frozen=True)
class Fault:
    at_s: float  # from the start of the workload
    kind: Kind
    node: str
    process: str  # a service name, or "nats"
    hold_s: float  # how long it lasts before it is healed

    def describe(self) -> str:
        what = self.node if self.kind is Kind.KILL_NODE else f"{self.process}@{self.node}"
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
    settle_s: float = 4.0,
) -> Schedule:
    """The schedule `name` for `seed`: `faults` faults over `nodes` (a NATS server's
    only on `nats_nodes`, those that run one; default: all); each fault held
    between `hold_s` bounds, a SIGSTOP for `stop_s` (issue 19's 30 s) unless None;
    `single` leaves `settle_s` between one heal and the next fault (time for the site
    to be whole again)."""
    if name not in ("single", "multi"):
        raise ValueError(f"unknown schedule {name!r} (single, multi)")
    rng = random.Random(f"{name}:{seed}")
    drawn: list[Fault] = []
    at = 2.0  # the workload runs a little before the first fault
    for _ in range(faults):
        kind = rng.choice(SINGLE_KINDS)
        if kind in (Kind.KILL_NATS, Kind.RESTART_NATS):
            process = NATS
        elif kind is Kind.SWIM_CUT:
            process = "membership"
        elif kind is Kind.STOP_PROCESS:
            process = rng.choice((*SERVICES, NATS))
        else:
            process = rng.choice(SERVICES) if kind is Kind.KILL_SERVICE else "*"
        candidates = (nats_nodes or nodes) if process == NATS else nodes
        node = rng.choice(candidates)
        hold = round(rng.uniform(*hold_s), 1)
        if kind is Kind.STOP_PROCESS and stop_s is not None:
            hold = stop_s
        if name == "multi" and drawn and rng.random() < 0.5:
            # Overlap the previous fault, on another node.
            last = drawn[-1]
            node = rng.choice([n for n in candidates if n != last.node] or candidates)
            start = round(last.at_s + rng.uniform(0.0, last.hold_s), 1)
        else:
            start = round(at, 1)
        drawn.append(Fault(start, kind, node, process, hold))
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
