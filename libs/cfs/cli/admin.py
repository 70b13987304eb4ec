"""`cfs admin`: node states, both Raft layers, forced elections, drain and remove.

Reads (status, raft-status, raft-debug, export-config) go straight to the nodes and leases KV
and the journal streams, with short deadlines: with JetStream quorum lost,
`status` falls back to the membership processes' SWIM views over core NATS.
Changes (node-drain, node-remove, raft-force-election) are command events on the
CMD stream, executed by the owning service, which audits them and replies.
`raft-force-leader` is the operator guide's DANGER path and runs from here.

Exit codes: 0 ok, 1 failed or refused, 2 usage (bad or unknown node/shard,
missing --yes-i-know without a terminal), 3 cluster unreachable, 4 permission denied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import nats.js.errors
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cfs.admin.client import CommandTimeout, actor, issue, node_events, poll_until
from cfs.admin.decide import NodeFacts, merge_views, parse_shard
from cfs.admin.report import (
    ShardView,
    backup_lines,
    debug_lines,
    node_json,
    node_line,
    service_json,
    service_lines,
    shard_line,
    stream_line,
    tier_lines,
)
from cfs.admin.snapshot import (
    SnapshotUnavailable,
    connected_server_name,
    discover_shards,
    facts_from_membership,
    read_backup_status,
    read_node_facts,
    read_record,
    shard_view,
)
from cfs.bus import Bus, BusError
from cfs.bus.errors import is_permission_error
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.cli.recovery import (
    NatsConfigOpt,
    NatsStoreOpt,
    NomadJobOpt,
    NomadOpt,
    RecoveryDirOpt,
    RecoveryWaitOpt,
    WitnessPortOpt,
)
from cfs.cluster import read_config
from cfs.fuse.config import ClientSettings, client_settings
from cfs.lease import Lease
from cfs.objstore import S3Settings, S3Url, is_s3_url, open_store, s3_settings
from cfs.objstore.base import write_file_atomically
from cfs.recovery.drive import RecoveryOptions, recover
from cfs.recovery.natsconf import NatsConfigError
from cfs.recovery.plan import WITNESS_PORT
from cfs.recovery.streams import RecoveryError
from cfs.security import Role
from cfs_contracts.events.admin import AdminCommandCompleted
from cfs_contracts.events.cluster import NodeDrained
from cfs_contracts.events.ops import AdminActionRecorded
from cfs_contracts.events.repair import ChunkLost, RepairCompleted, RepairProgress
from cfs_contracts.members import (
    ClusterConfig,
    Lifecycle,
    NodeAdmin,
    RepairJob,
    admin_key,
    repair_key,
)
from cfs_contracts.streams import NODES
from cfs_contracts.tier import TIER_CONFIG_KEY, TIER_STATE_KEY, TierConfig, TierState

log = logging.getLogger(__name__)
T = TypeVar("T")

app = typer.Typer(
    help="Operate the cluster: node states, Raft, drain and remove (operator guide).",
    no_args_is_help=True,
)

ClusterOpt = Annotated[
    str | None, typer.Option("--cluster", help="NATS URLs, comma-separated (or CFS_NATS_URLS)")
]
SiteOpt = Annotated[str | None, typer.Option("--site", help="site name (or CFS_SITE)")]
ShardsOpt = Annotated[
    int | None,
    typer.Option("--shards", min=1, max=999, help="shard count if JetStream cannot list them"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON document on stdout")]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", min=0.5, help="seconds to wait for the command's reply")
]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="follow progress until done")]

CONNECT_TIMEOUT_S = 2.5
REQUEST_TIMEOUT_S = 2.0  # JetStream API calls: a lost quorum must not make us hang
LEASE_MOVE_TIMEOUT_S = 15.0
RESULT_CODES = {"ok": ExitCode.OK, "usage": ExitCode.USAGE}


@dataclass
class Target:
    cluster: str | None = None
    site: str | None = None
    shards: int | None = None


@app.callback()
def _admin(
    ctx: typer.Context, cluster: ClusterOpt = None, site: SiteOpt = None, shards: ShardsOpt = None
) -> None:
    ctx.obj = Target(cluster, site, shards)


def _settings(
    ctx: typer.Context, cluster: str | None, site: str | None, shards: int | None
) -> ClientSettings:
    """Command options over group options over CFS_* over the cluster config file."""
    group = ctx.find_object(Target) or Target()
    return client_settings(cluster or group.cluster, site or group.site, shards or group.shards)


def _session(settings: ClientSettings, work: Callable[[Bus], Awaitable[T]]) -> T:
    """Connect, run `work`, close; a permission error NATS reported becomes exit 4."""

    async def go() -> T:
        bus = await settings.connect(
            Role.ADMIN,
            f"cli-{os.getpid()}",
            name="cfs-admin",
            connect_timeout=CONNECT_TIMEOUT_S,
            publish_timeout=REQUEST_TIMEOUT_S,
        )
        try:
            return await work(bus)
        except (BusError, CommandTimeout, SnapshotUnavailable, TimeoutError) as exc:
            denied = _denied(bus)
            if denied:
                raise CliError(f"permission denied: {denied}", ExitCode.FORBIDDEN) from None
            if isinstance(exc, CommandTimeout | SnapshotUnavailable | TimeoutError):
                raise CliError(str(exc) or "timed out") from None
            raise
        finally:
            await bus.close()

    return asyncio.run(go())


def _denied(bus: Bus) -> str | None:
    last = bus.nc.last_error
    text = str(last or "").removeprefix("nats: ")
    return text if last is not None and is_permission_error(text) else None


def _emit(as_json: bool, document: Any, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(document, indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


# -- status -----------------------------------------------------------------------------
@app.command("status")
@one_line_errors
def status(
    ctx: typer.Context,
    cluster: ClusterOpt = None,
    site: SiteOpt = None,
    shards: ShardsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One line per node (UP/SUSPECT/DOWN, lifecycle, capacity) and a shard summary."""
    settings = _settings(ctx, cluster, site, shards)

    async def work(bus: Bus) -> None:
        notes: list[str] = []
        found, names = await asyncio.gather(
            read_node_facts(bus, timeout=2.5),
            discover_shards(bus, settings.shards, timeout=1.5),
            return_exceptions=True,
        )
        if isinstance(names, BaseException):
            raise names
        if isinstance(found, NodeFacts):
            asked = [connected_server_name(bus) or "", *found.known()]
            views, answered = await facts_from_membership(bus, asked, timeout=1.0)
            facts, corrected = merge_views(found, views)
            source = "nodes KV"
            if corrected:
                notes.append(
                    f"the nodes KV is behind for {', '.join(corrected)}: "
                    f"liveness from the membership view of {', '.join(answered)}"
                )
        elif isinstance(found, SnapshotUnavailable):
            if (denied := _denied(bus)) is not None:
                raise CliError(f"permission denied: {denied}", ExitCode.FORBIDDEN) from None
            asked = [connected_server_name(bus) or ""]
            facts, answered = await facts_from_membership(bus, asked, timeout=1.5)
            if not answered:
                raise CliError(f"{found}; and no membership process answered") from None
            source = f"membership view of {', '.join(answered)}"
            notes.append(f"JetStream unavailable ({found}): node states from the {source}")
        else:
            raise found
        budget = 2.5 if source == "nodes KV" else 1.5
        shard_views, backup, tier_config, tier_state = await asyncio.gather(
            asyncio.gather(*(shard_view(bus, s, timeout=budget) for s in names)),
            read_backup_status(bus, timeout=budget),
            read_record(bus, TIER_CONFIG_KEY, TierConfig, timeout=budget),
            read_record(bus, TIER_STATE_KEY, TierState, timeout=budget),
        )
        nodes = facts.known()
        led = [v for v in shard_views if v.writer]
        summary = f"Shards: {len(shard_views)}, {len(led)} with a writer"
        if lost := [v.shard for v in shard_views if v.quorum_lost]:
            summary += f"; journal quorum lost on {', '.join(lost)}"
        document = {
            "source": source,
            "nodes": [node_json(facts, n) for n in nodes],
            "services": service_json(facts),
            "shards": [v.to_dict() for v in shard_views],
            "backup": backup.model_dump(mode="json") if backup else None,
            "tier": tier_state.model_dump(mode="json") if tier_state else None,
            "notes": notes,
        }
        lines = [node_line(facts, n) for n in nodes] + service_lines(facts) + [summary]
        if source == "nodes KV":
            lines += backup_lines(backup, facts.now_ms)
            lines += tier_lines(tier_config, tier_state, facts.now_ms)
        lines += [shard_line(v) for v in shard_views] + [f"Note: {n}" for n in notes]
        _emit(as_json, document, lines)

    _session(settings, work)


