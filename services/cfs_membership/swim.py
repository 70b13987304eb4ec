"""SWIM failure detection with Lifeguard, as pure state (DESIGN.md §2, §6).

No I/O and no clock: the runner passes `now` (monotonic seconds) into every call
and executes the returned actions (`Send` a message, report a `Changed` member).
The same object runs under a simulated network in the unit tests.

The protocol (Das et al., "SWIM", 2002; Dadgar et al., "Lifeguard", 2017; the
shape follows hashicorp/memberlist):

- Every protocol period one member is probed, in a randomized round-robin order:
  `Ping`, and if no `Ack` came within the probe timeout, `PingReq` through
  `indirect_k` other members, who ping the target and forward its ack, or answer
  `Nack` when they got none. No ack by the end of the period: the target is
  suspected.
- Local health (Lifeguard): a multiplier (0..max_lhm) that grows when our own
  probes fail without the helpers' nacks arriving (the fault is likely ours),
  when we must refute a suspicion of ourselves, and shrinks on every ack. The
  probe period and timeout are scaled by `lhm + 1`, so a starved or lossy member
  slows down instead of accusing healthy ones.
- Suspicion: a suspect member is declared DOWN when its suspicion timer runs out.
  The timer starts at `suspicion_max_s` and shrinks towards `suspicion_min_s` as
  independent confirmations (other members' `Suspect` messages) arrive:
  `max - (max - min) * log(c + 1) / log(k + 1)` (memberlist `suspicion.go`).
- Incarnations: only a member raises its own. A member that hears it is
  suspected (or declared down, or left) refutes with a higher incarnation; at
  equal incarnation suspect beats alive and down beats suspect.
- Dissemination: every update rides along on the messages we send anyway (and a
  gossip message to `gossip_fanout` members every `gossip_interval_s`), each one
  sent at most `gossip_lambda * ceil(log10(n + 1))` times. Pings to a suspect
  carry its suspicion, so it learns of it and refutes fast (Lifeguard's buddy
  system).
- Join: a new member sends `Join` to its seeds until one answers with a `Sync`
  (its whole member list); members also push-pull a `Sync` with one random peer
  every `sync_interval_s` to repair anything gossip missed. Leave: a `Left`
  update, sent directly to every member and gossiped.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from cfs_contracts.members import Liveness
from cfs_membership.messages import (
    Ack,
    Addr,
    Alive,
    Dead,
    Gossip,
    Join,
    Left,
    MemberInfo,
    Message,
    Nack,
    Ping,
    PingReq,
    Suspect,
    Sync,
    Update,
)

__all__ = [
    "Ack",
    "Action",
    "Addr",
    "Alive",
    "Changed",
    "Dead",
    "Gossip",
    "Join",
    "Left",
    "MemberInfo",
    "Message",
    "Nack",
    "Ping",
    "PingReq",
    "Send",
    "Suspect",
    "Swim",
    "SwimConfig",
    "Sync",
    "Update",
]


@dataclass(frozen=True)
class SwimConfig:
    """Timing; the defaults aim at detection in <= 2 s (median), <= 4 s (max) on a LAN.

    The budget on 6 nodes: each of the 5 survivors probes the dead node once per
    round-robin cycle (5 x 0.2 s), so the first failed probe ends ~0.2-0.4 s after
    the kill; the others confirm within the cycle, which shrinks the suspicion to
    `suspicion_min_s` (1 s). A live node suspected by one unlucky prober gets
    `suspicion_max_s` (3 s) to refute, which a few datagrams do in milliseconds.
    Both suspicion bounds grow with log10(members) past 10 members, as in memberlist.
    """

    probe_interval_s: float = 0.2
    probe_timeout_s: float = 0.08
    indirect_k: int = 3
    suspicion_min_s: float = 1.0
    suspicion_max_s: float = 3.0
    suspicion_k: int = 3
    gossip_interval_s: float = 0.2
    gossip_fanout: int = 3
    gossip_lambda: int = 4
    gossip_to_down_s: float = 5.0
    max_piggyback: int = 8
    sync_interval_s: float = 10.0
    join_retry_s: float = 1.0
    max_lhm: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout_s < self.probe_interval_s:
            raise ValueError("need 0 < probe_timeout_s < probe_interval_s")
        if not 0 < self.suspicion_min_s <= self.suspicion_max_s:
            raise ValueError("need 0 < suspicion_min_s <= suspicion_max_s")


# -- actions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Send:
    addr: Addr
    message: Message


@dataclass(frozen=True)
class Changed:
    """A member's state or incarnation changed in our view (`old` None: first seen).

    Our own entry is reported too: ALIVE -> ALIVE with a new incarnation after a
    refutation, ALIVE -> LEFT when we leave.
    """

    node: str
    old: Liveness | None
    new: Liveness
    incarnation: int
    by: str
    host: str
    port: int
    labels: dict[str, str]


Action = Send | Changed


# -- state ---------------------------------------------------------------------------------
@dataclass
class Suspicion:
    """Lifeguard's dynamic suspicion timeout for one suspect member."""

    start: float
    min_s: float
    max_s: float
    k: int
    seen: set[str]
    confirmations: int = 0
    deadline: float = 0.0

    @classmethod
    def begin(cls, by: str, now: float, k: int, min_s: float, max_s: float) -> Suspicion:
        s = cls(start=now, min_s=min_s, max_s=max_s, k=k, seen={by})
        s.deadline = now + (max_s if k > 0 else min_s)
        return s

    def confirm(self, by: str) -> bool:
        """Count an independent confirmation; True if it was new (and shrank the timer)."""
        if self.confirmations >= self.k or by in self.seen:
            return False
        self.seen.add(by)
        self.confirmations += 1
        frac = math.log(self.confirmations + 1) / math.log(self.k + 1)
        timeout = max(self.min_s, self.max_s - frac * (self.max_s - self.min_s))
        self.deadline = self.start + timeout
        return True


