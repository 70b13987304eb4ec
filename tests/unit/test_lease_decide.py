"""The pure lease decision: examples, then a model of several nodes and one KV bucket."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cfs.lease import (
    Action,
    LeaseRecord,
    Snapshot,
    decide,
    observe,
    proposal,
    step_down,
    wake_in,
    wrote,
)

LEASE, RENEW, MARGIN = 1.5, 0.3, 0.3


def rec(holder: str, term: int = 1, handoff_to: str | None = None) -> LeaseRecord:
    return LeaseRecord(
        holder=holder,
        term=term,
        lease_s=LEASE,
        acquired_ms=0,
        renewed_ms=0,
        handoff_to=handoff_to,
    )


def snap(node: str = "a", **kw: Any) -> Snapshot:
    return replace(Snapshot(node=node, lease_s=LEASE, renew_s=RENEW, margin_s=MARGIN), **kw)


def holding(term: int = 1, renewed_at: float = 10.0, **kw: Any) -> Snapshot:
    defaults: dict[str, Any] = {"record": rec("a", term), "revision": 5, "observed_at": 10.0}
    return snap(held_term=term, renewed_at=renewed_at, **{**defaults, **kw})


# -- contender -------------------------------------------------------------------------
def test_absent_key_is_acquired_with_term_1() -> None:
    s = snap()
    assert decide(s, 0.0).action is Action.ACQUIRE
    assert proposal(s, Action.ACQUIRE, 123) == LeaseRecord(
        holder="a", term=1, lease_s=LEASE, acquired_ms=123, renewed_ms=123
    )


def test_a_fresh_record_of_another_node_is_waited_out_then_taken_with_term_plus_1() -> None:
    s = observe(snap(), rec("b", 4), 7, now=100.0)
    assert decide(s, 100.0 + LEASE - 0.01).action is Action.WAIT
    d = decide(s, 100.0 + LEASE)
    assert d.action is Action.ACQUIRE and "b silent" in d.reason
    assert proposal(s, Action.ACQUIRE, 0).term == 5


def test_the_wait_counts_from_the_last_revision_change_seen() -> None:
    s = observe(snap(), rec("b"), 7, now=100.0)
    s = observe(s, rec("b"), 8, now=101.0)  # a renewal
    s = observe(s, rec("b"), 8, now=102.0)  # the same revision again: no change
    assert s.observed_at == 101.0
    assert decide(s, 101.0 + LEASE - 0.01).action is Action.WAIT


def test_older_revisions_are_ignored() -> None:
    s = observe(snap(), rec("b", 2), 9, now=1.0)
    assert observe(s, rec("c", 1), 8, now=2.0) is s


def test_released_record_is_taken_at_once_unless_handed_to_someone_else() -> None:
    released = observe(snap(), rec("", 3), 9, now=50.0)
    assert decide(released, 50.0).action is Action.ACQUIRE
    to_me = observe(snap(), rec("", 3, handoff_to="a"), 9, now=50.0)
    assert decide(to_me, 50.0).action is Action.ACQUIRE
    to_c = observe(snap(), rec("", 3, handoff_to="c"), 9, now=50.0)
    assert decide(to_c, 50.0).action is Action.WAIT
    assert decide(to_c, 50.0 + LEASE).action is Action.ACQUIRE  # c never came


def test_an_ineligible_node_never_acquires() -> None:
    assert decide(snap(eligible=False), 0.0).action is Action.WAIT
    s = observe(snap(eligible=False), rec("", 3), 9, now=50.0)
    assert decide(s, 999.0).action is Action.WAIT


# -- holder ----------------------------------------------------------------------------
def test_holder_renews_after_the_interval() -> None:
    s = holding()
    assert decide(s, 10.0 + RENEW - 0.01).action is Action.WAIT
    assert decide(s, 10.0 + RENEW).action is Action.RENEW
    renewed = proposal(s, Action.RENEW, 999)
    assert (renewed.holder, renewed.term, renewed.renewed_ms) == ("a", 1, 999)


def test_holder_steps_down_before_anyone_could_take_over() -> None:
    s = holding()
    assert s.holds(10.0 + LEASE - MARGIN - 0.001)
    d = decide(s, 10.0 + LEASE - MARGIN)
    assert d.action is Action.STEP_DOWN and "last renewal" in d.reason
    assert not s.holds(10.0 + LEASE - MARGIN)


def test_holder_steps_down_when_the_record_names_someone_else() -> None:
    assert decide(holding(record=rec("b", 2)), 10.1).action is Action.STEP_DOWN
    assert decide(holding(record=rec("a", 2)), 10.1).action is Action.STEP_DOWN  # forced
    assert decide(holding(record=None), 10.1).action is Action.STEP_DOWN  # deleted


def test_holder_releases_when_ineligible_or_asked_to_hand_off() -> None:
    d = decide(holding(eligible=False), 10.1)
    assert d.action is Action.RELEASE
    s = holding(record=rec("a", 1, handoff_to="b"))
    d = decide(s, 10.1)
    assert d.action is Action.RELEASE and "handoff to b" in d.reason
    released = proposal(s, Action.RELEASE, 5)
    assert (released.holder, released.term, released.handoff_to) == ("", 1, "b")


def test_a_handoff_to_the_holder_itself_is_cleared_by_the_next_renewal() -> None:
    s = holding(record=rec("a", 1, handoff_to="a"))
    assert decide(s, 10.0 + RENEW).action is Action.RENEW
    assert proposal(s, Action.RENEW, 0).handoff_to is None


def test_wrote_starts_holding_from_the_send_time() -> None:
    s = wrote(snap(), rec("a", 1), 3, sent_at=5.0, now=5.2)
    assert (s.held_term, s.renewed_at, s.revision, s.observed_at) == (1, 5.0, 3, 5.2)
    assert step_down(s).held_term is None


def test_wake_in_meets_the_next_deadline_and_never_spins() -> None:
    assert wake_in(holding(), 10.0 + LEASE - MARGIN - 0.05) < 0.06
    assert wake_in(holding(), 100.0) == RENEW / 2  # already past: retried at the tick
    waiting = observe(snap(), rec("b"), 7, now=0.0)
    assert wake_in(waiting, LEASE - 0.01) < 0.02
    assert wake_in(snap(), 0.0) == RENEW / 2


# -- a model: three nodes, one bucket, random event orderings -------------------------
@dataclass
class Bucket:
    record: LeaseRecord | None = None
    revision: int = 0
    written_at: float = 0.0
    history: list[tuple[LeaseRecord | None, int]] = field(default_factory=lambda: [(None, 0)])

    def put(self, record: LeaseRecord, now: float) -> int:
        self.revision += 1
        self.record, self.written_at = record, now
        self.history.append((record, self.revision))
        return self.revision


NODES = ("a", "b", "c")
FAULTS = ["ok", "ok", "in_flight", "fail", "ack_lost"]
node = st.sampled_from(NODES)
# Weighted by repetition: mostly ticks, time and watch deliveries; some admin and churn.
events = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), node, st.sampled_from(FAULTS)),
        st.tuples(st.just("tick"), node, st.sampled_from(FAULTS)),
        st.tuples(st.just("ack"), node),
        st.tuples(st.just("advance"), st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.5, 1.0])),
        st.tuples(st.just("observe"), node),
        st.tuples(st.just("observe_old"), node, st.integers(0, 50)),
        # Time passes with everyone but one node (paused, partitioned) ticking and watching.
        st.tuples(st.just("run"), st.sampled_from([*NODES, None]), st.integers(1, 80)),
        st.tuples(st.just("eligible"), node, st.sampled_from([True, True, False])),
        st.tuples(st.just("handoff"), node),
    ),
    min_size=5,
    max_size=120,
)
timings = st.tuples(st.sampled_from([1.0, 1.5, 3.0]), st.sampled_from([0.2, 0.25]))


class Model:
    """The runner's moves, step by step, against a CAS bucket; checks after every step."""

    def __init__(self, config: dict[str, tuple[float, float]]) -> None:
        self.kv = Bucket()
        self.now = 0.0
        self.nodes = {
            n: Snapshot(node=n, lease_s=lease, renew_s=lease * f, margin_s=lease * 0.2)
            for n, (lease, f) in config.items()
        }
        # A write applied by the bucket whose ack is still on its way (the runner's cycle
        # is blocked on it: that node makes no decision until the ack or a timeout).
        self.in_flight: dict[str, tuple[LeaseRecord, int, float]] = {}

    def check(self) -> None:
        holders = [n for n, s in self.nodes.items() if s.holds(self.now)]
        assert len(holders) <= 1, f"two holders at {self.now}: {holders}"

    def observe(self, n: str, record: LeaseRecord | None, revision: int) -> None:
        self.nodes[n] = observe(self.nodes[n], record, revision, self.now)

    def tick(self, n: str, fault: str) -> None:
        if n in self.in_flight:
            return
        s = self.nodes[n]
        d = decide(s, self.now)
        if s.held_term is not None and self.now >= s.valid_until:
            assert d.action is Action.STEP_DOWN, "a lapsed holder must step down first"
        if d.action in (Action.STEP_DOWN, Action.RELEASE):
            self.nodes[n] = s = step_down(s)
        if d.action in (Action.ACQUIRE, Action.RENEW, Action.RELEASE):
            self.write(n, s, d.action, fault)

    def write(self, n: str, s: Snapshot, action: Action, fault: str) -> None:
        record = proposal(s, action, 0)
        if self.kv.revision != s.revision:  # CAS lost: the runner re-reads
            self.observe(n, self.kv.record, self.kv.revision)
            return
        if fault == "fail":
            return
        old, age = self.kv.record, self.now - self.kv.written_at
        if action is Action.RENEW:
            assert old is not None and old.holder == n, "renewed someone else's record"
        if action is Action.ACQUIRE and old is not None:
            taken_over = old.holder or old.handoff_to not in (None, n)
            assert not taken_over or age >= old.lease_s, f"took a fresh record of {old}"
            assert record.term == old.term + 1
        revision = self.kv.put(record, self.now)
        if fault == "ok":
            self.nodes[n] = wrote(self.nodes[n], record, revision, self.now, self.now)
        elif fault == "in_flight":
            self.in_flight[n] = (record, revision, self.now)

    def ack(self, n: str) -> None:
        if n in self.in_flight:
            record, revision, sent_at = self.in_flight.pop(n)
            self.nodes[n] = wrote(self.nodes[n], record, revision, sent_at, self.now)

    def run(self, paused: str | None, steps: int) -> None:
        for _ in range(steps):
            self.now += 0.05
            for n in NODES:
                if n != paused:
                    self.ack(n)
                    self.observe(n, self.kv.record, self.kv.revision)
                    self.tick(n, "ok")
                    self.check()

    def handoff(self, target: str) -> None:
        if self.kv.record is not None and self.kv.record.holder != target:
            self.kv.put(self.kv.record.model_copy(update={"handoff_to": target}), self.now)