# -- export-config ------------------------------------------------------------------------
@app.command("export-config")
@one_line_errors
def export_config(
    ctx: typer.Context,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="a file, or s3://bucket/key (a URL ending in / gets a dated name); "
            "default: stdout",
        ),
    ] = None,
    s3_endpoint: Annotated[
        str | None,
        typer.Option("--s3-endpoint", help="S3 endpoint URL (or CFS_S3_ENDPOINT_URL)"),
    ] = None,
    s3_credentials: Annotated[
        Path | None,
        typer.Option(
            "--s3-credentials",
            help="AWS credentials file for S3 (or CFS_S3_CREDENTIALS_FILE)",
        ),
    ] = None,
    cluster: ClusterOpt = None,
    site: SiteOpt = None,
    shards: ShardsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The cluster config, members and settings as JSON, without secrets."""
    from importlib.metadata import version

    from cfs.admin.export import export_document, settings_defaults
    from cfs.kernel import registry

    settings = _settings(ctx, cluster, site, shards)
    s3 = s3_settings(s3_endpoint, s3_credentials)
    target = _s3_target(output, settings.site) if output and is_s3_url(output) else None

    async def work(bus: Bus) -> tuple[ClusterConfig | None, NodeFacts]:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S * 2):
                config = await read_config(bus)
        except nats.js.errors.BucketNotFoundError:
            raise CliError(f"site {settings.site} is not initialized (cfs cluster init)") from None
        return config, await read_node_facts(bus, timeout=3.0)

    config, facts = _session(settings, work)
    document = export_document(
        config=config,
        facts=facts,
        client=settings,
        s3=s3,
        services={spec.name: settings_defaults(spec.settings()) for spec in registry.specs()},
        version=version("claudefs"),
        now_ms=time.time_ns() // 1_000_000,
    )
    text = json.dumps(document, indent=2) + "\n"
    if output is None or output == "-":
        typer.echo(text, nl=False)
        return
    if target is not None:
        root, key = target
        asyncio.run(_put_export(root, key, text.encode(), s3, settings.site))
        where = str(root.child(key))
    else:
        path = Path(output)
        try:
            write_file_atomically(path, text.encode())
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
        where = str(path)
    size = len(text.encode())
    _emit(
        as_json,
        {"output": where, "bytes": size},
        [f"exported the configuration of site {settings.site} to {where} ({size} bytes)"],
    )


def _s3_target(output: str, site: str) -> tuple[S3Url, str]:
    """(bucket root, object key) of an s3:// --output; a bucket or a URL ending in /
    gets a name of its own, so repeated exports never overwrite each other."""
    try:
        url = S3Url.parse(output)
    except ValueError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None
    key = url.prefix
    if not key or output.rstrip().endswith("/"):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        key = url.key(f"cfs-config-{site}-{stamp}.json")
    return S3Url(url.bucket), key


async def _put_export(root: S3Url, key: str, data: bytes, s3: S3Settings, site: str) -> None:
    async with open_store(root, s3) as store:
        await store.put(key, data, metadata={"cfs-format": "config-export", "cfs-site": site})


# -- raft-status / raft-debug -------------------------------------------------------------
@app.command("raft-status")
@one_line_errors
def raft_status(
    ctx: typer.Context,
    cluster: ClusterOpt = None,
    site: SiteOpt = None,
    shards: ShardsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per shard: the writer lease (holder, term, age) and the journal's Raft group."""
    settings = _settings(ctx, cluster, site, shards)

    async def work(bus: Bus) -> None:
        names = await discover_shards(bus, settings.shards, timeout=1.5)
        views = await asyncio.gather(*(shard_view(bus, s) for s in names))
        lines: list[str] = []
        for view in views:
            lines += [shard_line(view), stream_line(view)]
        _emit(as_json, [v.to_dict() for v in views], lines)

    _session(settings, work)


