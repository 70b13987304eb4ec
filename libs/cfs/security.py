"""NATS credentials per service with least-privilege subject permissions (DESIGN.md §10).

`cfs cluster init` (and `cfs dev up`) generate one NKey per role. The seed goes into
a 0600 credentials file for the processes of that role; the server side gets only the
public keys and each role's permissions, as an `authorization` block (`nats-auth.conf`)
that every nats-server config carries. A chunk-store can then answer fragment requests and
record its own capacity, but cannot append to a metadata journal, take a writer lease
or issue an admin command; a client cannot touch the journals at all.

Each role also gets its own inbox prefix (`_INBOX.<role>.`), so one role cannot
subscribe to the replies another receives.

Per-node services (`ServiceSpec.per_node`: chunk-store, membership, metadata-raft,
repair) get one key per (role, node), `<role>@<node>.nk`, whose permissions are the
role's with `{n}` bound to that node: the chunk-store key of storage-1 may put
`$KV.nodes.store.storage-1` and answer `rpc.chunk.storage-1.*`, not storage-2's. The
nodes are those whose key files exist (`ensure_keys(nodes=...)`), so adding a node is
adding its keys and reloading the servers. Without a node list a per-node role gets
one shared key with `{n}` as `*` (the per-role scheme).

`cfs cluster rotate-credentials` replaces keys in two steps (`begin_rotation`, then
`finish_rotation`): in between both the old and the new public key are admitted, so no
process is refused while it moves to its new file. Connections are TLS whenever the
site has a CA (`cfs.tls`, found beside the credentials).

`permissions` is pure: the table is unit-tested, and the integration suites run every
service under its own credentials, so a missing permission fails a test.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypedDict

import nkeys

from cfs.kernel.spec import Grants, ServiceSpec
from cfs_contracts.data import VERBS
from cfs_contracts.members import health_key
from cfs_contracts.streams import CMD, HEALTH, LEASES, NODES, meta_stream, shard_name

AUTH_CONF = "nats-auth.conf"
# What a re-seeded server admits until its import is complete (the admin only).
RECOVERY_AUTH_CONF = "nats-auth-recovery.conf"
CREDENTIALS_SUFFIX = ".nk"
NODE_SEPARATOR = "@"  # `chunkstore@storage-1.nk`: node names have no `@`
# `<identity>.retiring`: the public key a rotation replaced, admitted until it finishes
RETIRING_SUFFIX = ".retiring"
_HEADER = "# ClaudeFS NATS credentials"


class Role(StrEnum):
    """The roles that are not services; each service's role comes from its spec
    (`cfs.kernel`), so `roles()` is the whole list."""

    ADMIN = "admin"  # operators (`cfs admin`, `cfs cluster`, `cfs node`) and provisioning
    CLIENT = "client"  # mounts and `cfs fs`


def roles() -> list[str]:
    """Every role a site has keys for: admin, client, then one per service."""
    from cfs.kernel.registry import service_roles

    return [Role.ADMIN.value, Role.CLIENT.value, *service_roles()]


def per_node_roles() -> list[str]:
    """The roles whose keys are per node (their services' `per_node`)."""
    from cfs.kernel.registry import specs

    return list(dict.fromkeys(spec.role for spec in specs() if spec.per_node))


@dataclass(frozen=True, order=True)
class Identity:
    """Whom a key belongs to: a role, and for a per-node role the node."""

    role: str
    node: str | None = None

    @property
    def name(self) -> str:
        return self.role if self.node is None else f"{self.role}{NODE_SEPARATOR}{self.node}"

    @classmethod
    def parse(cls, name: str) -> Identity:
        role, sep, node = name.partition(NODE_SEPARATOR)
        return cls(role, node if sep else None)


def identities(nodes: Sequence[str] = (), only: Sequence[str] | None = None) -> list[Identity]:
    """The keys a site with `nodes` has (pure): one per role, but one per (role, node) for
    a per-node role when the nodes are known."""
    per_node = set(per_node_roles())
    found: list[Identity] = []
    for role in roles() if only is None else only:
        if role in per_node and nodes:
            found += [Identity(role, node) for node in nodes]
        else:
            found.append(Identity(role))
    return found


class CredentialsError(Exception):
    """A credentials file that cannot be used."""


@dataclass(frozen=True)
class Permissions:
    """What one role may publish and subscribe to; replies to requests it received are
    always allowed (`allow_responses`)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def may_publish(self, subject: str) -> bool:
        return any(subject_matches(pattern, subject) for pattern in self.publish)

    def may_subscribe(self, subject: str) -> bool:
        """For a literal subject, or a wildcard one that an allowed pattern covers."""
        return any(subject_matches(pattern, subject) for pattern in self.subscribe)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more. A wildcard in
    `subject` matches only the same or a wider wildcard in `pattern`."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have):
            return False
        if token == "*":
            if have[i] == ">":
                return False
            continue
        if token != have[i]:
            return False
    return len(have) == len(want)


class ConnectOptions(TypedDict, total=False):
    """The nats-py `connect` arguments a credentials file turns into."""

    user_credentials: str
    nkeys_seed_str: str
    inbox_prefix: str
    tls: ssl.SSLContext


@dataclass(frozen=True)
class Credentials:
    """A loaded credentials file: the NKey seed and the inbox prefix of its role."""

    role: str
    site: str
    seed: str
    inbox_prefix: str
    node: str | None = None  # a per-node role's key: the node it belongs to


def inbox_prefix(role: str, node: str | None = None) -> str:
    return f"_INBOX.{role}" if node is None else f"_INBOX.{role}.{node}"


# -- the permission table (pure) --------------------------------------------------------
def _read_stream(stream: str) -> list[str]:
    """JetStream API subjects to look at and consume one stream (no create/delete)."""
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _read_bucket(bucket: str) -> list[str]:
    return _read_stream(f"KV_{bucket}")


def _write_keys(bucket: str, *patterns: str) -> list[str]:
    """Put, update, create and delete of keys matching `patterns` (a delete is a put)."""
    return [f"$KV.{bucket}.{pattern}" for pattern in patterns]


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


# What a client may do besides reading the nodes bucket: metadata and chunk requests
# (every verb but `rebuild`, repair's to ask for, and `touched`, the tierer's), damage
# reports from degraded reads, queueing its chunks for the data tier, and the leases
# (which node leads a shard).
CLIENT_GRANTS = Grants(
    publish=(
        "{s}.rpc.meta.*",
        *(f"{{s}}.rpc.chunk.*.{verb}" for verb in VERBS if verb not in ("rebuild", "touched")),
        "{s}.data.*.damaged",
        "{s}.tier.chunk",  # a stored chunk queued for S3
        "{s}.rpc.tier.flush",  # write-through: wait for S3
        "{s}.rpc.tier.recall",  # a chunk with fewer than k fragments on flash: from S3
    ),
    read_buckets=(LEASES.bucket,),
)


# What the admin commands (`cfs admin|cluster|node`, quorum recovery, provisioning) use:
# all of JetStream here and on a linked site (`$JS.<domain>.API`: replication-link,
# failover), every KV key, acks and flow control of its consumers, and every ClaudeFS
# subject (commands, RPCs, events, the peer's over the link); it reads only its own
# inbox and ClaudeFS events. Not: another role's inbox (snooping on or forging replies),
# system or advisory subjects, or anything outside ClaudeFS on the same servers.
ADMIN_PERMISSIONS = Permissions(
    publish=("$JS.API.>", "$JS.*.API.>", "$KV.>", "$JS.ACK.>", "$JS.FC.>", "cfs.>"),
    subscribe=(f"{inbox_prefix(Role.ADMIN)}.>", "cfs.>"),
)


def permissions(role: str, site: str, shards: int, node: str | None = None) -> Permissions:
    """The subjects `role` needs on `site` with `shards` metadata shards, and no more:
    admin what operators need (`ADMIN_PERMISSIONS`); a service exactly what its spec
    declares (`spec_subjects`),
    for a per-node role's key bound to `node` (any node when None)."""
    if role == Role.ADMIN:
        return ADMIN_PERMISSIONS
    if role not in per_node_roles():
        node = None  # a site-wide role's key is the same on every node
    everyone = common_publish(site)
    inbox = f"{inbox_prefix(role, node)}.>"
    if role == Role.CLIENT:
        pub, sub = grant_subjects(CLIENT_GRANTS, site, shards)
    else:
        from cfs.kernel.registry import by_role

        spec = by_role(role)
        if spec is None:
            raise ValueError(f"no role {role!r}; roles: {', '.join(roles())}")
        pub, sub = spec_subjects(spec, site, shards, node)
    return Permissions(publish=_unique([*everyone, *pub]), subscribe=_unique([inbox, *sub]))


def common_publish(site: str) -> list[str]:
    """What every non-admin role may publish: account info, dead letters, alerts, and
    reading the `nodes` and `health` buckets."""
    s = f"cfs.{site}"
    return [
        "$JS.API.INFO",
        f"{s}.dlq.>",
        f"{s}.alerts.>",
        *_read_bucket(NODES.bucket),
        *_read_bucket(HEALTH.bucket),
    ]


def spec_subjects(
    spec: ServiceSpec, site: str, shards: int, node: str | None = None
) -> tuple[list[str], list[str]]:
    """(publish, subscribe) subjects of a service: its declared grants, plus what the
    runtime does for it: its durable consumers, its admin verbs (consume its commands,
    reply, audit), its site lease and its health record. For a per-node service `{n}`
    and the health record's node are `node` (`*` when None: any node)."""
    bound = node if spec.per_node and node is not None else "*"
    pub, sub = grant_subjects(spec.grants, site, shards, bound)
    for consumer in spec.consumers:
        pub += _durable(consumer.config.stream, consumer.config.durable)
    if spec.admin:
        s = f"cfs.{site}"
        pub += [
            *_durable(CMD.name, f"cmd-{spec.name}"),
            f"$JS.API.DIRECT.GET.{CMD.name}.{s}.cmd.reply.>",  # answered already?
            f"{s}.cmd.reply.>",
            f"{s}.audit.>",
        ]
    if spec.lease_key is not None:
        pub += [*_read_bucket(LEASES.bucket), *_write_keys(LEASES.bucket, spec.lease_key)]
    pub += _write_keys(HEALTH.bucket, health_key(bound, spec.name))
    return pub, sub


def grant_subjects(
    grants: Grants, site: str, shards: int, node: str = "*"
) -> tuple[list[str], list[str]]:
    """(publish, subscribe) NATS subjects for declared `grants` on `site`, `{n}` as `node`."""
    s = f"cfs.{site}"
    metas = [meta_stream(shard_name(i)).name for i in range(1, shards + 1)]

    def streams(names: tuple[str, ...]) -> list[str]:
        return [m for name in names for m in (metas if name == "META_*" else [name])]

    pub = [subject.format(s=s, n=node) for subject in grants.publish]
    pub += [api for stream in streams(grants.read_streams) for api in _read_stream(stream)]
    pub += [api for bucket in grants.read_buckets for api in _read_bucket(bucket)]
    pub += [
        key.format(n=node)
        for bucket, keys in grants.write_keys.items()
        for key in _write_keys(bucket, *keys)
    ]
    pub += [f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}" for stream in streams(grants.stepdown)]
    return pub, [subject.format(s=s, n=node) for subject in grants.serve]


def _durable(stream: str, durable: str) -> list[str]:
    """Consume `stream` through the durable `durable` only (shared by every process of
    the service); other consumers of the stream stay out of reach."""
    name = f"{stream}.{durable}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{name}",
        f"$JS.API.CONSUMER.CREATE.{name}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{name}",
        f"$JS.API.CONSUMER.INFO.{name}",
        f"$JS.API.CONSUMER.MSG.NEXT.{name}",
        f"$JS.ACK.{name}.>",
    ]


