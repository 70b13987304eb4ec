"""`cfs admin failover-prepare`, `failover-test`, `failover`, `failback` and
`replication-sync`: moving the active site between two sites (DESIGN.md §8; guide
scenario 4 and the annual failover test).

Which site clients write to is the `geo.active` record, kept in both sites' `nodes`
buckets (`cfs_contracts.geo.ActiveSite`; each geo-replicator adopts the newer one).
A planned move fences the source (its shard writers refuse client mutations), waits
until the target has applied every message of the source's journal, then names the
target active and lifts the fence: nothing acknowledged on the source stays behind.
When the source does not answer, `failover` names the target active on the target
alone (what the source wrote and did not ship is the RPO); the source adopts the
newer record when it is back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from nats.js.kv import KeyValue

from cfs.admin.client import actor, record_action
from cfs.bus import Bus
from cfs.cli.admin import JsonOpt, _session, _settings, app
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.cli.geo import PEER_TIMEOUT_S, _status, read_peer
from cfs.client import MetadataClient
from cfs.client.shard_admin import ShardAdminRefused, shard_admin
from cfs.cluster import read_config
from cfs.geo import UNREACHABLE, peer_reachable, read_active
from cfs.hlc import system_wall_ms
from cfs.ids import new_id
from cfs_contracts.fs.records import ROOT_INO
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.fs.shard_admin import Republish, ShardPosition
from cfs_contracts.geo import GEO_ACTIVE_KEY, ActiveSite, newest_active
from cfs_contracts.streams import NODES

PROBE_PREFIX = ".cfs-failover-test-"  # the write probe's scratch name, in the root
POLL_S = 0.2

TimeoutSOpt = Annotated[
    float, typer.Option("--timeout", min=1.0, help="seconds to wait for the journal to drain")
]


@dataclass(frozen=True)
class Pair:
    here: str
    peer: str
    shards: int

    def check(self, **named: str) -> None:
        """Each `--flag SITE` names one of the two sites, and they differ."""
        known = (self.here, self.peer)
        for flag, site in named.items():
            if site not in known:
                raise CliError(
                    f"--{flag} {site}: no such site (sites: {', '.join(known)})", ExitCode.USAGE
                )
        if len(set(named.values())) != len(named):
            flags = " and ".join(f"--{f}" for f in named)
            raise CliError(f"{flags} name the same site", ExitCode.USAGE)


async def _pair(bus: Bus) -> Pair:
    ours, peer = await read_config(bus), await read_peer(bus)
    if ours is None or peer is None:
        raise CliError(
            "this site replicates with no other (cfs admin replication-link --peer SITE)"
        )
    return Pair(ours.site, peer.site, ours.shards)


class Sites:
    """Both sites' active-site records, read and written over one connection."""

    def __init__(self, bus: Bus, pair: Pair) -> None:
        self.bus = bus
        self.pair = pair

    async def kv(self, site: str) -> KeyValue:
        if site == self.bus.site:
            return await self.bus.key_value(NODES.bucket)
        remote = self.bus.nc.jetstream(domain=site, timeout=PEER_TIMEOUT_S)
        return await remote.key_value(NODES.bucket)

    async def reachable(self, site: str) -> bool:
        return site == self.bus.site or await peer_reachable(self.bus.nc, site, PEER_TIMEOUT_S)

    async def records(self) -> dict[str, ActiveSite | None]:
        """Each answering site's record (None: it has none)."""
        found: dict[str, ActiveSite | None] = {}
        for site in (self.pair.here, self.pair.peer):
            try:
                found[site], _ = await read_active(await self.kv(site))
            except UNREACHABLE:
                continue
        return found

    async def current(self) -> ActiveSite | None:
        return newest_active((await self.records()).values())

    async def change(self, site: str, reason: str, fenced: str | None = None) -> ActiveSite:
        """A record superseding both sites', put on every site that answers (at least
        `site`'s when it is the one named active)."""
        records = await self.records()
        epoch = max((r.epoch for r in records.values() if r is not None), default=0) + 1
        record = ActiveSite(
            site=site,
            epoch=epoch,
            changed_ms=system_wall_ms(),
            changed_by=f"cfs admin by {actor()}",
            reason=reason,
            fenced=fenced,
        )
        written = []
        for target in records:
            try:
                await (await self.kv(target)).put(GEO_ACTIVE_KEY, record.model_dump_json().encode())
                written.append(target)
            except UNREACHABLE:
                continue
        if site not in written and fenced is None:
            raise CliError(f"site {site} does not answer: it cannot be made active")
        return record


