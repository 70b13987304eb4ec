"""`cfs admin metadata-consistency-check` and `cfs admin metadata-repair` (guide scenario 5).

The checker compares every metadata replica with its shard's journal (record by
record, at the same position), checks the whole namespace across shards, and has
every fragment verified by its chunk-store (`cfs_metadata.fsck`). One line per
finding, in the guide's words:

    Inode 12345: corrupted (expected_size=1024, actual=512)
    Inode 67890: invalid parent pointer (points to 3073, named by 1/docs)
    Inode 4097 checksum mismatch: expected 0x1c2a40f3, got 0x8e0b5d21 (shard 001, ...)

Exit status: 0 clean, 1 findings, 2 could not check everything (what is said on
stdout), 4 permission denied. `metadata-repair` exits like a check run after it.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from cfs.admin.client import actor
from cfs.admin.snapshot import discover_shards
from cfs.bus import Bus, BusError
from cfs.bus.errors import is_permission_error
from cfs.cli.admin import REQUEST_TIMEOUT_S, JsonOpt, _session, _settings, app
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.fuse.config import ClientSettings
from cfs_contracts.events.ops import AdminActionRecorded
from cfs_contracts.fs.check import CHECK_STATUS_KEY, CheckStatus
from cfs_contracts.streams import NODES

if TYPE_CHECKING:
    from cfs_metadata.cross_site import CrossSiteReport
    from cfs_metadata.fsck import CheckReport
    from cfs_metadata.fsck_repair import Outcome
    from cfs_metadata.repair_plan import Plan

INCOMPLETE = ExitCode.USAGE  # 2: could not check everything (the checker's own meaning)
SHOWN = 20

VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="list every finding (default: the first 20)")
]
FragmentsOpt = Annotated[
    bool,
    typer.Option(
        "--fragments/--no-fragments",
        help="have every fragment verified by its chunk-store (reads all data)",
    ),
]


class _Bar:
    """The checker's progress as a rich bar on stderr (only on a terminal)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None

    def phase(self, description: str, total: int | None) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total)

    def advance(self, amount: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, amount)


@contextmanager
def _progress(enabled: bool) -> Iterator[_Bar]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    console = Console(stderr=True)
    with Progress(*columns, console=console, transient=True, disable=not enabled) as progress:
        yield _Bar(progress)


def _run(settings: ClientSettings, work: Any) -> Any:
    """`_session`, with "cannot reach the cluster" as could-not-check (exit 2)."""
    try:
        return _session(settings, work)
    except BusError as exc:
        if is_permission_error(str(exc)):
            raise
        raise CliError(f"could not check: {exc}", INCOMPLETE) from None


async def _check(bus: Bus, settings: ClientSettings, fragments: bool, bar: _Bar) -> Any:
    from cfs_metadata.fsck import CheckFailed, MetadataChecker

    names = await discover_shards(bus, settings.shards, timeout=REQUEST_TIMEOUT_S)
    checker = MetadataChecker(bus, [int(n) for n in names], progress=bar, fragments=fragments)
    try:
        await checker.run()
    except CheckFailed as exc:
        checker.close()
        raise CliError(f"could not check: {exc}", INCOMPLETE) from None
    return checker