ShardArg = Annotated[str, typer.Option("--shard", help="shard id, e.g. 001")]


async def _one_shard(bus: Bus, settings: ClientSettings, text: str, allow_all: bool) -> list[str]:
    names = await discover_shards(bus, settings.shards, timeout=1.5)
    try:
        return parse_shard(text, names, allow_all=allow_all)
    except ValueError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None


@app.command("raft-debug")
@one_line_errors
def raft_debug(
    ctx: typer.Context,
    shard: ShardArg,
    cluster: ClusterOpt = None,
    site: SiteOpt = None,
    shards: ShardsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Everything known about one shard: both Raft layers and what looks wrong."""
    settings = _settings(ctx, cluster, site, shards)

    async def work(bus: Bus) -> None:
        (name,) = await _one_shard(bus, settings, shard, allow_all=False)
        view = await shard_view(bus, name)
        _emit(as_json, view.to_dict(), debug_lines(view))

    _session(settings, work)


# -- commands through the CMD stream ------------------------------------------------------
def _finish(
    reply: AdminCommandCompleted, as_json: bool, extra: dict[str, Any] | None = None
) -> None:
    """Print the executor's answer and exit with its code (usage 2, refused/failed 1)."""
    document = {**reply.model_dump(mode="json"), **(extra or {})}
    if as_json:
        typer.echo(json.dumps(document, indent=2, default=str))
    elif reply.ok:
        typer.echo(reply.message)
    if not reply.ok:
        if not as_json:
            typer.echo(f"error: {reply.message}", err=True)
        raise typer.Exit(int(RESULT_CODES.get(reply.code, ExitCode.FAILED)))


@app.command("raft-force-election")
@one_line_errors
def raft_force_election(
    ctx: typer.Context,
    shard: ShardArg,
    to: Annotated[str | None, typer.Option("--to", help="node that should take the lease")] = None,
    cluster: ClusterOpt = None,
    site: SiteOpt = None,
    shards: ShardsOpt = None,
    timeout: TimeoutOpt = 15.0,
    as_json: JsonOpt = False,
) -> None:
    """Step the journal's Raft leader down and hand the writer lease over (last resort)."""
    settings = _settings(ctx, cluster, site, shards)

    async def work(bus: Bus) -> tuple[AdminCommandCompleted, ShardView | None]:
        (name,) = await _one_shard(bus, settings, shard, allow_all=False)
        before = await shard_view(bus, name)
        reply = await issue(
            bus,
            service="metadata-raft",
            verb="force-election",
            target=name,
            actor=actor(),
            arguments={"to": to} if to else {},
            timeout=timeout,
        )
        if not reply.ok:
            return reply, None

        async def moved() -> bool:
            view = await shard_view(bus, name)
            if to:
                return view.writer == to
            return bool(view.writer) and view.term > before.term

        settled = await poll_until(moved, LEASE_MOVE_TIMEOUT_S)
        after = await shard_view(bus, name)
        if not settled:
            who = to or "a new writer"
            raise CliError(
                f"{shard_line(after)}: {who} did not take the lease within "
                f"{LEASE_MOVE_TIMEOUT_S:g}s (a replica still replaying its journal may "
                "not lead until it has caught up: try again in a moment)"
            )
        return reply, after

    reply, after = _session(settings, work)
    if after is not None and not as_json:
        typer.echo(shard_line(after))
    _finish(reply, as_json, {"shard": after.to_dict()} if after else None)


@app.command("node-drain")
@one_line_errors
def node_drain(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="node to drain, e.g. storage-1")],
    wait: WaitOpt = True,
    cluster: ClusterOpt = None,
    site: SiteOpt = None,
    shards: ShardsOpt = None,
    timeout: TimeoutOpt = 15.0,
    wait_timeout: Annotated[
        float, typer.Option("--wait-timeout", min=1, help="give up waiting after this")
    ] = 3600.0,
    as_json: JsonOpt = False,
) -> None:
    """Move every fragment and shard lease off NODE, then mark it drained (NodeDrained)."""
    _lifecycle_command(
        "node-drain",
        node,
        wait,
        wait_timeout,
        timeout,
        as_json,
        _settings(ctx, cluster, site, shards),
    )


