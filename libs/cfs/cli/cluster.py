"""`cfs cluster init|info`: create a site's streams, buckets and config; show them."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Annotated

import nats.js.errors
import typer

from cfs.admin.client import actor, record_action
from cfs.bus import Bus, BusError
from cfs.bus.errors import is_permission_error
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.cli.tier import change_tier
from cfs.cluster import ClusterInitError, check_ec, init_cluster, new_config, read_config
from cfs.fuse.config import client_settings
from cfs.security import (
    Role,
    begin_rotation,
    ensure_credentials,
    ensure_keys,
    finish_rotation,
    write_auth_conf,
)
from cfs.security import roles as all_roles
from cfs.tls import ensure_server_cert, tls_dir
from cfs_contracts.fs.records import MAX_SITE_INDEX
from cfs_contracts.tier import TierMode

app = typer.Typer(help="Create and inspect a ClaudeFS cluster.", no_args_is_help=True)

ClusterOpt = Annotated[
    str | None, typer.Option("--cluster", help="NATS URLs, comma-separated (or CFS_NATS_URLS)")
]
SiteOpt = Annotated[str | None, typer.Option("--site", help="site name (or CFS_SITE)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
TlsServerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--tls-server",
        help="NAME=HOST[,HOST...]: a nats-server certificate for these addresses "
        "(repeatable; default: one per host of the NATS URLs)",
    ),
]
NodesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--node",
        help="a storage node: its own keys for the per-node services (repeatable; "
        "add a node later by running this again with its name)",
    ),
]
TOKEN_FILE = "cluster-token"
CONFIG_FILE = "cluster.json"
CREDENTIALS_DIR = "credentials"


def _default_config_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/etc/claudefs")
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "claudefs"


@app.command("init")
@one_line_errors
def init(
    bootstrap_node: Annotated[str, typer.Option("--bootstrap-node", help="the first node")],
    cluster_name: Annotated[str, typer.Option("--cluster-name", help="e.g. claudefs-prod")],
    cluster: ClusterOpt = None,
    site: SiteOpt = None,
    shards: Annotated[
        int, typer.Option(min=1, max=999, help="metadata shards; fixed for the cluster's life")
    ] = 1,
    ec: Annotated[str, typer.Option(help="erasure code: auto, ec4+2, ec2+1, copy3, ...")] = "auto",
    replicas: Annotated[
        int | None, typer.Option(min=1, max=5, help="stream replicas (default: min(3, servers))")
    ] = None,
    config_dir: Annotated[
        Path | None,
        typer.Option(
            help="where cluster.json and the cluster token go "
            "(default /etc/claudefs as root, else ~/.config/claudefs)"
        ),
    ] = None,
    site_index: Annotated[
        int,
        typer.Option(
            "--site-index",
            min=0,
            max=MAX_SITE_INDEX,
            help="distinct per replicated site (0 for the first): its inode numbers' range",
        ),
    ] = 0,
    tier: Annotated[
        TierMode, typer.Option("--tier", help="data tier: off, cache or tiered (needs --tier-url)")
    ] = TierMode.OFF,
    tier_url: Annotated[
        str | None, typer.Option("--tier-url", help="s3://bucket/prefix of the data tier")
    ] = None,
    tls_server: TlsServerOpt = None,
    node: NodesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Provision every stream and bucket, record the cluster's shape, write its config.
    With `--tier cache --tier-url s3://…` every file's data also goes to S3; with
    `--tier tiered`, cold files then leave flash (changeable later with
    `cfs admin tier-config`).

    Running it again with the same shape changes nothing; another shard count or
    name is refused (exit 1)."""
    try:
        check_ec(ec)
    except ClusterInitError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None
    if (tier is TierMode.OFF) != (tier_url is None):
        raise CliError(
            f"--tier {tier.value} goes with --tier-url s3://bucket/prefix"
            if tier is not TierMode.OFF
            else "--tier-url goes with --tier cache or --tier tiered",
            ExitCode.USAGE,
        )
    settings = client_settings(cluster, site)
    directory = config_dir or _default_config_dir()
    # The site's own keys when the config names them (a dev site), else new ones.
    settings.credentials_dir = (settings.credentials_dir or directory / CREDENTIALS_DIR).resolve()
    ensure_keys(settings.credentials_dir, settings.site, nodes=node or [bootstrap_node])
    certificates = _ensure_tls(
        settings.credentials_dir, settings.site, tls_server, settings.nats_urls
    )
    wanted = new_config(
        name=cluster_name,
        site=settings.site,
        shards=shards,
        ec=ec,
        bootstrap_node=bootstrap_node,
        created_by=actor(),
        site_index=site_index,
    )

    tls_on: list[bool] = []

    async def go() -> tuple[bool, int]:
        async with await settings.connect(Role.ADMIN, f"cli-{os.getpid()}") as bus:
            tls_on.append(bool(bus.nc._server_info.get("tls_required")))
            count = replicas or max(1, min(3, len(bus.nc.servers)))
            result = await init_cluster(bus, wanted, replicas=count)
            if tier is not TierMode.OFF:
                await change_tier(bus, {"mode": tier, "url": tier_url})
            await record_action(
                bus,
                "cluster init",
                {
                    "cluster_name": cluster_name,
                    "shards": str(shards),
                    "ec": ec,
                    "bootstrap_node": bootstrap_node,
                    "replicas": str(count),
                    "site_index": str(site_index),
                },
                "succeeded" if result.created else "succeeded: already initialized",
            )
            return result.created, count

    try:
        created, count = asyncio.run(go())
    except ClusterInitError as exc:
        raise CliError(str(exc)) from None
    auth_conf = write_auth_conf(settings.credentials_dir, settings.site, shards)
    enforced = asyncio.run(
        _requires_credentials(settings.nats_urls, settings.site, settings.tls_ca())
    )
    config_path, token_path = _write_config(
        directory, settings.site, settings.nats_urls, shards, cluster_name,
        settings.credentials_dir,
    )  # fmt: skip
    summary = {
        "cluster_name": cluster_name,
        "site": settings.site,
        "shards": shards,
        "ec": ec,
        "replicas": count,
        "created": created,
        "config": str(config_path),
        "token": str(token_path),
        "credentials_dir": str(settings.credentials_dir),
        "nats_auth_conf": str(auth_conf),
        "nats_auth_enforced": enforced,
        "tls_dir": str(tls_dir(settings.credentials_dir)),
        "tls_certificates": certificates,
        "nats_tls": bool(tls_on and tls_on[0]),
        "tier": tier.value,
        "tier_url": tier_url,
    }
    if not enforced:
        typer.echo(
            "warning: NATS accepts clients without credentials; add the authorization "
            f"block of {auth_conf} to every nats-server config and restart them "
            "(README: Security)",
            err=True,
        )
    if not summary["nats_tls"]:
        typer.echo(
            "warning: NATS accepts connections without TLS; give every nats-server a "
            f"tls block with its certificate from {tls_dir(settings.credentials_dir)} "
            "(README: Security)",
            err=True,
        )
    if as_json:
        typer.echo(json.dumps(summary))
        return
    verb = "initialized" if created else "was already initialized (nothing changed)"
    typer.echo(
        f"cluster {cluster_name!r} {verb}: site {settings.site}, {shards} shard(s), "
        f"ec {ec}, R{count} streams"
    )
    typer.echo(f"config: {config_path} (use: export CFS_CONFIG={config_path})")
    typer.echo(f"cluster token (for nodes joining): {token_path}")
    typer.echo(
        f"NATS credentials per service: {settings.credentials_dir} (server side: {auth_conf})"
    )