@app.command("metadata-consistency-check")
@one_line_errors
def metadata_consistency_check(
    ctx: typer.Context,
    verbose: VerboseOpt = False,
    fragments: FragmentsOpt = True,
    cross_site: Annotated[
        bool,
        typer.Option(
            "--cross-site", help="compare this site's namespace with the replicated peer's"
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check every metadata replica against its journal, the namespace across shards
    and every fragment: one line per problem; exit 0 clean, 1 problems, 2 incomplete.
    With --cross-site: each shard of this site against the peer site's, record by
    record where they differ."""
    settings = _settings(ctx, None, None, None)
    if cross_site:
        _cross_site(settings, as_json)
        return

    async def work(bus: Bus) -> CheckReport:
        with _progress(sys.stderr.isatty() and not as_json) as bar:
            checker = await _check(bus, settings, fragments, bar)
        checker.close()
        report: CheckReport = checker.report
        await _record(bus, report)
        return report

    report = _run(settings, work)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report_lines(report, verbose):
            typer.echo(line)
    raise typer.Exit(report.exit_code)


async def _record(bus: Bus, report: CheckReport) -> None:
    """`check.last`, whose age the "consistency check missed" alert watches."""
    status = CheckStatus(
        finished_ms=int(time.time() * 1000),
        status=report.status,
        problems=len(report.findings),
        inodes=report.inodes,
        seconds=report.seconds,
        by=bus.node,
    )
    kv = await bus.key_value(NODES.bucket)
    await kv.put(CHECK_STATUS_KEY, status.model_dump_json().encode())


def report_lines(report: CheckReport, verbose: bool) -> list[str]:
    shown = report.findings if verbose else report.findings[:SHOWN]
    lines = [f.line for f in shown]
    if len(report.findings) > len(shown):
        lines.append(
            f"... and {len(report.findings) - len(shown)} more (--verbose lists every finding)"
        )
    lines += [f"Could not check: {u}" for u in report.unchecked]
    lines += [f"Note: {n}" for n in report.notes]
    if report.skipped:
        lines.append(
            f"Note: {report.skipped} findings skipped: records of cross-shard operations "
            "in flight (run the check again)"
        )
    scope = (
        f"{report.inodes} inodes, {report.entries} entries, {report.fragments} fragments in "
        f"{report.shards} shards; {report.replicas} replicas compared with their journals "
        f"({report.seconds:.1f} s, {report.inodes_per_s:.0f} inodes/s)"
    )
    if report.findings:
        counts = Counter(f.problem.value for f in report.findings)
        kinds = ", ".join(f"{n} {problem}" for problem, n in sorted(counts.items()))
        lines.append(
            f"{len(report.findings)} problems found ({kinds}) in {scope}. "
            "`cfs admin metadata-repair --dry-run` shows what can be repaired."
        )
    elif report.unchecked:
        lines.append(f"No problem found, but the check is incomplete: {scope}.")
    else:
        lines.append(f"Metadata consistent: {scope}.")
    return lines


@app.command("metadata-repair")
@one_line_errors
def metadata_repair(
    ctx: typer.Context,
    auto_fix: Annotated[
        bool,
        typer.Option(
            "--auto-fix",
            help="also repair what changes what users see: remove dangling entries, "
            "set sizes to what the chunk maps hold",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="say what would be done; change nothing")
    ] = False,
    verbose: VerboseOpt = False,
    fragments: FragmentsOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Check, then repair what the journal proves (replicas rebuilt from it, link counts,
    parent pointers, orphans to /lost+found, damaged fragments) and check again. Without
    --auto-fix nothing that could lose user data is changed; every change is audited."""
    from cfs_metadata.fsck_repair import RepairRun
    from cfs_metadata.repair_plan import plan_repairs

    settings = _settings(ctx, None, None, None)
    show = sys.stderr.isatty() and not as_json

    def said(outcome: Outcome) -> None:
        if not as_json:
            typer.echo(outcome.line())

    async def work(bus: Bus) -> dict[str, Any]:
        with _progress(show) as bar:
            checker = await _check(bus, settings, fragments, bar)
        try:
            before: CheckReport = checker.report
            plan = plan_repairs(before.findings, checker.scratch, auto_fix=auto_fix)
            if not as_json:
                _plan_lines(before, plan, dry_run, verbose)
            if dry_run or not plan.actions:
                return {"before": before, "plan": plan, "outcomes": [], "after": None}
            await _audit(bus, {"auto_fix": str(auto_fix).lower()}, "requested")
            outcomes = await RepairRun(bus, checker.scratch, on_outcome=said).execute(plan.actions)
        finally:
            checker.close()
        failed = sum(not o.ok for o in outcomes)
        summary = f"{len(outcomes) - failed} repaired, {failed} failed"
        await _audit(bus, {"auto_fix": str(auto_fix).lower()}, f"succeeded: {summary}")
        if not as_json:
            typer.echo(f"{summary}; checking again")
        with _progress(show) as bar:
            again = await _check(bus, settings, fragments, bar)
        again.close()
        return {"before": before, "plan": plan, "outcomes": outcomes, "after": again.report}

    done = _run(settings, work)
    final: CheckReport = done["after"] or done["before"]
    if as_json:
        document = {
            "dry_run": dry_run,
            "auto_fix": auto_fix,
            "before": done["before"].to_dict(),
            "plan": done["plan"].to_dict(),
            "outcomes": [
                {"what": o.action.describe(), "ok": o.ok, "message": o.message}
                for o in done["outcomes"]
            ],
            "after": done["after"].to_dict() if done["after"] else None,
        }
        typer.echo(json.dumps(document, indent=2))
    elif done["after"] is not None:
        for line in report_lines(final, verbose):
            typer.echo(line)
    raise typer.Exit(final.exit_code)


def _plan_lines(report: CheckReport, plan: Plan, dry_run: bool, verbose: bool) -> None:
    for line in report_lines(report, verbose):
        typer.echo(line)
    if dry_run:
        for action in plan.actions:
            typer.echo(f"would {action.describe()}")
    for unrepaired in plan.unrepaired:
        typer.echo(f"not repaired: {unrepaired.describe()}")
    if not plan.actions:
        typer.echo("nothing to repair")


async def _audit(bus: Bus, arguments: dict[str, str], outcome: str) -> None:
    record = AdminActionRecorded(
        actor=actor(), command="metadata-repair", arguments=arguments, outcome=outcome
    )
    await bus.publish(bus.event(record), timeout=REQUEST_TIMEOUT_S)


def _cross_site(settings: ClientSettings, as_json: bool) -> None:
    from cfs.cli.geo import read_peer, replication_caught_up
    from cfs_metadata.cross_site import cross_site_check

    async def work(bus: Bus) -> CrossSiteReport:
        peer = await read_peer(bus)
        if peer is None:
            raise CliError("this site replicates with no other (cfs admin replication-link)")
        behind = await replication_caught_up(bus)
        report = await cross_site_check(bus, peer.site, peer.shards)
        if behind:
            report.notes.append(f"replication was not caught up ({behind}): run it again")
        return report

    report = _run(settings, work)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.lines():
            typer.echo(line)
    raise typer.Exit(report.exit_code)
