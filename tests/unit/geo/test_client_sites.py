"""Which site a two-site client uses: the one the newest record names, if it answers;
else it stays where it is until the standby has taken over."""

from __future__ import annotations

from cfs.client.sites import choose_site
from cfs_contracts.geo import ActiveSite


def active(site: str, epoch: int) -> ActiveSite:
    return ActiveSite(site=site, epoch=epoch, changed_ms=epoch, changed_by="test")


def test_the_newest_record_wins_wherever_it_was_read() -> None:
    records = {"a": active("a", 1), "b": active("b", 2)}
    assert choose_site("a", "a", records).site == "b"
    assert choose_site(None, "a", {"a": active("b", 3), "b": active("b", 2)}).site == "b"


def test_an_unreachable_active_site_is_waited_for_not_replaced() -> None:
    only_b = {"b": active("a", 1)}  # b answers, and still names a
    stay = choose_site("b", "a", only_b)
    assert stay.site == "b" and "does not answer" in stay.reason
    assert choose_site("a", "a", only_b).site is None  # a is gone: nothing to use yet
    assert choose_site("a", "a", {"b": active("b", 2)}).site == "b"  # b took over


def test_without_a_record_the_client_keeps_to_its_site() -> None:
    assert choose_site(None, "a", {"a": None, "b": None}).site == "a"
    assert choose_site("b", "a", {"a": None, "b": None}).site == "b"
    assert choose_site(None, "a", {"b": None}).site == "b"
    assert choose_site(None, "a", {}).site is None