async def _poll(what: str, check: Callable[[], Awaitable[str]], timeout: float) -> float:
    """Wait until `check` returns "" (else it says why not); the seconds it took."""
    start = time.monotonic()
    while True:
        why = await check()
        if not why:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise CliError(f"{what}: still {why} after {timeout:g}s")
        await asyncio.sleep(POLL_S)


async def _fence_holds(bus: Bus, pair: Pair, site: str, epoch: int, timeout: float) -> None:
    """Every shard writer of `site` refuses client writes under record `epoch`."""
    view = bus if site == bus.site else bus.for_site(site)

    async def check() -> str:
        open_ = []
        for shard in range(1, pair.shards + 1):
            try:
                reply = await shard_admin(view, shard, ShardPosition(), deadline_s=PEER_TIMEOUT_S)
            except ShardAdminRefused as exc:
                open_.append(f"shard {shard:03d} ({exc})")
                continue
            if reply.fence_epoch < epoch:
                open_.append(f"shard {shard:03d}")
        return f"taking writes on {site}: {', '.join(open_)}" if open_ else ""

    await _poll(f"fencing site {site}", check, timeout)


async def _drain(bus: Bus, source: str, target: str, timeout: float) -> float:
    """Wait until `target` has copied and applied all of `source`'s journal."""

    async def check() -> str:
        status = await _status(bus)
        for d in status["directions"]:
            if d["from"] == source and d["to"] == target:
                if not d["connected"]:
                    return f"{source} -> {target} {d['state']}"
                if d["lag_events"] or d.get("unapplied") is None:
                    return f"{d['lag_events']} event(s) of {source} not applied on {target}"
        return ""

    return await _poll(f"draining {source} to {target}", check, timeout)


async def _prepare(
    bus: Bus, pair: Pair, source: str, target: str, timeout: float
) -> dict[str, Any]:
    sites = Sites(bus, pair)
    for site in (source, target):
        if not await sites.reachable(site):
            raise CliError(f"site {site} does not answer over the site link", ExitCode.UNREACHABLE)
    current = await sites.current()
    active = current.site if current is not None else source
    record = await sites.change(
        active, f"failover from {source} to {target} in preparation", fenced=source
    )
    await _fence_holds(bus, pair, source, record.epoch, timeout)
    drained_s = await _drain(bus, source, target, timeout)
    return {"source": source, "target": target, "epoch": record.epoch, "drained_s": drained_s}


def _run(ctx: typer.Context, work: Callable[[Bus, Pair], Awaitable[dict[str, Any]]]) -> Any:
    settings = _settings(ctx, None, None, None)

    async def go(bus: Bus) -> dict[str, Any]:
        return await work(bus, await _pair(bus))

    return _session(settings, go)