@dataclass
class Member:
    node: str
    host: str
    port: int
    labels: dict[str, str]
    incarnation: int
    state: Liveness
    since: float
    suspicion: Suspicion | None = None

    @property
    def addr(self) -> Addr:
        return (self.host, self.port)

    def info(self) -> MemberInfo:
        return MemberInfo(
            self.node, self.state, self.incarnation, self.host, self.port, dict(self.labels)
        )


@dataclass
class Probe:
    seq: int
    target: str
    indirect_at: float
    deadline: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass
class Relay:
    """A ping we sent for another member's indirect probe."""

    requester: Addr
    seq: int
    deadline: float


_LIVE = (Liveness.ALIVE, Liveness.SUSPECT)


class Swim:
    """One member's protocol state; every method returns the actions to execute."""

    def __init__(
        self,
        config: SwimConfig,
        *,
        node: str,
        host: str,
        port: int,
        labels: dict[str, str] | None = None,
        incarnation: int = 0,
        rng: random.Random | None = None,
        now: float = 0.0,
    ) -> None:
        self.config = config
        self.node = node
        self.host = host
        self.port = port
        self.labels = dict(labels or {})
        self.incarnation = incarnation
        self.lhm = 0
        self.leaving = False
        self.joined = True
        self.members: dict[str, Member] = {}
        self.stats: dict[str, int] = {"probes": 0, "probe_failures": 0, "refutations": 0}
        self._rng = rng or random.Random()
        self._seq = 0
        self._probe: Probe | None = None
        self._order: list[str] = []
        self._cursor = 0
        self._relays: dict[int, Relay] = {}
        self._queue: dict[str, tuple[Update, int]] = {}  # node -> (latest update, sends)
        self._seeds: list[Addr] = []
        self._asked: dict[str, float] = {}  # unknown sender -> no new Sync request before
        self._next_probe = now + config.probe_interval_s * self._rng.random()
        self._next_gossip = now + config.gossip_interval_s
        self._next_sync = now + config.sync_interval_s * (0.5 + self._rng.random())
        self._next_join = math.inf

    # -- public --------------------------------------------------------------------------
    @property
    def addr(self) -> Addr:
        return (self.host, self.port)

    def state_of(self, node: str) -> Liveness | None:
        if node == self.node:
            return Liveness.LEFT if self.leaving else Liveness.ALIVE
        member = self.members.get(node)
        return member.state if member is not None else None

    def view(self) -> list[MemberInfo]:
        """Every member we know, ourselves included, sorted by name."""
        rows = [member.info() for member in self.members.values()]
        rows.append(self._self_info())
        return sorted(rows, key=lambda row: row.node)

    def join(self, seeds: Iterable[Addr], now: float) -> list[Action]:
        """Ask `seeds` for the member list until one answers (retried every join_retry_s)."""
        self._seeds = [addr for addr in seeds if addr != self.addr]
        if not self._seeds:
            self.joined = True
            return []
        self.joined = False
        return self._send_joins(now)

    def leave(self, now: float) -> list[Action]:
        """Tell every member we leave; afterwards we refute nothing."""
        out: list[Action] = []
        if self.leaving:
            return out
        self.leaving = True
        update = Left(self.node, self.incarnation)
        self._broadcast(update)
        for member in self._live_members():
            out.append(Send(member.addr, Gossip(self.node, (update,))))
        out.append(self._changed(self.node, Liveness.ALIVE, Liveness.LEFT, self.node))
        return out

    def next_deadline(self) -> float:
        """When `tick` next has something to do."""
        times = [self._next_probe, self._next_gossip, self._next_sync, self._next_join]
        if self._probe is not None:
            times.append(self._probe.deadline)
            if not self._probe.indirect_sent:
                times.append(self._probe.indirect_at)
        times.extend(relay.deadline for relay in self._relays.values())
        times.extend(m.suspicion.deadline for m in self.members.values() if m.suspicion is not None)
        return min(times)

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        self._expire_suspicions(now, out)
        self._run_probe(now, out)
        for seq, relay in list(self._relays.items()):
            if now >= relay.deadline:
                del self._relays[seq]
                out.append(Send(relay.requester, Nack(relay.seq, self.node)))
        if now >= self._next_gossip:
            self._next_gossip = now + self.config.gossip_interval_s
            self._gossip(now, out)
        if now >= self._next_sync:
            self._next_sync = now + self.config.sync_interval_s
            peers = [m for m in self.members.values() if m.state is Liveness.ALIVE]
            if peers:
                peer = self._rng.choice(peers)
                out.append(Send(peer.addr, self._sync(reply=True)))
        if not self.joined and now >= self._next_join:
            out.extend(self._send_joins(now))
        return out

    def receive(self, message: Message, addr: Addr, now: float) -> list[Action]:
        out: list[Action] = []
        remind = False
        for update in message.gossip:
            if update.node == self.node and not isinstance(update, Alive):
                # The sender still holds an accusation we refuted: answer it directly.
                remind = remind or update.incarnation < self.incarnation
            self._apply(update, now, out)
        if remind and not self.leaving:
            out.append(Send(addr, Gossip(self.node, (self._self_alive(),))))
        if not isinstance(message, Sync):
            self._ask_unknown(message.sender, addr, now, out)
        suspect = self.members.get(message.sender)
        if suspect is not None and suspect.state is Liveness.SUSPECT:
            # It talks, so it may well be alive: tell it what we think, so it refutes.
            accusation = Suspect(suspect.node, suspect.incarnation, self.node)
            out.append(Send(addr, Gossip(self.node, (accusation,))))
        if isinstance(message, Ping):
            if message.target == self.node:
                out.append(Send(addr, Ack(message.seq, self.node, self._piggyback())))
        elif isinstance(message, Ack):
            self._on_ack(message, out)
        elif isinstance(message, Nack):
            if self._probe is not None and self._probe.seq == message.seq:
                self._probe.nacks += 1
        elif isinstance(message, PingReq):
            seq = self._next_seq()
            target = (message.host, message.port)
            out.append(Send(target, Ping(seq, self.node, message.target, self._piggyback())))
            self._relays[seq] = Relay(addr, message.seq, now + max(0, message.nack_ms) / 1000)
        elif isinstance(message, Join):
            out.append(Send(addr, self._sync(reply=False)))
        elif isinstance(message, Sync):
            self.joined = True
            self._next_join = math.inf
            for info in message.members:
                self._merge(info, message.sender, now, out)
            if message.reply:
                out.append(Send(addr, self._sync(reply=False)))
        return out

    def _ask_unknown(self, sender: str, addr: Addr, now: float, out: list[Action]) -> None:
        """Someone we never heard of talks to us (its Alive missed us): sync with it."""
        if sender == self.node or sender in self.members:
            return
        if now >= self._asked.get(sender, -math.inf):
            self._asked[sender] = now + self.config.join_retry_s
            out.append(Send(addr, self._sync(reply=True)))

    # -- probing -------------------------------------------------------------------------
    def _run_probe(self, now: float, out: list[Action]) -> None:
        probe = self._probe
        if probe is not None and not probe.indirect_sent and now >= probe.indirect_at:
            self._send_indirect(probe, now, out)
        if probe is not None and now >= probe.deadline:
            self._probe = None
            self._probe_failed(probe, now, out)
        if self._probe is None and now >= self._next_probe:
            self._start_probe(now, out)

    def _start_probe(self, now: float, out: list[Action]) -> None:
        scale = self.lhm + 1
        self._next_probe = now + self.config.probe_interval_s * scale
        target = self._next_target()
        if target is None:
            return
        self.stats["probes"] += 1
        seq = self._next_seq()
        gossip = self._piggyback()
        if target.state is Liveness.SUSPECT:  # buddy system: tell it, so it can refute
            gossip = (Suspect(target.node, target.incarnation, self.node), *gossip)
        out.append(Send(target.addr, Ping(seq, self.node, target.node, gossip)))
        self._probe = Probe(
            seq=seq,
            target=target.node,
            indirect_at=now + self.config.probe_timeout_s * scale,
            deadline=self._next_probe,
        )

    def _next_target(self) -> Member | None:
        for _ in range(2):
            while self._cursor < len(self._order):
                member = self.members.get(self._order[self._cursor])
                self._cursor += 1
                if member is not None and member.state in _LIVE:
                    return member
            self._order = list(self.members)
            self._rng.shuffle(self._order)
            self._cursor = 0
        return None

    def _send_indirect(self, probe: Probe, now: float, out: list[Action]) -> None:
        probe.indirect_sent = True
        target = self.members.get(probe.target)
        if target is None:
            return
        # A second direct ping rides along (memberlist's TCP fallback, over UDP here):
        # one lost datagram should not cost a suspicion.
        out.append(Send(target.addr, Ping(probe.seq, self.node, target.node)))
        helpers = [
            m for m in self.members.values() if m.state is Liveness.ALIVE and m.node != target.node
        ]
        helpers = self._rng.sample(helpers, min(self.config.indirect_k, len(helpers)))
        # Helpers nack before our period ends, so a missing nack means our own trouble.
        nack_ms = int((probe.deadline - now) * 800)
        for helper in helpers:
            request = PingReq(
                probe.seq,
                self.node,
                target.node,
                target.host,
                target.port,
                nack_ms,
                self._piggyback(),
            )
            out.append(Send(helper.addr, request))
        probe.expected_nacks = len(helpers)

    def _on_ack(self, ack: Ack, out: list[Action]) -> None:
        if self._probe is not None and self._probe.seq == ack.seq:
            self._probe = None
            self.lhm = max(0, self.lhm - 1)
            return
        relay = self._relays.pop(ack.seq, None)
        if relay is not None:
            out.append(Send(relay.requester, Ack(relay.seq, self.node, self._piggyback())))

    def _probe_failed(self, probe: Probe, now: float, out: list[Action]) -> None:
        self.stats["probe_failures"] += 1
        if probe.expected_nacks:
            missed = probe.expected_nacks - probe.nacks
            self._health(max(0, missed))
        else:
            self._health(1)
        target = self.members.get(probe.target)
        if target is not None and target.state in _LIVE:
            self._apply(Suspect(target.node, target.incarnation, self.node), now, out)

    def _health(self, delta: int) -> None:
        self.lhm = min(self.config.max_lhm, max(0, self.lhm + delta))

    def _expire_suspicions(self, now: float, out: list[Action]) -> None:
        for member in list(self.members.values()):
            if member.suspicion is not None and now >= member.suspicion.deadline:
                self._apply(Dead(member.node, member.incarnation, self.node), now, out)

    def accused(self, state: Liveness, incarnation: int, by: str) -> list[Action]:
        """The stored records call us SUSPECT or DOWN (a verdict that reached them late:
        from a member that was partitioned away): refuted as that gossip would be,
        with an incarnation above it."""
        out: list[Action] = []
        update = Dead(self.node, incarnation, by) if state is Liveness.DOWN else (
            Suspect(self.node, incarnation, by)
        )  # fmt: skip
        self._about_me(update, out)
        return out

    # -- updates ---------------------------------------------------------------------------
    def _apply(self, update: Update, now: float, out: list[Action]) -> None:
        if update.node == self.node:
            self._about_me(update, out)
        elif isinstance(update, Alive):
            self._on_alive(update, now, out)
        elif isinstance(update, Suspect):
            self._on_suspect(update, now, out)
        else:
            self._on_gone(update, now, out)

    def _about_me(self, update: Update, out: list[Action]) -> None:
        if self.leaving:
            return
        if isinstance(update, Alive):
            stale = update.incarnation <= self.incarnation  # else: our own previous life
        else:
            stale = update.incarnation < self.incarnation
        if stale:
            return
        self.incarnation = update.incarnation + 1
        self.stats["refutations"] += 1
        if not isinstance(update, Alive):
            self._health(1)
        alive = self._self_alive()
        self._broadcast(alive)
        accuser = self.members.get(update.by) if isinstance(update, Suspect | Dead) else None
        if accuser is not None:  # its suspicion timer runs first: tell it directly
            out.append(Send(accuser.addr, Gossip(self.node, (alive,))))
        out.append(self._changed(self.node, Liveness.ALIVE, Liveness.ALIVE, self.node))

    def _on_alive(self, update: Alive, now: float, out: list[Action]) -> None:
        member = self.members.get(update.node)
        if member is None:
            self.members[update.node] = Member(
                update.node,
                update.host,
                update.port,
                dict(update.labels),
                update.incarnation,
                Liveness.ALIVE,
                since=now,
            )
            # A newcomer goes to a random place in this round, not to its end.
            self._order.insert(self._rng.randint(self._cursor, len(self._order)), update.node)
            self._broadcast(update)
            out.append(self._changed(update.node, None, Liveness.ALIVE, update.node))
            return
        if update.incarnation <= member.incarnation:
            return
        old = member.state
        member.incarnation = update.incarnation
        member.host, member.port, member.labels = update.host, update.port, dict(update.labels)
        member.suspicion = None
        self._broadcast(update)
        if old is not Liveness.ALIVE:
            member.state, member.since = Liveness.ALIVE, now
            out.append(self._changed(member.node, old, Liveness.ALIVE, member.node))

    def _on_suspect(self, update: Suspect, now: float, out: list[Action]) -> None:
        member = self.members.get(update.node)
        if member is None or update.incarnation < member.incarnation:
            return
        if member.state not in _LIVE:
            return
        if member.state is Liveness.SUSPECT and update.incarnation == member.incarnation:
            if member.suspicion is not None and member.suspicion.confirm(update.by):
                self._broadcast(update)  # confirmations spread, so every timer shrinks
            return
        old = member.state
        member.state, member.since = Liveness.SUSPECT, now
        member.incarnation = update.incarnation
        live = 1 + sum(1 for m in self.members.values() if m.state in _LIVE)
        scale = max(1.0, math.log10(live))
        k = max(0, min(self.config.suspicion_k, live - 2))
        member.suspicion = Suspicion.begin(
            update.by,
            now,
            k,
            self.config.suspicion_min_s * scale,
            self.config.suspicion_max_s * scale,
        )
        self._broadcast(update)
        out.append(self._changed(member.node, old, Liveness.SUSPECT, update.by))

    def _on_gone(self, update: Dead | Left, now: float, out: list[Action]) -> None:
        member = self.members.get(update.node)
        if member is None or update.incarnation < member.incarnation:
            return
        new = Liveness.LEFT if isinstance(update, Left) else Liveness.DOWN
        if member.state is Liveness.LEFT or member.state is new:
            return
        old = member.state
        member.state, member.since = new, now
        member.incarnation = update.incarnation
        member.suspicion = None
        self._broadcast(update)
        by = update.by if isinstance(update, Dead) else update.node
        out.append(self._changed(member.node, old, new, by))

    def _merge(self, info: MemberInfo, sender: str, now: float, out: list[Action]) -> None:
        """Take one row of a peer's `Sync` (memberlist's push-pull merge)."""
        alive = Alive(info.node, info.incarnation, info.host, info.port, dict(info.labels))
        if info.state is Liveness.ALIVE:
            self._apply(alive, now, out)
        elif info.state is Liveness.SUSPECT:
            if info.node != self.node and info.node not in self.members:
                self._apply(alive, now, out)
            self._apply(Suspect(info.node, info.incarnation, sender), now, out)
        elif info.state is Liveness.DOWN:
            # A peer's verdict is only a suspicion here: our own probes decide.
            if info.node == self.node:
                self._apply(Dead(info.node, info.incarnation, sender), now, out)
            else:
                self._apply(Suspect(info.node, info.incarnation, sender), now, out)
        else:
            self._apply(Left(info.node, info.incarnation), now, out)

    # -- dissemination -------------------------------------------------------------------
    def _broadcast(self, update: Update) -> None:
        self._queue[update.node] = (update, 0)  # a newer update about a node replaces the old

    def _retransmit_limit(self) -> int:
        n = 1 + sum(1 for m in self.members.values() if m.state in _LIVE)
        return self.config.gossip_lambda * max(1, math.ceil(math.log10(n + 1)))

    def _piggyback(self) -> tuple[Update, ...]:
        if not self._queue:
            return ()
        limit = self._retransmit_limit()
        chosen = sorted(self._queue.items(), key=lambda item: item[1][1])
        chosen = chosen[: self.config.max_piggyback]
        for node, (update, sends) in chosen:
            if sends + 1 >= limit:
                del self._queue[node]
            else:
                self._queue[node] = (update, sends + 1)
        return tuple(update for _node, (update, _sends) in chosen)

    def _gossip(self, now: float, out: list[Action]) -> None:
        if not self._queue:
            return
        targets = [
            m
            for m in self.members.values()
            if m.state in _LIVE
            or (m.state is Liveness.DOWN and now - m.since < self.config.gossip_to_down_s)
        ]
        for member in self._rng.sample(targets, min(self.config.gossip_fanout, len(targets))):
            gossip = self._piggyback()
            if not gossip:
                break
            out.append(Send(member.addr, Gossip(self.node, gossip)))

    def _sync(self, *, reply: bool) -> Sync:
        rows = tuple(m.info() for m in self.members.values())
        return Sync(self.node, (self._self_info(), *rows), reply, self._piggyback())

    def _send_joins(self, now: float) -> list[Action]:
        self._next_join = now + self.config.join_retry_s
        hello = Join(self.node, (self._self_alive(),))
        return [Send(seed, hello) for seed in self._seeds]

    # -- helpers ---------------------------------------------------------------------------
    def _live_members(self) -> list[Member]:
        return [m for m in self.members.values() if m.state in _LIVE]

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _self_alive(self) -> Alive:
        return Alive(self.node, self.incarnation, self.host, self.port, dict(self.labels))

    def _self_info(self) -> MemberInfo:
        state = Liveness.LEFT if self.leaving else Liveness.ALIVE
        return MemberInfo(
            self.node, state, self.incarnation, self.host, self.port, dict(self.labels)
        )

    def _changed(self, node: str, old: Liveness | None, new: Liveness, by: str) -> Changed:
        if node == self.node:
            return Changed(
                node, old, new, self.incarnation, by, self.host, self.port, dict(self.labels)
            )
        member = self.members[node]
        return Changed(
            node, old, new, member.incarnation, by, member.host, member.port, dict(member.labels)
        )