def connect_options(credentials: Path | None, tls_ca: Path | None = None) -> ConnectOptions:
    """nats-py connect options for a credentials file: ours (an NKey seed and the role's
    inbox prefix) or a standard NATS `.creds` file (user JWT + seed); plus TLS verified
    by `tls_ca`, or by the site CA beside the credentials when there is one."""
    from cfs.tls import ca_for, client_context

    ca = tls_ca or ca_for(credentials)
    tls = ConnectOptions(tls=client_context(ca)) if ca is not None else ConnectOptions()
    if credentials is None:
        return tls
    try:
        head = Path(credentials).read_text()[:64]
    except OSError as exc:
        raise CredentialsError(
            f"cannot read NATS credentials {credentials}: {exc.strerror}"
        ) from None
    if "BEGIN NATS USER JWT" in head:
        return ConnectOptions(user_credentials=str(credentials), **tls)
    loaded = load_credentials(credentials)
    return ConnectOptions(nkeys_seed_str=loaded.seed, inbox_prefix=loaded.inbox_prefix, **tls)


# -- files ----------------------------------------------------------------------------
def credentials_path(directory: Path, role: str, node: str | None = None) -> Path:
    """`<role>.nk`, or `<role>@<node>.nk` for a per-node role's key of `node`."""
    return Path(directory) / f"{Identity(role, node).name}{CREDENTIALS_SUFFIX}"


