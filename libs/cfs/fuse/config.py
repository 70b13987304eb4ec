"""What a client needs to find the cluster, and how to tell whether a mount is ours.

Kept free of pyfuse3 so `cfs fs` and `cfs umount` load quickly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from cfs.security import Role, credentials_path
from cfs.settingtypes import UrlList
from cfs.tls import ca_path

if TYPE_CHECKING:
    from cfs.bus import Bus

FSNAME = "claudefs"
# Written by `cfs dev up` and `cfs cluster init`; found from the working directory.
DEFAULT_CONFIG = Path(".cfs-dev") / "cluster.json"


class ConfigError(Exception):
    """The cluster config file named cannot be used."""


def config_path() -> Path | None:
    """The cluster config file: $CFS_CONFIG, else ./.cfs-dev/cluster.json when present."""
    named = os.environ.get("CFS_CONFIG")
    if named:
        return Path(named)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


class PeerSite(BaseModel):
    """The other site of a replicated pair: where a client goes when it is active."""

    site: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    nats_urls: list[str] = Field(min_length=1)
    credentials_dir: Path | None = None


class ClientSettings(BaseSettings):
    """Where the cluster is: from flags, then `CFS_*` variables, then the cluster config
    file (`config_path()`), then these defaults."""

    model_config = SettingsConfigDict(env_prefix="CFS_", extra="ignore")

    site: str = "local"
    nats_urls: UrlList = Field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    nats_credentials: Path | None = Field(
        default=None, description="one credentials file for every command (overrides the dir)"
    )
    credentials_dir: Path | None = Field(
        default=None,
        description="per-role credentials written by `cfs cluster init` (admin.nk, client.nk)",
    )
    nats_ca: Path | None = Field(
        default=None,
        description="the site CA for NATS TLS (default: tls/ca.pem beside the credentials)",
    )
    shards: int = Field(default=1, ge=1, le=999, description="fixed at `cfs cluster init`")
    peer: PeerSite | None = Field(
        default=None,
        description="the other site of a replicated pair (mounts follow the active site)",
    )
    log_level: str = "INFO"
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="the mount's Prometheus `/metrics` port; 0: none"
    )
    metrics_host: str = "127.0.0.1"
    op_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="how long a metadata call waits for a shard leader before it fails "
        "with `Leader not available` (covers writer and NATS failover)",
    )

    def credentials_for(self, role: Role) -> Path | None:
        """The file to connect with as `role`: `nats_credentials` when set, else the
        role's file in `credentials_dir` when that holds one (else anonymous, which a
        secured server refuses with a clear authorization error)."""
        if self.nats_credentials is not None:
            return self.nats_credentials
        if self.credentials_dir is not None:
            path = credentials_path(self.credentials_dir, role)
            if path.is_file():
                return path
        return None

    def peer_settings(self) -> ClientSettings | None:
        """The same client, for the peer site (None without one, or when `--site` named
        the config's peer: then there is no other site to follow)."""
        if self.peer is None or self.peer.site == self.site:
            return None
        return self.model_copy(
            update={
                "site": self.peer.site,
                "nats_urls": self.peer.nats_urls,
                "credentials_dir": self.peer.credentials_dir,
                "nats_credentials": None,
                "nats_ca": None,
                "peer": None,
            }
        )

    def tls_ca(self) -> Path | None:
        """`nats_ca`, else the site CA in `credentials_dir` (also for a command run
        without credentials: it is then refused for them, not for TLS)."""
        if self.nats_ca is not None:
            return self.nats_ca
        if self.credentials_dir is not None:
            found = ca_path(self.credentials_dir)
            return found if found.is_file() else None
        return None

    async def connect(self, role: Role, node: str, **options: Any) -> Bus:
        """A `Bus` to this cluster with `role`'s credentials (`options`: Bus.connect's)."""
        from cfs.bus import Bus  # `cfs umount` and `cfs fs --help` stay quick

        options.setdefault("tls_ca", self.tls_ca())
        return await Bus.connect(
            self.nats_urls,
            site=self.site,
            node=node,
            credentials=self.credentials_for(role),
            **options,
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = config_path()
        if path is None:
            return (init_settings, env_settings)
        if not path.is_file():
            raise ConfigError(f"cluster config {path} does not exist (CFS_CONFIG)")
        _check_json_object(path)
        return (init_settings, env_settings, JsonConfigSettingsSource(settings_cls, path))


def _check_json_object(path: Path) -> None:
    """The cluster config must be a JSON object; say so in one line naming the file
    (pydantic-settings would raise its parser's own error, or ignore a `null`)."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cluster config {path}: {exc.strerror or exc}") from None
    except RecursionError:
        raise ConfigError(f"cluster config {path}: not JSON: nested too deeply") from None
    except ValueError as exc:  # not UTF-8, not JSON
        raise ConfigError(f"cluster config {path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"cluster config {path}: must hold a JSON object, not {type(data).__name__}"
        )


def client_settings(
    cluster: str | None = None, site: str | None = None, shards: int | None = None
) -> ClientSettings:
    """Settings with command-line values (a comma-separated URL list) laid over the env."""
    overrides: dict[str, object] = {}
    if cluster:
        overrides["nats_urls"] = [u.strip() for u in cluster.split(",") if u.strip()]
    if site:
        overrides["site"] = site
    if shards:
        overrides["shards"] = shards
    try:
        return ClientSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:  # without the input values: they may hold secrets
        err = exc.errors(include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ConfigError(
            f"bad client settings (CFS_* or {_source()}): {where}: {err['msg']}"
        ) from None
    except SettingsError as exc:  # a variable or file that is not what the field takes
        cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
        raise ConfigError(f"bad client settings (CFS_* or {_source()}): {exc}{cause}") from None


def _source() -> str:
    path = config_path()
    return str(path) if path is not None else "no cluster config file"


def is_fuse_mount(path: Path | str) -> bool:
    """Is `path` the mount point of a FUSE file system (per /proc/self/mountinfo)?"""
    # Resolve symlinks above the mount point only: stat-ing a dead mount would hang.
    absolute = os.path.abspath(path)
    target = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        head, _, tail = line.partition(" - ")
        fields = head.split()
        if len(fields) < 5 or not tail:
            continue
        fstype = tail.split()[0]
        if _unescape(fields[4]) == target and (fstype == "fuse" or fstype.startswith("fuse.")):
            return True
    return False


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo (octal)."""
    raw = field.encode()
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")
