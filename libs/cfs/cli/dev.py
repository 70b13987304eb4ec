"""`cfs dev`: run ClaudeFS's moving parts on this machine as real processes."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cfs.bus import Bus, ensure_buckets, ensure_streams
from cfs.cli.errors import one_line_errors
from cfs.supervisor import NatsServer, S3Server
from cfs_contracts.streams import SITE_BUCKETS, site_streams

app = typer.Typer(help="Local development cluster (real nats-server and S3 processes).")
console = Console()


async def _provision(url: str, site: str, shards: int) -> int:
    async with await Bus.connect(url, site=site, node="dev") as bus:
        streams = await ensure_streams(bus.js, site_streams(shards), site=site, replicas=1)
        buckets = await ensure_buckets(bus.js, SITE_BUCKETS, replicas=1)
    return len(streams) + len(buckets)


@app.command("run")
@one_line_errors
def run(
    state_dir: Annotated[Path, typer.Option(help="where server stores and logs live")] = Path(
        ".cfs-dev"
    ),
    site: Annotated[str, typer.Option(help="site name used in subjects")] = "local",
    shards: Annotated[int, typer.Option(min=1, max=999, help="metadata shards")] = 1,
) -> None:
    """Start a single-node NATS JetStream and an S3 server; stay in the foreground."""
    state_dir = state_dir.resolve()
    nats_server = NatsServer.standalone(state_dir / "nats", name="local-1")
    s3 = S3Server(state_dir / "s3")
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with console.status("starting nats-server and the S3 server..."):
            nats_server.start()
            s3.start()
            provisioned = asyncio.run(_provision(nats_server.url, site, shards))
        table = Table(title="ClaudeFS local services", show_header=True)
        table.add_column("service")
        table.add_column("listening on", no_wrap=True)
        table.add_column("state / logs", overflow="fold")
        table.add_row("NATS JetStream", nats_server.url, str(nats_server.log_path))
        table.add_row("NATS monitoring", nats_server.monitor_url, "")
        table.add_row("S3 (moto server)", s3.endpoint_url, str(s3.log_path))
        console.print(table)
        console.print(f"site [bold]{site}[/]: {provisioned} streams and buckets provisioned")
        console.print("press Ctrl-C to stop")
        while not stop.wait(0.5):
            for proc in (nats_server, s3):
                if not proc.running:
                    console.print(f"[red]{proc!r} exited; last log lines:[/]\n{proc.log_tail(10)}")
                    raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        signal.signal(signal.SIGTERM, previous)
        s3.stop()
        nats_server.stop()
    console.print("stopped")
