"""The active-site decision: adopt the newer record, fail over only after the active
peer has been silent for the configured time, never move back on its own; checked
over a simulated pair of sites whose link comes and goes."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from cfs_contracts.geo import ActiveSite
from cfs_georep.active import Action, ActiveFacts, decide_active

T = 5.0  # failover_after_s in the simulation (one step = one second)


def record(site: str, epoch: int, ms: int = 0) -> ActiveSite:
    return ActiveSite(site=site, epoch=epoch, changed_ms=ms, changed_by="test")


def facts(**kw: object) -> ActiveFacts:
    base: dict[str, object] = dict(
        me="b",
        peer="a",
        local=record("a", 1),
        remote=record("a", 1),
        reachable=True,
        silent_s=0.0,
        failover_after_s=T,
    )
    base.update(kw)
    return ActiveFacts(**base)  # type: ignore[arg-type]


def test_the_peers_newer_record_is_adopted() -> None:
    newer = record("b", 2)
    decision = decide_active(facts(remote=newer), 1000, "me")
    assert decision.action is Action.ADOPT and decision.record == newer
    assert "epoch 2" in decision.reason


def test_an_older_or_equal_peer_record_changes_nothing() -> None:
    assert decide_active(facts(local=record("b", 3), remote=record("a", 2)), 0, "me").action is (
        Action.WAIT
    )
    assert decide_active(facts(), 0, "me").action is Action.WAIT


def test_equal_epochs_are_ordered_the_same_way_on_both_sites() -> None:
    one, two = record("a", 4, ms=10), record("b", 4, ms=20)
    assert two.supersedes(one) and not one.supersedes(two)
    assert not one.supersedes(one)


def test_failover_only_after_the_active_peer_was_silent_long_enough() -> None:
    short = decide_active(facts(reachable=False, remote=None, silent_s=T - 1), 0, "me")
    assert short.action is Action.WAIT and "failover after 5s" in short.reason
    done = decide_active(facts(reachable=False, remote=None, silent_s=T), 77, "geo@b")
    assert done.action is Action.PROMOTE and done.record is not None
    assert (done.record.site, done.record.epoch, done.record.changed_by) == ("b", 2, "geo@b")
    assert "unreachable for 5s" in done.record.reason


def test_no_failover_when_off_or_when_this_site_is_active() -> None:
    off = facts(reachable=False, remote=None, silent_s=1e6, failover_after_s=0)
    assert decide_active(off, 0, "me").action is Action.WAIT
    here = facts(local=record("b", 1), reachable=False, remote=None, silent_s=1e6)
    assert decide_active(here, 0, "me").action is Action.WAIT
    nothing = facts(local=None, remote=None, reachable=False, silent_s=1e6)
    assert decide_active(nothing, 0, "me").action is Action.WAIT


@dataclass
class Site:
    name: str
    record: ActiveSite | None
    heard: int = 0  # step it last heard its peer
    changes: list[tuple[int, Action, str]] = field(default_factory=list)


def simulate(link: list[bool]) -> tuple[Site, Site]:
    """Both sites decide once per step; `link[i]`: whether they reach each other."""
    a, b = Site("a", record("a", 1)), Site("b", record("a", 1))
    for step, up in enumerate(link, start=1):
        snapshot = {s.name: s.record for s in (a, b)}
        for me, peer in ((a, b), (b, a)):
            if up:
                me.heard = step
            f = ActiveFacts(
                me=me.name,
                peer=peer.name,
                local=me.record,
                remote=snapshot[peer.name] if up else None,
                reachable=up,
                silent_s=float(step - me.heard),
                failover_after_s=T,
            )
            decision = decide_active(f, step * 1000, me.name)
            if decision.record is not None:
                me.record = decision.record
                me.changes.append((step, decision.action, decision.record.site))
    return a, b


links = st.lists(st.booleans(), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(links)
def test_sites_that_talk_again_agree(link: list[bool]) -> None:
    a, b = simulate([*link, True, True])
    assert a.record == b.record


@settings(max_examples=300, deadline=None)
@given(links)
def test_short_cuts_never_move_the_active_site(link: list[bool]) -> None:
    longest, run = 0, 0
    for up in link:
        run = 0 if up else run + 1
        longest = max(longest, run)
    a, b = simulate([*link, True, True])
    if longest < T:
        assert a.changes == [] and b.changes == [] and a.record == record("a", 1)


@settings(max_examples=300, deadline=None)
@given(links)
def test_the_active_site_never_moves_back_on_its_own(link: list[bool]) -> None:
    """A site only ever promotes itself, and only at the end of T steps without the
    link: a's record comes back after b took over only if a saw b silent for T."""
    a, b = simulate([*link, True, True])
    for site in (a, b):
        for step, action, active in site.changes:
            if action is Action.PROMOTE:
                window = link[step - int(T) : step]
                assert active == site.name
                assert step >= T and len(window) == T and not any(window), (step, link)