def _ensure_tls(
    directory: Path, site: str, servers: list[str] | None, urls: list[str]
) -> list[str]:
    """The site CA and a certificate per server (kept when they exist); their names."""
    from urllib.parse import urlparse

    wanted: dict[str, list[str]] = {}
    for spec in servers or []:
        name, sep, listed = spec.partition("=")
        if not sep or not name or not listed:
            raise CliError(f"--tls-server {spec!r}: NAME=HOST[,HOST...]", ExitCode.USAGE)
        wanted[name] = listed.split(",")
    if not wanted:
        for url in urls:
            host = urlparse(url if "://" in url else f"nats://{url}").hostname or "127.0.0.1"
            wanted[host] = [host, "127.0.0.1", "localhost"]
    for name, hosts in wanted.items():
        ensure_server_cert(directory, site, name, hosts)
    return sorted(wanted)


async def _requires_credentials(urls: list[str], site: str, ca: Path | None) -> bool:
    """Does NATS refuse a client without credentials (the authorization is in force)?"""
    try:
        bus = await Bus.connect(
            urls,
            site=site,
            node=f"cli-{os.getpid()}-anonymous",
            tls_ca=ca,
        )
    except BusError as exc:
        if is_permission_error(str(exc)):
            return True
        raise
    await bus.close()
    return False