@app.command("node-remove")
@one_line_errors
def node_remove(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="node to remove, e.g. storage-1")],
    wait: WaitOpt = True,
    cluster: ClusterOpt = None,
    site: SiteOpt = None,
    shards: ShardsOpt = None,
    timeout: TimeoutOpt = 15.0,
    wait_timeout: Annotated[
        float, typer.Option("--wait-timeout", min=1, help="give up waiting after this")
    ] = 3600.0,
    as_json: JsonOpt = False,
) -> None:
    """Remove NODE for good (drained, or dead: its fragments are rebuilt elsewhere)."""
    _lifecycle_command(
        "node-remove",
        node,
        wait,
        wait_timeout,
        timeout,
        as_json,
        _settings(ctx, cluster, site, shards),
    )


def _lifecycle_command(
    verb: str,
    node: str,
    wait: bool,
    wait_timeout: float,
    timeout: float,
    as_json: bool,
    settings: ClientSettings,
) -> None:
    async def work(bus: Bus) -> tuple[AdminCommandCompleted, dict[str, Any] | None]:
        total = await _fragments_on(bus, node)
        async with node_events(bus, node) as events:
            reply = await issue(
                bus, service="membership", verb=verb, target=node, actor=actor(), timeout=timeout
            )
            if not reply.ok or not wait:
                return reply, None
            if not as_json:
                typer.echo(reply.message)
            done = await _follow(bus, verb, node, events, total, wait_timeout, as_json)
            return reply, done

    reply, done = _session(settings, work)
    if done is not None and not as_json:
        typer.echo(_done_line(verb, node, done))
        return
    _finish(reply, as_json, {"result": done} if done is not None else None)


