"""Which member record wins in the nodes KV, and which CLUSTER event the winner publishes."""

from __future__ import annotations

from cfs_contracts.events.cluster import NodeAlive, NodeDown, NodeJoined, NodeLeft, NodeSuspect
from cfs_contracts.members import Liveness, MemberRecord
from cfs_membership.records import accuses, event_for, merge, proposal
from cfs_membership.swim import Changed


def _rec(state: Liveness, inc: int, *, by: str = "n1", seen: int = 0) -> MemberRecord:
    return MemberRecord(
        node="n3",
        state=state,
        incarnation=inc,
        host="10.0.0.3",
        port=7946,
        since_ms=1000,
        detected_by=by,
        last_seen_ms=seen,
    )


def test_proposal_carries_the_change() -> None:
    change = Changed("n3", Liveness.SUSPECT, Liveness.DOWN, 4, "n2", "h", 9, {"rack": "r1"})
    record = proposal(change, 77)
    assert (record.state, record.incarnation, record.detected_by, record.since_ms) == (
        Liveness.DOWN,
        4,
        "n2",
        77,
    )
    assert record.labels == {"rack": "r1"} and (record.host, record.port) == ("h", 9)


def test_observers_of_one_death_write_one_record_and_one_event() -> None:
    stored = _rec(Liveness.SUSPECT, 2, seen=555)
    first = merge(stored, _rec(Liveness.DOWN, 2, by="n1"), own=False)
    assert first is not None and first.last_seen_ms == 555  # observers keep last-seen
    assert isinstance(event_for(stored, first), NodeDown)
    # The second observer re-reads after its CAS lost and finds nothing to add.
    assert merge(first, _rec(Liveness.DOWN, 2, by="n2"), own=False) is None
    assert merge(first, _rec(Liveness.SUSPECT, 2, by="n4"), own=False) is None


def test_stale_observations_never_overwrite_newer_ones() -> None:
    refuted = _rec(Liveness.ALIVE, 3, by="n3")
    assert merge(refuted, _rec(Liveness.DOWN, 2), own=False) is None
    assert merge(refuted, _rec(Liveness.SUSPECT, 2), own=False) is None
    left = _rec(Liveness.LEFT, 3, by="n3")
    assert merge(left, _rec(Liveness.ALIVE, 9), own=False) is None  # LEFT is final ...


def test_a_node_rejoins_over_its_own_left_record() -> None:
    left = _rec(Liveness.LEFT, 3, by="n3")
    rejoined = merge(left, _rec(Liveness.ALIVE, 4, by="n3"), own=True)  # ... but not to itself
    assert rejoined is not None
    event = event_for(left, rejoined)
    assert isinstance(event, NodeJoined) and event.node_id == "n3" and event.port == 7946


def test_own_refresh_updates_last_seen_only() -> None:
    stored = _rec(Liveness.ALIVE, 1, by="n3", seen=100)
    refreshed = merge(stored, _rec(Liveness.ALIVE, 1, by="n3", seen=200), own=True)
    assert refreshed is not None and refreshed.last_seen_ms == 200
    assert refreshed.since_ms == stored.since_ms
    assert event_for(stored, refreshed) is None
    # A refresh never hides a suspicion: only a refutation (higher incarnation) does.
    suspect = _rec(Liveness.SUSPECT, 1, by="n2")
    assert merge(suspect, _rec(Liveness.ALIVE, 1, by="n3"), own=True) is None
    back = merge(suspect, _rec(Liveness.ALIVE, 2, by="n3"), own=True)
    assert back is not None and isinstance(event_for(suspect, back), NodeAlive)


def test_events_for_each_transition() -> None:
    assert isinstance(event_for(None, _rec(Liveness.ALIVE, 0)), NodeJoined)
    assert isinstance(event_for(_rec(Liveness.DOWN, 0), _rec(Liveness.ALIVE, 1)), NodeAlive)
    assert event_for(_rec(Liveness.ALIVE, 0), _rec(Liveness.ALIVE, 1)) is None
    suspect = event_for(_rec(Liveness.ALIVE, 0), _rec(Liveness.SUSPECT, 0, by="n5"))
    assert isinstance(suspect, NodeSuspect) and suspect.suspected_by == "n5"
    down = event_for(_rec(Liveness.SUSPECT, 0), _rec(Liveness.DOWN, 0, by="n2"))
    assert isinstance(down, NodeDown) and down.detected_by == "n2" and down.method == "SWIM"
    assert isinstance(event_for(_rec(Liveness.ALIVE, 0), _rec(Liveness.LEFT, 0)), NodeLeft)
    assert merge(_rec(Liveness.LEFT, 0), _rec(Liveness.LEFT, 0), own=True) is None


def test_a_late_verdict_against_a_live_node_accuses_it_until_it_refutes() -> None:
    """A DOWN written late (its writer was partitioned) beats the node's own ALIVE at
    the same incarnation in `merge`; `accuses` says only a refutation can answer it."""
    own = _rec(Liveness.ALIVE, 0, by="n3")
    for state in (Liveness.SUSPECT, Liveness.DOWN):
        stored = _rec(state, 0)
        assert merge(stored, own, own=True) is None  # the refresh alone never wins
        assert accuses(stored, own, own=True)
        assert not accuses(stored, own, own=False)  # another's view of n3: no refutation
        refuted = _rec(Liveness.ALIVE, 1, by="n3")
        assert not accuses(stored, refuted, own=True)
        assert merge(stored, refuted, own=True) == refuted
    assert not accuses(_rec(Liveness.ALIVE, 0), own, own=True)
    assert not accuses(_rec(Liveness.LEFT, 0), own, own=True)
    assert not accuses(None, own, own=True)
