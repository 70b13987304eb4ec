"""Where the object store is, how long a call may take, and where its keys are kept.

`S3Settings` comes, like the NATS client settings, from keyword arguments (command-line
flags), then `CFS_S3_*` variables, then the cluster config file (`$CFS_CONFIG`, else
`./.cfs-dev/cluster.json`), whose S3 keys carry an `s3_` prefix because the file is
shared with the NATS settings:

    cluster.json             variable                    field
    s3_endpoint              CFS_S3_ENDPOINT_URL         endpoint_url
    s3_region                CFS_S3_REGION               region
    s3_credentials_file      CFS_S3_CREDENTIALS_FILE     credentials_file
    (other fields)           CFS_S3_<FIELD>              deadline_s, ...

No secret is ever part of the settings, so they can be logged and exported: the keys
live in `credentials_file`, in the AWS shared-credentials format (the profile named
by `profile`, default `[default]`):

    [default]
    aws_access_key_id = AKIA...
    aws_secret_access_key = ...
    # aws_session_token = ...   (optional, for temporary credentials)

Without a credentials file the standard AWS chain applies (AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, instance roles).
"""

from __future__ import annotations

import configparser
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cfs.fuse.config import ConfigError, config_path
from cfs.objstore.errors import ObjectStoreError

MiB = 1024 * 1024
# S3 refuses multipart parts below 5 MiB (except the last one).
MIN_PART_BYTES = 5 * MiB

# cluster.json key -> field. Only these are read from the shared file.
CLUSTER_FILE_KEYS = {
    "s3_endpoint": "endpoint_url",
    "s3_region": "region",
    "s3_credentials_file": "credentials_file",
}


class S3Settings(BaseSettings):
    """How to reach the object store. Holds no secret (see the module docstring)."""

    model_config = SettingsConfigDict(env_prefix="CFS_S3_", extra="ignore")

    endpoint_url: str | None = Field(
        default=None, description="S3 API endpoint (MinIO, moto); None: AWS S3 in `region`"
    )
    region: str = Field(default="us-east-1", min_length=1)
    credentials_file: Path | None = Field(
        default=None,
        description="AWS credentials-file format; None: the standard AWS credential chain",
    )
    profile: str = Field(default="default", description="section of `credentials_file`")
    deadline_s: float = Field(
        default=30.0,
        gt=0,
        description="how long one call retries temporary failures before it fails with "
        "ObjectStoreUnavailable (an outage is one clear error, never a hang)",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, description="per TCP connect")
    read_timeout_s: float = Field(
        default=20.0, gt=0, description="per socket read: a stalled server is given up on"
    )
    multipart_threshold_bytes: int = Field(
        default=64 * MiB, ge=MIN_PART_BYTES, description="put_file above this: multipart"
    )
    multipart_chunk_bytes: int = Field(default=16 * MiB, ge=MIN_PART_BYTES)
    multipart_concurrency: int = Field(default=4, ge=1, le=64)
    list_page_size: int = Field(
        default=1000, ge=1, le=1000, description="keys per LIST request (S3's maximum: 1000)"
    )

    @property
    def endpoint(self) -> str:
        """For messages: where the store is."""
        return self.endpoint_url or f"AWS S3 ({self.region})"

    @property
    def credentials_source(self) -> str:
        """For messages: where the keys come from (a file name, never its content)."""
        if self.credentials_file is None:
            return "the AWS credential chain (AWS_ACCESS_KEY_ID, ~/.aws, instance role)"
        return f"{self.credentials_file} [{self.profile}]"

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
        return (init_settings, env_settings, ClusterFileSource(settings_cls, path))


class ServiceS3Settings(S3Settings):
    """A service process's S3 settings: its environment (`CFS_S3_*`) only. The
    operator's cluster file (`CFS_CONFIG`) describes how a client finds the cluster;
    a service inheriting that variable must neither read nor depend on the file."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)


class ClusterFileSource(PydanticBaseSettingsSource):
    """The `s3_*` keys of the cluster config file; a relative credentials file is
    taken relative to the config file's directory."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cluster config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"cluster config {path}: not a JSON object")
        self._values: dict[str, Any] = {}
        for key, name in CLUSTER_FILE_KEYS.items():
            value = data.get(key)
            if value is None:
                continue
            if name == "credentials_file":
                value = path.resolve().parent / Path(str(value)).expanduser()
            self._values[name] = value

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def s3_settings(
    endpoint_url: str | None = None,
    credentials_file: Path | None = None,
    region: str | None = None,
) -> S3Settings:
    """Settings with the command-line values that were given laid over the rest."""
    overrides: dict[str, object] = {}
    if endpoint_url:
        overrides["endpoint_url"] = endpoint_url
    if credentials_file is not None:
        overrides["credentials_file"] = credentials_file
    if region:
        overrides["region"] = region
    return S3Settings(**overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class S3Credentials:
    """An access key read from a credentials file; the secret is never in a repr."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    def client_kwargs(self) -> dict[str, str]:
        kwargs = {
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
        }
        if self.session_token:
            kwargs["aws_session_token"] = self.session_token
        return kwargs


def load_credentials(path: Path, profile: str = "default") -> S3Credentials:
    """Read one profile of an AWS credentials file; ObjectStoreError naming the file
    (never a value from it) when it cannot be used."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open() as f:
            parser.read_file(f)
    except OSError as exc:
        raise ObjectStoreError(f"S3 credentials file {path}: {exc.strerror or exc}") from None
    except configparser.Error:
        raise ObjectStoreError(
            f"S3 credentials file {path}: not in the AWS credentials-file format "
            f"([{profile}] with aws_access_key_id and aws_secret_access_key)"
        ) from None
    if not parser.has_section(profile):
        found = ", ".join(parser.sections()) or "none"
        raise ObjectStoreError(
            f"S3 credentials file {path}: no [{profile}] section (sections: {found})"
        )
    section = parser[profile]
    missing = [k for k in ("aws_access_key_id", "aws_secret_access_key") if not section.get(k)]
    if missing:
        raise ObjectStoreError(f"S3 credentials file {path} [{profile}]: no {', '.join(missing)}")
    return S3Credentials(
        access_key_id=section["aws_access_key_id"].strip(),
        secret_access_key=section["aws_secret_access_key"].strip(),
        session_token=(section.get("aws_session_token") or "").strip() or None,
    )


def write_credentials_file(
    path: Path, access_key_id: str, secret_access_key: str, profile: str = "default"
) -> Path:
    """Write a credentials file readable by its owner only (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# S3 credentials for ClaudeFS (AWS credentials-file format). Keep it mode 0600.\n"
        f"[{profile}]\naws_access_key_id = {access_key_id}\n"
        f"aws_secret_access_key = {secret_access_key}\n"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
