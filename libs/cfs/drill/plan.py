"""The drill's plan and report: pure, no I/O.

The guide's "Monthly DR Drill" as steps with dependencies. `decide` takes what has
happened so far and says what to do next: run a step, skip it (a step it needs did
not succeed: its checks would only repeat that failure), or finish. Teardown has no
dependency and always runs last, so a failed or interrupted drill still stops every
process it started and still writes its report.

The report is the command's output (`--json`, `--report FILE`): not a message on
the bus, so it lives here rather than in `contracts/`; `format` versions it for the
scripts that read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

REPORT_FORMAT = 1


class Step(StrEnum):
    SNAPSHOT_METADATA = "snapshot-metadata"
    S3_SNAPSHOT = "s3-snapshot"
    START_SITE = "start-site"
    RESTORE_METADATA = "restore-metadata"
    RESTORE_DATA = "restore-data"
    CONSISTENCY_CHECK = "metadata-consistency-check"
    COMPARE_SAMPLE = "compare-sample"
    MOUNT = "mount"
    SMOKE_TEST = "posix-smoke-test"
    TEARDOWN = "teardown"


@dataclass(frozen=True)
class StepSpec:
    step: Step
    title: str
    needs: tuple[Step, ...] = ()


# In the order they run; every step's needs come before it.
PLAN: tuple[StepSpec, ...] = (
    StepSpec(Step.SNAPSHOT_METADATA, "metadata snapshot of the live site"),
    StepSpec(Step.S3_SNAPSHOT, "data tier snapshot of the live site", (Step.SNAPSHOT_METADATA,)),
    StepSpec(
        Step.START_SITE,
        "temporary local site (own NATS, S3, credentials)",
        (Step.SNAPSHOT_METADATA, Step.S3_SNAPSHOT),
    ),
    StepSpec(
        Step.RESTORE_METADATA,
        "restore-metadata from the snapshot, shards opened",
        (Step.START_SITE, Step.SNAPSHOT_METADATA),
    ),
    StepSpec(
        Step.RESTORE_DATA,
        "data tier copied, restore-data --from-s3",
        (Step.RESTORE_METADATA, Step.S3_SNAPSHOT),
    ),
    StepSpec(
        Step.CONSISTENCY_CHECK,
        "metadata-consistency-check of the restored site",
        (Step.RESTORE_DATA,),
    ),
    StepSpec(
        Step.COMPARE_SAMPLE, "SHA-256 of sampled files, live vs restored", (Step.RESTORE_DATA,)
    ),
    StepSpec(Step.MOUNT, "FUSE mount of the restored site", (Step.RESTORE_DATA,)),
    StepSpec(Step.SMOKE_TEST, "POSIX smoke test through the mount", (Step.MOUNT,)),
    StepSpec(Step.TEARDOWN, "temporary site and mount stopped"),
)
SPECS: dict[Step, StepSpec] = {spec.step: spec for spec in PLAN}


class Status(StrEnum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


class StepResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    step: Step
    title: str
    status: Status
    started_ms: int = Field(description="wall clock, ms since the epoch (0: never started)")
    duration_s: float = Field(ge=0.0, description="seconds the step ran (0 when skipped)")
    details: str = Field(default="", description="one line: what it did, or why it failed")
    figures: dict[str, Any] = Field(default_factory=dict, description="the step's numbers")


@dataclass(frozen=True)
class Decision:
    """`step` to run (`skip_reason` None) or to record as skipped; None: the drill is done."""

    step: Step | None
    skip_reason: str | None = None


def decide(results: list[StepResult], interrupted: bool = False) -> Decision:
    """The next step given the results so far, in plan order.

    A step runs only if every step it needs succeeded; otherwise it is skipped,
    naming the first need that did not. After an interruption (Ctrl-C, SIGTERM)
    every remaining step but teardown is skipped."""
    done = {r.step: r.status for r in results}
    for spec in PLAN:
        if spec.step in done:
            continue
        if spec.step is Step.TEARDOWN:
            return Decision(spec.step)
        if interrupted:
            return Decision(spec.step, "the drill was interrupted")
        for need in spec.needs:
            if done.get(need) is not Status.OK:
                return Decision(spec.step, f"needs {need.value}, which {done[need].value}")
        return Decision(spec.step)
    return Decision(None)


class DrillReport(BaseModel):
    """Everything `cfs admin dr-drill` found, in plan order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = REPORT_FORMAT
    site: str = Field(description="the live site drilled")
    started_ms: int
    finished_ms: int
    ok: bool = Field(description="every step ok (none failed or skipped)")
    interrupted: bool = Field(
        default=False, description="stopped by Ctrl-C or SIGTERM: the steps after it skipped"
    )
    rto_s: float | None = Field(
        description="seconds from the start of the restore (provisioning the temporary "
        "site) to the restored site serving the smoke test's first operation through a "
        "mount; None when it never did"
    )
    steps: tuple[StepResult, ...]

    @property
    def failed(self) -> list[StepResult]:
        return [s for s in self.steps if s.status is Status.FAILED]


def build_report(
    site: str,
    started_ms: int,
    finished_ms: int,
    results: list[StepResult],
    rto_s: float | None,
    interrupted: bool = False,
) -> DrillReport:
    ok = bool(results) and not interrupted and all(r.status is Status.OK for r in results)
    return DrillReport(
        site=site,
        started_ms=started_ms,
        finished_ms=finished_ms,
        ok=ok,
        interrupted=interrupted,
        rto_s=round(rto_s, 3) if rto_s is not None else None,
        steps=tuple(results),
    )


def summary_line(report: DrillReport) -> str:
    rto = f"RTO {report.rto_s:.1f} s" if report.rto_s is not None else "RTO not measured"
    if report.ok:
        return f"DR drill of site {report.site}: every step ok; {rto}."
    if report.interrupted:
        return f"DR drill of site {report.site} INTERRUPTED; {rto}."
    failed = ", ".join(s.step.value for s in report.failed) or "none"
    skipped = sum(1 for s in report.steps if s.status is Status.SKIPPED)
    return f"DR drill of site {report.site} FAILED: {failed} failed, {skipped} skipped; {rto}."


def to_json(report: DrillReport) -> str:
    return json.dumps(report.model_dump(mode="json"), indent=2)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(report: DrillReport) -> str:
    """The report as a Markdown page, for the runbook's drill log."""
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(report.started_ms / 1000, UTC).isoformat(timespec="seconds")
    lines = [
        f"# DR drill of site {report.site} ({when})",
        "",
        summary_line(report),
        "",
        "| step | status | seconds | details |",
        "|---|---|---:|---|",
    ]
    for s in report.steps:
        lines.append(
            f"| {s.step.value} | {s.status.value} | {s.duration_s:.1f} | {_cell(s.details)} |"
        )
    lines += ["", f"Total: {(report.finished_ms - report.started_ms) / 1000:.1f} s."]
    if report.rto_s is not None:
        lines.append(
            f"Measured RTO: {report.rto_s:.1f} s (temporary site provisioned, metadata and "
            "data restored, mount serving)."
        )
    return "\n".join(lines) + "\n"
