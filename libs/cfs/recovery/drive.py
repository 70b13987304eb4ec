"""`raft-force-leader` without quorum: gather the facts, choose the runner, walk the plan.

Kept apart from the CLI module: the facts come from the admin's open bus, the client
config and the operator's options; the decisions are `cfs.recovery.plan`'s.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from cfs.bus import Bus
from cfs.fuse.config import DEFAULT_CONFIG, ClientSettings, config_path
from cfs.recovery.natsconf import NatsConfigError
from cfs.recovery.plan import (
    WITNESS_PORT,
    Mode,
    RecoveryFacts,
    decide_mode,
    plan_recovery,
)
from cfs.recovery.quorum import Say, recover_quorum
from cfs.recovery.runners import DevRunner, ManualRunner, NomadRunner, Runner
from cfs.security import (
    CredentialsError,
    Identity,
    Role,
    load_credentials,
    public_key,
    render_auth_conf,
)
from cfs.supervisor.devcontrol import running_dev_site


@dataclass(frozen=True)
class RecoveryOptions:
    recovery_dir: Path | None = None  # default: <config dir>/recovery/<stamp>
    wait_s: float = 600.0  # for each wait on the operator (or Nomad)
    nomad: str | None = None  # Nomad HTTP API address
    nomad_job: str = "cfs-nats"
    nats_config: Path | None = None  # the survivor's nats-server config (manual mode)
    nats_store: str | None = None  # its JetStream store dir, when the config does not say
    witness_port: int = WITNESS_PORT


def default_recovery_dir(stamp: str) -> Path:
    """`recovery/<stamp>` beside the cluster config file."""
    return (config_path() or DEFAULT_CONFIG).resolve().parent / "recovery" / stamp


def _port(url: str) -> int | None:
    return urlsplit(url if "://" in url else f"nats://{url}").port or 4222


def survivor_url(bus: Bus, urls: list[str]) -> tuple[str, list[str]]:
    """(the URL of the server the admin is connected to, the other URLs of the site)."""
    connected = bus.nc.connected_url
    port = connected.port if connected is not None else None
    host = connected.hostname if connected is not None else None
    for url in urls:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        if _port(url) == port and parts.hostname in (host, None):
            return url, [u for u in urls if u != url]
    if connected is None:
        return urls[0], urls[1:]
    return f"nats://{host}:{port}", list(urls)


def admin_admission(settings: ClientSettings) -> str | None:
    """An `authorization` block admitting the admin key only; None on a site without
    our NKey credentials (nothing then keeps services out: the plan says so)."""
    credentials = settings.credentials_for(Role.ADMIN)
    if credentials is None:
        return None
    try:
        loaded = load_credentials(credentials)
    except CredentialsError:  # a JWT `.creds` file: operator mode, not ours to rewrite
        return None
    key = public_key(loaded.seed)
    return render_auth_conf([(Identity(Role.ADMIN.value), key)], settings.site, settings.shards)


async def recover(
    bus: Bus,
    settings: ClientSettings,
    *,
    survivor: str,
    server: str | None,
    shards: list[str],
    options: RecoveryOptions,
    say: Say,
) -> str:
    """Plan and run the recovery; NatsConfigError for what the operator must supply."""
    control = running_dev_site()
    mode = decide_mode(control is not None, options.nomad)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if options.recovery_dir is not None:
        recovery_dir = options.recovery_dir.resolve()
    elif mode is Mode.DEV and control is not None:
        recovery_dir = control.state_dir / "recovery" / stamp
    else:
        recovery_dir = default_recovery_dir(stamp)
    if (recovery_dir / "export" / "manifest.json").exists():
        raise NatsConfigError(f"{recovery_dir} already holds an export: choose another directory")
    url, lost = survivor_url(bus, list(settings.nats_urls))
    runner: Runner
    config_file: PurePosixPath | None = None
    config_text: str | None = None
    if mode is Mode.DEV and control is not None:
        runner = DevRunner(control)
    elif mode is Mode.NOMAD and options.nomad:
        nomad = NomadRunner(options.nomad, site=settings.site, job=options.nomad_job)
        config_text = await nomad.prepare(survivor)
        runner = nomad
    else:
        runner = ManualRunner()
        if options.nats_config is not None:
            try:
                config_text = options.nats_config.read_text()
            except OSError as exc:
                raise NatsConfigError(
                    f"cannot read --nats-config {options.nats_config}: {exc.strerror}"
                ) from None
            config_file = PurePosixPath(options.nats_config.resolve())
    facts = RecoveryFacts(
        site=settings.site,
        shards=tuple(shards),
        survivor=survivor,
        server=server or survivor,
        url=url,
        lost_urls=tuple(lost),
        recovery_dir=recovery_dir,
        stamp=stamp,
        system_password=secrets.token_hex(16),
        config_file=config_file,
        config_text=config_text,
        store_dir=options.nats_store,
        admission=admin_admission(settings),
        witness_port=options.witness_port,
    )
    plan = plan_recovery(mode, facts)
    return await recover_quorum(settings, plan, runner, wait_s=options.wait_s, say=say)
