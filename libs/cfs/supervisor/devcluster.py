"""The `cfs dev` daemon: one whole site (or two linked ones) on this machine,
controlled over a Unix socket.

`cfs dev up` starts `python -m cfs.supervisor.devcluster --state-dir DIR` in a session
of its own and returns once the site is ready; later `cfs dev status|kill|start|
stop|down` talk to it through `DIR/control.sock` (one JSON request per line, one
JSON answer). The daemon is the parent of every service, NATS and S3 process (they
die with it: PR_SET_PDEATHSIG), so nothing outlives it, and `kill -9` of a node
stays a real `kill -9` of real processes.

A topology with `peer_site` runs a `SitePair` (DESIGN.md §8): two sites, each its own
NATS cluster and JetStream domain, linked through proxies that `cfs dev partition`
cuts and `cfs dev heal` restores; replication is linked both ways once both are
ready (`cfs admin replication-link`, as an operator runs it). `cfs dev kill-site`
ends every process of one site (guide scenario 4), `start-site` brings it back.

Files under the state directory:
- `cluster.json`: what clients need to reach the first site (site, nats_urls, shards,
  s3_endpoint, s3_region, s3_credentials_file, credentials_dir; with two sites also
  `peer`); the `cfs` commands find it as `./.cfs-dev/cluster.json` or through
  `CFS_CONFIG`. `cluster-<site>.json`: the same for each site. Services get the S3
  settings as `CFS_S3_*` variables.
- `credentials/s3.ini`: the S3 server's keys (AWS credentials-file format, 0600); only
  its name is in cluster.json.
- `dev.json`: the daemon's pid, state (`starting`, `ready`, `failed: ...`, `stopped`).
- `devd.log`; one site: `logs/<node>.<service>.log`, `nats/<server>/`,
  `nodes/<node>/`; two sites: the same under `<site>/`, and `link/`; `s3/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cfs.fuse.config import PeerSite
from cfs.security import RECOVERY_AUTH_CONF, Role, write_auth_conf
from cfs.supervisor.devcontrol import (
    CONTROL_SOCKET,
    STATE_FILE,
    DevUsageError,
    cluster_file_name,
)
from cfs.supervisor.errors import SupervisorError
from cfs.supervisor.nats import NatsCluster
from cfs.supervisor.process import log_event
from cfs.supervisor.s3 import S3Server
from cfs.supervisor.site import LocalSite, child_pythonpath
from cfs.supervisor.sites import SitePair
from cfs.supervisor.topology import Topology

log = logging.getLogger(__name__)

RESTART_CHECK_S = 1.0

S3_CREDENTIALS_FILE = "s3.ini"
FULL_NATS = 3
CLI_UNREACHABLE = 3  # `cfs` exit code: the peer does not answer over the link (yet)
LINK_RETRY_S = 1.0

Hook = Callable[["DevCluster"], Awaitable[None]]


DEV_ARCHIVE_URL = "s3://cfs-dev-backups/archive"
DEV_TIER_URL = "s3://cfs-dev-tier/data"  # `make run` sets the data tier to cache mode here


class DevCluster:
    """A `LocalSite` (or a `SitePair`) plus an S3 server, with the operations `cfs dev`
    offers."""

    def __init__(self, state_dir: Path, topology: Topology) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.topology = topology
        self.s3 = S3Server(self.state_dir / "s3", port=topology.s3_port) if topology.s3 else None
        self.s3_credentials = self.state_dir / "credentials" / S3_CREDENTIALS_FILE
        envs = {name: {**self._s3_env(name), **topology.env} for name in topology.sites}
        options: dict[str, Any] = {
            "servers": topology.nats_servers,
            "shards": topology.shards,
            "labels": {node.name: node.labels for node in topology.nodes},
            "ec": topology.ec,
        }
        self.pair: SitePair | None = None
        if topology.peer_site is None:
            env = envs[topology.site]
            one = LocalSite(
                self.state_dir, topology.node_names, site=topology.site, env=env, **options
            )
            sites = [one]
        else:
            self.pair = SitePair(
                self.state_dir,
                topology.site,
                topology.peer_site,
                nodes=topology.node_names,
                site_env=envs,
                **options,
            )
            sites = list(self.pair.sites)
        self.sites: dict[str, LocalSite] = {site.site: site for site in sites}
        self._stop = asyncio.Event()
        self._retired: dict[str, set[str]] = {name: set() for name in self.sites}
        self._killed: set[str] = set()  # ended by kill-site: nothing of them restarts
        # Control operations and the restart loop act on the same processes.
        self._lock = threading.RLock()

    @property
    def site(self) -> LocalSite:
        """The first site: the one `cluster.json` names and node commands default to."""
        return self.sites[self.topology.site]

    def _s3_env(self, site: str) -> dict[str, str]:
        """With an S3 server, journals are archived (DESIGN.md §9), each site's apart."""
        if self.s3 is None:
            return {}
        env = self.s3.settings_env(self.s3_credentials)
        env["CFS_ARCHIVE_URL"] = self.archive_url(site)
        return env

    def _own_url(self, base: str, site: str) -> str:
        """Two sites share the S3 server but never a place in it: each gets its own
        prefix under `base`; a single site keeps `base` itself."""
        return base if self.topology.peer_site is None else f"{base}/{site}"

    def archive_url(self, site: str) -> str:
        return self._own_url(DEV_ARCHIVE_URL, site)

    def tier_url(self, site: str) -> str:
        return self._own_url(DEV_TIER_URL, site)

    # -- files ---------------------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        return self.state_dir / CONTROL_SOCKET

    def cluster_file(self, site: str | None = None) -> Path:
        return self.state_dir / cluster_file_name(site)

    def _urls(self, site: str) -> list[str]:
        """The site's NATS URLs a client should use (not those retired by a reform)."""
        local = self.sites[site]
        return [s.url for s in local.nats_servers if s.name not in self._retired[site]]

    def cluster_config(self, site: str) -> dict[str, Any]:
        """What a client of `site` needs (`ClientSettings`), its peer's too when paired."""
        local = self.sites[site]
        config: dict[str, Any] = {
            "site": site,
            "nats_urls": self._urls(site),
            "shards": self.topology.shards,
            "s3_endpoint": self.s3.endpoint_url if self.s3 else None,
            "s3_region": self.s3.REGION if self.s3 else None,
            "s3_credentials_file": str(self.s3_credentials) if self.s3 else None,
            "credentials_dir": str(local.credentials_dir) if local.secure else None,
        }
        if self.pair is not None:
            peer = self.pair.b if site == self.pair.a.site else self.pair.a
            config["peer"] = PeerSite(
                site=peer.site,
                nats_urls=self._urls(peer.site),
                credentials_dir=peer.credentials_dir if peer.secure else None,
            ).model_dump(mode="json")
        return config

    def write_cluster_files(self) -> None:
        """Where clients find each site; rewritten when the NATS servers change."""
        for site in self.sites:
            _write_json(self.cluster_file(site), self.cluster_config(site))
        _write_json(self.cluster_file(), self.cluster_config(self.topology.site))

    def write_state(self, state: str) -> None:
        _write_json(
            self.state_dir / STATE_FILE,
            {
                "pid": os.getpid(),
                "state": state,
                "site": self.topology.site,
                "sites": self.topology.sites,
                "nodes": self.topology.node_names,
                "socket": str(self.socket_path),
                "updated": time.time(),
            },
        )

    # -- operations (blocking; the control server runs them in a thread) --------------------
    def site_status(self, site: str) -> dict[str, Any]:
        local = self.sites[site]
        nodes = {}
        for node in local.node_names:
            server = local.nats_server_of(node)
            nodes[node] = {
                "services": {
                    name: {
                        "running": proc.running,
                        "pid": proc.pid,
                        "metrics_port": local.metrics_port(node, name),
                    }
                    for name, proc in local.node_processes(node).items()
                },
                "nats": None
                if server is None
                else {
                    "name": server.name,
                    "running": server.running,
                    "url": server.url,
                    "route_url": server.route_url,
                    "pid": server.pid,
                },
                "swim_port": local.swim_port(node),
            }
        return {
            "killed": site in self._killed,
            "nats_urls": local.urls,
            "nats": [
                {"name": s.name, "running": s.running, "url": s.url} for s in local.nats_servers
            ],
            "nodes": nodes,
            "cluster_file": str(self.cluster_file(site)),
        }

    def status(self) -> dict[str, Any]:
        """Every site's processes; the first site's also at the top (as one site has it)."""
        sites = {name: self.site_status(name) for name in self.sites}
        first = sites[self.topology.site]
        return {
            "site": self.topology.site,
            "state_dir": str(self.state_dir),
            "nats_urls": first["nats_urls"],
            "s3": None
            if self.s3 is None
            else {"running": self.s3.running, "endpoint": self.s3.endpoint_url},
            "nodes": first["nodes"],
            "sites": sites,
            "link": None
            if self.pair is None
            else {"sites": [self.pair.a.site, self.pair.b.site], "state": self.pair.link_state()},
        }

    def _site(self, name: str | None) -> LocalSite:
        """The site a request names (the first one when it names none)."""
        if name is None:
            return self.site
        if name not in self.sites:
            raise DevUsageError(f"unknown site {name!r}; sites: {', '.join(self.sites)}")
        return self.sites[name]

    def kill(self, node: str, services_only: bool = False, site: str | None = None) -> None:
        """`kill -9` a node: its services and (a machine crash) its NATS server."""
        local = self._site(site)
        with self._lock:
            local.kill9(node)
            server = local.nats_server_of(node)
            if server is not None and not services_only and server.running:
                server.kill9()
        log_event(
            log,
            logging.WARNING,
            "dev.node_killed",
            site=local.site,
            node=node,
            nats=not services_only,
        )

    def stop_node(self, node: str, site: str | None = None) -> None:
        """A clean shutdown of a node's services and NATS server."""
        local = self._site(site)
        with self._lock:
            local.stop_node(node)
            server = local.nats_server_of(node)
            if server is not None:
                server.stop()
        log_event(log, logging.INFO, "dev.node_stopped", site=local.site, node=node)

    def start_node(self, node: str, site: str | None = None) -> None:
        """Start whatever of the node is not running (its NATS server first)."""
        local = self._site(site)
        with self._lock:
            server = local.nats_server_of(node)
            if server is not None and not server.running:
                server.start(wait=False)
            local.start_node(node)
        log_event(log, logging.INFO, "dev.node_started", site=local.site, node=node)

    def kill_site(self, site: str) -> dict[str, Any]:
        """Guide scenario 4, a whole site lost: `kill -9` of every service and NATS server
        of the site. Nothing of it restarts until `start_site`."""
        local = self._site(site)
        with self._lock:
            self._killed.add(local.site)
            for node in local.node_names:
                local.kill9(node)
            for server in local.nats_servers:
                if server.running:
                    server.kill9()
        log_event(log, logging.WARNING, "dev.site_killed", site=local.site)
        return self.site_status(local.site)

    def start_site(self, site: str, timeout: float = 120.0) -> dict[str, Any]:
        """Bring a site back on its stores: its NATS servers (together: a cluster's
        members need each other to elect), then every node's services; returns once
        the site is ready."""
        local = self._site(site)
        retired = self._retired[local.site]
        with self._lock:
            servers = [s for s in local.nats_servers if not s.running and s.name not in retired]
            for server in servers:
                server.start(wait=False)
            for server in servers:
                server.wait_healthy(timeout)
            for node in local.node_names:
                if node not in retired:
                    local.start_node(node)
            self._killed.discard(local.site)
        asyncio.run(local.wait_ready(timeout))
        log_event(log, logging.INFO, "dev.site_started", site=local.site)
        return self.site_status(local.site)

    def _linked_pair(self, op: str) -> SitePair:
        if self.pair is None:
            raise DevUsageError(
                f"this dev cluster runs one site ({self.topology.site}): no site link to "
                f"{op} (a topology with peer_site runs two)"
            )
        return self.pair

    def partition(self, sites: list[str] | None = None) -> dict[str, Any]:
        """Cut the link between the two sites: both keep running, nothing crosses."""
        pair = self._linked_pair("partition")
        names = [pair.a.site, pair.b.site]
        if sites is not None and sorted(sites) != sorted(names):
            raise DevUsageError(
                f"--sites {','.join(sites)}: the link is between {names[0]} and {names[1]} "
                f"(--sites {','.join(names)})"
            )
        try:
            pair.partition()
        except TimeoutError as exc:
            raise SupervisorError(str(exc)) from None
        log_event(log, logging.WARNING, "dev.partitioned", sites=names)
        return {"sites": names, "state": pair.link_state()}

    def heal(self) -> dict[str, Any]:
        """Restore the link; the leaf connections come back on their own."""
        pair = self._linked_pair("heal")
        try:
            pair.heal()
        except TimeoutError as exc:
            raise SupervisorError(str(exc)) from None
        log_event(log, logging.INFO, "dev.healed", sites=[pair.a.site, pair.b.site])
        return {"sites": [pair.a.site, pair.b.site], "state": pair.link_state()}

    def reform_nats(self, survivor: str, site: str | None = None) -> dict[str, Any]:
        """Quorum recovery: the survivor's NATS server becomes the seed of a fresh cluster
        (its old store kept aside). Nodes whose server was lost are retired: they can
        only come back as new nodes (`cfs node add`), never with their old state."""
        local = self._site(site)
        if not isinstance(local.nats, NatsCluster):
            raise SupervisorError("this site runs one standalone NATS server: nothing to reform")
        if survivor not in local.node_names or local.nats_server_of(survivor) is None:
            raise SupervisorError(f"{survivor!r} runs no NATS server of this site")
        with self._lock:
            lost = [
                node
                for node in local.node_names
                if (server := local.nats_server_of(node)) is not None and not server.running
            ]
            admission = None
            if local.secure:  # the recovery's admin only, until `open-nats`
                admission = write_auth_conf(
                    local.credentials_dir,
                    local.site,
                    local.shards,
                    only=[Role.ADMIN],
                    name=RECOVERY_AUTH_CONF,
                )
            old_store = local.nats.reform(survivor, admission=admission)
            for node in lost:
                local.kill9(node)  # whatever of it still ran must not rejoin
            self._retired[local.site].update(lost)
        self.write_cluster_files()
        log_event(
            log,
            logging.WARNING,
            "dev.nats_reformed",
            site=local.site,
            survivor=survivor,
            retired=lost,
        )
        return {
            "nats_urls": [s.url for s in local.nats_servers if s.running],
            "old_store": str(old_store),
            "retired": lost,
        }

    def open_nats(self, site: str | None = None) -> dict[str, Any]:
        """End a reform's admission: the site's services may connect again."""
        local = self._site(site)
        if isinstance(local.nats, NatsCluster):
            local.nats.open_to_clients()
        log_event(log, logging.WARNING, "dev.nats_opened", site=local.site)
        return {"nats_urls": [s.url for s in local.nats_servers if s.running]}

    def add_node(
        self, node: str, labels: dict[str, str], site: str | None = None
    ) -> dict[str, Any]:
        """`cfs node add`: a new node's services, and a NATS server beside it while the
        site runs fewer than three (after a quorum loss left one)."""
        local = self._site(site)
        with self._lock:
            try:
                local.add_node(node, labels)
            except ValueError as exc:
                raise SupervisorError(str(exc)) from None
            added = None
            running = [server for server in local.nats_servers if server.running]
            if isinstance(local.nats, NatsCluster) and len(running) < FULL_NATS:
                added = local.nats.add_server(node)
                running.append(added)
            local.start_node(node)
        self.write_cluster_files()
        log_event(
            log,
            logging.INFO,
            "dev.node_added",
            site=local.site,
            node=node,
            nats=added is not None,
        )
        return {"nats_server": None if added is None else added.name, "nats_servers": len(running)}

    def rotate_credentials(
        self, roles: list[str], site: str | None = None, timeout: float = 120.0
    ) -> dict[str, Any]:
        """`cfs cluster rotate-credentials`: the site's keys of `roles` replaced, its
        servers reloaded and those roles' processes restarted onto the new keys."""
        local = self._site(site)
        with self._lock:  # the restart loop must not race the rolling restart
            rotated = asyncio.run(local.rotate_credentials(roles, timeout))
        log_event(log, logging.INFO, "dev.credentials_rotated", site=local.site, keys=rotated)
        return {"site": local.site, "rotated": rotated}

    def handle(self, request: dict[str, Any]) -> Any:
        """One control request -> its result; raises on bad requests."""
        op = request.get("op")
        if op == "status":
            return self.status()
        if op == "down":
            self._stop.set()
            return "stopping"
        if op == "partition":
            sites = request.get("sites")
            return self.partition(None if sites is None else [str(s) for s in sites])
        if op == "heal":
            return self.heal()
        named = request.get("site")
        local = self._site(None if named is None else str(named))
        node = request.get("node")
        if op == "kill-site":
            return self.kill_site(local.site)
        if op == "start-site":
            return self.start_site(local.site, float(request.get("ready_timeout") or 120.0))
        if op in {"kill", "start", "stop"}:
            if not isinstance(node, str) or node not in local.node_names:
                raise DevUsageError(
                    f"unknown node {node!r}; nodes"
                    f"{f' of {local.site}' if len(self.sites) > 1 else ''}: "
                    f"{', '.join(local.node_names)}"
                )
            if op == "start" and node in self._retired[local.site]:
                raise SupervisorError(
                    f"{node} was lost in a quorum recovery; add a new node instead "
                    "(cfs node add --node NAME)"
                )
            if op == "start" and local.site in self._killed:
                raise SupervisorError(
                    f"site {local.site} was killed; bring it back whole: "
                    f"cfs dev start-site {local.site}"
                )
            if op == "kill":
                self.kill(node, bool(request.get("services_only")), local.site)
            elif op == "start":
                self.start_node(node, local.site)
            else:
                self.stop_node(node, local.site)
            return self.site_status(local.site)["nodes"][node]
        if op == "reform-nats":
            return self.reform_nats(str(node), local.site)
        if op == "open-nats":
            return self.open_nats(local.site)
        if op == "rotate-credentials":
            roles = [str(role) for role in request.get("roles") or []]
            return self.rotate_credentials(roles, local.site, float(request.get("timeout") or 120))
        if op == "add-node":
            return self.add_node(str(node), dict(request.get("labels") or {}), local.site)
        raise SupervisorError(f"unknown request {op!r}")

    # -- the daemon ------------------------------------------------------------------------
    async def serve(
        self,
        *,
        ready_timeout: float = 120.0,
        on_ready: Hook | None = None,
        before_stop: Hook | None = None,
    ) -> None:
        """Start everything, answer control requests until `down` or a signal, stop all."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.write_state("starting")
        server: asyncio.base_events.Server | None = None
        running = self.pair if self.pair is not None else self.site
        try:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            server = await asyncio.start_unix_server(self._client, path=str(self.socket_path))
            if self.s3 is not None:
                await asyncio.to_thread(self.s3.write_credentials, self.s3_credentials)
                await asyncio.to_thread(self.s3.start)
            await running.start()
            await running.wait_ready(ready_timeout)
            self.write_cluster_files()
            if self.pair is not None:
                await self._link_replication(ready_timeout)
            if on_ready is not None:
                await on_ready(self)
            self.write_state("ready")
            log_event(
                log,
                logging.INFO,
                "dev.ready",
                sites={name: site.urls for name, site in self.sites.items()},
            )
            await self._restart_exited_until_stopped()
        except BaseException as exc:
            self.write_state(f"failed: {str(exc).splitlines()[0] if str(exc) else exc!r}")
            raise
        finally:
            if server is not None:
                server.close()
            try:
                if before_stop is not None:
                    await before_stop(self)
            finally:
                await asyncio.to_thread(self._stop_all)
                with contextlib.suppress(FileNotFoundError):
                    self.socket_path.unlink()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        self.write_state("stopped")  # not reached after a failure: that state stays

    async def _link_replication(self, timeout: float) -> None:
        """`cfs admin replication-link --peer OTHER` on each site, as an operator runs
        it, through the site's cluster file."""
        assert self.pair is not None
        for here, there in ((self.pair.a, self.pair.b), (self.pair.b, self.pair.a)):
            await self.admin(here.site, timeout, "replication-link", "--peer", there.site)

    async def admin(self, site: str, timeout: float, *args: str) -> str:
        """Run `cfs admin ARGS` against `site`; retried while it exits 3 (the peer
        does not answer over the link yet: leaf connections are still forming)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CFS_")}
        env.update(CFS_CONFIG=str(self.cluster_file(site)), PYTHONPATH=child_pythonpath())
        deadline = time.monotonic() + timeout
        while True:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cfs.cli", "admin", *args,
                env=env, cwd=self.state_dir,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            said = (out or err).decode(errors="replace").strip()
            if proc.returncode == 0:
                log_event(
                    log, logging.INFO, "dev.admin", site=site, command=" ".join(args), said=said
                )
                return said
            if proc.returncode != CLI_UNREACHABLE or time.monotonic() > deadline:
                raise SupervisorError(
                    f"cfs admin {' '.join(args)} on site {site} failed "
                    f"(exit {proc.returncode}): {said}"
                )
            await asyncio.sleep(LINK_RETRY_S)

    async def _restart_exited_until_stopped(self) -> None:
        """The restart policy a real deployment has (Nomad, systemd): a service that
        crashed (the kernel ends a process whose critical task failed) is started again.
        Processes stopped or killed through `cfs dev` stay as they are."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), RESTART_CHECK_S)
            if not self._stop.is_set():
                await asyncio.to_thread(self.restart_exited)

    def restart_exited(self) -> list[str]:
        """Restart crashed services of every site but one killed on purpose (a lost
        site stays lost until `start_site`, whatever its processes did as they died)."""
        with self._lock:
            return [
                name
                for site, local in self.sites.items()
                if site not in self._killed
                for name in local.restart_exited()
            ]

    def _stop_all(self) -> None:
        try:
            if self.pair is not None:
                self.pair.stop()  # both sites and the link proxies
            else:
                self.site.stop()
        finally:
            if self.s3 is not None:
                self.s3.stop()
        log_event(log, logging.INFO, "dev.stopped", sites=list(self.sites))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise SupervisorError("a request is a JSON object")
                result = await asyncio.to_thread(self.handle, request)
                answer: dict[str, Any] = {"ok": True, "result": result}
            except (SupervisorError, KeyError, ValueError) as exc:
                answer = {
                    "ok": False,
                    "error": str(exc).splitlines()[0],
                    "usage": isinstance(exc, DevUsageError),
                }
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cfs.supervisor.devcluster")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--topology", type=Path, default=None)
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        topology = Topology.load(args.topology) if args.topology else Topology.default()
        cluster = DevCluster(args.state_dir, topology)
        asyncio.run(cluster.serve(ready_timeout=args.ready_timeout))
    except SupervisorError as exc:
        log.error("dev.failed", extra={"error": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
