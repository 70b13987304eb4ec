"""The drill's pure parts: which step runs after which outcome, the sample rules, the
report, and the smoke test against a plain directory (its errno checks are POSIX)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from cfs.cli.main import app
from cfs.drill.plan import (
    PLAN,
    SPECS,
    Decision,
    DrillReport,
    Status,
    Step,
    StepResult,
    build_report,
    decide,
    summary_line,
    to_json,
    to_markdown,
)
from cfs.drill.sample import CLOCK_MARGIN_NS, FileFacts, SampleTally, Verdict, choose, classify
from cfs.drill.smoke import posix_smoke

S = 1_000_000_000


def result(step: Step, status: Status = Status.OK, details: str = "") -> StepResult:
    return StepResult(
        step=step,
        title=SPECS[step].title,
        status=status,
        started_ms=1,
        duration_s=0.5,
        details=details,
    )


def run(outcomes: dict[Step, Status], interrupted_at: Step | None = None) -> list[StepResult]:
    """Drive `decide` to the end: a step that runs gets its outcome from `outcomes`
    (default ok); `interrupted_at` is cut short by a Ctrl-C."""
    results: list[StepResult] = []
    interrupted = False
    while (decision := decide(results, interrupted)).step is not None:
        step = decision.step
        if decision.skip_reason is not None:
            results.append(result(step, Status.SKIPPED, decision.skip_reason))
            continue
        if step is interrupted_at:
            interrupted = True
            results.append(result(step, Status.FAILED, "interrupted"))
            continue
        results.append(result(step, outcomes.get(step, Status.OK)))
    return results


def test_plan_order_puts_every_need_first_and_teardown_last() -> None:
    seen: set[Step] = set()
    for spec in PLAN:
        assert set(spec.needs) <= seen, spec.step
        seen.add(spec.step)
    assert PLAN[-1].step is Step.TEARDOWN and PLAN[-1].needs == ()
    assert seen == set(Step)


def test_a_clean_drill_runs_every_step_once_in_order() -> None:
    results = run({})
    assert [r.step for r in results] == [spec.step for spec in PLAN]
    assert all(r.status is Status.OK for r in results)
    assert decide(results) == Decision(None)


def test_a_failed_restore_skips_what_depends_on_it_but_not_the_teardown() -> None:
    results = {r.step: r for r in run({Step.RESTORE_METADATA: Status.FAILED})}
    for later in (
        Step.RESTORE_DATA,
        Step.CONSISTENCY_CHECK,
        Step.COMPARE_SAMPLE,
        Step.MOUNT,
        Step.SMOKE_TEST,
    ):
        assert results[later].status is Status.SKIPPED
    assert results[Step.RESTORE_DATA].details == "needs restore-metadata, which failed"
    assert results[Step.SMOKE_TEST].details == "needs mount, which skipped"
    assert results[Step.TEARDOWN].status is Status.OK


def test_a_failed_check_does_not_stop_the_independent_checks() -> None:
    results = {r.step: r.status for r in run({Step.CONSISTENCY_CHECK: Status.FAILED})}
    assert results[Step.COMPARE_SAMPLE] is Status.OK
    assert results[Step.SMOKE_TEST] is Status.OK


def test_an_interruption_skips_everything_but_the_teardown() -> None:
    results = run({}, interrupted_at=Step.START_SITE)
    after = [r for r in results if r.step not in (Step.SNAPSHOT_METADATA, Step.S3_SNAPSHOT)]
    assert after[0].details == "interrupted"
    assert {r.status for r in after[1:-1]} == {Status.SKIPPED}
    assert after[-1].step is Step.TEARDOWN and after[-1].status is Status.OK


@given(st.dictionaries(st.sampled_from(list(Step)), st.sampled_from(list(Status))))
def test_every_drill_ends_with_a_teardown_and_runs_nothing_whose_need_failed(
    outcomes: dict[Step, Status],
) -> None:
    results = run(outcomes)
    assert [r.step for r in results] == [spec.step for spec in PLAN]
    status = {r.step: r.status for r in results}
    for spec in PLAN:
        if any(status[need] is not Status.OK for need in spec.needs):
            assert status[spec.step] is Status.SKIPPED


def report_of(results: list[StepResult], rto: float | None = 12.3456) -> DrillReport:
    return build_report("local", 1_000, 61_000, results, rto)


def test_report_ok_only_when_every_step_is_ok() -> None:
    assert report_of(run({})).ok
    bad = report_of(run({Step.COMPARE_SAMPLE: Status.FAILED}))
    assert not bad.ok and [s.step for s in bad.failed] == [Step.COMPARE_SAMPLE]
    assert "compare-sample failed" in summary_line(bad)
    assert not report_of([]).ok
    stopped = build_report("local", 1, 2, run({}), None, interrupted=True)
    assert not stopped.ok and "INTERRUPTED" in summary_line(stopped)


def test_report_json_round_trips_and_markdown_has_a_row_per_step() -> None:
    results = run({Step.MOUNT: Status.FAILED})
    results[0] = result(Step.SNAPSHOT_METADATA, details="a | b")
    report = report_of(results)
    assert DrillReport.model_validate(json.loads(to_json(report))) == report
    text = to_markdown(report)
    assert text.count("\n| ") == len(PLAN) + 1  # the header and one row per step
    assert "| snapshot-metadata | ok | 0.5 | a \\| b |" in text
    assert "| mount | failed |" in text and "Measured RTO: 12.3 s" in text
    assert report.rto_s == 12.346


def facts(ino: int = 5, size: int = 10, mtime: int = 100 * S, ctime: int = 100 * S) -> FileFacts:
    return FileFacts("/a", ino, size, mtime, ctime)


def test_an_unchanged_file_is_compared() -> None:
    assert classify(facts(), facts(), cut_ns=200 * S) is Verdict.COMPARE


def test_a_file_changed_after_the_cut_is_skipped_not_failed() -> None:
    later = facts(size=20, mtime=300 * S, ctime=300 * S)
    assert classify(facts(), later, cut_ns=200 * S) is Verdict.CHANGED
    chmod = facts(ctime=300 * S)
    assert classify(facts(), chmod, cut_ns=200 * S) is Verdict.CHANGED
    replaced = facts(ino=9, ctime=300 * S)  # renamed over after the cut
    assert classify(facts(), replaced, cut_ns=200 * S) is Verdict.CHANGED
    assert classify(facts(), None, cut_ns=200 * S) is Verdict.GONE


def test_a_file_unchanged_since_before_the_cut_must_match_the_restore() -> None:
    live = facts(size=20)  # same ctime as before the cut, yet not what was restored
    assert classify(facts(), live, cut_ns=200 * S) is Verdict.DIFFERENT
    near = facts(size=20, ctime=200 * S - CLOCK_MARGIN_NS + 1)  # within the clock margin
    assert classify(facts(), near, cut_ns=200 * S) is Verdict.CHANGED


@given(st.lists(st.text(min_size=1), unique=True), st.integers(0, 20), st.integers())
def test_choose_takes_min_n_of_the_paths_reproducibly(paths: list[str], n: int, seed: int) -> None:
    chosen = choose(paths, n, seed)
    assert len(chosen) == min(n, len(paths))
    assert set(chosen) <= set(paths) and chosen == sorted(chosen)
    assert choose(iter(paths), n, seed) == chosen


def test_tally_needs_something_compared_unless_the_tree_is_empty() -> None:
    assert SampleTally().ok
    assert not SampleTally(sampled=3, changed=3).ok
    tally = SampleTally(sampled=3, compared=2, matched=1)
    tally.fail("/x: SHA-256 live abc, restored def")
    assert not tally.ok and "1 FAILED: /x" in tally.describe()


def test_smoke_test_passes_on_a_posix_file_system(tmp_path: Path) -> None:
    served: list[bool] = []
    passed = posix_smoke(tmp_path, lambda: served.append(True))
    assert served == [True]
    assert "O_EXCL EEXIST" in passed and "rmdir ENOTEMPTY" in passed
    assert list(tmp_path.iterdir()) == []


def test_dr_drill_help() -> None:
    done = CliRunner().invoke(app, ["admin", "dr-drill", "--help"], terminal_width=200)
    assert done.exit_code == 0, done.output
    for option in ("--report", "--json", "--sample"):
        assert option in done.output


@pytest.mark.parametrize("step", list(Step))
def test_every_step_has_a_title(step: Step) -> None:
    assert SPECS[step].title
