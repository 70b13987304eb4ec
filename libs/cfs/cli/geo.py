"""`cfs admin replication-link` and `replication-status`: the two sites' journals
shipped to each other (DESIGN.md §8; guide scenarios 4 and 6).

Each site holds `GEO_IN`, the peer's shard journals sourced over the leaf-node
link; `replication-link --peer SITE`, run once on each site, makes it. The status
reads both directions: the inbound one from this site's stream, the outbound one
from the peer's (over the link: when it cannot be read, that is the partition).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated, Any

import nats.errors
import nats.js.errors
import typer
from nats.js.client import JetStreamContext

from cfs.admin.client import actor, record_action
from cfs.admin.snapshot import read_record
from cfs.bus import Bus
from cfs.cli.admin import JsonOpt, _session, _settings, app
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.client import MetadataClient
from cfs.cluster import read_config
from cfs.geo import (
    UNREACHABLE,
    GeoError,
    Inbound,
    ensure_inbound,
    last_copied,
    peer_reachable,
    read_active,
    read_inbound,
)
from cfs.hlc import system_wall_ms
from cfs_contracts.fs.records import ROOT_INO
from cfs_contracts.geo import (
    CONFLICTS_OPEN_KEY,
    GEO_ACTIVE_KEY,
    GEO_APPLIED_KEY,
    GEO_PEER_KEY,
    ActiveSite,
    GeoApplied,
    GeoPeer,
    OpenConflicts,
    newest_active,
)
from cfs_contracts.members import ClusterConfig
from cfs_contracts.streams import NODES, meta_stream, shard_name

PEER_TIMEOUT_S = 5.0  # a request over the link; no answer in time: partitioned
BAR = 10


async def _peer_config(bus: Bus, peer: str) -> ClusterConfig:
    """The peer's cluster config, read over the link from its own JetStream domain."""
    try:
        config = await read_config(bus, bus.nc.jetstream(domain=peer, timeout=PEER_TIMEOUT_S))
    except UNREACHABLE:
        raise CliError(
            f"site {peer} does not answer over the site link (is it up, and this site's "
            "NATS linked to it?)",
            ExitCode.UNREACHABLE,
        ) from None
    except nats.js.errors.BucketNotFoundError:
        config = None
    if config is None:
        raise CliError(f"site {peer} answers but is not initialized (cfs cluster init)")
    return config


async def read_peer(bus: Bus) -> GeoPeer | None:
    return await read_record(bus, GEO_PEER_KEY, GeoPeer)


