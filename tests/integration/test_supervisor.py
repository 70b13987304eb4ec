"""The supervisor against real processes: nats-server (standalone and clustered) and moto."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import nats
import pytest
from nats.js.client import JetStreamContext
from nats.js.errors import NoStreamResponseError

from cfs.supervisor import (
    DEFAULT_MAX_PAYLOAD,
    ManagedProcess,
    NatsCluster,
    NatsServer,
    S3Server,
    SupervisorError,
    free_port,
    live_processes,
)

REPO = Path(__file__).resolve().parents[2]


def _pid_gone(pid: int) -> bool:
    """True if `pid` no longer runs (a zombie that nobody reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_for(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


async def _publish(js: JetStreamContext, subject: str, payload: bytes) -> None:
    """Publish, retrying while a new clustered stream's interest spreads over the routes."""
    for _ in range(50):
        try:
            await js.publish(subject, payload)
            return
        except NoStreamResponseError:
            await asyncio.sleep(0.1)
    await js.publish(subject, payload)


async def test_standalone_server_serves_jetstream(nats_server: NatsServer) -> None:
    assert "sync_interval: always" in nats_server.config_path.read_text()
    nc = await nats.connect(nats_server.url)
    try:
        assert nc.max_payload == DEFAULT_MAX_PAYLOAD
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    finally:
        await nc.close()


async def test_standalone_restart_keeps_store(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="KEEP", subjects=["keep.>"])
    await js.publish("keep.a", b"1")
    await nc.close()

    old_pid = nats_server.pid
    await asyncio.to_thread(nats_server.restart)
    assert nats_server.pid != old_pid

    nc = await nats.connect(nats_server.url)
    try:
        assert (await nc.jetstream().stream_info("KEEP")).state.messages == 1
    finally:
        await nc.close()


async def test_cluster_forms_and_survives_kill9_restart(nats_cluster3: NatsCluster) -> None:
    assert nats_cluster3.meta_leader() in {"n1", "n2", "n3"}
    nc = await nats.connect(servers=nats_cluster3.urls)
    js = nc.jetstream()
    await js.add_stream(name="R3", subjects=["r3.>"], num_replicas=3)
    for i in range(10):
        await _publish(js, "r3.x", str(i).encode())
    info = await js.stream_info("R3")
    await nc.close()
    assert info.state.messages == 10
    assert info.cluster is not None and info.cluster.leader

    victim = nats_cluster3.server(info.cluster.leader)  # the stream leader: forces re-election
    pid = victim.pid
    assert pid is not None
    assert victim.kill9() == -signal.SIGKILL
    assert _pid_gone(pid) and not victim.running

    await asyncio.to_thread(victim.restart, wait=False)
    await asyncio.to_thread(nats_cluster3.wait_healthy, 30)

    # Same identity: the meta group still has exactly n1..n3 (meta_cluster.peer is the
    # leader's peer id; only the leader lists "replicas").
    leader = nats_cluster3.server(nats_cluster3.meta_leader() or "")
    meta = leader.jsz()["meta_cluster"]
    assert meta["cluster_size"] == 3
    replicas = {r["name"] for r in meta["replicas"] if r["current"]}
    assert replicas | {leader.name} == {"n1", "n2", "n3"}
    nc = await nats.connect(victim.url)
    try:
        assert (await nc.jetstream().stream_info("R3")).state.messages == 10
    finally:
        await nc.close()


def test_pause_and_resume(nats_server: NatsServer) -> None:
    pid = nats_server.pid
    assert pid is not None
    nats_server.pause()
    try:
        assert _wait_for(lambda: _proc_state(pid) == "T")
        assert nats_server.running and nats_server.process.paused
        assert not nats_server.healthz()
    finally:
        nats_server.resume()
    assert _wait_for(nats_server.healthz)
    assert not nats_server.process.paused


def test_stop_reaps_process(nats_server: NatsServer) -> None:
    pid = nats_server.pid
    assert pid is not None
    assert nats_server.stop() == 0
    assert _pid_gone(pid)
    assert nats_server.process not in live_processes()
    assert nats_server.stop() == 0  # idempotent


def test_s3_put_get(s3_server: S3Server) -> None:
    s3 = boto3.client("s3", **s3_server.client_kwargs)
    s3.create_bucket(Bucket="cfs-test")
    s3.put_object(Bucket="cfs-test", Key="a/b", Body=b"payload")
    assert s3.get_object(Bucket="cfs-test", Key="a/b")["Body"].read() == b"payload"

    pid = s3_server.pid
    assert pid is not None
    s3_server.stop()
    assert _pid_gone(pid)


def test_port_taken_fails_with_log(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        port = free_port()
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        server = NatsServer.standalone(tmp_path, port=port)
        with pytest.raises(SupervisorError, match="address already in use") as err:
            server.start(timeout=10)
    assert "last lines of" in str(err.value)
    assert not server.running
    assert server.process not in live_processes()


def test_restart_appends_to_log(tmp_path: Path) -> None:
    proc = ManagedProcess(
        "echo", ["sh", "-c", "echo hello-$$; exec sleep 30"], log_path=tmp_path / "echo.log"
    )

    def greetings() -> int:
        return sum(line.startswith("hello-") for line in proc.log_tail().splitlines())

    try:
        proc.start()
        proc.wait_until(lambda: greetings() == 1, 5, "greeting")
        proc.restart(timeout=2)
        proc.wait_until(lambda: greetings() == 2, 5, "second greeting")
        assert proc.log_tail().count("--- cfs.supervisor: start echo") == 2
    finally:
        proc.stop()


def test_child_started_from_short_lived_thread_survives(tmp_path: Path) -> None:
    proc = ManagedProcess("sleeper", ["sleep", "30"], log_path=tmp_path / "sleep.log")
    worker = threading.Thread(target=proc.start)
    worker.start()
    worker.join()
    try:
        time.sleep(0.3)  # PDEATHSIG would have fired when the worker thread exited
        assert proc.running
    finally:
        proc.stop()


@pytest.mark.parametrize("die_with_parent", [True, False])
def test_child_dies_with_supervisor(tmp_path: Path, die_with_parent: bool) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from cfs.supervisor import ManagedProcess
        p = ManagedProcess("orphan", ["sleep", "30"], log_path=Path({str(tmp_path)!r}) / "o.log",
                           die_with_parent={die_with_parent})
        p.start()
        print(p.pid, flush=True)
        time.sleep(30)
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'libs'}{os.pathsep}{REPO / 'contracts'}"}
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True
    )
    child_pid = 0
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        assert (
            _wait_for(lambda: _pid_gone(child_pid), 3 if die_with_parent else 0.5)
            is die_with_parent
        )
    finally:
        parent.kill()
        parent.wait()
        if child_pid and not _pid_gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)
