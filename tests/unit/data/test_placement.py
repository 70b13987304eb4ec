"""Rendezvous placement: deterministic, spread over failure domains, minimal movement."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cfs.placement import Candidate, place, rank

NODES = [Candidate(f"storage-{i}", domain=f"rack-{i % 3}") for i in range(1, 10)]


@settings(max_examples=100, deadline=None)
@given(key=st.text(min_size=1, max_size=20))
def test_first_picks_cover_every_domain_before_repeating(key: str) -> None:
    chosen = rank(key, NODES)[:3]
    assert len({c.domain for c in chosen}) == 3


@settings(max_examples=100, deadline=None)
@given(key=st.text(min_size=1, max_size=20))
def test_order_does_not_depend_on_input_order(key: str) -> None:
    assert place(key, NODES, 6) == place(key, list(reversed(NODES)), 6)


def test_removing_a_node_moves_only_its_own_fragments() -> None:
    keys = [f"chunk-{i}" for i in range(500)]
    flat = [Candidate(f"n{i}") for i in range(8)]
    before = {k: place(k, flat, 3) for k in keys}
    survivors = [c for c in flat if c.node != "n3"]
    after = {k: place(k, survivors, 3) for k in keys}
    for key in keys:
        if "n3" not in before[key]:
            assert after[key] == before[key]
        else:
            kept = [n for n in before[key] if n != "n3"]
            assert after[key][:2] == kept


def test_load_spreads_evenly() -> None:
    flat = [Candidate(f"n{i}") for i in range(6)]
    counts = dict.fromkeys((c.node for c in flat), 0)
    for i in range(3000):
        for node in place(f"k{i}", flat, 2):
            counts[node] += 1
    assert max(counts.values()) < 1.2 * min(counts.values())


def test_not_enough_nodes() -> None:
    try:
        place("k", NODES[:2], 3)
    except ValueError as exc:
        assert "needs 3 nodes, only 2 eligible" in str(exc)
    else:
        raise AssertionError("expected ValueError")