@app.command("failover-prepare")
@one_line_errors
def failover_prepare(
    ctx: typer.Context,
    source: Annotated[str, typer.Option("--source", help="the site to stop writing on")],
    target: Annotated[str, typer.Option("--target", help="the site to move to")],
    abort: Annotated[
        bool, typer.Option("--abort", help="lift the fence instead (no failover after all)")
    ] = False,
    timeout: TimeoutSOpt = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Block new writes on SOURCE (its writers answer EROFS), wait until TARGET has
    applied all of SOURCE's journal (lag 0), and report; `--abort` lifts the block."""

    async def work(bus: Bus, pair: Pair) -> dict[str, Any]:
        pair.check(source=source, target=target)
        if abort:
            sites = Sites(bus, pair)
            current = await sites.current()
            record = await sites.change(
                current.site if current else source, f"failover to {target} called off"
            )
            await record_action(bus, "failover-prepare", {"source": source, "abort": "1"}, "lifted")
            return {"source": source, "target": target, "epoch": record.epoch, "aborted": True}
        result = await _prepare(bus, pair, source, target, timeout)
        await record_action(
            bus, "failover-prepare", {"source": source, "target": target}, "fenced, drained"
        )
        return result

    result = _run(ctx, work)
    if as_json:
        typer.echo(json.dumps(result))
    elif result.get("aborted"):
        typer.echo(f"Site {source} takes writes again (epoch {result['epoch']})")
    else:
        typer.echo(f"Site {source} fenced: new writes refused (epoch {result['epoch']})")
        typer.echo(f"Journal of {source} applied on {target}: lag 0 ({result['drained_s']:.1f}s)")
        typer.echo(f"Ready: cfs admin failover-test --target {target}")


@app.command("failover-test")
@one_line_errors
def failover_test(
    ctx: typer.Context,
    target: Annotated[str, typer.Option("--target", help="the site that would take over")],
    as_json: JsonOpt = False,
) -> None:
    """Whether TARGET can be made active, changing nothing: it answers, it has applied
    everything the other site wrote (lag 0), both sites' shards are equal at equal
    positions, and a write in a scratch name on TARGET works. Exit 1 if any fails."""
    from cfs_metadata.cross_site import cross_site_check

    async def work(bus: Bus, pair: Pair) -> dict[str, Any]:
        pair.check(target=target)
        other = pair.peer if target == pair.here else pair.here
        checks: list[dict[str, Any]] = []

        def add(name: str, ok: bool, detail: str) -> None:
            checks.append({"check": name, "ok": ok, "detail": detail})

        reachable = await Sites(bus, pair).reachable(target)
        add("reachable", reachable, "answers" if reachable else "does not answer")
        if reachable:
            status = await _status(bus)
            into = next(d for d in status["directions"] if d["to"] == target)
            lag = into.get("lag_events")
            caught_up = bool(into["connected"]) and lag == 0 and into.get("unapplied") == 0
            add("lag", caught_up, f"{other} -> {target}: {into['state']}, {lag} event(s) behind")
            report = await cross_site_check(bus, pair.peer, pair.shards)
            detail = "; ".join(report.lines()) or "no shards"
            add("digests", report.exit_code == 0, detail)
            add("write probe", *(await _probe(bus.for_site(target))))
        return {"target": target, "ok": all(c["ok"] for c in checks), "checks": checks}

    result = _run(ctx, work)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for check in result["checks"]:
            mark = "PASS" if check["ok"] else "FAIL"
            typer.echo(f"{mark} {check['check']}: {check['detail']}")
        verdict = "can" if result["ok"] else "cannot"
        typer.echo(f"Site {target} {verdict} take over")
    if not result["ok"]:
        raise typer.Exit(ExitCode.FAILED)


async def _probe(site_bus: Bus) -> tuple[bool, str]:
    """Create, look up and remove a scratch file on the site's metadata."""
    meta = MetadataClient(site_bus, deadline_s=PEER_TIMEOUT_S * 2)
    name = f"{PROBE_PREFIX}{new_id()}"
    start = time.monotonic()
    try:
        made = await meta.create(ROOT_INO, name, mode=0o600)
        found = await meta.lookup(ROOT_INO, name)
        await meta.unlink(ROOT_INO, name)
    except FsError as exc:
        return False, f"/{name}: {exc}"
    if found.ino != made.ino:
        return False, f"/{name}: created inode {made.ino}, found {found.ino}"
    return True, f"created and removed /{name} in {time.monotonic() - start:.2f}s"


@app.command("failover")
@one_line_errors
def failover(
    ctx: typer.Context,
    from_: Annotated[str, typer.Option("--from", help="the active site now")],
    to: Annotated[str, typer.Option("--to", help="the site to make active")],
    timeout: TimeoutSOpt = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Make TO the active site. If FROM answers: fence it, wait until TO has applied
    all of it, then switch (nothing acknowledged is left behind). If FROM does not
    answer: switch on TO alone, and print how far behind TO was (the RPO)."""

    async def work(bus: Bus, pair: Pair) -> dict[str, Any]:
        pair.check(**{"from": from_, "to": to})
        return await _switch(bus, pair, from_, to, timeout)

    _print_switch(_run(ctx, work), as_json)


async def _switch(bus: Bus, pair: Pair, source: str, target: str, timeout: float) -> dict[str, Any]:
    sites = Sites(bus, pair)
    start = time.monotonic()
    result: dict[str, Any] = {"from": source, "to": target}
    if await sites.reachable(source):
        result.update(await _prepare(bus, pair, source, target, timeout))
        result["planned"] = True
    else:
        status = await _status(bus)
        into = next(d for d in status["directions"] if d["to"] == target)
        result.update(planned=False, lag_s=into.get("lag_s"), lag_events=into.get("lag_events"))
    record = await sites.change(target, f"failover from {source}")
    result.update(epoch=record.epoch, seconds=time.monotonic() - start)
    await record_action(
        bus, "failover", {"from": source, "to": target}, f"active {target} (epoch {record.epoch})"
    )
    return result


def _print_switch(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result))
        return
    source, target = result["from"], result["to"]
    if result["planned"]:
        typer.echo(f"Site {source} fenced; its journal applied on {target} (lag 0)")
    else:
        lag = result.get("lag_s")
        behind = "unknown" if lag is None else f"{lag:.1f}s"
        typer.echo(
            f"Site {source} does not answer: switched on {target} alone; {target} was "
            f"{behind} behind ({result.get('lag_events')} event(s)); {source} follows "
            "when it is back"
        )
    typer.echo(
        f"Active site: {target} (epoch {result['epoch']}, {result['seconds']:.1f}s); "
        "clients follow it"
    )


@app.command("replication-sync")
@one_line_errors
def replication_sync(
    ctx: typer.Context,
    source: Annotated[str, typer.Option("--source", help="the site whose changes to ship")],
    target: Annotated[str, typer.Option("--target", help="the site to bring up to date")],
    timeout: TimeoutSOpt = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Bring TARGET up to date with SOURCE: wait until TARGET has applied everything
    SOURCE wrote (the journal ships itself once the link is up), then compare both
    sites' shard digests at equal positions. Exit 1 when they still differ."""
    from cfs_metadata.cross_site import cross_site_check

    async def work(bus: Bus, pair: Pair) -> dict[str, Any]:
        pair.check(source=source, target=target)
        return await _sync(bus, pair, source, target, timeout, cross_site_check)

    result = _run(ctx, work)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"{source} -> {target}: every journal event applied ({result['drained_s']:.1f}s)"
        )
        if result["shipped"]:
            typer.echo(f"Shipped again from {source}: {result['shipped']} record(s) that differed")
        typer.echo("\n".join(result["check"]))
    if not result["equal"]:
        raise typer.Exit(ExitCode.FAILED)


async def _sync(
    bus: Bus, pair: Pair, source: str, target: str, timeout: float, check: Any
) -> dict[str, Any]:
    """Both journals applied both ways, then the digests compared; what still differs
    and exists on `source` is journaled there again (`Republish`: stamped now, so it
    wins on `target`) and compared once more. Records only `target` holds are left
    for the operator: this never deletes."""
    for site in (source, target):
        if not await Sites(bus, pair).reachable(site):
            raise CliError(
                f"site {site} does not answer: a resync needs both sites", ExitCode.UNREACHABLE
            )
    drained_s = await _drain(bus, source, target, timeout)
    await _drain(bus, target, source, timeout)  # equal positions: both ways applied
    report = await check(bus, pair.peer, pair.shards)
    shipped = await _republish(bus, source, report.records) if report.exit_code == 1 else 0
    if shipped:
        await _drain(bus, source, target, timeout)
        await _drain(bus, target, source, timeout)
        report = await check(bus, pair.peer, pair.shards)
    return {
        "source": source,
        "target": target,
        "drained_s": drained_s,
        "shipped": shipped,
        "equal": report.exit_code == 0,
        "check": report.lines(),
        "report": report.to_dict(),
    }


async def _republish(bus: Bus, source: str, records: list[Any]) -> int:
    """Ask `source`'s shard writers to journal again the inodes and names they hold
    that differ on the other site; how many records were named."""
    view = bus if source == bus.site else bus.for_site(source)
    named = 0
    for shard in sorted({r.shard for r in records}):
        mine = [r for r in records if r.shard == shard and r.side in (source, "both")]
        inodes = tuple(r.number for r in mine if r.kind == "inode")
        dentries = tuple((r.number, r.name) for r in mine if r.kind == "dentry")
        if inodes or dentries:
            op = Republish(sync_id=new_id(), inodes=inodes, dentries=dentries)
            await shard_admin(view, shard, op)
            named += len(inodes) + len(dentries)
    return named


@app.command("failback")
@one_line_errors
def failback(
    ctx: typer.Context,
    from_: Annotated[str, typer.Option("--from", help="the active site now")],
    to: Annotated[str, typer.Option("--to", help="the site to return to")],
    timeout: TimeoutSOpt = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Return to TO: resync it from FROM first (`replication-sync`), then switch as
    `failover` does (FROM fenced and drained, TO made active)."""
    from cfs_metadata.cross_site import cross_site_check

    async def work(bus: Bus, pair: Pair) -> dict[str, Any]:
        pair.check(**{"from": from_, "to": to})
        synced = await _sync(bus, pair, from_, to, timeout, cross_site_check)
        if not synced["equal"]:
            raise CliError(
                f"{to} still differs from {from_} after the resync: "
                + "; ".join(synced["check"])
                + " (cfs admin show-conflicts, then cfs admin replication-sync)"
            )
        switched = await _switch(bus, pair, from_, to, timeout)
        return {**switched, "sync": synced}

    result = _run(ctx, work)
    if not as_json:
        typer.echo(f"{to} resynced from {from_}: shards equal")
    _print_switch(result, as_json)
