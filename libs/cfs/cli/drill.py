"""`cfs admin dr-drill`: the operator guide's monthly DR drill in one command.

    cfs admin dr-drill [--sample N] [--report FILE.md|FILE.json] [--json]

Snapshots the live site (metadata and data tier), restores both into a temporary
local site, checks it, compares a sample of files with the live site, runs a POSIX
smoke test through a FUSE mount of it, tears it down and reports each step with the
measured RTO. Exit 0 when every step is ok, 1 when one failed, 130 when interrupted.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cfs.cli.admin import JsonOpt, _settings, app
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.drill.plan import DrillReport, Status, StepResult, summary_line, to_json, to_markdown
from cfs.drill.runner import Drill, DrillOptions, run_drill
from cfs.objstore import s3_settings

INTERRUPTED = 130
_STYLE = {Status.OK: "green", Status.FAILED: "bold red", Status.SKIPPED: "yellow"}


@app.command("dr-drill")
@one_line_errors
def dr_drill(
    ctx: typer.Context,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="also write the report here: Markdown, or JSON (*.json)"),
    ] = None,
    sample: Annotated[
        int, typer.Option("--sample", min=0, help="files compared between live and restored")
    ] = 100,
    seed: Annotated[int, typer.Option("--seed", help="the sample's random seed")] = 0,
    s3_output: Annotated[
        str | None,
        typer.Option(
            "--s3-output",
            help="s3://bucket/prefix for the data snapshot's manifest "
            "(default: s3://<tier bucket>/dr-drill)",
        ),
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir", help="where the temporary site lives (default: the temp directory)"
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The monthly DR drill against the live site: snapshot-metadata and s3-snapshot,
    restore into a temporary local site, metadata-consistency-check, SHA-256 of a
    sample of files (live vs restored), POSIX smoke test through a FUSE mount,
    teardown; each step's time and the measured RTO. Exit 1 if any step failed."""
    if report is not None and report.is_dir():
        raise CliError(f"--report {report}: is a directory", ExitCode.USAGE)
    settings = _settings(ctx, None, None, None)
    options = DrillOptions(sample=sample, seed=seed, s3_output=s3_output, work_dir=work_dir)
    drill = Drill(settings, s3_settings(), options)
    console = Console(stderr=True)

    def progress(result: StepResult) -> None:
        if not as_json:
            style = _STYLE[result.status]
            console.print(
                f"[{style}]{result.status.value:>7}[/] {result.step.value} "
                f"({result.duration_s:.1f} s)"
            )

    outcome = asyncio.run(run_drill(drill, progress))
    if report is not None:
        text = to_json(outcome) if report.suffix.lower() == ".json" else to_markdown(outcome)
        report.write_text(text)
    if as_json:
        typer.echo(json.dumps(outcome.model_dump(mode="json")))
    else:
        _print_table(outcome)
    if outcome.interrupted:
        raise typer.Exit(INTERRUPTED)
    if not outcome.ok:
        raise typer.Exit(ExitCode.FAILED)


def _print_table(report: DrillReport) -> None:
    table = Table(title=f"DR drill of site {report.site}")
    table.add_column("step")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("details", overflow="fold")
    for s in report.steps:
        table.add_row(
            s.step.value,
            f"[{_STYLE[s.status]}]{s.status.value}[/]",
            f"{s.duration_s:.1f}",
            s.details,
        )
    out = Console()
    out.print(table)
    out.print(summary_line(report))
