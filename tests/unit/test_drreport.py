"""The RTO/RPO report's verdicts (tests/scenarios/drreport.py): pure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scenarios import drreport
from tests.scenarios.drreport import TARGETS, Target, verdict, violations


def test_every_row_of_the_guides_three_tables_has_a_target() -> None:
    tables = {t.table for t in TARGETS}
    assert tables == {"Availability tiers", "RTO", "RPO"}
    assert sum(t.table == "Availability tiers" for t in TARGETS) == 7 * 2  # RTO and RPO
    assert sum(t.table == "RTO" for t in TARGETS) == 8
    assert sum(t.table == "RPO" for t in TARGETS) == 5
    assert len({t.key for t in TARGETS}) == len(TARGETS)


def test_a_bound_looser_than_the_guide_names_its_floor() -> None:
    for target in TARGETS:
        looser = target.bound_s is not None and target.bound_s > (target.guide_s or 0.0)
        assert target.floor or not looser, target.key


def test_verdicts() -> None:
    rto = Target("RTO", "x", "RTO", "5 sec", 5.0, "s", "rto_s")
    assert verdict(rto, 4.9)[0] == "ok"
    assert verdict(rto, 5.1) == ("FAILED", "5.10 s > 5 s")
    assert verdict(rto, None)[0] == "not measured"
    floored = Target("RTO", "x", "RTO", "5 sec", 5.0, "s", "rto_s", bound_s=15.0, floor="why")
    assert verdict(floored, 10.0) == ("over guide", "why")
    assert verdict(floored, 16.0)[0] == "FAILED"
    lost = Target("RPO", "x", "RPO", "1 min", 60.0, "s", "lost_files")
    assert verdict(lost, 0)[0] == "ok"
    assert verdict(lost, 1)[0] == "FAILED"  # a loss of unknown age: never within an RPO
    na = Target("RTO", "x", "RTO", "N/A", None, "s", "longest_s")
    assert verdict(na, 1e9)[0] == "ok"


def test_a_scenario_is_held_to_the_targets_it_measures() -> None:
    assert violations("scenario 2", {"rto_client_s": 9.0, "lost_writes": 0}) == []
    missed = violations("scenario 2", {"rto_client_s": 16.0, "lost_writes": 2})
    assert len(missed) == 4 and all("scenario" not in m for m in missed)
    assert violations("scenario 2", {})[0].endswith("figure rto_client_s not reported")
    assert violations("no such scenario", {"anything": 1e9}) == []


def test_the_report_exits_non_zero_until_every_row_is_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(drreport.RESULTS_ENV, str(tmp_path / "measured"))
    drreport.record("scenario 2", {"rto_client_s": 2.0, "lost_writes": 0})
    out = tmp_path / "report.json"
    assert drreport.main([str(tmp_path / "measured"), "--json", str(out)]) == 1
    rows = json.loads(out.read_text())
    raft = [r for r in rows if r["scenario"] == "scenario 2"]
    assert raft and all(r["status"] == "ok" for r in raft)
    assert sum(r["status"] == "not measured" for r in rows) == len(rows) - len(raft)
    everything = {t.scenario: {} for t in TARGETS}
    for t in TARGETS:
        everything[t.scenario][t.figure] = 0.0
    for scenario, figures in everything.items():
        drreport.record(scenario, figures)
    assert drreport.main([str(tmp_path / "measured"), "--markdown", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.md").read_text().count("| ok") == len(TARGETS)
