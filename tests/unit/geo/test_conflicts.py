"""The conflict-resolver's pure parts: what a resolution takes (or why it is refused),
and the open-conflicts count it publishes."""

from __future__ import annotations

import pytest

from cfs.conflicts import Open, ResolutionRefused, Strategy, open_conflicts, plan
from cfs_conflicts.service import count
from cfs_contracts.events.geo import ConflictDetected, ConflictResolved
from cfs_contracts.fs.conflicts import FieldConflict
from cfs_contracts.fs.records import Stamp


def conflict(ino: int, group: str = "owner", kind: str = "field") -> FieldConflict:
    return FieldConflict(
        kind=kind,  # type: ignore[arg-type]
        ino=ino,
        group=group,
        local={"uid": 1001, "gid": 1001},
        remote={"uid": 1002, "gid": 1002},
        local_stamp=Stamp(ns=3_000, site="site-a"),
        remote_stamp=Stamp(ns=4_000, site="site-b"),
        here="site-a",
        there="site-b",
        winner="site-b",
    )


def detected(c: FieldConflict) -> ConflictDetected:
    return ConflictDetected(conflict_id=c.conflict_id, shard=1, conflict=c)


def test_manual_writes_the_chosen_sites_values_and_lww_writes_nothing() -> None:
    found = [Open(detected(conflict(7))), Open(detected(conflict(8, "content")))]
    (manual,) = plan(found, Strategy.MANUAL, 7, "site-a")
    assert manual.winner == "site-a" and manual.write == {"uid": 1001, "gid": 1001}
    kept = plan(found, Strategy.LWW, None, None)
    assert [(c.winner, c.write) for c in kept] == [("site-b", None), ("site-b", None)]
    (same,) = plan(found, Strategy.MANUAL, 7, "site-b")  # the merge's own choice
    assert same.write is None


@pytest.mark.parametrize(
    ("inode", "winner", "why"),
    [
        (9, "site-a", "no open conflict on inode 9"),
        (7, "site-z", "between site-a and site-b, not site-z"),
        (8, "site-a", "can only keep what the merge kept"),  # content: not a manual choice
        (7, None, "needs --inode and --winner"),
    ],
)
def test_a_resolution_that_cannot_be_made_says_why(
    inode: int, winner: str | None, why: str
) -> None:
    found = [Open(detected(conflict(7))), Open(detected(conflict(8, "content")))]
    with pytest.raises(ResolutionRefused, match=why):
        plan(found, Strategy.MANUAL, inode, winner)


def test_the_count_follows_detections_and_resolutions_and_keeps_its_time() -> None:
    one, two = conflict(7), conflict(8, "foo", kind="name")
    events: list[ConflictDetected | ConflictResolved] = [detected(one), detected(two)]
    first = count(events, None)
    assert (first.open, first.kinds, first.oldest_ns) == (2, {"field": 1, "name": 1}, 4_000)
    assert count(events, first) is first  # nothing changed: the same record
    events.append(
        ConflictResolved(
            conflict_id=one.conflict_id, strategy="manual", winner="site-a", applied=True, by="t"
        )
    )
    after = count(events, first)
    assert (after.open, after.kinds) == (1, {"name": 1}) and len(open_conflicts(events)) == 1
