"""A whole site on this machine: NATS, streams and buckets, and every node's services.

For tests, benchmarks and `cfs dev up`. Process control (`stop`, `kill9`,
`start_node`) is synchronous like the rest of the supervisor; what talks to NATS
(`start`, `wait_ready`, `client`) is async:

    site = LocalSite(tmp_path, nodes=3)
    try:
        await site.start()          # NATS up, streams + buckets provisioned, services spawned
        await site.wait_ready()     # metadata answers, every chunk-store has a fresh record
        site.chunkstore("storage-2").kill9()
        site.start_node("storage-2")
    finally:
        site.stop()                 # every process, always

or `async with LocalSite(tmp_path) as site:` (start + wait_ready, stop on exit).
From synchronous code: `asyncio.run(site.start())`.

Layout under `base_dir`: `nats/` (server stores and logs), `nodes/<node>/` (each
node's data dir: `metadata/`, `chunks/`), `logs/<node>.<service>.log`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import TracebackType

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from cfs.bus import Bus
from cfs.kernel import registry
from cfs.security import (
    AUTH_CONF,
    Role,
    begin_rotation,
    credentials_for,
    ensure_credentials,
    ensure_keys,
    finish_rotation,
    write_auth_conf,
)
from cfs.supervisor.errors import SupervisorError
from cfs.supervisor.forkserver import ForkServer
from cfs.supervisor.nats import LeafListen, LeafRemote, NatsCluster, NatsServer
from cfs.supervisor.ports import free_port
from cfs.supervisor.process import ManagedProcess, log_event
from cfs.tls import ca_path, ensure_server_cert
from cfs_contracts.data import StoreRecord, store_record_key
from cfs_contracts.members import Liveness, MemberRecord, member_key
from cfs_contracts.streams import NODES

log = logging.getLogger(__name__)

_NODE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_RECORD_MAX_AGE_MS = 10_000
_MAX_RESTART_DELAY_S = 60.0


class LocalSite:
    """NATS (a 3+ server cluster, or one server) plus metadata-raft and chunk-store per node."""

    def __init__(
        self,
        base_dir: Path,
        nodes: int | Sequence[str] = 3,
        *,
        servers: int | None = None,
        shards: int = 1,
        site: str = "local",
        labels: Mapping[str, Mapping[str, str]] | None = None,
        env: Mapping[str, str] | None = None,
        ec: str = "auto",
        secure: bool = True,
        tls: bool | None = None,
        services: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        nats: NatsCluster | NatsServer | None = None,
        site_index: int = 0,
        domain: str | None = None,
        leaf_auth: tuple[str, str] | None = None,
        leaf_remotes: Sequence[LeafRemote] = (),
    ) -> None:
        """Nothing starts here: ports are chosen and process command lines fixed.

        `nodes`: a count (named storage-1..N) or names. `servers`: NATS servers,
        default min(3, nodes); fewer than 3 gives one standalone server (a 2-server
        JetStream cluster cannot survive losing one). `labels`: per node, the
        chunk-store's failure-domain labels. `env`: extra variables for every
        service process (e.g. CFS_RESERVE_BYTES, CFS_LEASE_S). `secure`: NATS
        requires credentials and every service connects with its role's
        least-privilege key (`cfs.security`, under `base_dir/credentials`), as
        `cfs cluster init` sets up a real site; `client()` gets the admin key.
        `tls` (default: as `secure`): every NATS connection, client, route and site
        link, is TLS with a site CA and a certificate per server (`cfs.tls`, under
        `base_dir/credentials/tls`); clients find the CA beside their credentials.
        `services`: which services run (names as `cfs service list`; per node as a
        mapping), default every one on every node (those that need a peer site only on a
        linked site); a test of one service runs only it.
        `nats`: a NATS server or cluster the caller started (and stops); by default the
        site has its own. `site_index`, `domain`, `leaf_auth`, `leaf_remotes`: one of two
        linked sites (`cfs.supervisor.sites.SitePair`).
        """
        names = (
            [f"storage-{i}" for i in range(1, nodes + 1)] if isinstance(nodes, int) else list(nodes)
        )
        if not names:
            raise ValueError("a site needs at least one node")
        for name in names:
            if _NODE_RE.match(name) is None:
                raise ValueError(f"invalid node name {name!r} (letters, digits, - and _)")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate node names in {names}")
        self.base_dir = Path(base_dir)
        self.site = site
        self.site_index = site_index
        self.shards = shards
        self.ec = ec
        self.node_names: tuple[str, ...] = tuple(names)
        self.secure = secure
        self.credentials_dir = self.base_dir / "credentials"
        auth_file = self.credentials_dir / AUTH_CONF if secure else None
        self.tls = secure if tls is None else tls
        if self.tls and not secure:  # processes find the CA beside their credentials
            raise ValueError("tls=True needs secure=True")
        issuer = partial(ensure_server_cert, self.credentials_dir, site) if self.tls else None
        count = servers if servers is not None else min(3, len(names))
        self.nats: NatsCluster | NatsServer
        self._owns_nats = nats is None
        if nats is not None:
            self.nats = nats
        elif count >= 3:
            # Server i runs beside node i, named after it (`raft-status` shows node names).
            server_names = names[:count] + [f"nats-{i}" for i in range(len(names) + 1, count + 1)]
            self.nats = NatsCluster(
                count,
                self.base_dir / "nats",
                name=f"cfs-{site}",
                names=server_names,
                auth_file=auth_file,
                domain=domain,
                leaf_auth=leaf_auth,
                leaf_remotes=leaf_remotes,
                tls=issuer,
            )
        else:
            self.nats = NatsServer.standalone(
                self.base_dir / "nats",
                auth_file=auth_file,
                domain=domain,
                leaf_listen=LeafListen(free_port(), *leaf_auth) if leaf_auth else None,
                leaf_remotes=leaf_remotes,
                tls=issuer,
            )
        self._spawned_ms: dict[str, int] = {}
        # since when a node's membership record must be fresh (its own restarts only)
        self._member_since: dict[str, int] = {}
        self._restarts: dict[str, tuple[float, float]] = {}  # name -> (last restart, delay)
        self._procs: dict[tuple[str, str], ManagedProcess] = {}
        self._env = dict(env or {})
        known = registry.service_names()
        linked = bool(leaf_auth or leaf_remotes)
        self._default_services = tuple(
            spec.name for spec in registry.specs() if linked or not spec.needs_peer
        )
        chosen = services if services is not None else self._default_services
        self._services: dict[str, tuple[str, ...]] = {
            node: tuple(chosen.get(node, ()) if isinstance(chosen, Mapping) else chosen)
            for node in names
        }
        for wanted in self._services.values():
            if unknown := set(wanted) - set(known):
                raise ValueError(f"unknown services {sorted(unknown)}; known: {known}")
        # Service processes fork from one that imported them (CFS_FORK_SERVICES=0: exec each).
        self._forkserver = (
            ForkServer(
                self.base_dir / "logs" / "forkserver.log",
                env={**os.environ, "PYTHONPATH": child_pythonpath()},
                label=str(self.base_dir),
            )
            if os.environ.get("CFS_FORK_SERVICES", "1") != "0"
            else None
        )
        # SWIM: a UDP port per node, every other node as a seed, one token per site.
        self._swim_ports = {node: _free_udp_port() for node in names}
        # Prometheus `/metrics` of each service process, kept across restarts.
        self._metrics_ports: dict[tuple[str, str], int] = {}
        self._cluster_token = secrets.token_hex(16)
        for node in names:
            self._build_node(node, (labels or {}).get(node, {}))

    def _build_node(self, node: str, labels: Mapping[str, str]) -> None:
        """Fix the command lines and environment of a node's service processes."""
        common = {
            "CFS_NODE": node,
            "CFS_SITE": self.site,
            "CFS_NATS_URLS": json.dumps(self.urls),
            "CFS_DATA_DIR": str(self.base_dir / "nodes" / node),
            "CFS_SHARDS": str(self.shards),
            "CFS_LABELS": json.dumps(dict(labels)),
            "PYTHONPATH": child_pythonpath(),
            **self._env,
        }
        swim = {
            "CFS_SWIM_HOST": "127.0.0.1",
            "CFS_SWIM_PORT": str(self._swim_ports[node]),
            "CFS_SEEDS": json.dumps(
                [f"127.0.0.1:{port}" for n, port in self._swim_ports.items() if n != node]
            ),
            "CFS_CLUSTER_TOKEN": self._cluster_token,
            "CFS_NETEM_FILE": str(self.netem_file),
            **self._env,
        }
        for spec in registry.specs():
            # A node added later (`add_node`) runs every service, as a new machine would.
            if spec.name not in self._services.setdefault(node, self._default_services):
                continue
            env = dict(common)
            if "CFS_METRICS_PORT" not in self._env:  # the caller's value wins (0: none)
                port = self._metrics_ports.setdefault((node, spec.name), free_port())
                env["CFS_METRICS_PORT"] = str(port)
            if (credentials := self.credentials(spec.role, node)) is not None:
                env["CFS_NATS_CREDENTIALS"] = str(credentials)
            if spec.name == "membership":
                env.update(swim)
            self._procs[node, spec.name] = ManagedProcess(
                f"{spec.name}@{node}",
                [
                    sys.executable,
                    "-m",
                    spec.package,
                    "--node",
                    node,
                    "--data-dir",
                    str(self.base_dir / "nodes" / node),
                ],
                log_path=self.base_dir / "logs" / f"{node}.{spec.name}.log",
                env=env,
                forkserver=self._forkserver,
            )

    def add_node(self, node: str, labels: Mapping[str, str] | None = None) -> None:
        """A new node (`cfs node add`): its services join through the existing members.

        Not started here: `start_node` does that, as for any other node."""
        if _NODE_RE.match(node) is None:
            raise ValueError(f"invalid node name {node!r} (letters, digits, - and _)")
        if node in self.node_names:
            raise ValueError(f"node {node!r} is already part of site {self.site}")
        self._swim_ports[node] = _free_udp_port()
        self.node_names = (*self.node_names, node)
        if self.secure and self.credentials_dir.exists():  # a running site: its own keys
            ensure_keys(self.credentials_dir, self.site, nodes=[node])
            write_auth_conf(self.credentials_dir, self.site, self.shards)
            self._reload_nats()
        self._build_node(node, labels or {})

    def __repr__(self) -> str:
        return f"<LocalSite {self.site} nodes={list(self.node_names)} urls={self.urls}>"

    # -- where things are ----------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        if isinstance(self.nats, NatsCluster):
            return self.nats.urls
        return [self.nats.url]

    @property
    def nats_servers(self) -> list[NatsServer]:
        return self.nats.servers if isinstance(self.nats, NatsCluster) else [self.nats]

    def nats_server_of(self, node: str) -> NatsServer | None:
        """The NATS server that runs beside `node` (named after it), if it has one."""
        self._check_node(node)
        return next((server for server in self.nats_servers if server.name == node), None)

    def credentials(self, role: str, node: str | None = None) -> Path | None:
        """The credentials file of `role` (for a per-node role, `node`'s own key), None
        on a site without NATS auth."""
        return credentials_for(self.credentials_dir, role, node) if self.secure else None

    def data_dir(self, node: str) -> Path:
        self._check_node(node)
        return self.base_dir / "nodes" / node

    def service(self, node: str, name: str) -> ManagedProcess:
        """The process of service `name` (as `cfs service list` names it) on `node`."""
        self._check_node(node)
        try:
            return self._procs[node, name]
        except KeyError:
            raise registry.UnknownService(name) from None

    def metadata(self, node: str) -> ManagedProcess:
        return self.service(node, "metadata-raft")

    def chunkstore(self, node: str) -> ManagedProcess:
        return self.service(node, "chunk-store")

    def repair(self, node: str) -> ManagedProcess:
        return self.service(node, "repair")

    def membership(self, node: str) -> ManagedProcess:
        return self.service(node, "membership")

    def node_processes(self, node: str) -> dict[str, ManagedProcess]:
        """Service name -> process, for one node."""
        self._check_node(node)
        return {name: proc for (n, name), proc in self._procs.items() if n == node}

    def metrics_port(self, node: str, service: str) -> int | None:
        """The `/metrics` HTTP port of a service process (None: it serves none)."""
        self._check_node(node)
        return self._metrics_ports.get((node, service))

    def swim_port(self, node: str) -> int:
        """The UDP port `node`'s membership speaks SWIM on."""
        self._check_node(node)
        return self._swim_ports[node]

    def metrics_ports(self) -> dict[tuple[str, str], int]:
        """(node, service) -> `/metrics` port, for every process that serves one."""
        return {key: port for key, port in self._metrics_ports.items() if key in self._procs}

    @property
    def netem_file(self) -> Path:
        """Fault-injection rules every membership process follows (absent: no faults);
        see `cfs_membership.transport` (write with `write_rules`)."""
        return self.base_dir / "netem.json"

    def processes(self) -> list[ManagedProcess]:
        """Every service process (running or not), node by node."""
        return list(self._procs.values())

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, timeout: float = 60.0) -> None:
        """Start NATS, provision streams and buckets, spawn every node's services.

        Returns once the processes are spawned; `wait_ready` waits for them to serve.
        On any failure everything started so far is stopped.
        """
        try:
            if self.secure:
                ensure_credentials(
                    self.credentials_dir, self.site, self.shards, nodes=self.node_names
                )
            await asyncio.to_thread(self._start_nats, timeout)
            await self.provision()
            for node in self.node_names:
                self.start_node(node)
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise
        log_event(log, logging.INFO, "site.started", site=self.site, nodes=len(self.node_names))

    def _start_nats(self, timeout: float) -> None:
        if not self._owns_nats:
            return
        if isinstance(self.nats, NatsCluster):
            self.nats.start(timeout)
        else:
            self.nats.start(wait=True, timeout=timeout)

    async def provision(self, timeout: float = 60.0) -> None:
        """`cfs cluster init`: every stream and KV bucket and the cluster config, idempotently.

        Retried until `timeout`: servers restarted on existing stores answer JetStream
        API requests only once each stream's Raft group has a leader again.
        """
        from cfs.cluster import init_cluster, new_config

        wanted = new_config(
            name=f"cfs-{self.site}",
            site=self.site,
            shards=self.shards,
            ec=self.ec,
            bootstrap_node=self.node_names[0],
            created_by="cfs dev",
            site_index=self.site_index,
        )
        replicas = min(3, len(self.nats_servers))
        deadline = time.monotonic() + timeout
        async with await self.client("site-init") as bus:
            while True:
                try:
                    await init_cluster(bus, wanted, replicas=replicas)
                    return
                except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                    if time.monotonic() >= deadline:
                        raise SupervisorError(
                            f"provisioning site {self.site}: JetStream did not answer "
                            f"within {timeout:.0f}s ({exc!r})"
                        ) from exc
                    log_event(log, logging.INFO, "site.provision_retry", error=repr(exc))
                    await asyncio.sleep(0.5)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until metadata answers getattr(1), every chunk-store has published a fresh
        `StoreRecord` and every membership process has recorded its node ALIVE since it
        was (re)started (of the services that run); fails fast if a process exits."""
        from cfs.client import MetadataClient  # the client is not needed to supervise

        deadline = time.monotonic() + timeout
        async with await self.client("site-probe") as bus:
            client = MetadataClient(bus, deadline_s=2.0)
            kv = await bus.key_value(NODES.bucket)
            while True:
                self._check_alive()
                waiting = [node for node in self.node_names if not await self._fresh(kv, node)]
                if not waiting and not self._runs("metadata-raft"):
                    break  # a site of other services only (membership and alerts, say)
                if not waiting:
                    try:
                        await client.getattr(1)
                        break
                    except Exception as exc:  # FsError / BusError while electing a writer
                        waiting = [f"metadata ({exc})"]
                if time.monotonic() >= deadline:
                    raise SupervisorError(
                        f"site {self.site} not ready after {timeout:.0f}s; waiting for "
                        f"{', '.join(waiting)}{self._log_tails()}"
                    )
                await asyncio.sleep(0.1)
        log_event(log, logging.INFO, "site.ready", site=self.site)

    def _runs(self, service: str, node: str | None = None) -> bool:
        nodes = self.node_names if node is None else (node,)
        return any(service in self._services.get(n, ()) for n in nodes)

    async def _fresh(self, kv: KeyValue, node: str) -> bool:
        if not self._runs("chunk-store", node):
            return not self._runs("membership", node) or await self._member_alive(kv, node)
        try:
            entry = await kv.get(store_record_key(node))
        except Exception:  # not written yet (KeyNotFoundError) or NATS hiccup
            return False
        if not entry.value:
            return False
        record = StoreRecord.model_validate_json(entry.value)
        now_ms = time.time_ns() // 1_000_000
        return (
            record.started_ms >= self._spawned_ms.get(node, 0)
            and now_ms - record.updated_ms < _RECORD_MAX_AGE_MS
            and (not self._runs("membership", node) or await self._member_alive(kv, node))
        )

    async def _member_alive(self, kv: KeyValue, node: str) -> bool:
        """The node's membership process has written `member.<node>` ALIVE since its start."""
        try:
            entry = await kv.get(member_key(node))
        except Exception:  # not written yet (KeyNotFoundError) or NATS hiccup
            return False
        if not entry.value:
            return False
        member = MemberRecord.model_validate_json(entry.value)
        since = self._member_since.get(node, self._spawned_ms.get(node, 0))
        return member.state is Liveness.ALIVE and member.last_seen_ms >= since

    def start_node(self, node: str) -> None:
        """Start this node's services that are not running (what systemd would do)."""
        self._check_node(node)
        self._spawned_ms[node] = self._member_since[node] = time.time_ns() // 1_000_000
        for proc in self.node_processes(node).values():
            if not proc.running:
                proc.start()

    def restart_exited(self, now: float | None = None) -> list[str]:
        """Restart every service process that exited by itself (the restart policy of
        systemd, Nomad or compose): a crashed service comes back, with a delay that
        doubles (1 s up to 60 s) while it keeps crashing. Returns the restarted names."""
        now = time.monotonic() if now is None else now
        restarted = []
        for proc in self._procs.values():
            if not proc.exited_unasked:
                continue
            last, delay = self._restarts.get(proc.name, (0.0, 0.0))
            if now - last < delay:
                continue
            rc = proc.returncode
            proc.start()
            ran_long = now - last > 2 * _MAX_RESTART_DELAY_S
            delay = 1.0 if ran_long else min(max(1.0, delay * 2), _MAX_RESTART_DELAY_S)
            self._restarts[proc.name] = (now, delay)
            log_event(log, logging.WARNING, "site.restarted", proc=proc.name, rc=rc, delay=delay)
            restarted.append(proc.name)
        return restarted

    async def rotate_credentials(self, rotate: Sequence[str], timeout: float = 120.0) -> list[str]:
        """`cfs cluster rotate-credentials`: new keys for the roles `rotate`, without a
        refused connection or a lost write.

        1. New seeds; the servers reload admitting the old and the new public keys.
        2. The running processes of those roles restart onto the new files, one node at
           a time, each node ready again before the next (a node's loss never fails an
           operation; all of them at once would).
        3. The old keys are dropped and the servers reload: a connection still on an old
           key (a client this site does not run, e.g. a mount) is closed and reconnects
           with the new file, which `Bus` reads again at every connect.
        Returns the rotated identities (`role` or `role@node`)."""
        if not self.secure:
            raise SupervisorError(f"site {self.site} runs without credentials")
        rotated = begin_rotation(self.credentials_dir, self.site, rotate)
        write_auth_conf(self.credentials_dir, self.site, self.shards)
        await asyncio.to_thread(self._reload_nats)
        services = {spec.name for spec in registry.specs() if spec.role in rotate}
        for node in self.node_names:
            procs = [
                proc
                for name, proc in self.node_processes(node).items()
                if name in services and proc.running
            ]
            if not procs:
                continue
            # wait_ready then waits for fresh records of the restarted ones only
            now_ms = time.time_ns() // 1_000_000
            if self.node_processes(node).get("chunk-store") in procs:
                self._spawned_ms[node] = now_ms
            if self.node_processes(node).get("membership") in procs:
                self._member_since[node] = now_ms
            for proc in procs:
                await asyncio.to_thread(proc.stop, 15.0)
                proc.start()
            await self.wait_ready(timeout)
            log_event(log, logging.INFO, "site.node_rotated", node=node, services=len(procs))
        finish_rotation(self.credentials_dir, rotate)
        write_auth_conf(self.credentials_dir, self.site, self.shards)
        await asyncio.to_thread(self._reload_nats)
        names = [who.name for who in rotated]
        log_event(log, logging.INFO, "site.credentials_rotated", site=self.site, keys=names)
        return names

    def _reload_nats(self) -> None:
        """Every running server loads its config again (the authorization with it)."""
        for server in self.nats_servers:
            if server.running:
                server.reload()

    def stop_node(self, node: str, timeout: float = 15.0) -> None:
        """SIGTERM this node's services (clean shutdown)."""
        self._check_node(node)
        for proc in self.node_processes(node).values():
            proc.stop(timeout)

    def kill9(self, node: str) -> None:
        """SIGKILL this node's services: a crashed node (its NATS server is separate)."""
        self._check_node(node)
        for proc in self.node_processes(node).values():
            proc.kill9()

    def stop(self) -> None:
        """Stop every service process (in parallel), then NATS; never leaves a process."""
        running = [proc for proc in self._procs.values() if proc.running]
        try:
            if running:
                with ThreadPoolExecutor(max_workers=len(running)) as pool:
                    list(pool.map(lambda proc: proc.stop(15.0), running))
        finally:
            for proc in self._procs.values():  # whatever survived an exception above
                if proc.running:
                    proc.kill9()
            if self._forkserver is not None:
                self._forkserver.stop()
            if self._owns_nats:
                self.nats.stop()
        log_event(log, logging.INFO, "site.stopped", site=self.site)

    def mount_process(
        self, mountpoint: Path, log_path: Path | None = None, env: dict[str, str] | None = None
    ) -> ManagedProcess:
        """A FUSE mount of this site as its own process (`python -m cfs.fuse`, in the
        foreground, client credentials); start it and wait for `is_fuse_mount`. `env`:
        more settings (e.g. CFS_PEER, the other site of a pair)."""
        argv = [sys.executable, "-m", "cfs.fuse", str(mountpoint), "--cluster"]
        argv += [",".join(self.urls), "--site", self.site, "--shards", str(self.shards)]
        if (credentials := self.credentials(Role.CLIENT)) is not None:
            argv += ["--credentials", str(credentials)]
        return ManagedProcess(
            f"mount@{mountpoint.name}",
            argv,
            log_path=log_path or self.base_dir / "logs" / "mount.log",
            env={"PYTHONPATH": child_pythonpath(), **self._env, **(env or {})},
        )

    def cli_env(self, role: str = Role.ADMIN, **extra: str) -> dict[str, str]:
        """The environment to run the `cfs` console script against this site as `role`:
        this process's, less any `CFS_*` (the caller's own cluster), plus `extra`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CFS_")}
        env.update(
            CFS_NATS_URLS=json.dumps(self.urls),
            CFS_SITE=self.site,
            CFS_NATS_CREDENTIALS=str(self.credentials(role)),
        )
        env.update(extra)
        return env

    @property
    def ca(self) -> Path | None:
        """The site CA clients verify the servers with (None without TLS, or before a
        server of the site issued it: a caller's own `nats` may be plain)."""
        path = ca_path(self.credentials_dir)
        return path if self.tls and path.exists() else None

    async def client(
        self, name: str | None = None, role: str = Role.ADMIN, node: str | None = None
    ) -> Bus:
        """A connected `Bus` for this site with `role`'s credentials (`node`'s key for a
        per-node role; close it, or use `async with`)."""
        return await Bus.connect(
            self.urls,
            site=self.site,
            node=name or f"client-{time.time_ns()}",
            credentials=self.credentials(role, node),
            tls_ca=self.ca,
        )

    async def __aenter__(self) -> LocalSite:
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # -- internals -----------------------------------------------------------------------
    def _check_node(self, node: str) -> None:
        if node not in self.node_names:
            raise KeyError(f"no node {node!r} in site {self.site} ({', '.join(self.node_names)})")

    def _check_alive(self) -> None:
        for (node, _service), proc in self._procs.items():
            if node in self._spawned_ms and not proc.running:
                raise SupervisorError(
                    f"{proc.name} exited with code {proc.returncode} while the site was "
                    f"starting\n--- last lines of {proc.log_path} ---\n{proc.log_tail()}"
                )

    def _log_tails(self) -> str:
        return "".join(
            f"\n--- {proc.log_path} ---\n{proc.log_tail(15)}" for proc in self._procs.values()
        )


def _free_udp_port(host: str = "127.0.0.1") -> int:
    """A port free for TCP (as `free_port` checks) and for UDP (what SWIM binds)."""
    for _ in range(100):
        port = free_port(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise OSError(f"no free UDP port found on {host}")


def child_pythonpath() -> str:
    """The import roots of our packages, then whatever PYTHONPATH we were given."""
    roots: list[str] = []
    for package in ("cfs", "cfs_contracts", *registry.packages()):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = str(Path(next(iter(spec.submodule_search_locations))).resolve().parent)
        if root not in roots:
            roots.append(root)
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(roots + [p for p in inherited if p not in roots])
