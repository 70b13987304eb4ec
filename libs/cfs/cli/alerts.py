"""`cfs admin alerts list` and `cfs admin alerts test RULE` (the alerts service)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer

from cfs.admin.client import actor, issue
from cfs.admin.snapshot import read_record
from cfs.bus import Bus
from cfs.cli.admin import JsonOpt, _finish, _session, _settings, app
from cfs.cli.errors import CliError, one_line_errors
from cfs_contracts.alerts import ALERTS_STATE_KEY, AlertsState
from cfs_contracts.events.admin import AdminCommandCompleted

alerts_app = typer.Typer(help="Alert rules, what fires now, and test notifications.")
app.add_typer(alerts_app, name="alerts")

TEST_TIMEOUT_S = 60.0


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


@alerts_app.command("list")
@one_line_errors
def list_alerts(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The rules the alerts service evaluates, what fires now, and its hooks."""
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> AlertsState | None:
        return await read_record(bus, ALERTS_STATE_KEY, AlertsState)

    state = _session(settings, work)
    if state is None:
        raise CliError("the alerts service has published nothing yet (is it running?)")
    if as_json:
        typer.echo(json.dumps(state.model_dump(mode="json")))
        return
    typer.echo(f"Firing ({len(state.firing)}):" if state.firing else "Firing: nothing")
    for alert in state.firing:
        typer.echo(f"  [{alert.severity}] {alert.rule} {alert.key}: {alert.summary} "
                   f"(since {_when(alert.since_ms)})")  # fmt: skip
    typer.echo(f"Rules ({len(state.rules)}):")
    for rule in state.rules:
        typer.echo(f"  {rule.name} [{rule.severity}]: {rule.watches}")
    typer.echo(f"Hooks ({len(state.hooks)}):" if state.hooks else "Hooks: none (ALERTS only)")
    for hook in state.hooks:
        error = f"; last error: {hook.last_error}" if hook.failed and hook.last_error else ""
        typer.echo(f"  {hook.name} ({hook.kind}): {hook.delivered} delivered, "
                   f"{hook.failed} failed{error}")  # fmt: skip
    typer.echo(f"(evaluated by {state.node}, {_when(state.updated_ms)})")


@alerts_app.command("test")
@one_line_errors
def test_alert(
    ctx: typer.Context,
    rule: Annotated[str, typer.Argument(help="the rule to send a test notification of")],
    as_json: JsonOpt = False,
) -> None:
    """Send a test notification of RULE through every hook; exit 1 if one fails."""
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> AdminCommandCompleted:
        return await issue(
            bus, service="alerts", verb="test", target=rule, actor=actor(), timeout=TEST_TIMEOUT_S
        )

    _finish(_session(settings, work), as_json)
