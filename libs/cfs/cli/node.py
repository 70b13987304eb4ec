"""`cfs node add --node NAME`: admit a node, and restore three-way replication with it.

On a `cfs dev` site the local supervisor starts the node's processes (and a NATS
server beside it while the site has fewer than three); on a real deployment the
node's services are started by its own service manager with the cluster token,
and this command waits for it to join. Either way it then raises every stream
back to R3 once three NATS servers are there (after `raft-force-leader` left one).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Annotated, Any

import nats.js.errors
import typer
from rich.console import Console

from cfs.admin.client import record_action
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.fuse.config import ClientSettings, client_settings
from cfs.security import Role
from cfs.supervisor.devcontrol import running_dev_site
from cfs_contracts.members import Liveness, MemberRecord, member_key
from cfs_contracts.streams import NODES

app = typer.Typer(help="Add nodes to the cluster.", no_args_is_help=True)
console = Console(stderr=True)

FULL_REPLICAS = 3


@app.command("add")
@one_line_errors
def add(
    node: Annotated[str, typer.Option("--node", help="the new node's name, e.g. storage-4")],
    label: Annotated[
        list[str] | None, typer.Option("--label", help="failure domain, KEY=VALUE (repeatable)")
    ] = None,
    cluster: Annotated[str | None, typer.Option("--cluster", help="NATS URLs")] = None,
    site: Annotated[str | None, typer.Option("--site", help="site name")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the node and R3")] = 180.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Start (on a dev site) or wait for a new node, then restore R3 streams."""
    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--label {item!r}: expected KEY=VALUE", ExitCode.USAGE)
        labels[key] = value
    settings = client_settings(cluster, site)
    asyncio.run(_refuse_existing(settings, node))
    control = running_dev_site()
    started: dict[str, Any] = {}
    if control is not None:
        started = control.call(
            "add-node", node=node, labels=labels, site=settings.site, timeout=timeout
        )
        settings = client_settings(cluster, site)  # the dev site may have new NATS URLs
    result = asyncio.run(_admit(settings, node, timeout, started))
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(
        f'Node "{node}" joined (SWIM, {result["joined_s"]:.1f}s)'
        + (f"; NATS server {result['nats_server']} added" if result["nats_server"] else "")
    )
    if result["replicas"]:
        typer.echo(f"streams: R{result['replicas']} ({result['streams']} streams and buckets)")
    else:
        typer.echo(
            f"streams unchanged: {result['nats_servers']} NATS server(s) run; they are raised "
            f"to R{FULL_REPLICAS} when {FULL_REPLICAS} do"
        )


async def _refuse_existing(settings: ClientSettings, node: str) -> None:
    async with await settings.connect(Role.ADMIN, f"cli-{os.getpid()}") as bus:
        kv = await bus.key_value(NODES.bucket)
        try:
            entry = await kv.get(member_key(node))
        except nats.js.errors.KeyNotFoundError:
            return
        if entry.value:
            member = MemberRecord.model_validate_json(entry.value)
            if member.state in (Liveness.ALIVE, Liveness.SUSPECT):
                raise CliError(f"node {node!r} is already a member ({member.state.value})")


async def _admit(
    settings: ClientSettings, node: str, timeout: float, started: dict[str, Any]
) -> dict[str, Any]:
    from cfs.recovery.streams import scale_streams

    began = time.monotonic()
    async with await settings.connect(Role.ADMIN, f"cli-{os.getpid()}") as bus:
        kv = await bus.key_value(NODES.bucket)
        with console.status(f"waiting for {node} to join..."):
            while True:
                try:
                    entry = await kv.get(member_key(node))
                    member = MemberRecord.model_validate_json(entry.value or b"{}")
                    if member.state is Liveness.ALIVE:
                        break
                except (nats.js.errors.KeyNotFoundError, ValueError):
                    pass
                if time.monotonic() - began > timeout:
                    raise CliError(f"node {node!r} did not join within {timeout:.0f}s")
                await asyncio.sleep(0.5)
        joined = time.monotonic() - began
        await record_action(bus, "node add", {"node": node}, "succeeded: joined")
        servers = int(started.get("nats_servers") or 0) or len(bus.nc.servers)
    scaled: dict[str, list[str]] = {}
    if servers >= FULL_REPLICAS:
        with console.status(f"raising streams to R{FULL_REPLICAS}, waiting until current..."):
            scaled = await scale_streams(
                settings.nats_urls,
                settings.site,
                settings.shards,
                FULL_REPLICAS,
                timeout=timeout,
                credentials=settings.credentials_for(Role.ADMIN),
            )
    return {
        "node": node,
        "joined_s": round(joined, 2),
        "nats_server": started.get("nats_server"),
        "nats_servers": servers,
        "replicas": FULL_REPLICAS if scaled else None,
        "streams": len(scaled),
    }
