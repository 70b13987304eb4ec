"""SWIM + Lifeguard under a simulated network: detection times, false positives,
refutation, join, leave, restart, and the authenticated codec."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfs_contracts.members import Liveness
from cfs_membership.codec import BadMac, Codec, Malformed
from cfs_membership.swim import (
    Ack,
    Alive,
    Changed,
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
    Suspicion,
    Swim,
    SwimConfig,
    Sync,
)

from .simnet import TOKEN, SimNet

DETECT_MEDIAN_S = 2.0
DETECT_MAX_S = 4.0


def _kill_and_measure(net: SimNet, names: list[str], victim: str) -> tuple[float, float]:
    """Seconds until the first member, and until every member, marks `victim` DOWN."""
    killed_at = net.now
    net.kill(victim)
    net.run_for(8.0)
    seen = net.first(victim, Liveness.DOWN, killed_at)
    survivors = [name for name in names if name != victim]
    assert sorted(seen) == sorted(survivors), f"not every member saw {victim} down: {seen}"
    assert all(state is Liveness.DOWN for state in net.views_of(victim).values())
    return min(seen.values()) - killed_at, max(seen.values()) - killed_at


@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_a_killed_member_is_marked_down_by_all_within_the_targets(loss: float) -> None:
    first: list[float] = []
    everyone: list[float] = []
    for seed in range(20):
        net = SimNet(seed=seed, loss=loss)
        names = net.cluster(6)
        net.run_for(net.rng.random() * 2)  # kill at a random point of the probe cycle
        a, b = _kill_and_measure(net, names, names[seed % 6])
        first.append(a)
        everyone.append(b)
    print(
        f"\nloss {loss:.0%}: first DOWN median {statistics.median(first):.2f}s "
        f"max {max(first):.2f}s; all members median {statistics.median(everyone):.2f}s "
        f"max {max(everyone):.2f}s"
    )
    assert statistics.median(first) <= DETECT_MEDIAN_S
    assert max(first) <= DETECT_MAX_S
    assert max(everyone) <= DETECT_MAX_S


@pytest.mark.parametrize("count", [6, 8])
def test_ten_minutes_of_five_percent_loss_bring_no_false_down(count: int) -> None:
    net = SimNet(seed=count, loss=0.05)
    names = net.cluster(count)
    start = net.now
    net.run_for(600.0)
    changes = [t for t in net.transitions if t.at >= start]
    downs = [t for t in changes if t.change.new is Liveness.DOWN]
    assert downs == []
    for name in names:
        assert set(net.views_of(name).values()) == {Liveness.ALIVE}
    suspicions = sum(1 for t in changes if t.change.new is Liveness.SUSPECT)
    print(f"\n{count} members, 10 min at 5% loss: {suspicions} suspect transitions, 0 down")


def test_join_through_one_seed_converges() -> None:
    net = SimNet(seed=3)
    names = net.cluster(8, settle_s=2.0)
    for name in names:
        view = {row.node: row.state for row in net.nodes[name].view()}
        assert view == dict.fromkeys(names, Liveness.ALIVE), name
        assert net.nodes[name].joined


def test_join_retries_until_a_seed_answers() -> None:
    net = SimNet(seed=4)
    net.add("n1")
    net.drop_to.add("n1")
    net.add("n2", seeds=["n1"])
    net.run_for(2.5)
    assert not net.nodes["n2"].joined
    net.drop_to.clear()
    net.run_for(1.5)
    assert net.nodes["n2"].joined
    assert net.nodes["n1"].state_of("n2") is Liveness.ALIVE


def test_a_suspected_live_member_refutes_and_stays_alive() -> None:
    net = SimNet(seed=5)
    names = net.cluster(6)
    # n1 wrongly accuses n3 at its current incarnation.
    net.deliver_raw("n2", Codec(TOKEN).encode(Gossip("n1", (Suspect("n3", 0, "n1"),))), ("x", 1))
    net.run_for(0.01)
    assert net.nodes["n2"].state_of("n3") is Liveness.SUSPECT
    net.run_for(5.0)
    assert net.nodes["n3"].incarnation == 1
    assert net.nodes["n3"].stats["refutations"] == 1
    assert not [t for t in net.transitions if t.change.new is Liveness.DOWN]
    for name in names:
        member = net.nodes[name].members.get("n3")
        assert member is None or (member.state, member.incarnation) == (Liveness.ALIVE, 1)


def test_a_verdict_the_records_got_late_is_refuted_like_gossip() -> None:
    """n3 finds itself DOWN in the records (n5 wrote it after a partition healed):
    its incarnation goes above the verdict and everyone hears it alive."""
    net = SimNet(seed=11)
    names = net.cluster(6)
    n3 = net.nodes["n3"]
    actions = n3.accused(Liveness.DOWN, n3.incarnation, "n5")
    assert n3.incarnation == 1 and n3.stats["refutations"] == 1
    assert any(isinstance(a, Changed) and a.node == "n3" for a in actions)
    assert n3.accused(Liveness.DOWN, 0, "n5") == []  # an older verdict: already above it
    net.run_for(3.0)
    for name in names:
        member = net.nodes[name].members.get("n3")
        assert member is None or (member.state, member.incarnation) == (Liveness.ALIVE, 1)


def test_a_member_cut_off_briefly_is_suspected_but_never_declared_down() -> None:
    net = SimNet(seed=6)
    net.cluster(6)
    net.drop_to.add("n4")
    net.drop_from.add("n4")
    net.run_for(0.6)
    net.drop_to.clear()
    net.drop_from.clear()
    net.run_for(5.0)
    assert any(t.change.node == "n4" and t.change.new is Liveness.SUSPECT for t in net.transitions)
    assert not [t for t in net.transitions if t.change.new is Liveness.DOWN]
    assert set(net.views_of("n4").values()) == {Liveness.ALIVE}


def test_local_health_rises_when_our_own_probes_fail_and_slows_probing() -> None:
    net = SimNet(seed=7)
    net.cluster(6)
    deaf = net.nodes["n2"]
    net.drop_to.add("n2")  # n2 hears nothing: its acks and nacks never come
    net.run_for(1.5)
    assert deaf.lhm >= 3
    probes = deaf.stats["probes"]
    net.run_for(2.0)
    slow = deaf.stats["probes"] - probes
    assert slow <= 3, f"{slow} probes in 2 s; at full speed there would be 10"
    net.drop_to.clear()
    net.run_for(30.0)
    assert deaf.lhm == 0
    assert set(net.views_of("n2").values()) == {Liveness.ALIVE}  # it refuted everything


def test_suspicion_timeout_shrinks_with_independent_confirmations() -> None:
    s = Suspicion.begin("a", now=10.0, k=3, min_s=1.0, max_s=3.0)
    assert s.deadline == pytest.approx(13.0)
    assert not s.confirm("a")  # the accuser does not confirm itself
    assert s.confirm("b")
    assert s.deadline == pytest.approx(12.0)  # log 2 / log 4 of the way
    assert not s.confirm("b")
    assert s.confirm("c")
    assert s.confirm("d")
    assert s.deadline == pytest.approx(11.0)
    assert not s.confirm("e")  # k reached
    assert Suspicion.begin("a", now=0.0, k=0, min_s=1.0, max_s=3.0).deadline == 1.0


def test_graceful_leave_is_left_not_down() -> None:
    net = SimNet(seed=8)
    names = net.cluster(6)
    leaving = net.nodes["n4"]
    net._run("n4", leaving.leave(net.now))
    net.run_for(0.5)
    net.kill("n4")
    net.run_for(5.0)
    for name in names:
        if name != "n4":
            assert net.nodes[name].state_of("n4") is Liveness.LEFT
    assert not [t for t in net.transitions if t.change.new is Liveness.DOWN]


def test_a_restarted_member_refutes_its_old_death_and_is_alive_again() -> None:
    net = SimNet(seed=9)
    names = net.cluster(6)
    _kill_and_measure(net, names, "n3")
    restarted = net.add("n3", seeds=["n1", "n2"])  # a new process that lost its incarnation
    net.run_for(3.0)
    assert restarted.incarnation >= 1
    assert set(net.views_of("n3").values()) == {Liveness.ALIVE}
    assert {row.node for row in restarted.view()} == set(names)


def test_datagrams_with_a_bad_mac_are_dropped() -> None:
    net = SimNet(seed=10)
    net.cluster(4)
    forged = Codec(b"not-the-token").encode(Gossip("n1", (Dead("n2", 5, "n1"),)))
    net.deliver_raw("n3", forged, ("10.9.9.9", 1))
    net.deliver_raw("n3", forged[:-1] + b"x", ("10.9.9.9", 1))
    net.run_for(1.0)
    assert net.rejected == 2
    assert net.nodes["n3"].state_of("n2") is Liveness.ALIVE
    with pytest.raises(BadMac):
        Codec(TOKEN).decode(forged)
    with pytest.raises(Malformed):
        Codec(TOKEN).decode(b"S1short")
    codec = Codec(TOKEN)
    tampered = bytearray(codec.encode(Ping(1, "n1", "n2")))
    tampered[-3] ^= 1
    with pytest.raises(BadMac):
        codec.decode(bytes(tampered))
    assert TOKEN.decode() not in repr(codec)


# -- codec round trip ------------------------------------------------------------------------
_names = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=20)
_incs = st.integers(min_value=0, max_value=2**53)
_ports = st.integers(min_value=1, max_value=65535)
_labels = st.dictionaries(_names, _names, max_size=3)
_updates = st.one_of(
    st.builds(Alive, _names, _incs, _names, _ports, _labels),
    st.builds(Suspect, _names, _incs, _names),
    st.builds(Dead, _names, _incs, _names),
    st.builds(Left, _names, _incs),
)
_gossip = st.lists(_updates, max_size=4).map(tuple)
_rows = st.builds(MemberInfo, _names, st.sampled_from(Liveness), _incs, _names, _ports, _labels)
_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Ping, _incs, _names, _names, _gossip),
    st.builds(Ack, _incs, _names, _gossip),
    st.builds(PingReq, _incs, _names, _names, _names, _ports, _incs, _gossip),
    st.builds(Nack, _incs, _names, _gossip),
    st.builds(Gossip, _names, _gossip),
    st.builds(Join, _names, _gossip),
    st.builds(Sync, _names, st.lists(_rows, max_size=4).map(tuple), st.booleans(), _gossip),
)


@settings(max_examples=300, deadline=None)
@given(_messages)
def test_codec_round_trip(message: Message) -> None:
    codec = Codec(b"k")
    assert codec.decode(codec.encode(message)) == message


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_codec_rejects_garbage_without_crashing(data: bytes) -> None:
    with pytest.raises((BadMac, Malformed)):
        Codec(b"k").decode(data)


def test_config_rejects_inconsistent_timing() -> None:
    with pytest.raises(ValueError):
        SwimConfig(probe_interval_s=0.1, probe_timeout_s=0.2)
    with pytest.raises(ValueError):
        SwimConfig(suspicion_min_s=3.0, suspicion_max_s=1.0)


def test_a_lone_member_without_seeds_probes_nobody() -> None:
    swim = Swim(SwimConfig(), node="solo", host="h", port=1)
    assert swim.join([("h", 1)], 0.0) == []
    assert swim.tick(swim.next_deadline()) == []
    assert swim.view()[0].state is Liveness.ALIVE
