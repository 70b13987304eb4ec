"""Guide scenarios end to end: a `cfs dev` site, a FUSE mount, and only `cfs` commands.

Each test drives the operator's commands as subprocesses (what a person would type)
and the mount with plain file I/O; it asserts the guide's RPO (no acknowledged
write lost) and prints the measured RTO.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cfs.fuse.config import is_fuse_mount
from tests.scenarios import drreport

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse"), reason="scenarios need a FUSE mount (/dev/fuse missing)"
)

# What the survivors and the mount log while a node's services and NATS server are
# killed -9 and JetStream re-elects: every scenario provokes this on purpose.
NODE_LOSS_LOGS = (
    "nats.disconnected",  # clients of the killed server
    "nats.error",
    "lease.*",  # renewals, reads and watches time out; a holder on a lost quorum lapses
    "leader.lost",
    "follower.retry",
    "retry.waiting",  # requests and publishes while a stream or shard has no leader
    "member.down",
    "member.write_retry",
    "service.degraded",
    "health.write_failed",
    "store.heartbeat_failed",
    "data.degraded_read",  # reads around the lost node's fragments
    "data.put_failed",
    "data.put_straggling",  # a put unanswered long after its siblings: sent elsewhere
    "data.recode",
    "fragment.event_failed",  # a put whose DATA event timed out with the lost server: EIO
    "leader.append_retry",  # the killed node's NATS server led a journal: appends wait
    "retry.gave_up",  # ... for longer than one publish deadline, and are tried again
)


def tear_down(
    mounts: dict[Path, int | None],
    state_dir: Path,
    dev_down: Callable[[], subprocess.CompletedProcess[str]],
) -> None:
    """Unmount and kill the mounts, then `dev_down` (`cfs dev down`); if that fails,
    kill the dev daemon: nothing a test started outlives it."""
    try:
        for mnt, pid in mounts.items():
            if is_fuse_mount(mnt):
                subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    finally:
        result = dev_down()
        state = state_dir / "dev.json"
        if result.returncode != 0 and state.exists():  # last resort: kill the daemon
            pid = json.loads(state.read_text()).get("pid")
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(int(pid), signal.SIGKILL)


class DevSite:
    """One `cfs dev` site under `tmp_path` and at most one mount of it."""

    def __init__(
        self,
        tmp_path: Path,
        nodes: int = 3,
        env: dict[str, str] | None = None,
        *,
        s3_port: int | None = None,
    ) -> None:
        """`s3_port`: run the site's S3 server (moto) on this port; default: no S3."""
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.topology = tmp_path / "topology.yaml"
        self.topology.write_text(
            yaml.safe_dump(
                {
                    "site": "local",
                    "shards": 1,
                    "s3": s3_port is not None,
                    "s3_port": s3_port,
                    "nodes": [{"name": f"storage-{i}"} for i in range(1, nodes + 1)],
                    "env": env or {},
                }
            )
        )
        self.mnt = tmp_path / "mnt"
        self.env = {
            **os.environ,
            "CFS_DEV_DIR": str(self.state),
            "CFS_CONFIG": str(self.state / "cluster.json"),
            "CFS_OP_TIMEOUT_S": "10",
        }
        self._mounts: dict[Path, int | None] = {}

    def cfs(
        self, *args: str, timeout: float = 180.0, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run `cfs ARGS` as an operator would (in the test's directory: what a command
        writes to `.` stays there); never raises on a non-zero exit."""
        return subprocess.run(
            [sys.executable, "-m", "cfs.cli", *args],
            env={**self.env, **env},
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, timeout: float = 180.0) -> str:
        """`cfs ARGS` that must succeed; its stdout."""
        result = self.cfs(*args, timeout=timeout)
        assert result.returncode == 0, (
            f"cfs {' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def up(self) -> None:
        self.ok("dev", "up", "--topology", str(self.topology), timeout=240)

    def mount(self, mnt: Path | None = None, *options: str) -> Path:
        """A mount of the site (`self.mnt` unless told), unmounted by `down`."""
        mnt = mnt or self.mnt
        mnt.mkdir(exist_ok=True)
        log = self.tmp / f"{mnt.name}.log" if mnt != self.mnt else self.tmp / "mount.log"
        out = self.ok("mount", str(mnt), "--log", str(log), *options)
        found = re.search(r"pid (\d+)", out)
        self._mounts[mnt] = int(found.group(1)) if found else None
        assert is_fuse_mount(mnt)
        return mnt

    def down(self) -> None:
        """Unmount and stop everything, whatever state the test left."""
        tear_down(self._mounts, self.state, lambda: self.cfs("dev", "down", timeout=90))

    # -- observations ----------------------------------------------------------------------
    def shard_leader(self, shard: str = "001") -> str | None:
        """The writer of a shard as `cfs admin raft-status --json` reports it."""
        for entry in self.json("admin", "raft-status"):
            if entry["shard"] == shard:
                return entry.get("writer")
        raise AssertionError(f"shard {shard} missing from raft-status")


@pytest.fixture
def dev_site_factory(tmp_path: Path) -> Iterator[Callable[..., DevSite]]:
    sites: list[DevSite] = []

    def make(
        nodes: int = 3, env: dict[str, str] | None = None, s3_port: int | None = None
    ) -> DevSite:
        site = DevSite(tmp_path, nodes, env, s3_port=s3_port)
        sites.append(site)
        site.up()
        site.mount()
        return site

    try:
        yield make
    finally:
        for site in sites:
            site.down()


def write_file(path: Path, data: bytes) -> str:
    """Write and fsync (acknowledged = durable); returns the SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for(what: str, check: Callable[[], bool], timeout: float, every: float = 0.2) -> float:
    """Seconds until `check()` holds; fails the test after `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(every)
    return time.monotonic() - started


def backfill(site: DevSite) -> None:
    """`s3-backfill`, as an operator runs it after enabling a tier on a site with data:
    what a client wrote before it saw the new `tier-config` is queued now, not at the
    tierer's own pass a few seconds later (which a test could outrun)."""
    reply = json.loads(site.ok("admin", "s3-backfill", "--json"))
    assert reply["error"] is None, reply


def report(scenario: str, **figures: float | str) -> None:
    """The measured RTO/RPO, printed (pytest -s), kept for `make dr-report`, and held
    to the guide's targets this scenario measures (`drreport.TARGETS`)."""
    line = " ".join(
        f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"\n[{scenario}] {line}")
    drreport.record(scenario, figures)
    missed = drreport.violations(scenario, figures)
    assert not missed, "; ".join(missed)


class Writer(threading.Thread):
    """Creates small fsync'd files one after another; remembers each acknowledged one."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.acked: dict[Path, str] = {}
        self.acked_at: dict[Path, float] = {}
        self.ack_times: list[float] = []
        self.failures = 0
        self.stop = threading.Event()
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            self._loop()
        finally:
            self.ended_at = time.monotonic()

    def _loop(self) -> None:
        self.root.mkdir(exist_ok=True)
        i = 0
        while not self.stop.is_set():
            path = self.root / f"f{i:06d}"
            try:
                digest = write_file(path, f"file {i}\n".encode() * 10)
            except OSError:
                self.failures += 1
                time.sleep(0.05)
            else:
                self.acked[path] = digest
                self.acked_at[path] = time.monotonic()
                self.ack_times.append(self.acked_at[path])
            i += 1

    def longest_gap_after(self, t0: float) -> float:
        """The longest time without an acknowledged write from t0 on (the client's RTO),
        up to the writer's end: a write stuck until the test stopped the writer counts
        too (call after `join`)."""
        end = [self.ended_at] if self.ended_at is not None else []
        times = [t0] + [t for t in self.ack_times if t >= t0] + end
        return max(b - a for a, b in itertools.pairwise(times)) if len(times) > 1 else 0


TWO_SITES = Path(__file__).resolve().parents[2] / "deploy" / "topologies" / "two-sites.yaml"
SITE_A, SITE_B = "site-a", "site-b"


class DevPair:
    """`cfs dev` with two linked sites (`deploy/topologies/two-sites.yaml`, one node per
    site: two NATS clusters, two metadata journals, one link) and mounts of them."""

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        spec = yaml.safe_load(TWO_SITES.read_text())
        spec["nodes"] = spec["nodes"][:1]
        spec["env"] = {**spec.get("env", {}), **(env or {})}
        self.topology = tmp_path / "two-sites.yaml"
        self.topology.write_text(yaml.safe_dump(spec))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CFS_")}
        self.env.update(CFS_DEV_DIR=str(self.state), CFS_OP_TIMEOUT_S="10")
        self._mount_pids: dict[Path, int | None] = {}

    def cfs(
        self, *args: str, site: str = SITE_A, timeout: float = 180.0
    ) -> subprocess.CompletedProcess[str]:
        """`cfs ARGS` against `site` (its cluster file); never raises on an exit code."""
        env = {**self.env, "CFS_CONFIG": str(self.state / f"cluster-{site}.json")}
        return subprocess.run(
            [sys.executable, "-m", "cfs.cli", *args],
            env=env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, site: str = SITE_A, timeout: float = 180.0) -> str:
        result = self.cfs(*args, site=site, timeout=timeout)
        assert result.returncode == 0, (
            f"cfs {' '.join(args)} (on {site}) exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
        return result.stdout

    def up(self) -> None:
        self.ok("dev", "up", "--topology", str(self.topology), timeout=240)

    def mount(self, name: str, site: str, *, follow: bool = True) -> Path:
        """A mount of `site`; `follow`: it moves to whichever site is active."""
        mnt = self.tmp / name
        mnt.mkdir(exist_ok=True)
        args = ["mount", str(mnt), "--log", str(self.tmp / f"{name}.log")]
        out = self.ok(*args, *([] if follow else ["--no-follow"]), site=site)
        found = re.search(r"pid (\d+)", out)
        self._mount_pids[mnt] = int(found.group(1)) if found else None
        assert is_fuse_mount(mnt)
        return mnt

    def mount_log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def replication(self, site: str = SITE_A) -> dict[str, Any]:
        done = self.cfs("admin", "replication-status", "--json", site=site)
        assert done.stdout, done.stderr
        status: dict[str, Any] = json.loads(done.stdout)
        return status

    def caught_up(self) -> bool:
        """Both directions connected, nothing left to copy or apply."""
        directions = self.replication()["directions"]
        return all(
            d["connected"] and d["lag_events"] == 0 and d.get("unapplied") == 0 for d in directions
        )

    def active(self, site: str = SITE_A) -> str | None:
        record = self.replication(site).get("active")
        return record["site"] if record else None

    def down(self) -> None:
        tear_down(self._mount_pids, self.state, lambda: self.cfs("dev", "down", timeout=120))


@pytest.fixture
def dev_pair_factory(tmp_path: Path) -> Iterator[Callable[..., DevPair]]:
    pairs: list[DevPair] = []

    def make(env: dict[str, str] | None = None) -> DevPair:
        pair = DevPair(tmp_path, env)
        pairs.append(pair)
        pair.up()
        return pair

    try:
        yield make
    finally:
        for pair in pairs:
            pair.down()
