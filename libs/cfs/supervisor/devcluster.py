"""The `cfs dev` daemon: one whole site on this machine, controlled over a Unix socket.

`cfs dev up` starts `python -m cfs.supervisor.devcluster --state-dir DIR` in a session
of its own and returns once the site is ready; later `cfs dev status|kill|start|
stop|down` talk to it through `DIR/control.sock` (one JSON request per line, one
JSON answer). The daemon is the parent of every service, NATS and S3 process (they
die with it: PR_SET_PDEATHSIG), so nothing outlives it, and `kill -9` of a node
stays a real `kill -9` of real processes.

Files under the state directory:
- `cluster.json`: what clients need (site, nats_urls, shards, s3_endpoint, s3_region,
  s3_credentials_file); the `cfs` commands find it as `./.cfs-dev/cluster.json` or
  through `CFS_CONFIG`. Services get the S3 settings as `CFS_S3_*` variables.
- `credentials/s3.ini`: the S3 server's keys (AWS credentials-file format, 0600); only
  its name is in cluster.json.
- `dev.json`: the daemon's pid, state (`starting`, `ready`, `failed: ...`, `stopped`).
- `devd.log`, `logs/<node>.<service>.log`, `nats/<server>/`, `nodes/<node>/`, `s3/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cfs.security import RECOVERY_AUTH_CONF, Role, write_auth_conf
from cfs.supervisor.errors import SupervisorError
from cfs.supervisor.nats import NatsCluster
from cfs.supervisor.process import log_event
from cfs.supervisor.s3 import S3Server
from cfs.supervisor.site import LocalSite
from cfs.supervisor.topology import Topology

log = logging.getLogger(__name__)

RESTART_CHECK_S = 1.0

CLUSTER_FILE = "cluster.json"
STATE_FILE = "dev.json"
CONTROL_SOCKET = "control.sock"
LOG_FILE = "devd.log"
S3_CREDENTIALS_FILE = "s3.ini"
FULL_NATS = 3

Hook = Callable[["DevCluster"], Awaitable[None]]


DEV_ARCHIVE_URL = "s3://cfs-dev-backups/archive"
DEV_TIER_URL = "s3://cfs-dev-tier/data"  # `make run` sets the data tier to cache mode here


class DevCluster:
    """A `LocalSite` plus an S3 server, with the operations `cfs dev` offers."""

    def __init__(self, state_dir: Path, topology: Topology) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.topology = topology
        self.s3 = S3Server(self.state_dir / "s3", port=topology.s3_port) if topology.s3 else None
        self.s3_credentials = self.state_dir / "credentials" / S3_CREDENTIALS_FILE
        s3_env = self.s3.settings_env(self.s3_credentials) if self.s3 is not None else {}
        if self.s3 is not None:  # with an S3 server, journals are archived (DESIGN.md §9)
            s3_env["CFS_ARCHIVE_URL"] = DEV_ARCHIVE_URL
        self.site = LocalSite(
            self.state_dir,
            topology.node_names,
            servers=topology.nats_servers,
            shards=topology.shards,
            site=topology.site,
            labels={node.name: node.labels for node in topology.nodes},
            env={**s3_env, **topology.env},
            ec=topology.ec,
        )
        self._stop = asyncio.Event()
        self._retired: set[str] = set()

    # -- files ---------------------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        return self.state_dir / CONTROL_SOCKET

    def write_cluster_file(self) -> None:
        """Where clients find the site; rewritten when the NATS servers change."""
        config = {
            "site": self.topology.site,
            "nats_urls": [s.url for s in self.site.nats_servers if s.name not in self._retired],
            "shards": self.topology.shards,
            "s3_endpoint": self.s3.endpoint_url if self.s3 else None,
            "s3_region": self.s3.REGION if self.s3 else None,
            "s3_credentials_file": str(self.s3_credentials) if self.s3 else None,
            "credentials_dir": str(self.site.credentials_dir) if self.site.secure else None,
        }
        _write_json(self.state_dir / CLUSTER_FILE, config)

    def write_state(self, state: str) -> None:
        _write_json(
            self.state_dir / STATE_FILE,
            {
                "pid": os.getpid(),
                "state": state,
                "site": self.topology.site,
                "nodes": self.topology.node_names,
                "socket": str(self.socket_path),
                "updated": time.time(),
            },
        )

    # -- operations (blocking; the control server runs them in a thread) --------------------
    def status(self) -> dict[str, Any]:
        nodes = {}
        for node in self.site.node_names:
            server = self.site.nats_server_of(node)
            nodes[node] = {
                "services": {
                    name: {"running": proc.running, "pid": proc.pid}
                    for name, proc in self.site.node_processes(node).items()
                },
                "nats": None
                if server is None
                else {"name": server.name, "running": server.running, "url": server.url},
            }
        return {
            "site": self.topology.site,
            "state_dir": str(self.state_dir),
            "nats_urls": self.site.urls,
            "s3": None
            if self.s3 is None
            else {"running": self.s3.running, "endpoint": self.s3.endpoint_url},
            "nodes": nodes,
        }

    def kill(self, node: str, services_only: bool = False) -> None:
        """`kill -9` a node: its services and (a machine crash) its NATS server."""
        self.site.kill9(node)
        server = self.site.nats_server_of(node)
        if server is not None and not services_only and server.running:
            server.kill9()
        log_event(log, logging.WARNING, "dev.node_killed", node=node, nats=not services_only)

    def stop_node(self, node: str) -> None:
        """A clean shutdown of a node's services and NATS server."""
        self.site.stop_node(node)
        server = self.site.nats_server_of(node)
        if server is not None:
            server.stop()
        log_event(log, logging.INFO, "dev.node_stopped", node=node)

    def start_node(self, node: str) -> None:
        """Start whatever of the node is not running (its NATS server first)."""
        server = self.site.nats_server_of(node)
        if server is not None and not server.running:
            server.start(wait=False)
        self.site.start_node(node)
        log_event(log, logging.INFO, "dev.node_started", node=node)

    def reform_nats(self, survivor: str) -> dict[str, Any]:
        """Quorum recovery: the survivor's NATS server becomes the seed of a fresh cluster
        (its old store kept aside). Nodes whose server was lost are retired: they can
        only come back as new nodes (`cfs node add`), never with their old state."""
        if not isinstance(self.site.nats, NatsCluster):
            raise SupervisorError("this site runs one standalone NATS server: nothing to reform")
        if survivor not in self.site.node_names or self.site.nats_server_of(survivor) is None:
            raise SupervisorError(f"{survivor!r} runs no NATS server of this site")
        lost = [
            node
            for node in self.site.node_names
            if (server := self.site.nats_server_of(node)) is not None and not server.running
        ]
        admission = None
        if self.site.secure:  # the recovery's admin only, until `open-nats`
            admission = write_auth_conf(
                self.site.credentials_dir,
                self.site.site,
                self.site.shards,
                only=[Role.ADMIN],
                name=RECOVERY_AUTH_CONF,
            )
        old_store = self.site.nats.reform(survivor, admission=admission)
        for node in lost:
            self.site.kill9(node)  # whatever of it still ran must not rejoin
        self._retired.update(lost)
        self.write_cluster_file()
        log_event(log, logging.WARNING, "dev.nats_reformed", survivor=survivor, retired=lost)
        return {
            "nats_urls": [s.url for s in self.site.nats_servers if s.running],
            "old_store": str(old_store),
            "retired": lost,
        }

    def open_nats(self) -> dict[str, Any]:
        """End a reform's admission: the site's services may connect again."""
        if isinstance(self.site.nats, NatsCluster):
            self.site.nats.open_to_clients()
        log_event(log, logging.WARNING, "dev.nats_opened")
        return {"nats_urls": [s.url for s in self.site.nats_servers if s.running]}

    def add_node(self, node: str, labels: dict[str, str]) -> dict[str, Any]:
        """`cfs node add`: a new node's services, and a NATS server beside it while the
        site runs fewer than three (after a quorum loss left one)."""
        try:
            self.site.add_node(node, labels)
        except ValueError as exc:
            raise SupervisorError(str(exc)) from None
        added = None
        running = [server for server in self.site.nats_servers if server.running]
        if isinstance(self.site.nats, NatsCluster) and len(running) < FULL_NATS:
            added = self.site.nats.add_server(node)
            running.append(added)
        self.site.start_node(node)
        self.write_cluster_file()
        log_event(log, logging.INFO, "dev.node_added", node=node, nats=added is not None)
        return {"nats_server": None if added is None else added.name, "nats_servers": len(running)}

    def handle(self, request: dict[str, Any]) -> Any:
        """One control request -> its result; raises on bad requests."""
        op = request.get("op")
        node = request.get("node")
        if op == "status":
            return self.status()
        if op in {"kill", "start", "stop"}:
            if not isinstance(node, str) or node not in self.site.node_names:
                raise SupervisorError(
                    f"unknown node {node!r}; nodes: {', '.join(self.site.node_names)}"
                )
            if op == "start" and node in self._retired:
                raise SupervisorError(
                    f"{node} was lost in a quorum recovery; add a new node instead "
                    "(cfs node add --node NAME)"
                )
            if op == "kill":
                self.kill(node, bool(request.get("services_only")))
            elif op == "start":
                self.start_node(node)
            else:
                self.stop_node(node)
            return self.status()["nodes"][node]
        if op == "reform-nats":
            return self.reform_nats(str(node))
        if op == "open-nats":
            return self.open_nats()
        if op == "add-node":
            return self.add_node(str(node), dict(request.get("labels") or {}))
        if op == "down":
            self._stop.set()
            return "stopping"
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
        try:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            server = await asyncio.start_unix_server(self._client, path=str(self.socket_path))
            if self.s3 is not None:
                await asyncio.to_thread(self.s3.write_credentials, self.s3_credentials)
                await asyncio.to_thread(self.s3.start)
            await self.site.start()
            await self.site.wait_ready(ready_timeout)
            self.write_cluster_file()
            if on_ready is not None:
                await on_ready(self)
            self.write_state("ready")
            log_event(log, logging.INFO, "dev.ready", site=self.topology.site, urls=self.site.urls)
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

    async def _restart_exited_until_stopped(self) -> None:
        """The restart policy a real deployment has (Nomad, systemd): a service that
        crashed (the kernel ends a process whose critical task failed) is started again.
        Processes stopped or killed through `cfs dev` stay as they are."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), RESTART_CHECK_S)
            if not self._stop.is_set():
                await asyncio.to_thread(self.site.restart_exited)

    def _stop_all(self) -> None:
        try:
            self.site.stop()
        finally:
            if self.s3 is not None:
                self.s3.stop()
        log_event(log, logging.INFO, "dev.stopped", site=self.topology.site)

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
                answer = {"ok": False, "error": str(exc).splitlines()[0]}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()


class DevControl:
    """The client side of the control socket (what `cfs dev status|kill|...` use)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir).resolve()

    def state(self) -> dict[str, Any] | None:
        """The daemon's state file, or None if there never was one."""
        try:
            data: dict[str, Any] = json.loads((self.state_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return data

    def daemon_pid(self) -> int | None:
        """The daemon's pid if it is alive."""
        state = self.state()
        if state is None or not isinstance(state.get("pid"), int):
            return None
        pid = int(state["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def call(self, op: str, timeout: float = 120.0, **args: Any) -> Any:
        """Send one request; SupervisorError with the daemon's message if it fails."""
        if self.daemon_pid() is None:
            raise SupervisorError(
                f"no dev cluster is running in {self.state_dir} (start one: cfs dev up)"
            )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.state_dir / CONTROL_SOCKET))
                sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError as exc:
                raise SupervisorError(f"dev cluster in {self.state_dir}: {exc}") from exc
        try:
            answer = json.loads(data)
        except ValueError as exc:
            raise SupervisorError(f"dev cluster in {self.state_dir} did not answer") from exc
        if not answer.get("ok"):
            raise SupervisorError(str(answer.get("error")))
        return answer.get("result")

    def wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False


def running_dev_site() -> DevControl | None:
    """The dev site this shell's client config points at ($CFS_DEV_DIR, else the
    directory of the cluster config file), if its daemon runs."""
    from cfs.fuse.config import DEFAULT_CONFIG, config_path

    named = os.environ.get("CFS_DEV_DIR")
    state_dir = Path(named) if named else (config_path() or DEFAULT_CONFIG).resolve().parent
    control = DevControl(state_dir)
    return control if control.daemon_pid() is not None else None


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
