"""`cfs service run NAME --node ID`: start one service process in the foreground."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Run ClaudeFS services (what systemd, Nomad or `cfs dev` start).")

# Service name (as in DESIGN.md) -> module with `main(argv)`. Imported by name so that
# the CLI does not load every service's dependencies.
SERVICES = {
    "metadata-raft": "cfs_metadata.service",
    "chunk-store": "cfs_chunkstore.service",
    "repair": "cfs_repair.service",
    "membership": "cfs_membership.service",
}


@app.command("run")
def run(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(SERVICES)}")],
    node: Annotated[str, typer.Option(help="this node's id, e.g. storage-1")],
    config: Annotated[Path | None, typer.Option(help="JSON settings file")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="node data directory (or CFS_DATA_DIR)")
    ] = None,
) -> None:
    """Run a service until SIGTERM/SIGINT; settings from flags, CFS_* env, config file."""
    module_name = SERVICES.get(name)
    if module_name is None:
        typer.echo(f"error: unknown service {name!r}; known: {', '.join(SERVICES)}", err=True)
        raise typer.Exit(2)
    argv = ["--node", node] + (["--config", str(config)] if config else [])
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    importlib.import_module(module_name).main(argv)


@app.command("list")
def list_services() -> None:
    """List the services this release can run."""
    for name in SERVICES:
        typer.echo(name)
