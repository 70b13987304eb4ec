"""Quorum recovery without the dev supervisor (guide scenario 3, option 2): the operator, Nomad.

A real 3-node site (NATS servers with TLS and NKey auth, metadata-raft and membership
per node). Acknowledged namespace operations, then two nodes die (kill -9: their
services and their NATS servers). `cfs admin raft-force-leader` runs as a subprocess
with no `cfs dev` daemon anywhere: it exports, prints the steps, and waits. The test
is the operator: it reads the printed steps and runs their commands from outside
(stops the survivor's server, moves the store aside, starts the seed and the witness
with the written configs, stops the witness, reloads the seed). The command then
imports and hands the lease; every acknowledged operation is there and the shard
writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cfs.bus import BusError
from cfs.client import MetadataClient
from cfs.security import AUTH_CONF
from cfs.supervisor import LocalSite
from cfs.supervisor.nats import nats_server_binary

CFS = str(Path(sys.executable).parent / "cfs")
SITE = "qm"
SURVIVOR = "storage-3"
LOST = ("storage-1", "storage-2")

pytestmark = pytest.mark.expected_logs(
    "nats.disconnected",
    "nats.error",
    "lease.*",
    "leader.lost",
    "follower.retry",
    "retry.waiting",
    "retry.gave_up",
    "member.down",
    "member.write_retry",
    "service.degraded",
    "health.write_failed",
    "leader.append_retry",
    "leader.fence_failed",
    "projection.rebuilt",
)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[LocalSite]:
    running = LocalSite(
        tmp_path / "site", nodes=3, site=SITE, services=["metadata-raft", "membership"]
    )
    try:
        asyncio.run(running.start())
        asyncio.run(running.wait_ready())
        yield running
    finally:
        running.stop()


class Operator:
    """Runs what the printed steps say; every process it starts is stopped at the end."""

    def __init__(self, site: LocalSite, logs: Path) -> None:
        self.site = site
        self.logs = logs
        self.servers: list[subprocess.Popen[bytes]] = []
        self.done: list[str] = []
        self.env = {
            **os.environ,
            "PATH": f"{Path(nats_server_binary()).parent}:{os.environ['PATH']}",
        }

    def perform(self, kind: str, commands: list[str]) -> None:
        self.done.append(kind)
        if kind == "stop-server":
            server = self.site.nats_server_of(SURVIVOR)
            assert server is not None
            server.stop()
            return
        for command in commands:
            if command.startswith("nats-server "):
                log = (self.logs / f"{kind}.log").open("wb")
                server = subprocess.Popen(
                    [nats_server_binary(), *shlex.split(command)[1:]],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                # reaped when it exits, as the operator's shell would: a printed step
                # waits for the pid to be gone (`tail --pid`), which a zombie never is
                threading.Thread(target=server.wait, daemon=True).start()
                self.servers.append(server)
            else:
                subprocess.run(command, shell=True, check=True, env=self.env)

    def stop(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.servers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _steps(lines: queue.Queue[str | None]) -> Iterator[tuple[str, str, list[str]]]:
    """(actor, kind, commands) of each printed step, as soon as it is complete."""
    current: tuple[str, str, list[str]] | None = None
    while True:
        line = lines.get(timeout=180)
        if line is not None and line.startswith("    $ ") and current is not None:
            current[2].append(line.removeprefix("    $ "))
            continue
        if line is not None and line.startswith("    why: "):
            continue
        if current is not None:
            yield current
            current = None
        if line is None:
            return
        header = re.match(r"\[\d+/\d+\] (\w+) ([\w-]+): ", line)
        if header:
            current = (header.group(1), header.group(2), [])


def _reader(stream: object, out: queue.Queue[str | None], copy: list[str]) -> None:
    for line in iter(stream.readline, ""):  # type: ignore[attr-defined]
        copy.append(line)
        out.put(line.rstrip("\n"))
    out.put(None)


async def _acknowledged(site: LocalSite, names: list[str]) -> None:
    async with await site.client("writer") as bus:
        client = MetadataClient(bus, deadline_s=10.0)
        for name in names:
            await client.mkdir(1, name)


async def _journal_replicated(site: LocalSite) -> None:
    """Every replica of META_001 holds everything (what the survivor will be seeded from)."""
    deadline = time.monotonic() + 30
    async with await site.client("probe") as bus:
        while True:
            info = await bus.js.stream_info("META_001")
            replicas = (info.cluster.replicas if info.cluster else None) or []
            if len(replicas) == 2 and all(r.current and not r.lag for r in replicas):
                return
            assert time.monotonic() < deadline, info.cluster
            await asyncio.sleep(0.2)


async def _names_and_write(url: str, site: LocalSite) -> tuple[set[str], float]:
    """The root's names, and how long until a new mkdir succeeded on the survivor."""
    from cfs.bus import Bus

    async with await Bus.connect(
        [url],
        site=SITE,
        node="check",
        credentials=site.credentials("admin"),
        tls_ca=site.ca,
    ) as bus:
        client = MetadataClient(bus, deadline_s=5.0)
        names = {entry.name async for entry in client.readdir(1)}
        started = time.monotonic()
        while True:
            try:
                await client.mkdir(1, "after-recovery")
                return names, time.monotonic() - started
            except (BusError, OSError, TimeoutError):
                assert time.monotonic() - started < 30
                await asyncio.sleep(0.5)