async def _fragments_on(bus: Bus, node: str) -> int:
    """Fragments the node's chunk-store last reported: the progress bar's total."""
    from cfs_contracts.data import StoreRecord, store_record_key

    try:
        kv = await bus.key_value(NODES.bucket)
        entry = await asyncio.wait_for(kv.get(store_record_key(node)), REQUEST_TIMEOUT_S)
        return StoreRecord.model_validate_json(entry.value or b"").fragments
    except Exception:  # no record, or unreadable: an indeterminate bar
        return 0


async def _finished(bus: Bus, verb: str, node: str) -> dict[str, Any] | None:
    """The KV's word that the drain or removal is done (in case an event was missed)."""
    kv = await bus.key_value(NODES.bucket)
    try:
        admin = NodeAdmin.model_validate_json((await kv.get(admin_key(node))).value or b"")
    except Exception:
        return None
    if verb == "node-drain":
        return {"lifecycle": "drained"} if admin.lifecycle is Lifecycle.DRAINED else None
    try:
        job = RepairJob.model_validate_json((await kv.get(repair_key(node))).value or b"")
    except Exception:
        return None
    if job.reason == "removed" and job.done_ms and job.trigger_ms == admin.since_ms:
        return {"fragments_rebuilt": job.fragments_rebuilt, "chunks_lost": job.chunks_lost}
    return None


