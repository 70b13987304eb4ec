"""Alert rules: the shipped file covers what the guide asks for; bad files are one
line; evaluation fires once after `for:`, repeats on its interval, resolves once, and
a condition shorter than `for:` never fires (property)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfs_alerts.rules import (
    DEFAULT_RULES,
    AlertState,
    Kind,
    Rule,
    RulesError,
    load_rules,
    observe,
    seconds,
)

DEFAULTS = DEFAULT_RULES
GUIDE = {  # the guide's Prevention sections, and issue 17's additions
    "replication-lag", "s3-write-lag", "s3-queue-depth", "flash-critical", "node-down",
    "consistency-check-missed", "corruption-detected", "leader-changes", "backup-age",
    "archive-lag", "conflicts-recorded", "repair-stalled",
}  # fmt: skip


def test_the_shipped_rules_cover_every_alert_the_guide_names() -> None:
    rules = {r.name: r for r in load_rules(DEFAULTS)}
    assert set(rules) == GUIDE
    lag = rules["replication-lag"]
    assert (lag.figure, lag.above, lag.for_s) == ("replication.lag_s", 10, 30)
    assert rules["corruption-detected"].event == "CorruptionDetected"
    assert rules["node-down"].describe("storage-2", 1) == "node storage-2 down"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("rules: [{name: a, figure: x}]", "rules.0: Value error, figure x: give one of above"),
        ("rules: [{name: a}]", "a rule watches one figure or one event"),
        ("rules: [{name: a, event: E, figure: x, above: 1}]", "one figure or one event"),
        ("rules: [{name: a, event: E, for: soon}]", "bad duration 'soon'"),
        ("rules: [{name: a, event: E}, {name: a, event: F}]", "rule names used twice: a"),
        ("rules: [{name: a, event: E, colour: red}]", "rules.0.colour: Extra inputs"),
        ("rules: [", "not valid YAML"),
    ],
)
def test_a_bad_rules_file_is_one_line_naming_the_place(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RulesError) as raised:
        load_rules(path)
    message = str(raised.value)
    assert message.startswith(f"rules {path}: ") and why in message and "\n" not in message


def test_durations() -> None:
    assert [seconds(t) for t in ("250ms", "30s", "5m", "2h", "1d", 7)] == [
        0.25, 30, 300, 7200, 86400, 7
    ]  # fmt: skip


LAG = Rule.model_validate(
    {"name": "lag", "figure": "replication.lag_s", "above": 10, "for": "30s", "repeat": "1h",
     "summary": "lag {value:.0f}s"}
)  # fmt: skip


def run(rule: Rule, samples: list[tuple[float, float]]) -> list[tuple[float, Kind, str]]:
    state: AlertState | None = None
    sent = []
    for now, value in samples:
        state, note = observe(rule, "site-b", rule.holds(value), value, state, now)
        if note is not None:
            sent.append((now, note.kind, note.summary))
    return sent


def test_fires_once_after_for_repeats_on_its_interval_and_resolves_once() -> None:
    samples = [(float(t), 20.0) for t in range(0, 4000, 10)] + [(4000.0, 1.0), (4010.0, 1.0)]
    sent = run(LAG, samples)
    assert sent == [
        (30, Kind.FIRED, "lag 20s"),
        (3630, Kind.REPEATED, "lag 20s"),
        (4000, Kind.RESOLVED, "resolved: lag 20s"),
    ]


def test_an_event_alert_lasts_until_its_quiet_time() -> None:
    rule = Rule.model_validate({"name": "c", "event": "CorruptionDetected", "clear": "5m"})
    state, note = observe(rule, "inode 7", True, None, None, 0.0)
    assert note is not None and note.kind is Kind.FIRED and note.dedupe_key == "c/inode 7"
    state, note = observe(rule, "inode 7", True, None, state, 100.0)  # again: no new mail
    assert note is None
    state, note = observe(rule, "inode 7", False, None, state, 350.0)
    assert note is None and state is not None  # 250 s since the last: still firing
    state, note = observe(rule, "inode 7", False, None, state, 401.0)
    assert state is None and note is not None and note.kind is Kind.RESOLVED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.booleans()), min_size=1, max_size=60))
def test_one_notification_per_firing_and_never_before_for(
    steps: list[tuple[int, bool]],
) -> None:
    """Whatever the condition does: a run of holding shorter than `for:` sends nothing;
    each firing is one FIRED and at most one RESOLVED (no REPEATED within an hour)."""
    rule = LAG
    state: AlertState | None = None
    now = 0.0
    held_since: float | None = None
    fired = resolved = 0
    for gap, holds in steps:
        now += gap
        if holds and held_since is None:
            held_since = now
        state, note = observe(rule, "k", holds, 20.0 if holds else 1.0, state, now)
        if note is not None and note.kind is Kind.FIRED:
            assert held_since is not None and now - held_since >= rule.for_s
            fired += 1
        if note is not None and note.kind is Kind.RESOLVED:
            resolved += 1
            assert resolved == fired
        assert note is None or note.kind is not Kind.REPEATED
        if not holds:
            held_since = None
    assert fired - resolved in (0, 1)
