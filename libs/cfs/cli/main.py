"""Entry point of the `cfs` console script."""

from __future__ import annotations

import os

import typer

from cfs.cli import admin, cluster, dev, fs, node, service
from cfs.cli import alerts as _alerts  # noqa: F401 (adds `cfs admin alerts`)
from cfs.cli import backup as _backup  # noqa: F401 (adds its commands to `cfs admin`)
from cfs.cli import check as _check  # noqa: F401 (adds its commands to `cfs admin`)
from cfs.cli import conflicts as _conflicts  # noqa: F401 (show- and resolve-conflicts)
from cfs.cli import drill as _drill  # noqa: F401 (adds `cfs admin dr-drill`)
from cfs.cli import failover as _failover  # noqa: F401 (failover, failback, ...)
from cfs.cli import gc as _gc  # noqa: F401 (adds `cfs admin gc`)
from cfs.cli import geo as _geo  # noqa: F401 (adds the replication commands)
from cfs.cli import tier as _tier  # noqa: F401 (adds the data tier commands)
from cfs.cli.errors import OneLineGroup
from cfs.logs import setup_logging

app = typer.Typer(
    name="cfs",
    help="ClaudeFS: a distributed POSIX file system built for disaster recovery.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=OneLineGroup,
)


@app.callback()
def _quiet_logs() -> None:
    """Commands report failures as one line; library logs (JSON on stderr) only when
    asked for with CFS_LOG_LEVEL. Long-running commands configure their own."""
    setup_logging(os.environ.get("CFS_LOG_LEVEL", "CRITICAL"), service="cfs")


app.add_typer(dev.app, name="dev")
app.add_typer(service.app, name="service")
app.add_typer(fs.app, name="fs")
app.add_typer(cluster.app, name="cluster")
app.add_typer(node.app, name="node")
app.add_typer(admin.app, name="admin")
app.command("mount")(fs.mount)
app.command("umount")(fs.umount)


@app.command()
def version() -> None:
    """Print the ClaudeFS version."""
    from importlib.metadata import version as dist_version

    typer.echo(f"claudefs {dist_version('claudefs')}")


def main() -> None:
    app()
