"""The guide's two-site commands answer --help with the guide's flags (scenario 6),
and the pure parts of show-conflicts read as the guide writes them."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cfs.cli.conflicts import headline
from cfs.cli.main import app
from cfs.conflicts import open_conflicts
from cfs_contracts.events.geo import ConflictDetected, ConflictResolved
from cfs_contracts.fs.conflicts import FieldConflict
from cfs_contracts.fs.records import Stamp

GUIDE = {
    ("admin", "replication-status"): ["--watch", "--json"],
    ("admin", "show-conflicts"): ["--verbose", "--json"],
    ("admin", "resolve-conflicts"): ["--strategy", "--inode", "--winner"],
    ("admin", "metadata-consistency-check"): ["--cross-site"],
    ("admin", "replication-link"): ["--peer"],
    ("admin", "replication-sync"): ["--source", "--target"],
    ("admin", "failover-prepare"): ["--source", "--target"],
    ("admin", "failover-test"): ["--target"],
    ("admin", "failover"): ["--from", "--to"],
    ("admin", "failback"): ["--from", "--to"],
    ("mount",): ["--follow", "--no-follow"],
}


@pytest.mark.parametrize("command", sorted(GUIDE), ids=" ".join)
def test_each_command_answers_help_with_the_guides_flags(command: tuple[str, ...]) -> None:
    done = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert done.exit_code == 0, done.output
    for flag in GUIDE[command]:
        assert flag in done.output, f"{' '.join(command)} --help lacks {flag}"


def _owner(winner: str) -> FieldConflict:
    return FieldConflict(
        ino=456,
        group="owner",
        local={"uid": 1001, "gid": 1001},
        remote={"uid": 1002, "gid": 1002},
        local_stamp=Stamp(ns=3_000_000_000, site="site-a"),
        remote_stamp=Stamp(ns=4_000_000_000, site="site-b"),
        here="site-a",
        there="site-b",
        winner=winner,
    )


def test_a_field_conflict_reads_as_in_the_guide_and_leaves_the_list_once_resolved() -> None:
    conflict = _owner("site-b")
    assert headline(conflict).startswith("Inode 456: CONFLICT - attr.owner differs; site-b won")
    detected = ConflictDetected(conflict_id=conflict.conflict_id, shard=1, conflict=conflict)
    twice = [detected, detected]
    assert [o.conflict_id for o in open_conflicts(twice)] == [conflict.conflict_id]
    done = ConflictResolved(
        conflict_id=conflict.conflict_id, strategy="manual", winner="site-a", applied=True, by="t"
    )
    assert open_conflicts([*twice, done]) == []


def test_both_sites_name_one_conflict_alike() -> None:
    seen_on_a = _owner("site-b")
    seen_on_b = seen_on_a.model_copy(
        update={
            "here": "site-b",
            "there": "site-a",
            "local": seen_on_a.remote,
            "remote": seen_on_a.local,
            "local_stamp": seen_on_a.remote_stamp,
            "remote_stamp": seen_on_a.local_stamp,
        }
    )
    assert seen_on_a.conflict_id == seen_on_b.conflict_id


def test_one_divergence_recorded_as_several_pairs_is_one_line_and_one_resolution() -> None:
    """A truncate then a write on each side: each site may pair up other changes
    (other ids); show-conflicts lists the inode's field once, and a resolution made
    after them closes every such pair, here and on the site that recorded others."""
    first = _owner("site-b")
    second = first.model_copy(update={"remote_stamp": Stamp(ns=5_000_000_000, site="site-b")})
    assert first.conflict_id != second.conflict_id and first.scope == second.scope
    events: list[ConflictDetected | ConflictResolved] = [
        ConflictDetected(conflict_id=c.conflict_id, shard=1, conflict=c) for c in (first, second)
    ]
    listed = open_conflicts(events)
    assert [o.conflict_id for o in listed] == [second.conflict_id]  # the latest
    resolved = ConflictResolved(
        conflict_id=first.conflict_id, strategy="last-write-wins", winner="site-b",
        applied=False, by="t", ino=456, kind="field", group="owner", through_ns=6_000_000_000,
    )  # fmt: skip
    assert open_conflicts([*events, resolved]) == []
    later = second.model_copy(update={"remote_stamp": Stamp(ns=7_000_000_000, site="site-b")})
    again = ConflictDetected(conflict_id=later.conflict_id, shard=1, conflict=later)
    assert [o.conflict_id for o in open_conflicts([*events, resolved, again])] == [
        later.conflict_id
    ], "a change made after the resolution diverges anew"
