"""`cfs admin export-config`: a site's configuration as one JSON document, secrets left out.

What an operator keeps beside a backup (and diffs between sites): the cluster config
recorded at `cfs cluster init`, the members as the nodes KV records them, the settings
the services run with by default, how clients and the object store are reached. Key
material never appears: credentials are named by their files, and a setting that is a
secret (a `SecretStr`, or a name like `*token*`) is listed without its value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import SecretBytes, SecretStr
from pydantic_core import to_jsonable_python
from pydantic_settings import BaseSettings

from cfs.admin.decide import NodeFacts
from cfs.fuse.config import ClientSettings
from cfs.objstore import S3Settings
from cfs_contracts.members import ClusterConfig

FORMAT = "cfs-config-export/1"
SECRET_SHOWN = "<secret: not exported>"
_SECRET_WORDS = ("secret", "token", "password", "seed", "private")
# Who a process is and how it reaches NATS: per process, not a site setting.
_PER_PROCESS = frozenset({"node", "site", "nats_urls", "nats_credentials", "nats_ca", "log_level"})


def is_secret(name: str, value: object) -> bool:
    """A pydantic secret, or a name with a secret's word in it (`cluster_token`, not
    `seeds`: SWIM's seeds are addresses)."""
    words = name.lower().split("_")
    return isinstance(value, SecretStr | SecretBytes) or any(w in _SECRET_WORDS for w in words)


def settings_defaults(settings_type: type[BaseSettings]) -> dict[str, Any]:
    """Each field's default (None when the process must be given one), secrets hidden."""
    found: dict[str, Any] = {}
    for name, info in settings_type.model_fields.items():
        if name in _PER_PROCESS:
            continue
        value = None if info.is_required() else info.get_default(call_default_factory=True)
        found[name] = SECRET_SHOWN if is_secret(name, value) else to_jsonable_python(value)
    return found


def member_json(facts: NodeFacts, node: str) -> dict[str, Any]:
    """One member as the nodes KV records it."""
    member = facts.members.get(node)
    store = facts.stores.get(node)
    state = facts.liveness(node)
    labels = dict(store.labels if store else member.labels if member else {})
    return {
        "node": node,
        "state": state.value if state else None,
        "lifecycle": facts.lifecycle(node).value,
        "labels": labels,
        "swim_address": f"{member.host}:{member.port}" if member else None,
        "capacity_bytes": store.capacity_bytes if store else None,
        "free_bytes": store.free_bytes if store else None,
        "used_bytes": store.used_bytes if store else None,
        "fragments": store.fragments if store else None,
    }


def s3_json(settings: S3Settings) -> dict[str, Any]:
    """The S3 settings: they hold no secret, only the credentials file's name."""
    document: dict[str, Any] = settings.model_dump(mode="json")
    document["credentials"] = "file" if settings.credentials_file else "AWS credential chain"
    return document


def export_document(
    *,
    config: ClusterConfig | None,
    facts: NodeFacts,
    client: ClientSettings,
    s3: S3Settings,
    services: Mapping[str, Mapping[str, Any]],
    version: str,
    now_ms: int,
) -> dict[str, Any]:
    """The export, from what was read; pure, so a test can check it holds no secret."""
    return {
        "format": FORMAT,
        "exported_ms": now_ms,
        "cfs_version": version,
        "cluster": config.model_dump(mode="json") if config is not None else None,
        "topology": {
            "site": client.site,
            "shards": config.shards if config is not None else client.shards,
            "ec": config.ec if config is not None else None,
            "members": [member_json(facts, node) for node in facts.known()],
        },
        "services": {name: dict(values) for name, values in services.items()},
        "client": {
            "site": client.site,
            "nats_urls": list(client.nats_urls),
            "credentials_dir": str(client.credentials_dir) if client.credentials_dir else None,
            "nats_credentials": str(client.nats_credentials) if client.nats_credentials else None,
            "op_timeout_s": client.op_timeout_s,
        },
        "s3": s3_json(s3),
    }