def _write_config(
    directory: Path, site: str, urls: list[str], shards: int, name: str, credentials: Path
) -> tuple[Path, Path]:
    """cluster.json (readable) and the membership token (0600, kept if it exists)."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / CONFIG_FILE
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "cluster_name": name,
                "site": site,
                "nats_urls": urls,
                "shards": shards,
                "credentials_dir": str(credentials),
            },
            indent=2,
        )
        + "\n"
    )
    os.replace(tmp, config_path)
    token_path = directory / TOKEN_FILE
    if not token_path.exists():
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return config_path, token_path


@app.command("credentials")
@one_line_errors
def credentials(
    site: SiteOpt = None,
    shards: Annotated[
        int | None,
        typer.Option(min=1, max=999, help="metadata shards (default: from the cluster config)"),
    ] = None,
    config_dir: Annotated[
        Path | None,
        typer.Option(help="where the credentials/ directory goes (as for `init`)"),
    ] = None,
    rotate: Annotated[
        list[str] | None,
        typer.Option("--rotate", help="replace this role's key (repeatable), e.g. client"),
    ] = None,
    tls_server: TlsServerOpt = None,
    node: NodesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write every role's NATS key and the servers' authorization config, offline.

    Run it before the first start of nats-server with that config (then `cfs cluster
    init` finds the servers already secured), or with --rotate to replace a key:
    reload the servers (`nats-server --signal reload`) and restart that role's
    processes with the new file."""
    settings = client_settings(None, site)
    known = all_roles()
    roles: list[str] = []
    for name in rotate or []:
        if name not in known:
            raise CliError(f"unknown role {name!r} (roles: {', '.join(known)})", ExitCode.USAGE)
        roles.append(name)
    if config_dir is not None:  # named on the command line: wins over the config file's
        directory = config_dir / CREDENTIALS_DIR
    else:
        directory = settings.credentials_dir or _default_config_dir() / CREDENTIALS_DIR
    if roles:  # offline: no old key needs to stay admitted (the servers restart)
        begin_rotation(directory, settings.site, roles)
        finish_rotation(directory, roles)
    conf = ensure_credentials(directory, settings.site, shards or settings.shards, nodes=node or ())
    certificates = _ensure_tls(directory, settings.site, tls_server, settings.nats_urls)
    summary = {
        "credentials_dir": str(directory),
        "nats_auth_conf": str(conf),
        "tls_dir": str(tls_dir(directory)),
        "tls_certificates": certificates,
        "roles": known,
        "rotated": roles,
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(f"NATS credentials per role in {directory}")
    typer.echo(f"server side (add to every nats-server config): {conf}")
    if roles:
        typer.echo(
            f"rotated: {', '.join(summary['rotated'])}; reload the servers, then restart "
            "those processes with the new files"
        )


@app.command("rotate-credentials")
@one_line_errors
def rotate_credentials(
    role: Annotated[
        list[str] | None,
        typer.Option("--role", help="rotate this role's keys (repeatable; default: every role)"),
    ] = None,
    site: SiteOpt = None,
    finish: Annotated[
        bool,
        typer.Option(
            "--finish",
            help="outside cfs dev: drop the old keys, once every process uses the new ones",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds for the whole rotation")] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """New NATS keys for a role without losing a write: the old and the new key are both
    admitted while the role's processes move to the new one, then the old is dropped.

    On a `cfs dev` site everything happens here: servers reloaded, the role's processes
    restarted node by node. Elsewhere this writes the new keys and the servers' config
    admitting both; reload the servers (`nats-server --signal reload`), restart the
    role's processes with the new files, then run it again with `--finish` and reload."""
    from cfs.supervisor.devcontrol import running_dev_site

    settings = client_settings(None, site)
    known = all_roles()
    roles = list(dict.fromkeys(role or known))
    if unknown := [name for name in roles if name not in known]:
        raise CliError(f"unknown role {unknown[0]!r} (roles: {', '.join(known)})", ExitCode.USAGE)
    control = running_dev_site()
    summary: dict[str, object]
    if control is not None and not finish:
        summary = control.call(
            "rotate-credentials", roles=roles, site=settings.site, timeout=timeout + 10
        )
        summary["done"] = True
    else:
        directory = settings.credentials_dir
        if directory is None:
            raise CliError("no credentials_dir in the cluster config (cfs cluster init)")
        if finish:
            rotated = [who.name for who in finish_rotation(directory, roles)]
        else:
            rotated = [who.name for who in begin_rotation(directory, settings.site, roles)]
        conf = write_auth_conf(directory, settings.site, settings.shards)
        summary = {"site": settings.site, "rotated": rotated, "nats_auth_conf": str(conf)}
        summary["done"] = finish
    if as_json:
        typer.echo(json.dumps(summary))
        return
    rotated_keys = summary["rotated"]
    keys = ", ".join(map(str, rotated_keys)) if isinstance(rotated_keys, list) else ""
    if summary["done"] and not finish:
        typer.echo(
            f"rotated on site {summary['site']}: {keys or 'none'} "
            "(servers reloaded, processes moved)"
        )
    elif finish:
        typer.echo(
            f"old keys dropped: {keys or 'none'}; reload the servers (nats-server --signal reload)"
        )
    else:
        typer.echo(
            f"new keys: {keys}; the old ones stay admitted. Now reload the servers "
            "(nats-server --signal reload), restart those roles' processes, then run "
            "`cfs cluster rotate-credentials --finish` and reload again."
        )


@app.command("info")
@one_line_errors
def info(cluster: ClusterOpt = None, site: SiteOpt = None, as_json: JsonOpt = False) -> None:
    """What `cfs cluster init` recorded (exit 1 if the site is not initialized)."""
    settings = client_settings(cluster, site)

    async def go() -> str | None:
        async with await settings.connect(Role.ADMIN, f"cli-{os.getpid()}") as bus:
            try:
                config = await read_config(bus)
            except nats.js.errors.BucketNotFoundError:
                return None
            return None if config is None else config.model_dump_json()

    found = asyncio.run(go())
    if found is None:
        raise CliError(f"site {settings.site} is not initialized (cfs cluster init)")
    data = json.loads(found)
    if as_json:
        typer.echo(found)
    else:
        for key, value in data.items():
            typer.echo(f"{key}: {value}")