async def _follow(
    bus: Bus,
    verb: str,
    node: str,
    events: asyncio.Queue[Any],
    total: int,
    wait_timeout: float,
    as_json: bool,
) -> dict[str, Any]:
    """Show RepairProgress as a bar until NodeDrained (drain) or RepairCompleted (remove)."""
    console = Console(stderr=True)
    deadline = time.monotonic() + wait_timeout
    lost = 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=as_json, transient=False) as progress:
        bar = progress.add_task(f"{verb} {node}", total=total or None, info="waiting for repair")
        while time.monotonic() < deadline:
            try:
                event = (await asyncio.wait_for(events.get(), 2.0)).payload
            except TimeoutError:
                if (found := await _finished(bus, verb, node)) is not None:
                    progress.update(bar, completed=total or 1, total=total or 1)
                    return found
                continue
            if isinstance(event, RepairProgress | RepairCompleted):
                info = f"{event.fragments_rebuilt} fragments, {event.bytes_rebuilt} bytes"
                progress.update(bar, completed=event.fragments_rebuilt, info=info)
            if isinstance(event, ChunkLost):
                lost += 1
                console.print(f"chunk lost: {event.path or event.ino} chunk {event.chunk_index}")
            if isinstance(event, NodeDrained) and verb == "node-drain":
                progress.update(bar, completed=total or 1, total=total or 1)
                return {**event.model_dump(mode="json"), "chunks_lost": lost}
            if isinstance(event, RepairCompleted) and verb == "node-remove":
                return event.model_dump(mode="json")
    raise CliError(f"{verb} {node}: not finished within {wait_timeout:g}s (still running)")


def _done_line(verb: str, node: str, done: dict[str, Any]) -> str:
    if verb == "node-drain":
        moved = done.get("fragments_moved")
        leases = done.get("leases_moved")
        detail = f": {moved} fragments and {leases} shard leases moved" if moved is not None else ""
        return f'Node "{node}" is drained{detail}'
    rebuilt, lost = done.get("fragments_rebuilt", 0), done.get("chunks_lost", 0)
    return f'Node "{node}" is removed: {rebuilt} fragments rebuilt, {lost} chunks lost'


# -- raft-force-leader (DANGER) -----------------------------------------------------------
DANGER = (
    "DANGER: forcing {leader} to lead shard(s) {shards}. Operations acknowledged by a quorum "
    "that did not include {leader} may be lost. Do this only if the other nodes are "
    "confirmed destroyed."
)


