"""`cfs service run NAME --node ID`: start one service process in the foreground."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cfs.kernel.registry import UnknownService, by_name, specs

app = typer.Typer(help="Run ClaudeFS services (what systemd, Nomad or `cfs dev` start).")


@app.command("run")
def run(
    name: Annotated[str, typer.Argument(help="a service name (`cfs service list`)")],
    node: Annotated[str, typer.Option(help="this node's id, e.g. storage-1")],
    config: Annotated[Path | None, typer.Option(help="JSON settings file")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="node data directory (or CFS_DATA_DIR)")
    ] = None,
) -> None:
    """Run a service until SIGTERM/SIGINT; settings from flags, CFS_* env, config file."""
    from cfs.service_main import run_spec

    try:
        spec = by_name(name)
    except UnknownService as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    argv = ["--node", node] + (["--config", str(config)] if config else [])
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    run_spec(spec, argv)


@app.command("list")
def list_services() -> None:
    """List the services this release can run: name, role, site singleton or not."""
    for spec in specs():
        kind = "site singleton" if spec.singleton is not None else "per node"
        typer.echo(f"{spec.name}\t{spec.role}\t{kind}")