def test_force_leader_without_supervisor_follows_the_operator(
    site: LocalSite, tmp_path: Path
) -> None:
    names = [f"acked-{i}" for i in range(25)]
    asyncio.run(_acknowledged(site, names))
    asyncio.run(_journal_replicated(site))
    survivor = site.nats_server_of(SURVIVOR)
    assert survivor is not None
    for node in LOST:  # the nodes die: services and NATS servers, kill -9
        site.kill9(node)
        server = site.nats_server_of(node)
        assert server is not None
        server.kill9()

    recovery = tmp_path / "recovery"
    env = {
        **site.cli_env(),
        "CFS_CREDENTIALS_DIR": str(site.credentials_dir),
        "CFS_DEV_DIR": str(tmp_path / "no-dev-site"),  # no supervisor anywhere
    }
    env.pop("CFS_NATS_CREDENTIALS")
    # Bad input: one line, exit 2, nothing done (the survivor's config is needed).
    refused = subprocess.run(
        [
            CFS,
            "admin",
            "raft-force-leader",
            "--shard",
            "*",
            "--leader",
            SURVIVOR,
            "--yes-i-know",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines()[-1].endswith("(--nats-config FILE)"), refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "recovery").exists()
    operator = Operator(site, tmp_path)
    stderr: list[str] = []
    lines: queue.Queue[str | None] = queue.Queue()
    started = time.monotonic()
    cli = subprocess.Popen(
        [
            CFS, "admin", "raft-force-leader", "--shard", "*", "--leader", SURVIVOR,
            "--yes-i-know", "--nats-config", str(survivor.config_path),
            "--recovery-dir", str(recovery), "--wait", "60",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    reader = threading.Thread(target=_reader, args=(cli.stderr, lines, stderr), daemon=True)
    reader.start()
    try:
        printed: dict[str, list[str]] = {}
        for actor, kind, commands in _steps(lines):
            printed[kind] = commands
            if actor == "operator":
                operator.perform(kind, commands)
        stdout = cli.stdout.read() if cli.stdout else ""
        assert cli.wait(30) == 0, "".join(stderr) + stdout
        took = time.monotonic() - started
        text = "".join(stderr)
        # What the operator was told: which server, its store, the exact commands.
        assert operator.done == [
            "stop-server", "move-store", "start-seed", "start-witness",
            "stop-witness", "open", "keep-config",
        ], text  # fmt: skip
        assert f"stop NATS server {SURVIVOR} ({survivor.url})" in text
        assert printed["move-store"][0].startswith(f"mv {survivor.store_dir} "), printed
        assert printed["start-seed"][-1] == f"nats-server -c {survivor.state_dir}/seed.conf"
        assert "gave up" not in text
        assert f"quorum recovered on {SURVIVOR} for shards 001" in stdout, stdout
        # Durability: the old store moved aside, never deleted; the export on disk.
        lost_stores = list(survivor.state_dir.glob("store.lost-*"))
        assert len(lost_stores) == 1 and any(lost_stores[0].rglob("*")), lost_stores
        assert (recovery / "export" / "manifest.json").is_file()
        assert (recovery / "plan.json").is_file()
        # No service reached the seed before the import was complete: refused until the
        # reload that admitted them again, none refused after it. The reload ends at its
        # summary line: a connection checked against the old authorization while it was
        # being applied is logged between its "Reloaded: ..." lines.
        seed_log = (tmp_path / "start-seed.log").read_text().splitlines()
        opened = next(
            i for i, line in enumerate(seed_log) if "Reloaded server configuration" in line
        )
        assert any("authentication error" in line for line in seed_log[:opened])
        assert not any("authentication error" in line for line in seed_log[opened:])
        # RPO: every acknowledged operation the survivor held; the shard writes again.
        found, write_s = asyncio.run(_names_and_write(survivor.url, site))
        assert set(names) <= found, sorted(set(names) - found)
        print(f"\nquorum recovery without supervisor: {took:.1f}s, first write {write_s:.1f}s")
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait(10)
        with contextlib.suppress(OSError):
            if cli.stdout:
                cli.stdout.close()
        site.stop()  # the services first: they leave while their server still runs
        operator.stop()


# -- the Nomad runner, end to end ----------------------------------------------------------
class NomadOnSite:
    """A fake Nomad API whose one allocation is the survivor's real nats-server: the
    job's template is the server's config without its authorization, followed by the
    variable item `auth_conf` (as deploy/nomad renders it); restart, signal and the
    witness job start, reload and stop real nats-server processes."""

    def __init__(self, site: LocalSite, work: Path) -> None:
        server = site.nats_server_of(SURVIVOR)
        assert server is not None
        self.server = server
        self.work = work
        auth = (site.credentials_dir / AUTH_CONF).read_text()
        rendered = server.config_path.read_text()
        assert auth in rendered
        self.template = rendered.replace(auth, "")
        self.items = {"auth_conf": auth}
        self.index = 7
        self.calls: list[tuple[str, str]] = []
        self.seed: subprocess.Popen[bytes] | None = None
        self.witness: subprocess.Popen[bytes] | None = None

    def rendered(self) -> str:
        return self.template + "\n" + self.items["auth_conf"]

    def _start(self, conf: Path, cwd: Path, name: str) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("ab")
        return subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.path
        self.calls.append((method, path))
        body: dict[str, Any] = await request.json() if request.can_read_body else {}
        if path == "/v1/job/cfs-nats/allocations":
            alloc = {"ID": "alloc-3", "NodeName": SURVIVOR, "ClientStatus": "running"}
            return web.json_response([alloc])
        if path == "/v1/client/fs/cat/alloc-3":
            return web.Response(text=self.rendered())
        if path == "/v1/job/cfs-nats":
            task = {"Name": "nats-server", "Driver": "exec", "Config": {"command": "nats-server"}}
            return web.json_response({"TaskGroups": [{"Name": "nats", "Tasks": [task]}]})
        if path == "/v1/var/cfs/qm/nats":
            if method == "PUT":
                if int(request.query["cas"]) != self.index:
                    return web.Response(status=409, text="cas")
                self.items = dict(body["Items"])
                self.index += 1
            return web.json_response({"Items": self.items, "ModifyIndex": self.index})
        if path == "/v1/jobs":  # the witness
            task = body["Job"]["TaskGroups"][0]["Tasks"][0]
            assert task["Config"]["args"] == ["-c", "/local/witness.conf"]
            task_dir = self.work / "witness"
            for template in task["Templates"]:  # the task directory as the task sees it
                dest = task_dir / template["DestPath"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(template["EmbeddedTmpl"].replace("/local/", f"{task_dir}/local/"))
            conf = task_dir / "local" / "witness.conf"
            self.witness = self._start(conf, task_dir, "nomad-witness")
            return web.json_response({})
        if path == "/v1/client/allocation/alloc-3/restart":
            await asyncio.to_thread(self.server.stop)
            (self.work / "seed.conf").write_text(self.rendered())
            self.seed = self._start(self.work / "seed.conf", self.work, "nomad-seed")
            return web.json_response({})
        if path.startswith("/v1/job/cfs-nats-witness-") and method == "DELETE":
            await asyncio.to_thread(_terminate, self.witness)
            return web.json_response({})
        if path == "/v1/client/allocation/alloc-3/signal":
            assert body == {"Task": "nats-server", "Signal": "SIGHUP"} and self.seed is not None
            (self.work / "seed.conf").write_text(self.rendered())
            self.seed.send_signal(signal.SIGHUP)
            return web.json_response({})
        return web.Response(status=404, text=f"unknown {method} {path}")

    def stop(self) -> None:
        _terminate(self.witness)
        _terminate(self.seed)


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


async def _run_with_fake_nomad(nomad: NomadOnSite, env: dict[str, str], cwd: Path) -> str:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", nomad.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    http = web.TCPSite(runner, "127.0.0.1", 0)
    await http.start()
    port = http._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    cli = await asyncio.create_subprocess_exec(
        *(CFS, "admin", "raft-force-leader", "--shard", "*", "--leader", SURVIVOR),
        *("--yes-i-know", "--nomad", f"http://127.0.0.1:{port}", "--wait", "60"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(cli.communicate(), 150)
    finally:
        if cli.returncode is None:
            os.killpg(cli.pid, signal.SIGKILL)
            await cli.wait()
        await runner.cleanup()
    text = out.decode()
    assert cli.returncode == 0, text
    return text


# make test-slow: the Nomad runner's requests are checked against a fake Nomad in the
# unit suite (test_quorum_nomad.py); this drives real servers through it.
@pytest.mark.slow
def test_force_leader_through_the_nomad_api_on_real_servers(
    site: LocalSite, tmp_path: Path
) -> None:
    names = [f"acked-{i}" for i in range(10)]
    asyncio.run(_acknowledged(site, names))
    asyncio.run(_journal_replicated(site))
    survivor = site.nats_server_of(SURVIVOR)
    assert survivor is not None
    for node in LOST:
        site.kill9(node)
        server = site.nats_server_of(node)
        assert server is not None
        server.kill9()
    env = {
        **site.cli_env(),
        "CFS_CREDENTIALS_DIR": str(site.credentials_dir),
        "CFS_DEV_DIR": str(tmp_path / "no-dev-site"),
    }
    env.pop("CFS_NATS_CREDENTIALS")
    work = tmp_path / "nomad"
    work.mkdir()
    nomad = NomadOnSite(site, work)
    try:
        text = asyncio.run(_run_with_fake_nomad(nomad, env, tmp_path))
        assert f"quorum recovered on {SURVIVOR} for shards 001" in text, text
        assert nomad.calls[:5] == [
            ("GET", "/v1/job/cfs-nats/allocations"),
            ("GET", "/v1/client/fs/cat/alloc-3"),
            ("GET", "/v1/job/cfs-nats"),
            ("GET", "/v1/var/cfs/qm/nats"),
            ("POST", "/v1/jobs"),
        ]
        assert nomad.calls[-1] == ("POST", "/v1/client/allocation/alloc-3/signal")
        # The old store was never touched; the seed runs on a fresh one beside it.
        assert any(survivor.store_dir.rglob("*.blk")), "the old store is intact"
        assert list(survivor.state_dir.glob("store.reseed-*"))
        # The variable keeps the new cluster and the site's authorization again.
        assert nomad.items["cfs_recovery_auth_conf"] in nomad.items["auth_conf"]
        found, _ = asyncio.run(_names_and_write(survivor.url, site))
        assert set(names) <= found, sorted(set(names) - found)
    finally:
        site.stop()
        nomad.stop()
