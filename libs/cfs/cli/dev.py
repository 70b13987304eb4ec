"""`cfs dev`: a whole ClaudeFS site (or two linked ones) on this machine as real processes.

    cfs dev up [--topology deploy/topologies/six-nodes.yaml]   # returns when ready
    cfs dev status | kill NODE | start NODE | stop NODE | down
    cfs dev run                                              # `make run`

    cfs dev up --topology deploy/topologies/two-sites.yaml     # site-a and site-b
    cfs dev kill NODE --site site-b | kill-site site-b | start-site site-b
    cfs dev partition --sites site-a,site-b | heal

The sites run under a daemon (`cfs.supervisor.devcluster`) that owns every
process; these commands talk to it through its control socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.supervisor.devcluster import DevCluster
from cfs.supervisor.devcontrol import (
    CLUSTER_FILE,
    LOG_FILE,
    STATE_FILE,
    DevControl,
    DevUsageError,
    cluster_file_name,
)
from cfs.supervisor.topology import Topology

app = typer.Typer(
    help="Local development site: NATS cluster, S3 server and every node's services.",
    no_args_is_help=True,
)
console = Console()

StateDirOpt = Annotated[
    Path,
    typer.Option(
        "--state-dir", envvar="CFS_DEV_DIR", help="where stores, logs and cluster.json live"
    ),
]
DEFAULT_STATE_DIR = Path(".cfs-dev")
TopologyOpt = Annotated[
    Path | None,
    typer.Option("--topology", help="YAML topology (deploy/topologies/); default: 3 nodes"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
SiteOpt = Annotated[
    str | None, typer.Option("--site", help="the node's site (default: the first site)")
]
SiteArg = Annotated[str, typer.Argument(help="site name, e.g. site-b")]


def _not_running(state_dir: Path) -> DevControl:
    """One site per state directory: its stores and ports are the running daemon's."""
    control = DevControl(state_dir)
    running = control.daemon_pid()
    if running is not None:
        raise CliError(
            f"a dev site is already running from {control.state_dir} (pid {running}); "
            "stop it first: cfs dev down"
        )
    return control


def _topology(path: Path | None) -> Topology:
    return Topology.load(path) if path is not None else Topology.default()


@app.command("up")
@one_line_errors
def up(
    topology: TopologyOpt = None,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    foreground: Annotated[
        bool, typer.Option("--foreground", help="stay attached; Ctrl-C stops the site")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the site")] = 180.0,
) -> None:
    """Start a site and return when every service is ready."""
    spec = _topology(topology)  # a bad file fails here, before anything starts
    control = _not_running(state_dir)
    if foreground:
        cluster = DevCluster(state_dir, spec)
        console.print(f"starting {spec.summary}; Ctrl-C stops it")
        asyncio.run(cluster.serve(ready_timeout=timeout, on_ready=_print_ready))
        return
    control.state_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "cfs.supervisor.devcluster",
        "--state-dir",
        str(control.state_dir),
    ]
    if topology is not None:
        argv += ["--topology", str(topology.resolve())]
    argv += ["--ready-timeout", str(timeout)]
    with (control.state_dir / LOG_FILE).open("ab") as log:
        # A session of its own: the site outlives this command and its terminal.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + timeout + 30
    with console.status(f"starting {spec.summary}..."):
        while True:
            state = control.state() or {}
            if state.get("pid") == proc.pid and state.get("state") == "ready":
                break
            if proc.poll() is not None:
                raise CliError(
                    f"the dev site did not start (exit {proc.returncode}): "
                    f"{state.get('state', 'no state')}; see {control.state_dir / LOG_FILE}"
                )
            if time.monotonic() > deadline:
                proc.terminate()
                raise CliError(
                    f"the dev site was not ready after {timeout:.0f}s; see "
                    f"{control.state_dir / LOG_FILE}"
                )
            time.sleep(0.2)
    _print_status(control.call("status"))
    console.print(f"clients find it through {control.state_dir / CLUSTER_FILE}")
    if spec.peer_site is not None:
        files = ", ".join(str(control.state_dir / cluster_file_name(s)) for s in spec.sites)
        console.print(f"each site through its own: {files}")