def credentials_for(directory: Path, role: str, node: str | None) -> Path:
    """The file a process of `role` on `node` connects with: the node's own key for a
    per-node role, else the role's."""
    if node is not None and role in per_node_roles():
        return credentials_path(directory, role, node)
    return credentials_path(directory, role)


def ensure_credentials(
    directory: Path,
    site: str,
    shards: int,
    only: Sequence[str] | None = None,
    nodes: Sequence[str] = (),
) -> Path:
    """`ensure_keys`, then `write_auth_conf`; returns the auth config's path."""
    ensure_keys(directory, site, only, nodes)
    return write_auth_conf(directory, site, shards, only)


def ensure_keys(
    directory: Path, site: str, only: Sequence[str] | None = None, nodes: Sequence[str] = ()
) -> None:
    """Create the missing keys (of every role, or `only` these; per node for per-node
    roles when `nodes` are given); existing seeds are kept, so services keep working."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    for who in identities(nodes, only):
        path = credentials_path(directory, who.role, who.node)
        if not path.exists():
            _write_secret(path, _render_credentials(who, site, _new_user_seed()))


def present_identities(directory: Path, only: Sequence[str] | None = None) -> list[Identity]:
    """The identities whose key files are in `directory`, in `roles()` order."""
    order = {role: i for i, role in enumerate(roles() if only is None else only)}
    found = [
        Identity.parse(path.name.removesuffix(CREDENTIALS_SUFFIX))
        for path in Path(directory).glob(f"*{CREDENTIALS_SUFFIX}")
    ]
    return sorted(
        (who for who in found if who.role in order),
        key=lambda who: (order[who.role], who.node or ""),
    )


def write_auth_conf(
    directory: Path,
    site: str,
    shards: int,
    only: Sequence[str] | None = None,
    name: str = AUTH_CONF,
) -> Path:
    """The server side of the keys in `directory` (public keys and permissions): every
    identity with a key file there (of `only` these roles), plus the keys a rotation is
    retiring (`begin_rotation`), still admitted meanwhile."""
    users = [
        (who, public_key(load_credentials(credentials_path(directory, who.role, who.node)).seed))
        for who in present_identities(directory, only)
    ]
    users += retiring_keys(directory, only)
    conf = Path(directory) / name
    tmp = conf.with_suffix(".tmp")
    tmp.write_text(render_auth_conf(users, site, shards))
    os.replace(tmp, conf)
    return conf


# -- rotation ----------------------------------------------------------------------------
def begin_rotation(directory: Path, site: str, rotate: Sequence[str]) -> list[Identity]:
    """Give every key of the roles `rotate` a new seed; the old public keys stay admitted
    (`<identity>.retiring`, in the next `write_auth_conf`) until `finish_rotation`, so
    processes still connected with them keep working while they move to the new file."""
    rotated = []
    for who in present_identities(directory, rotate):
        path = credentials_path(directory, who.role, who.node)
        old = public_key(load_credentials(path).seed)
        (Path(directory) / f"{who.name}{RETIRING_SUFFIX}").write_text(old + "\n")
        _replace_secret(path, _render_credentials(who, site, _new_user_seed()))
        rotated.append(who)
    return rotated


def finish_rotation(directory: Path, rotate: Sequence[str] | None = None) -> list[Identity]:
    """Forget the retiring keys (of `rotate` roles, or all); the next `write_auth_conf`
    no longer admits them, and a server reload closes whatever still uses one."""
    done = []
    for who, _ in retiring_keys(directory, rotate):
        (Path(directory) / f"{who.name}{RETIRING_SUFFIX}").unlink(missing_ok=True)
        done.append(who)
    return done


def retiring_keys(directory: Path, only: Sequence[str] | None = None) -> list[tuple[Identity, str]]:
    """(identity, old public key) of the rotations begun and not finished."""
    wanted = set(roles() if only is None else only)
    found = []
    for path in sorted(Path(directory).glob(f"*{RETIRING_SUFFIX}")):
        who = Identity.parse(path.name.removesuffix(RETIRING_SUFFIX))
        if who.role in wanted:
            found.append((who, path.read_text().strip()))
    return found


def render_auth_conf(users: Sequence[tuple[Identity | str, str]], site: str, shards: int) -> str:
    """nats-server `authorization` block: public keys and permissions only, no secret."""
    lines = [
        "# Generated by cfs cluster init: one NKey user per role (per node for per-node",
        "# services). No secrets in here.",
        "authorization {",
        "  users = [",
    ]
    for user, key in users:
        who = user if isinstance(user, Identity) else Identity(user)
        perms = permissions(who.role, site, shards, who.node)
        lines += [
            f"    # {who.name}",
            "    {",
            f"      nkey: {json.dumps(key)}",
            "      permissions: {",
            f"        publish: {{ allow: {json.dumps(list(perms.publish))} }}",
            f"        subscribe: {{ allow: {json.dumps(list(perms.subscribe))} }}",
            "        allow_responses: true",
            "      }",
            "    }",
        ]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def load_credentials(path: Path) -> Credentials:
    """Read a file written by `ensure_credentials`; one clear error when it is unusable."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read NATS credentials {path}: {exc.strerror}") from None
    fields: dict[str, str] = {}
    seed = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            for word in line.lstrip("#").split():
                key, sep, value = word.partition("=")
                if sep:
                    fields[key] = value
        elif line:
            seed = line
    try:
        nkeys.from_seed(bytearray(seed.encode())).wipe()
    except Exception:
        raise CredentialsError(f"{path} holds no valid NATS NKey seed") from None
    role = fields.get("role", "")
    return Credentials(
        role=role,
        site=fields.get("site", ""),
        seed=seed,
        inbox_prefix=fields.get("inbox") or "_INBOX",
        node=fields.get("node"),
    )


def public_key(seed: str) -> str:
    pair = nkeys.from_seed(bytearray(seed.encode()))
    try:
        return str(pair.public_key.decode())
    finally:
        pair.wipe()


def _new_user_seed() -> str:
    return str(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER).decode())


def _render_credentials(who: Identity, site: str, seed: str) -> str:
    node = f" node={who.node}" if who.node is not None else ""
    return (
        f"{_HEADER}: role={who.role}{node} site={site} "
        f"inbox={inbox_prefix(who.role, who.node)}\n"
        "# Keep this file secret (mode 0600); the server knows only the public key.\n"
        f"{seed}\n"
    )


def _replace_secret(path: Path, text: str) -> None:
    """Atomically, 0600 from the start: a process reading the file while it is replaced
    (a reconnect) sees the old seed or the new one, never half of one."""
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    _write_secret(tmp, text)
    os.replace(tmp, path)


def _write_secret(path: Path, text: str) -> None:
    """Create with mode 0600 from the start: the seed is never world-readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as f:
        f.write(text)