@settings(max_examples=300, deadline=None)
@given(events=events, config=st.fixed_dictionaries({n: timings for n in NODES}))
def test_no_two_nodes_ever_hold_the_lease_at_once(
    events: list[tuple[Any, ...]], config: dict[str, tuple[float, float]]
) -> None:
    m = Model(config)
    for kind, *args in events:
        if kind == "advance":
            m.now += args[0]
        elif kind == "observe":
            m.observe(args[0], m.kv.record, m.kv.revision)
        elif kind == "observe_old":
            m.observe(args[0], *m.kv.history[min(args[1], len(m.kv.history) - 1)])
        elif kind == "eligible":
            m.nodes[args[0]] = replace(m.nodes[args[0]], eligible=args[1])
        else:
            getattr(m, kind)(*args)
        m.check()
    # Liveness: with everyone eligible, connected and ticking, one node ends up holding.
    m.nodes = {n: replace(s, eligible=True) for n, s in m.nodes.items()}
    m.run(None, 200)
    assert sum(s.holds(m.now) for s in m.nodes.values()) == 1


def test_a_less_preferred_replica_waits_its_delay_before_taking_a_lease() -> None:
    released = snap(record=rec(""), revision=3, observed_at=10.0, acquire_delay_s=0.2)
    assert decide(released, 10.1).action is Action.WAIT
    assert decide(released, 10.25).action is Action.ACQUIRE
    assert abs(wake_in(released, 10.1) - 0.1) < 0.01
    expired = snap(record=rec("b"), revision=3, observed_at=10.0, acquire_delay_s=0.2)
    assert decide(expired, 10.0 + LEASE + 0.1).action is Action.WAIT
    assert decide(expired, 10.0 + LEASE + 0.25).action is Action.ACQUIRE
    handed = snap(record=rec("", handoff_to="a"), revision=3, observed_at=10.0, acquire_delay_s=5)
    assert decide(handed, 10.0).action is Action.ACQUIRE, "a handoff target never waits"


def test_a_fresh_read_wins_over_a_higher_known_revision() -> None:
    """After a quorum recovery re-seeded the bucket, revisions start again lower."""
    s = observe(snap(), rec("b", 2), 900, now=1.0)
    assert observe(s, rec("b", 2), 3, now=2.0) is s  # a stale watch delivery: ignored
    reseeded = observe(s, rec("b", 2), 3, now=2.0, fresh=True)
    assert reseeded.revision == 3 and reseeded.record == rec("b", 2)