async def _print_ready(cluster: DevCluster) -> None:
    _print_status(await asyncio.to_thread(cluster.status))


@app.command("status")
@one_line_errors
def status(state_dir: StateDirOpt = DEFAULT_STATE_DIR, as_json: JsonOpt = False) -> None:
    """Which processes of the dev site(s) run, and the site link (exit 1 when no site
    is running)."""
    result = DevControl(state_dir).call("status")
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_status(result)


@app.command("kill")
@one_line_errors
def kill(
    node: Annotated[str, typer.Argument(help="node name, e.g. storage-1")],
    services_only: Annotated[
        bool, typer.Option("--services-only", help="leave the node's NATS server running")
    ] = False,
    site: SiteOpt = None,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
) -> None:
    """`kill -9` a node: every service process and (unless --services-only) its NATS server."""
    _call(state_dir, "kill", node=node, site=site, services_only=services_only)
    console.print(f"killed {node}" + (" (services only)" if services_only else ""))


@app.command("start")
@one_line_errors
def start(
    node: Annotated[str, typer.Argument()],
    site: SiteOpt = None,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
) -> None:
    """Start what is not running of a node (as systemd would after a reboot)."""
    _call(state_dir, "start", node=node, site=site)
    console.print(f"started {node}")


@app.command("stop")
@one_line_errors
def stop(
    node: Annotated[str, typer.Argument()],
    site: SiteOpt = None,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
) -> None:
    """Stop a node cleanly (SIGTERM to its services and NATS server)."""
    _call(state_dir, "stop", node=node, site=site)
    console.print(f"stopped {node}")


@app.command("kill-site")
@one_line_errors
def kill_site(site: SiteArg, state_dir: StateDirOpt = DEFAULT_STATE_DIR) -> None:
    """`kill -9` every process of a site, services and NATS servers: the whole site
    lost (guide scenario 4). Nothing of it restarts until `cfs dev start-site`."""
    _call(state_dir, "kill-site", site=site)
    console.print(f"killed site {site} (every service and NATS server)")


@app.command("start-site")
@one_line_errors
def start_site(
    site: SiteArg,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the site")] = 120.0,
) -> None:
    """Bring a site back on its stores (after kill-site); returns once it is ready."""
    _call(state_dir, "start-site", site=site, ready_timeout=timeout, call_timeout=timeout + 30)
    console.print(f"started site {site}")


@app.command("partition")
@one_line_errors
def partition(
    sites: Annotated[
        str | None,
        typer.Option("--sites", help="the two linked sites, comma-separated (default: both)"),
    ] = None,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
) -> None:
    """Cut the link between the two sites: both keep running, nothing crosses."""
    names = None
    if sites is not None:
        names = [name.strip() for name in sites.split(",")]
        if len(names) != 2 or not all(names) or names[0] == names[1]:
            raise CliError(
                f"--sites {sites}: name the two linked sites, e.g. --sites site-a,site-b",
                ExitCode.USAGE,
            )
    link = _call(state_dir, "partition", sites=names)
    console.print(f"link {' <-> '.join(link['sites'])}: {link['state']}")


@app.command("heal")
@one_line_errors
def heal(state_dir: StateDirOpt = DEFAULT_STATE_DIR) -> None:
    """Restore the link cut by `cfs dev partition`; replication resumes by itself."""
    link = _call(state_dir, "heal")
    console.print(f"link {' <-> '.join(link['sites'])}: healed")


def _call(state_dir: Path, op: str, call_timeout: float = 120.0, **args: Any) -> Any:
    """One request to the daemon; what the operator got wrong exits 2."""
    try:
        return DevControl(state_dir).call(op, timeout=call_timeout, **args)
    except DevUsageError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None


