"""`cfs admin show-conflicts` and `resolve-conflicts` (guide scenario 6).

`show-conflicts` reads this site's CONFLICTS stream (`cfs.conflicts`);
`resolve-conflicts` is a command the conflict-resolver service executes (through the
CMD stream, so it is audited and answered once), which records the decision on both
sites.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from cfs.admin.client import actor, issue
from cfs.bus import Bus
from cfs.cli.admin import JsonOpt, _finish, _session, _settings, app
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.conflicts import Open, Strategy, conflict_events, open_conflicts
from cfs_contracts.events.admin import AdminCommandCompleted
from cfs_contracts.fs.conflicts import FieldConflict
from cfs_contracts.fs.records import Stamp

RESOLVE_TIMEOUT_S = 60.0


def _when(stamp: Stamp | None) -> str:
    if stamp is None:
        return "as created"
    moment = datetime.fromtimestamp(stamp.ns / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _values(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items()) or "-"


def headline(conflict: FieldConflict) -> str:
    """One line, in the guide's words."""
    c = conflict
    if c.kind == "name":
        return (
            f"Inode {c.ino}: CONFLICT - name {c.group!r} (directory {c.parent}) created on "
            f"both sites; {c.winner} won, the other file is {c.kept_as!r}"
        )
    if c.kind == "deleted":
        name = f" as {c.kept_as!r}" if c.kept_as else ""
        return f"Inode {c.ino}: CONFLICT - deleted on one site, changed on {c.winner}: kept{name}"
    later = max((s for s in (c.local_stamp, c.remote_stamp) if s is not None), key=Stamp.key)
    return (
        f"Inode {c.ino}: CONFLICT - attr.{c.group} differs; {c.winner} won "
        f"(written last, {_when(later)})"
    )


def details(conflict: FieldConflict) -> list[str]:
    """The two versions, each with its site and time (`--verbose`)."""
    c = conflict
    if c.kind != "field":
        return [f"  {c.here}: {_values(c.local)}", f"  {c.there}: {_values(c.remote)}"]
    return [
        f"  {c.here}: {_values(c.local)} ({_when(c.local_stamp)})",
        f"  {c.there}: {_values(c.remote)} ({_when(c.remote_stamp)})",
    ]


def _as_json(item: Open) -> dict[str, Any]:
    return {
        "conflict_id": item.conflict_id,
        "shard": item.detected.shard,
        "headline": headline(item.conflict),
        **json.loads(item.conflict.model_dump_json()),
    }


@app.command("show-conflicts")
@one_line_errors
def show_conflicts(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="both versions of each, with their times")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """What the merges of the two sites' changes found and no one resolved yet."""
    settings = _settings(ctx, None, None, None)
    found = open_conflicts((_session(settings, conflict_events))[0])
    if as_json:
        typer.echo(json.dumps({"conflicts": [_as_json(item) for item in found]}))
        return
    if not found:
        typer.echo("No conflicts.")
        return
    for item in found:
        typer.echo(headline(item.conflict))
        if verbose:
            typer.echo(f"  id {item.conflict_id}, shard {item.detected.shard:03d}")
            for line in details(item.conflict):
                typer.echo(line)


@app.command("resolve-conflicts")
@one_line_errors
def resolve_conflicts(
    ctx: typer.Context,
    strategy: Annotated[
        Strategy, typer.Option("--strategy", help="last-write-wins: keep what the merge kept")
    ],
    inode: Annotated[
        int | None, typer.Option("--inode", min=1, help="manual: the inode decided on")
    ] = None,
    winner: Annotated[
        str | None, typer.Option("--winner", help="manual: the site whose version stays")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Close open conflicts: all of them as the merge settled them (last-write-wins), or
    those of one inode with one site's version (manual: written again, so both sites
    end with it)."""
    if strategy is Strategy.MANUAL and (inode is None or winner is None):
        raise CliError("--strategy manual needs --inode and --winner", ExitCode.USAGE)
    if strategy is Strategy.LWW and (inode is not None or winner is not None):
        raise CliError("--inode and --winner go with --strategy manual", ExitCode.USAGE)
    settings = _settings(ctx, None, None, None)
    arguments = {"strategy": strategy.value}
    if inode is not None and winner is not None:
        arguments.update(inode=str(inode), winner=winner)

    async def work(bus: Bus) -> AdminCommandCompleted:
        return await issue(
            bus,
            service="conflict-resolver",
            verb="resolve",
            target=str(inode) if inode is not None else "*",
            actor=actor(),
            arguments=arguments,
            timeout=RESOLVE_TIMEOUT_S,
        )

    _finish(_session(settings, work), as_json)
