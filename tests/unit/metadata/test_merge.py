"""Cross-site merge of an inode's field groups (pure): two sites converge whatever
the delivery order, sequential changes never conflict, concurrent ones always do."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cfs_contracts.fs.records import Inode, Kind
from cfs_metadata.merge import FieldConflict, merge_inode, stamp_inode

A, B = "site-a", "site-b"


def _file() -> Inode:
    return Inode(
        ino=2 << 10 | 1, kind=Kind.FILE, mode=0o644, uid=0, gid=0, nlink=1, size=0,
        atime_ns=1, mtime_ns=1, ctime_ns=1,
    )  # fmt: skip


def _set(group: str, value: int) -> dict[str, Any]:
    return {
        "mode": {"mode": value % 0o7777},
        "owner": {"uid": value, "gid": value + 1},
        "content": {"size": value, "mtime_ns": value},
        "xattrs": {"xattrs": {"user.v": str(value)}},
    }[group]


@dataclass
class Site:
    name: str
    inode: Inode = field(default_factory=_file)
    outbox: list[Inode] = field(default_factory=list)  # its journal, shipped in order
    conflicts: list[FieldConflict] = field(default_factory=list)

    def change(self, group: str, value: int, ns: int) -> None:
        after = self.inode.model_copy(update={**_set(group, value), "ctime_ns": ns})
        self.inode = stamp_inode(self.inode, after, ns, self.name)
        self.outbox.append(self.inode)

    def receive(self, other: Site) -> bool:
        if not other.outbox:
            return False
        merged = merge_inode(self.inode, other.outbox.pop(0), self.name, other.name)
        self.inode = merged.inode
        self.conflicts += merged.conflicts
        return True


def _drain(a: Site, b: Site) -> None:
    while a.receive(b) | b.receive(a):
        pass


GROUPS = st.sampled_from(["mode", "owner", "content", "xattrs"])
ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("change"), st.sampled_from([A, B]), GROUPS, st.integers(0, 3),
                  st.integers(0, 1000)),  # a small value range: equal values happen
        st.tuples(st.just("deliver"), st.sampled_from([A, B])),
    ),
    max_size=40,
)  # fmt: skip


def _run(actions: list[tuple[Any, ...]], sequential: bool) -> tuple[Site, Site]:
    sites = {A: Site(A), B: Site(B)}
    other = {A: sites[B], B: sites[A]}
    clock = 0
    for action in actions:
        if action[0] == "deliver":
            sites[action[1]].receive(other[action[1]])
            continue
        _, name, group, value, skew = action
        if sequential:  # it has seen everything the other site did
            _drain(sites[A], sites[B])
        clock += 1
        sites[name].change(group, value, ns=skew * 1000 + clock)  # clocks skewed
    _drain(sites[A], sites[B])
    return sites[A], sites[B]


@settings(max_examples=300)
@given(ACTIONS)
def test_two_sites_converge_whatever_the_order_of_delivery(actions: list[tuple[Any, ...]]) -> None:
    a, b = _run(actions, sequential=False)
    assert a.inode == b.inode


@settings(max_examples=200)
@given(ACTIONS)
def test_changes_made_after_seeing_the_other_sites_never_conflict(
    actions: list[tuple[Any, ...]],
) -> None:
    a, b = _run(actions, sequential=True)
    assert a.inode == b.inode
    assert a.conflicts == [] and b.conflicts == []


@given(GROUPS, st.integers(0, 10**6), st.integers(0, 10**6))
def test_one_group_changed_on_both_sites_is_a_conflict_won_by_the_later(
    group: str, ns_a: int, ns_b: int
) -> None:
    a, b = Site(A), Site(B)
    a.change(group, 1, ns=ns_a)
    b.change(group, 2, ns=ns_b)
    _drain(a, b)
    winner = A if (ns_a, A) > (ns_b, B) else B
    assert a.inode == b.inode
    for site in (a, b):
        assert [(c.group, c.winner) for c in site.conflicts] == [(group, winner)]
    conflict = a.conflicts[0]
    assert conflict.local != conflict.remote  # both versions kept for show-conflicts
    wanted = _set(group, 1 if winner == A else 2)
    assert a.inode.model_dump(include=set(wanted)) == wanted


def test_the_guides_story_rename_on_one_site_and_owner_on_the_other_both_survive() -> None:
    """Scenario 6: site A renames (namespace: not an inode group) and changes the
    mode, site B changes the owner: no conflict, both changes on both sites. Then
    the owner is changed on both: one conflict, the later write wins."""
    a, b = Site(A), Site(B)
    a.change("mode", 0o600, ns=10)
    b.change("owner", 1000, ns=11)
    _drain(a, b)
    assert a.inode == b.inode and (a.inode.mode, a.inode.uid) == (0o600, 1000)
    assert a.conflicts == b.conflicts == []
    a.change("owner", 2000, ns=20)
    b.change("owner", 3000, ns=21)
    _drain(a, b)
    assert a.inode == b.inode and a.inode.uid == 3000
    assert [c.reason for c in a.conflicts] == ["owner changed on both sites; site-b wrote last"]
