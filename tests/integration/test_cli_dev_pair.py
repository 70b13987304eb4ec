"""`cfs dev` with two linked sites, as an operator types it (guide scenarios 4 and 6):
`deploy/topologies/two-sites.yaml` cut to one node per site comes up with replication
linked both ways and a cluster file per site; `partition`/`heal` really cut and
restore the link (`replication-status` tells which); a file written on site-a is read
on site-b; a site killed whole stays down until `start-site`, then catches up; bad
input is one line and exit 2; `cfs dev down` leaves no process behind."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from cfs.fuse.config import PeerSite
from cfs.objstore.url import S3Url
from cfs.supervisor.devcluster import DEV_ARCHIVE_URL, DEV_TIER_URL, DevCluster
from cfs.supervisor.topology import Topology
from tests.integration.test_cli_dev import _cfs, _live_pids_under, _one_line_error
from tests.integration.test_geo_replication import until

# Two dev sites up and down: make test-slow, with scenarios 4 and 6 and the annual
# failover test, which drive the same commands (the default suite has the site pair
# itself in test_geo_replication.py).
pytestmark = pytest.mark.slow

TWO_SITES = Path(__file__).resolve().parents[2] / "deploy" / "topologies" / "two-sites.yaml"
A, B = "site-a", "site-b"
T = TypeVar("T")


@dataclass(frozen=True)
class DevPair:
    env: dict[str, str]  # `cfs dev` commands find the daemon through CFS_DEV_DIR
    state: Path

    def on(self, site: str) -> dict[str, str]:
        """The environment of a `cfs` command against one site (its cluster file)."""
        return {**self.env, "CFS_CONFIG": str(self.state / f"cluster-{site}.json")}

    def cfs(
        self, *args: str, site: str | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = self.env if site is None else self.on(site)
        if stdin is None:
            return _cfs(env, *args)
        return subprocess.run(
            [sys.executable, "-m", "cfs.cli", *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def status(self) -> dict[str, Any]:
        done = self.cfs("dev", "status", "--json")
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def replication(self, site: str = A) -> tuple[int, str]:
        done = self.cfs("admin", "replication-status", site=site)
        return done.returncode, done.stdout


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevPair]:
    """The shipped two-site topology with one node per site (each its own standalone
    NATS server), and its S3 server."""
    base = tmp_path_factory.mktemp("dev-pair")
    spec = yaml.safe_load(TWO_SITES.read_text())
    spec["nodes"] = spec["nodes"][:1]
    topology = base / "two-sites-1.yaml"
    topology.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFS_")}
    env["CFS_DEV_DIR"] = str(base / "state")
    up = _cfs(env, "dev", "up", "--topology", str(topology), timeout=180)
    try:
        assert up.returncode == 0, up.stderr
        assert "Link site-a <-> site-b: up" in up.stdout, up.stdout
        yield DevPair(env, base / "state")
    finally:
        down = _cfs(env, "dev", "down", timeout=90)
        assert down.returncode == 0, down.stderr
    assert _live_pids_under(base / "state") == [], "dev down left processes"


def test_each_site_archives_apart(tmp_path: Path) -> None:
    """Without starting anything: the two sites share the S3 server but archive (and
    tier) under prefixes of their own, valid S3 URLs the backup service takes."""
    dev = DevCluster(tmp_path / "dev", Topology.load(TWO_SITES))
    assert set(dev.sites) == {A, B} and dev.pair is not None
    for name, site in dev.sites.items():
        assert dev.archive_url(name) == f"{DEV_ARCHIVE_URL}/{name}"
        assert dev.tier_url(name) == f"{DEV_TIER_URL}/{name}"
        S3Url.parse(dev.archive_url(name))
        for proc in site.processes():
            assert proc.env["CFS_ARCHIVE_URL"] == dev.archive_url(name)
            assert proc.env["CFS_SITE"] == name


def test_bad_input_is_one_line_and_exit_2(pair: DevPair) -> None:
    unknown = "unknown site 'nope'"
    _one_line_error(pair.cfs("dev", "kill", "storage-1", "--site", "nope"), 2, unknown)
    _one_line_error(pair.cfs("dev", "kill", "nope", "--site", B), 2, "unknown node 'nope'")
    _one_line_error(pair.cfs("dev", "kill-site", "nope"), 2, unknown)
    _one_line_error(pair.cfs("dev", "start-site", "nope"), 2, unknown)
    _one_line_error(
        pair.cfs("dev", "partition", "--sites", "site-a,nope"),
        2,
        "the link is between site-a and site-b",
    )
    _one_line_error(pair.cfs("dev", "partition", "--sites", A), 2, "name the two linked sites")
    assert pair.status()["link"]["state"] == "up"  # nothing was cut


def test_up_runs_both_sites_with_a_cluster_file_each(pair: DevPair) -> None:
    status = pair.status()
    assert list(status["sites"]) == [A, B]
    assert status["link"] == {"sites": [A, B], "state": "up"}
    for site in status["sites"].values():
        assert not site["killed"] and all(s["running"] for s in site["nats"])
        services = site["nodes"]["storage-1"]["services"]
        assert services["geo-replicator"]["running"] and services["metadata-raft"]["running"]
    text = pair.cfs("dev", "status").stdout
    assert "ClaudeFS dev site site-a" in text and "ClaudeFS dev site site-b" in text

    files = {s: json.loads((pair.state / f"cluster-{s}.json").read_text()) for s in (A, B)}
    assert json.loads((pair.state / "cluster.json").read_text()) == files[A]
    for here, there in ((A, B), (B, A)):
        assert files[here]["site"] == here
        assert files[here]["nats_urls"] == status["sites"][here]["nats_urls"]
        peer = PeerSite.model_validate(files[here]["peer"])
        assert peer.site == there and peer.nats_urls == files[there]["nats_urls"]
        assert peer.credentials_dir == pair.state / there / "credentials"

    def archived(site: str) -> str | None:
        done = pair.cfs("admin", "status", "--json", site=site)
        backup = json.loads(done.stdout).get("backup") if done.returncode == 0 else None
        return (backup or {}).get("archive_url")

    for site in (A, B):
        url = until(functools.partial(archived, site), 60, f"{site}'s journal archive")
        assert url.startswith(f"{DEV_ARCHIVE_URL}/{site}/"), url


def test_partition_and_heal(pair: DevPair) -> None:
    until(lambda: pair.replication()[0] == 0, 60, "replication connected both ways")
    cut = pair.cfs("dev", "partition", "--sites", "site-b,site-a")
    assert cut.returncode == 0, cut.stderr
    assert pair.status()["link"]["state"] == "cut"
    code, text = pair.replication()
    assert code == 3, text
    assert "unreachable (partition detected)" in text, text
    # Both sites keep working; what site-a writes meanwhile crosses after the heal.
    made = pair.cfs("fs", "put", "-", "/during-partition.txt", site=A, stdin="cut\n")
    assert made.returncode == 0, made.stderr

    healed = pair.cfs("dev", "heal")
    assert healed.returncode == 0, healed.stderr
    until(lambda: pair.replication()[0] == 0, 60, "replication connected after the heal")
    assert "connected" in pair.replication()[1]
    until(
        lambda: pair.cfs("fs", "cat", "/during-partition.txt", site=B).stdout == "cut\n",
        60,
        "the file written during the partition on site-b",
    )


def test_file_written_on_a_is_read_on_b(pair: DevPair) -> None:
    made = pair.cfs("fs", "put", "-", "/from-a.txt", site=A, stdin="hello from site-a\n")
    assert made.returncode == 0, made.stderr
    until(
        lambda: pair.cfs("fs", "cat", "/from-a.txt", site=B).stdout == "hello from site-a\n",
        60,
        "/from-a.txt on site-b",
    )


def test_kill_site_and_start_site(pair: DevPair) -> None:
    killed = pair.cfs("dev", "kill-site", B)
    assert killed.returncode == 0, killed.stderr

    def all_down() -> bool:
        site = pair.status()["sites"][B]
        procs = [p for node in site["nodes"].values() for p in node["services"].values()]
        return site["killed"] and not any(p["running"] for p in procs + site["nats"])

    assert all_down()
    time.sleep(3)  # several rounds of the daemon's restart loop
    assert all_down(), "the daemon restarted processes of a site killed on purpose"
    assert pair.status()["link"]["state"] == "down"
    code, text = pair.replication(A)
    assert code == 3, text
    _one_line_error(pair.cfs("dev", "start", "storage-1", "--site", B), 1, "start-site")
    # Site-a serves on alone; site-b gets what it missed once it is back.
    made = pair.cfs("fs", "put", "-", "/while-b-lost.txt", site=A, stdin="lost\n")
    assert made.returncode == 0, made.stderr

    started = pair.cfs("dev", "start-site", B)
    assert started.returncode == 0, started.stderr
    site = pair.status()["sites"][B]
    assert not site["killed"] and all(s["running"] for s in site["nats"])
    until(lambda: pair.replication()[0] == 0, 60, "replication connected after start-site")
    until(
        lambda: pair.cfs("fs", "cat", "/while-b-lost.txt", site=B).stdout == "lost\n",
        60,
        "the file written while site-b was lost, on site-b",
    )