@app.command("down")
@one_line_errors
def down(
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    purge: Annotated[bool, typer.Option("--purge", help="also delete every store and log")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for a clean stop")] = 60.0,
) -> None:
    """Stop every process of the dev site (state is kept unless --purge)."""
    control = DevControl(state_dir)
    pid = control.daemon_pid()
    if pid is not None:
        control.call("down")
        if not control.wait_exit(pid, timeout):
            os.kill(pid, 9)  # its children die with it (PR_SET_PDEATHSIG)
            raise CliError(f"the dev site did not stop within {timeout:.0f}s; killed pid {pid}")
        console.print("dev site stopped")
    elif not purge:
        raise CliError(f"no dev site is running from {control.state_dir}")
    if purge and control.state_dir.exists():
        marks = [control.state_dir / name for name in (STATE_FILE, LOG_FILE)]
        if not any(mark.exists() for mark in marks):
            # `--state-dir .` or a typo must not delete a directory that is not a site's,
            # an empty one included (the working directory, say): `up` writes its log first
            raise CliError(
                f"{control.state_dir} holds no dev site (no {STATE_FILE} or {LOG_FILE}): "
                "not deleted",
                ExitCode.USAGE,
            )
        shutil.rmtree(control.state_dir)
        console.print(f"removed {control.state_dir}")


def _print_status(status: dict[str, Any]) -> None:
    for name, site in status["sites"].items():
        _print_site(name, site)
    if status.get("s3"):
        console.print(f"S3:   {status['s3']['endpoint']}")
    if status.get("link"):
        link = status["link"]
        console.print(f"Link {' <-> '.join(link['sites'])}: {_LINK_STATES[link['state']]}")


_LINK_STATES = {
    "up": "[green]up[/]",
    "cut": "[red]cut[/] (cfs dev heal restores it)",
    "down": "[yellow]down[/] (not cut: a site or server is down, or reconnecting)",
}


def _print_site(name: str, site: dict[str, Any]) -> None:
    killed = " [red](killed: cfs dev start-site brings it back)[/]" if site["killed"] else ""
    table = Table(title=f"ClaudeFS dev site {name}{killed}", show_header=True)
    table.add_column("node")
    table.add_column("nats")
    services = sorted({name for info in site["nodes"].values() for name in info["services"]})
    for service in services:
        table.add_column(service)
    for node, info in site["nodes"].items():
        nats = info.get("nats")
        cells = ["-" if nats is None else _mark(nats["running"])]
        for service in services:
            proc = info["services"].get(service, {})
            cell = _mark(bool(proc.get("running")), proc.get("pid"))
            if proc.get("metrics_port"):
                cell += f" :{proc['metrics_port']}"
            cells.append(cell)
        table.add_row(node, *cells)
    console.print(table)
    console.print("Metrics: http://127.0.0.1:PORT/metrics (PORT: the :number beside each pid)")
    servers = ", ".join(f"{s['url']} {_mark(s['running'])}" for s in site["nats"])
    console.print(f"NATS: {servers}")


def _mark(running: bool, pid: int | None = None) -> str:
    if running:
        return f"[green]up[/]{f' {pid}' if pid else ''}"
    return "[red]down[/]"


# -- make run -------------------------------------------------------------------------------
SAMPLE_FILES = {
    "README.txt": b"Welcome to ClaudeFS. This tree was written through the FUSE mount.\n",
    "docs/guide.md": b"# Disaster recovery\n\nSee ../shared/seeds/disaster-recovery-guide.md\n",
    "docs/notes/todo.txt": b"- drain a node: cfs admin node-drain storage-2\n",
}
SAMPLE_BLOB = "data/sample-6MiB.bin"  # more than one 4 MiB chunk: erasure-coded stripes


@app.command("run")
@one_line_errors
def run(
    mountpoint: Annotated[Path, typer.Option(help="where to mount the site")] = Path("mnt"),
    topology: TopologyOpt = None,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the site")] = 180.0,
) -> None:
    """`make run`: start a site, mount it, write a sample tree, print its status, and stay
    in the foreground until Ctrl-C; then unmount and stop every process."""
    from cfs.fuse.config import is_fuse_mount

    spec = _topology(topology)
    control = _not_running(state_dir)
    mnt = mountpoint.resolve()
    if is_fuse_mount(mnt):
        raise CliError(f"{mnt} is already mounted; unmount it first: cfs umount {mountpoint}")
    mnt.mkdir(parents=True, exist_ok=True)
    mount = _MountProcess(mnt, control.state_dir)
    cluster = DevCluster(state_dir, spec)
    console.print(f"starting {spec.summary}...")
    asyncio.run(
        cluster.serve(ready_timeout=timeout, on_ready=mount.on_ready, before_stop=mount.on_stop)
    )
    console.print("stopped: unmounted and every process ended")


class _MountProcess:
    """The FUSE mount of `make run`, owned by the dev process like every other child."""

    def __init__(self, mnt: Path, state_dir: Path) -> None:
        self.mnt = mnt
        self.state_dir = state_dir
        self.proc: Any = None

    async def on_ready(self, cluster: DevCluster) -> None:
        from cfs.fuse.config import is_fuse_mount
        from cfs.security import Role
        from cfs.supervisor.process import ManagedProcess

        status = await asyncio.to_thread(cluster.status)
        credentials = cluster.site.credentials(Role.CLIENT)
        self.proc = ManagedProcess(
            "mount",
            [
                sys.executable,
                "-m",
                "cfs.fuse",
                str(self.mnt),
                "--cluster",
                ",".join(status["nats_urls"]),
                "--site",
                cluster.topology.site,
                "--shards",
                str(cluster.topology.shards),
                *(["--credentials", str(credentials)] if credentials else []),
            ],
            log_path=self.state_dir / "logs" / "mount.log",
        )
        self.proc.start()
        await asyncio.to_thread(
            self.proc.wait_until, lambda: is_fuse_mount(self.mnt), 60.0, f"{self.mnt} mounted"
        )
        env = {**os.environ, "CFS_CONFIG": str(cluster.state_dir / CLUSTER_FILE)}
        if cluster.s3 is not None:  # the data tier in cache mode, each site's its own
            for site in cluster.sites:
                tier = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "cfs.cli", "admin", "tier-config", "--mode", "cache",
                     "--url", cluster.tier_url(site)],
                    env={**env, "CFS_CONFIG": str(cluster.cluster_file(site))},
                    check=False, capture_output=True, text=True,
                )  # fmt: skip
                console.print((tier.stdout or tier.stderr).strip())
        written = await asyncio.to_thread(_write_sample_tree, self.mnt)
        _print_status(status)
        console.print(f"mounted at [bold]{self.mnt}[/]; sample tree: {written}")
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cfs.cli", "admin", "status"],
            env=env,
            check=False,
        )
        console.print("press Ctrl-C to unmount and stop")

    async def on_stop(self, cluster: DevCluster) -> None:
        if self.proc is None:
            return
        await asyncio.to_thread(_unmount, self.mnt)
        await asyncio.to_thread(self.proc.stop, 30.0)


def _write_sample_tree(mnt: Path) -> str:
    """A few files and directories (kept if a previous run wrote them)."""
    for name, data in SAMPLE_FILES.items():
        path = mnt / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    blob = mnt / SAMPLE_BLOB
    if not blob.exists():
        blob.parent.mkdir(parents=True, exist_ok=True)
        with blob.open("wb") as f:
            f.write(os.urandom(6 * 1024 * 1024))
            f.flush()
            os.fsync(f.fileno())
    return f"{len(SAMPLE_FILES) + 1} files under {mnt}"


def _unmount(mnt: Path) -> None:
    from cfs.fuse.config import is_fuse_mount

    if not is_fuse_mount(mnt):
        return
    argv = ["umount", str(mnt)] if os.geteuid() == 0 else ["fusermount3", "-u", str(mnt)]
    if subprocess.run(argv, capture_output=True, check=False).returncode != 0:
        lazy = ["umount", "-l", str(mnt)] if os.geteuid() == 0 else ["fusermount3", "-uz", str(mnt)]
        subprocess.run(lazy, capture_output=True, check=False)