@app.command("raft-force-leader")
@one_line_errors
def raft_force_leader(
    ctx: typer.Context,
    shard: Annotated[str, typer.Option("--shard", help="shard id, or * for every shard")],
    leader: Annotated[str, typer.Option("--leader", help="the surviving node to lead")],
    yes_i_know: Annotated[
        bool, typer.Option("--yes-i-know", help="skip the confirmation (may lose data)")
    ] = False,
    recovery_dir: RecoveryDirOpt = None,
    wait: RecoveryWaitOpt = 600.0,
    nomad: NomadOpt = None,
    nomad_job: NomadJobOpt = "cfs-nats",
    nats_config: NatsConfigOpt = None,
    nats_store: NatsStoreOpt = None,
    witness_port: WitnessPortOpt = WITNESS_PORT,
    cluster: ClusterOpt = None,
    site: SiteOpt = None,
    shards: ShardsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """DANGER: make LEADER the writer of the shard(s), even without a Raft quorum.

    Without a quorum the site is re-seeded from LEADER's NATS server: its streams are
    exported, the server is restarted on a fresh store as the seed of a new cluster
    (by the cfs dev supervisor, by Nomad with --nomad, or by the operator following
    the printed steps while this command waits), and the export is imported."""
    settings = _settings(ctx, cluster, site, shards)
    options = RecoveryOptions(
        recovery_dir=recovery_dir,
        wait_s=wait,
        nomad=nomad,
        nomad_job=nomad_job,
        nats_config=nats_config,
        nats_store=nats_store,
        witness_port=witness_port,
    )
    if not yes_i_know and not sys.stdin.isatty():
        raise CliError(
            "raft-force-leader may lose acknowledged operations; refusing without "
            "--yes-i-know when stdin is not a terminal",
            ExitCode.USAGE,
        )

    async def work(bus: Bus) -> dict[str, Any]:
        chosen = await _one_shard(bus, settings, shard, allow_all=True)
        await _check_leader_known(bus, leader)
        if not yes_i_know:
            typer.echo(DANGER.format(leader=leader, shards=", ".join(chosen)), err=True)
            if not await asyncio.to_thread(typer.confirm, "Continue?", default=False):
                raise CliError("aborted; nothing changed")
        arguments = {"shard": shard, "leader": leader, "shards": ",".join(chosen)}
        await _audit(bus, arguments, "requested")
        try:
            result = await _force_leader(bus, settings, chosen, leader, options)
        except (BusError, CliError, RecoveryError, TimeoutError) as exc:
            await _audit(bus, arguments, f"failed: {exc}")
            raise
        await _audit(bus, arguments, "succeeded")
        return result

    result = _session(settings, work)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        for line in result["lines"]:
            typer.echo(line)


async def _check_leader_known(bus: Bus, leader: str) -> None:
    try:
        facts: NodeFacts = await read_node_facts(bus, timeout=3.0)
    except SnapshotUnavailable:  # quorum lost: ask the survivors who is a member
        candidates = [connected_server_name(bus) or "", leader]
        facts, _ = await facts_from_membership(bus, candidates, timeout=2.0)
    if leader not in facts.known():
        known = ", ".join(facts.known()) or "none"
        raise CliError(f"unknown node {leader!r} (known: {known})", ExitCode.USAGE)


async def _force_leader(
    bus: Bus, settings: ClientSettings, chosen: list[str], leader: str, options: RecoveryOptions
) -> dict[str, Any]:
    """With quorum, move the lease by handoff; without, recover the quorum on `leader`."""
    views = await asyncio.gather(*(shard_view(bus, s) for s in chosen))
    with_quorum = [v.shard for v in views if v.has_quorum]
    without = [v.shard for v in views if not v.has_quorum]
    lines: list[str] = []
    for name in with_quorum:
        await Lease(bus, f"meta.{name}", node="cfs-admin").request_handoff(leader)

        async def taken(name: str = name) -> bool:
            return (await shard_view(bus, name)).writer == leader

        if not await poll_until(taken, LEASE_MOVE_TIMEOUT_S):
            raise CliError(
                f"shard {name}: {leader} did not take the lease within {LEASE_MOVE_TIMEOUT_S:g}s"
            )
        lines.append(shard_line(await shard_view(bus, name)))
    recovered: str | None = None
    if without:
        try:
            recovered = await recover(
                bus,
                settings,
                survivor=leader,
                server=connected_server_name(bus),
                shards=without,
                options=options,
                say=lambda line: typer.echo(line, err=True),
            )
        except NatsConfigError as exc:
            raise CliError(str(exc), ExitCode.USAGE) from None
        lines.append(
            f"quorum recovered on {leader} for shards {', '.join(without)}"
            + (f": {recovered}" if recovered else "")
        )
    return {
        "leader": leader,
        "handed_over": with_quorum,
        "recovered": without,
        "recovery": str(recovered) if recovered is not None else None,
        "lines": lines,
    }


async def _audit(bus: Bus, arguments: dict[str, str], outcome: str) -> None:
    """AUDIT record of the force; without quorum it may not be writable: say so, go on."""
    record = AdminActionRecorded(
        actor=actor(), command="raft-force-leader", arguments=arguments, outcome=outcome
    )
    try:
        await bus.publish(bus.event(record), timeout=REQUEST_TIMEOUT_S)
    except BusError as exc:
        log.warning("admin.audit_unwritten", extra={"outcome": outcome, "error": str(exc)})
        typer.echo(f"warning: audit record ({outcome}) not written: {exc}", err=True)
