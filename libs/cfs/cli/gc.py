"""`cfs admin gc [--dry-run] [--json]`: fragment garbage collection now (issue 14).

The active backup service decides and deletes (`cfs_backup.collector`); this asks it
for one run and prints what went, or with --dry-run what would. Exit 0 when the run
completed, 1 when it was blocked (nothing deleted) or some deletes failed.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cfs.admin.client import actor
from cfs.admin.report import size
from cfs.bus import Bus, BusError, NoResponders, RequestTimeout
from cfs.cli.admin import REQUEST_TIMEOUT_S, JsonOpt, _session, _settings, app
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs_contracts.backup import GcReport, GcRequest, gc_subject
from cfs_contracts.events.ops import AdminActionRecorded

GC_TIMEOUT_S = 3600.0


@app.command("gc")
@one_line_errors
def gc(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list what would be deleted, delete nothing")
    ] = False,
    as_json: JsonOpt = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="seconds to wait for the run's report")
    ] = GC_TIMEOUT_S,
) -> None:
    """Delete fragments no file, retained snapshot or restorable point in time needs.

    Kept: chunks of the live metadata, of the oldest retained snapshot and of the
    journal after its cut, and every fragment younger than the grace (gc_grace_s).
    """
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> GcReport:
        body = GcRequest(dry_run=dry_run).model_dump_json().encode()
        try:
            msg = await bus.request(gc_subject(bus.site), body, timeout=timeout)
        except NoResponders:
            raise CliError(
                "no active backup service answers (is `backup` running?)", ExitCode.UNREACHABLE
            ) from None
        except RequestTimeout:
            raise CliError(
                f"no report within {timeout:g} s: the backup service may have stopped "
                "mid-run (a rerun continues where it left off)",
                ExitCode.UNREACHABLE,
            ) from None
        report = GcReport.model_validate_json(msg.data)
        if not dry_run:
            record = AdminActionRecorded(
                actor=actor(),
                command="gc",
                arguments={"run": report.run_id},
                outcome=f"deleted {report.deleted} fragments ({report.deleted_bytes} bytes)"
                if report.ok
                else report.message,
            )
            try:
                await bus.publish(bus.event(record), timeout=REQUEST_TIMEOUT_S)
            except BusError as exc:
                typer.echo(f"warning: audit record not written: {exc}", err=True)
        return report

    report = _session(settings, work)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        for line in describe(report):
            typer.echo(line)
    if not report.ok:
        raise typer.Exit(ExitCode.FAILED)


def describe(report: GcReport) -> list[str]:
    if report.message and not report.deleted and not report.fragments:
        return [f"Fragment GC {report.run_id}: {report.message}"]
    verb = "would be deleted" if report.dry_run else "deleted"
    lines = [
        f"Fragment GC {report.run_id}{' (dry run)' if report.dry_run else ''}: "
        f"{report.deleted} fragments ({size(report.deleted_bytes)}) {verb} of "
        f"{report.fragments} on {len(report.nodes)} nodes in {report.seconds:.1f} s",
        f"  kept: {report.kept_referenced} referenced, {report.kept_young} younger than "
        f"{report.grace_s:g} s; keep set {report.keep_chunks} chunks (live metadata"
        + (
            f", snapshot {report.protected_snapshot} and the journal after it)"
            if report.protected_snapshot
            else "; no retained snapshot)"
        ),
    ]
    if report.already_gone or report.stored_again:
        lines.append(
            f"  {report.already_gone} already gone, {report.stored_again} stored again (kept)"
        )
    if report.unreachable:
        lines.append(f"  not answering (skipped): {', '.join(report.unreachable)}")
    if report.tier_candidates or report.tier_note:
        lines.append(
            f"  S3 tier: {report.tier_candidates} chunks outside the keep set"
            + (
                f" ({report.tier_note})"
                if report.tier_note
                else f", {report.tier_forgotten} unindexed (compaction frees their space), "
                f"{report.tier_young} younger than the grace"
                if not report.dry_run
                else ", would be unindexed"
            )
        )
    if report.message:
        lines.append(f"  {report.message}")
    for d in report.deletions:
        lines.append(f"  {d.node} {d.key} {d.size} B, {d.age_s:.0f} s old")
    if len(report.deletions) < report.deleted:
        lines.append(f"  … and {report.deleted - len(report.deletions)} more")
    return lines