@app.command("replication-link")
@one_line_errors
def replication_link(
    ctx: typer.Context,
    peer: Annotated[str, typer.Option("--peer", help="the other site's name")],
    replicas: Annotated[
        int | None, typer.Option("--replicas", min=1, max=5, help="default: as the journals")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Replicate with site PEER: its journals are sourced into this site from now on
    (run it on both sites). The peer must answer over the link, with the same shard
    count; running it again changes nothing."""
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> dict[str, Any]:
        ours = await read_config(bus)
        if ours is None:
            raise CliError("this site is not initialized (cfs cluster init)")
        if peer == ours.site:
            raise CliError(f"--peer {peer} is this site; name the other one", ExitCode.USAGE)
        theirs = await _peer_config(bus, peer)
        if theirs.site != peer:
            raise CliError(f"the domain {peer} answers as site {theirs.site}")
        if theirs.shards != ours.shards:
            raise CliError(
                f"site {peer} has {theirs.shards} shard(s), this one {ours.shards}: "
                "replicated sites need the same count (shard i ships to shard i)"
            )
        existing = await read_peer(bus)
        if existing is not None and existing.site != peer:
            raise CliError(f"this site replicates with {existing.site} already")
        record = existing or GeoPeer(
            site=peer, shards=ours.shards, linked_ms=system_wall_ms(), linked_by=actor()
        )
        copies = (
            replicas
            or (await bus.js.stream_info(meta_stream(shard_name(1)).name)).config.num_replicas
            or 1
        )
        try:
            created = await ensure_inbound(bus.js, record, copies)
        except GeoError as exc:
            raise CliError(str(exc)) from None
        kv = await bus.key_value(NODES.bucket)
        if (await read_active(kv))[0] is None:  # the first site linked starts as the active one
            active = await _active(bus, peer) or ActiveSite(
                site=ours.site,
                epoch=1,
                changed_ms=system_wall_ms(),
                changed_by=f"cfs admin by {actor()}",
                reason="the first site linked",
            )
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await kv.create(GEO_ACTIVE_KEY, active.model_dump_json().encode())
        if existing is None:
            await kv.put(GEO_PEER_KEY, record.model_dump_json().encode())
            # Each site made its own root at init: a change to it here, shipped and
            # merged there, leaves the two roots alike (else they differ until one is).
            await MetadataClient(bus).setattr(ROOT_INO, mtime_now=True)
            await record_action(bus, "replication-link", {"peer": peer}, "linked")
        return {"site": ours.site, "peer": peer, "shards": ours.shards, "created": created}

    result = _session(settings, work)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        verb = "now replicates" if result["created"] else "already replicates"
        typer.echo(
            f"Site {result['site']} {verb} from site {peer} ({result['shards']} shard "
            f"journals sourced into GEO_IN); run it on {peer} too for the way back"
        )


def _unapplied(applied: GeoApplied | None, copied: dict[int, int]) -> int | None:
    """Messages copied but not applied: the replicator's own count, and at least one
    for each shard whose last copied message is past its published position (a
    replicator that stopped publishing does not look caught up). None: no replicator
    ever reported."""
    if applied is None:
        return None
    behind = 0
    for shard, last in copied.items():
        progress = applied.shards.get(shard)
        position = progress.position if progress is not None else 0
        if last > position:
            behind += max(1, progress.pending if progress is not None else 1)
    return max(applied.pending, behind)


def _direction(
    source: str,
    target: str,
    inbound: Inbound | None,
    applied: GeoApplied | None,
    copied: dict[int, int],
    why: str,
    reachable: bool,
    now: int,
) -> dict[str, Any]:
    """One direction: copied over the link (JetStream's source lag), then applied by
    the target's geo-replicator (its published progress)."""
    if inbound is None:
        return {"from": source, "to": target, "connected": False, "state": why}
    connected = reachable and not inbound.errors
    if connected:
        state = "connected"
    elif not reachable:
        state = "unreachable (partition detected)"
    else:
        state = "failing: " + "; ".join(inbound.errors)
    unapplied = _unapplied(applied, copied)
    lag_s = inbound.lag_s(now, reachable)
    if unapplied:  # copied, not applied yet: as old as the last message applied
        newest = [s.newest_ms for s in applied.shards.values() if s.newest_ms] if applied else []
        behind = max(0.0, (now - min(newest)) / 1000) if newest else None
        lag_s = behind if lag_s is None or behind is None else max(lag_s, behind)
    return {
        "from": source,
        "to": target,
        "connected": connected,
        "state": state,
        "lag_events": inbound.lag_events + (unapplied or 0),
        "lag_s": lag_s,
        "copied": inbound.copied,
        "unapplied": unapplied,  # None: no geo-replicator has reported
        "applied_updated_ms": applied.updated_ms if applied is not None else None,
        "shards": [{"shard": s.shard, "lag": s.lag, "error": s.error} for s in inbound.shards],
    }


async def _status(bus: Bus) -> dict[str, Any]:
    ours = await read_config(bus)
    peer = await read_peer(bus)
    if ours is None or peer is None:
        raise CliError(
            "this site replicates with no other (cfs admin replication-link --peer SITE)"
        )
    now = system_wall_ms()
    reachable = await peer_reachable(bus.nc, peer.site, PEER_TIMEOUT_S)
    inbound: Inbound | None = None
    outbound: Inbound | None = None
    applied_here = await read_record(bus, GEO_APPLIED_KEY, GeoApplied)
    applied_there: GeoApplied | None = None
    copied_here: dict[int, int] = {}
    copied_there: dict[int, int] = {}
    why_in = why_out = "unreachable (partition detected)"
    try:
        inbound = await read_inbound(bus.js, peer.site)
        copied_here = await last_copied(bus.js, peer.site, peer.shards)
    except GeoError as exc:
        why_in = str(exc)
    if reachable:
        try:
            remote = bus.nc.jetstream(domain=peer.site, timeout=PEER_TIMEOUT_S)
            outbound = await read_inbound(remote, ours.site)
            applied_there = await _peer_applied(remote)
            copied_there = await last_copied(remote, ours.site, peer.shards)
        except UNREACHABLE:
            pass  # unreachable since the probe
        except GeoError as exc:
            why_out = f"not replicated: {exc}"
    active = await _active(bus, peer.site if reachable else None)
    counted = await read_record(bus, CONFLICTS_OPEN_KEY, OpenConflicts)
    return {
        "open_conflicts": counted.open if counted is not None else None,
        "site": ours.site,
        "peer": peer.site,
        "reachable": reachable,
        "active": active.model_dump(mode="json") if active is not None else None,
        "directions": [
            _direction(
                peer.site, ours.site, inbound, applied_here, copied_here, why_in, reachable, now
            ),
            _direction(
                ours.site, peer.site, outbound, applied_there, copied_there, why_out, reachable, now
            ),
        ],
    }


async def _active(bus: Bus, peer: str | None) -> ActiveSite | None:
    """The newest active-site record of this site and (when it answers) the peer."""
    ours, _ = await read_active(await bus.key_value(NODES.bucket))
    theirs: ActiveSite | None = None
    if peer is not None:
        try:
            remote = bus.nc.jetstream(domain=peer, timeout=PEER_TIMEOUT_S)
            theirs, _ = await read_active(await remote.key_value(NODES.bucket))
        except UNREACHABLE:
            pass
    return newest_active((ours, theirs))


def active_line(active: dict[str, Any] | None) -> str:
    if active is None:
        return "Active site: none recorded (clients use their own site)"
    record = ActiveSite.model_validate(active)
    fenced = f"; {record.fenced} takes no new writes" if record.fenced else ""
    why = f"{record.reason}, " if record.reason else ""
    return f"Active site: {record.site} (epoch {record.epoch}: {why}by {record.changed_by}){fenced}"


async def _peer_applied(remote: JetStreamContext) -> GeoApplied | None:
    """The peer's geo-replicator progress, from its nodes bucket over the link."""
    try:
        kv = await remote.key_value(NODES.bucket)
        entry = await kv.get(GEO_APPLIED_KEY)
    except nats.js.errors.KeyNotFoundError:
        return None
    return GeoApplied.model_validate_json(entry.value) if entry.value else None


async def replication_caught_up(bus: Bus) -> str:
    """ "" when both directions are connected with nothing to copy or apply; else why not."""
    status = await _status(bus)
    behind = [
        f"{d['from']} -> {d['to']}: {d['state']}, {d.get('lag_events', '?')} event(s) behind"
        for d in status["directions"]
        if not d["connected"] or d["lag_events"] or d.get("unapplied")
    ]
    return "; ".join(behind)


def _bar(direction: dict[str, Any]) -> str:
    done = direction["copied"]
    total = done + direction["lag_events"]
    filled = BAR if total == 0 else int(BAR * done / total)
    return f"[{'█' * filled}{'░' * (BAR - filled)}]"


def _render(status: dict[str, Any]) -> list[str]:
    lines = [
        f"Replication between {status['site']} (here) and {status['peer']}:",
        "  " + active_line(status.get("active")),
    ]
    if status.get("open_conflicts"):
        lines.append(f"  Open conflicts: {status['open_conflicts']} (cfs admin show-conflicts)")
    for d in status["directions"]:
        head = f"  {d['from']} -> {d['to']}: "
        if "copied" not in d:
            lines.append(head + d["state"])
            continue
        lag = f"{d['lag_events']} event(s)"
        if d["lag_s"] is not None:
            lag += f", {d['lag_s']:.1f} s"
        if not d["connected"]:
            newest = "" if d["lag_s"] is None else f"; newest copied event {d['lag_s']:.0f} s old"
            lines.append(head + d["state"] + newest)
        elif d["lag_events"]:
            lines.append(head + f"Lag resolving... {_bar(d)} {lag} to go")
        else:
            lines.append(head + f"connected, lag 0 ({d['copied']} journal messages copied)")
    return lines


@app.command("replication-status")
@one_line_errors
def replication_status(
    ctx: typer.Context,
    watch: Annotated[
        float | None,
        typer.Option("--watch", min=0.2, help="print again every SECONDS until interrupted"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Both directions between this site and its peer: connected or unreachable
    (partition detected), lag in journal events and seconds, progress while catching
    up. Exits 3 when a direction is not connected."""
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> dict[str, Any]:
        while True:
            status = await _status(bus)
            if watch is None:
                return status
            typer.echo(json.dumps(status) if as_json else "\n".join(_render(status)))
            await asyncio.sleep(watch)

    status = _session(settings, work)
    typer.echo(json.dumps(status) if as_json else "\n".join(_render(status)))
    if not all(d["connected"] for d in status["directions"]):
        raise typer.Exit(ExitCode.UNREACHABLE)
