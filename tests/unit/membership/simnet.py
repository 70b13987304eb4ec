"""A deterministic network for `Swim` instances: virtual clock, seeded loss and latency.

Every datagram goes through the real codec (MAC included). Nodes can be killed
(they stop ticking and their datagrams vanish) and revived as a new process.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from cfs_contracts.members import Liveness
from cfs_membership.codec import Codec, CodecError
from cfs_membership.swim import Action, Addr, Changed, Send, Swim, SwimConfig

TOKEN = b"sim-cluster-token"


@dataclass(frozen=True)
class Transition:
    at: float
    observer: str
    change: Changed


@dataclass
class SimNet:
    config: SwimConfig = field(default_factory=SwimConfig)
    seed: int = 0
    loss: float = 0.0
    latency_s: float = 0.0005
    jitter_s: float = 0.002
    now: float = 0.0
    nodes: dict[str, Swim] = field(default_factory=dict)
    alive: set[str] = field(default_factory=set)
    transitions: list[Transition] = field(default_factory=list)
    drop_to: set[str] = field(default_factory=set)  # these receive nothing
    drop_from: set[str] = field(default_factory=set)  # what these send is lost
    rejected: int = 0
    sent: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.codec = Codec(TOKEN)
        self._by_addr: dict[Addr, str] = {}
        self._heap: list[tuple[float, int, str, str, bytes, Addr]] = []
        self._counter = itertools.count()
        self._timer: dict[str, float] = {}

    # -- building ------------------------------------------------------------------------
    def add(self, name: str, *, seeds: list[str] | None = None, incarnation: int = 0) -> Swim:
        port = 7000 + len(self._by_addr) if name not in self.nodes else self.nodes[name].port
        swim = Swim(
            self.config,
            node=name,
            host="10.0.0.1",
            port=port,
            labels={"rack": f"r{port % 3}"},
            incarnation=incarnation,
            rng=random.Random(self.rng.random()),
            now=self.now,
        )
        self.nodes[name] = swim
        self._by_addr[swim.addr] = name
        self.alive.add(name)
        seed_addrs = [self.nodes[s].addr for s in (seeds or [])]
        self._run(name, swim.join(seed_addrs, self.now))
        self._arm(name)
        return swim

    def cluster(self, count: int, settle_s: float = 3.0) -> list[str]:
        names = [f"n{i}" for i in range(1, count + 1)]
        self.add(names[0])
        for name in names[1:]:
            self.add(name, seeds=[names[0]])
        self.run_for(settle_s)
        return names

    def kill(self, name: str) -> None:
        self.alive.discard(name)
        self._timer.pop(name, None)

    # -- running -------------------------------------------------------------------------
    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_until(self, end: float) -> None:
        while self._heap and self._heap[0][0] <= end:
            at, _n, kind, name, data, addr = heapq.heappop(self._heap)
            self.now = at
            if name not in self.alive:
                continue
            swim = self.nodes[name]
            if kind == "tick":
                if self._timer.get(name) != at:
                    continue  # superseded by an earlier wake-up
                del self._timer[name]
                self._run(name, swim.tick(at))
            else:
                try:
                    message = self.codec.decode(data)
                except CodecError:
                    self.rejected += 1
                    continue
                self._run(name, swim.receive(message, addr, at))
            self._arm(name)
        self.now = end

    def deliver_raw(self, name: str, data: bytes, source: Addr) -> None:
        heapq.heappush(self._heap, (self.now, next(self._counter), "msg", name, data, source))

    def _arm(self, name: str) -> None:
        if name not in self.alive:
            return
        at = max(self.nodes[name].next_deadline(), self.now)
        current = self._timer.get(name)
        if current is not None and current <= at:
            return
        self._timer[name] = at
        heapq.heappush(self._heap, (at, next(self._counter), "tick", name, b"", ("", 0)))

    def _run(self, name: str, actions: list[Action]) -> None:
        source = self.nodes[name].addr
        for action in actions:
            if isinstance(action, Changed):
                self.transitions.append(Transition(self.now, name, action))
                continue
            assert isinstance(action, Send)
            self.sent += 1
            data = self.codec.encode(action.message)
            if self.rng.random() < self.loss:
                continue
            target = self._by_addr.get(action.addr)
            if target is None or target in self.drop_to or name in self.drop_from:
                continue
            at = self.now + self.latency_s + self.rng.random() * self.jitter_s
            heapq.heappush(self._heap, (at, next(self._counter), "msg", target, data, source))

    # -- queries -------------------------------------------------------------------------
    def views_of(self, node: str) -> dict[str, Liveness | None]:
        return {name: self.nodes[name].state_of(node) for name in self.alive if name != node}

    def first(self, node: str, state: Liveness, after: float) -> dict[str, float]:
        """When each observer first saw `node` enter `state` (at or after `after`)."""
        seen: dict[str, float] = {}
        for t in self.transitions:
            if t.at >= after and t.change.node == node and t.change.new is state:
                seen.setdefault(t.observer, t.at)
        return seen
