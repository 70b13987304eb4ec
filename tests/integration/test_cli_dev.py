"""`cfs dev`, `cfs cluster` and `cfs node` as an operator types them, bad input included.

Every failure is one line on stderr with a stable exit code (1 failed, 2 usage,
3 unreachable); a dev site leaves no process behind after `cfs dev down`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import yaml


def _cfs(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cfs.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _side_by_side(
    *runs: Callable[[], subprocess.CompletedProcess[str]],
) -> list[subprocess.CompletedProcess[str]]:
    """Each run's result, in order, the runs side by side: commands that change nothing,
    each costing an interpreter's start (and some a connect deadline)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda run: run(), runs))


def _one_line_error(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]


def _live_pids_under(path: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(path).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CFS_")}
    return {
        **base,
        "CFS_DEV_DIR": str(tmp_path / "state"),
        "CFS_CONFIG": str(tmp_path / "state" / "cluster.json"),
    }


@pytest.fixture
def site(tmp_path: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A one-node dev site (a standalone NATS server): quick to start."""
    topology = tmp_path / "one.yaml"
    topology.write_text(yaml.safe_dump({"s3": False, "nodes": [{"name": "solo"}]}))
    up = _cfs(env, "dev", "up", "--topology", str(topology), timeout=180)
    try:
        assert up.returncode == 0, up.stderr
        yield env
    finally:
        _cfs(env, "dev", "down", timeout=90)
    assert _live_pids_under(tmp_path / "state") == [], "dev down left processes"


def test_dev_commands_without_a_site(env: dict[str, str], tmp_path: Path) -> None:
    bad = {
        "duplicate": yaml.safe_dump({"nodes": [{"name": "a"}, {"name": "a"}]}),
        "unclosed": "nodes: [unclosed",
        "space": yaml.safe_dump({"nodes": [{"name": "a b"}]}),
        "peer": yaml.safe_dump({"site": "a", "peer_site": "a", "nodes": [{"name": "n"}]}),
    }
    for name, text in bad.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    expected = [
        (("dev", "status"), "no dev cluster is running"),
        (("dev", "kill", "storage-1"), "no dev cluster is running"),
        (("dev", "down"), "no dev site is running"),
        (("dev", "partition"), "no dev cluster is running"),
        (("dev", "up", "--topology", str(tmp_path / "missing.yaml")), "No such file"),
        (("dev", "up", "--topology", str(tmp_path / "duplicate.yaml")), "duplicate node names: a"),
        (("dev", "up", "--topology", str(tmp_path / "unclosed.yaml")), "not valid YAML"),
        (("dev", "up", "--topology", str(tmp_path / "space.yaml")), "nodes.0.name"),
        (("dev", "up", "--topology", str(tmp_path / "peer.yaml")), "another site than 'a'"),
    ]
    results = _side_by_side(*(partial(_cfs, env, *args) for args, _ in expected))
    for result, (_, fragment) in zip(results, expected, strict=True):
        _one_line_error(result, 1, fragment)
    assert not (tmp_path / "state" / "dev.json").exists()  # nothing was started


def test_cluster_commands_bad_input(env: dict[str, str]) -> None:
    env = {k: v for k, v in env.items() if k != "CFS_CONFIG"}
    init = ("cluster", "init", "--cluster", "nats://127.0.0.1:1", "--bootstrap-node", "n1")
    unreachable, bad_ec, no_config, no_label = _side_by_side(
        partial(_cfs, env, *init, "--cluster-name", "c", timeout=30),
        partial(_cfs, env, *init, "--cluster-name", "c", "--ec", "ec9"),
        partial(_cfs, {**env, "CFS_CONFIG": "/nonexistent/cluster.json"}, "cluster", "info"),
        partial(_cfs, env, "node", "add", "--node", "x", "--label", "norack"),
    )
    _one_line_error(unreachable, 3, "cannot reach NATS at nats://127.0.0.1:1")
    _one_line_error(bad_ec, 2, "unknown erasure scheme")
    _one_line_error(no_config, 1, "cluster config /nonexistent/cluster.json does not exist")
    _one_line_error(no_label, 2, "KEY=VALUE")


def test_dev_site_lifecycle_and_cluster_init(site: dict[str, str], tmp_path: Path) -> None:
    env = site
    status = json.loads(_cfs(env, "dev", "status", "--json").stdout)
    assert status["nodes"]["solo"]["services"]["metadata-raft"]["running"]
    ports = [s["metrics_port"] for s in status["nodes"]["solo"]["services"].values()]
    assert all(ports) and len(set(ports)) == len(ports)  # each process its own /metrics
    printed, *refused = _side_by_side(
        partial(_cfs, {**env, "COLUMNS": "250"}, "dev", "status"),
        partial(_cfs, env, "dev", "up"),
        partial(_cfs, env, "dev", "kill", "nope"),
        partial(_cfs, env, "dev", "partition"),
        partial(_cfs, env, "dev", "heal"),
        partial(_cfs, env, "dev", "kill-site", "site-b"),
        partial(_cfs, env, "dev", "kill", "solo", "--site", "b"),
    )
    port = status["nodes"]["solo"]["services"]["metadata-raft"]["metrics_port"]
    assert f":{port}" in printed.stdout
    expected = [
        (1, "already running"),
        (2, "unknown node 'nope'"),
        # One site: no link to cut, no other site to name.
        (2, "runs one site (local): no site link"),
        (2, "no site link to heal"),
        (2, "unknown site 'site-b'"),
        (2, "unknown site 'b'"),
    ]
    for result, (code, fragment) in zip(refused, expected, strict=True):
        _one_line_error(result, code, fragment)
    cluster = json.loads((tmp_path / "state" / "cluster.json").read_text())
    assert "peer" not in cluster
    assert json.loads((tmp_path / "state" / "cluster-local.json").read_text()) == cluster

    # cluster init: idempotent for the same shape, refused for another.
    info = json.loads(_cfs(env, "cluster", "info", "--json").stdout)
    assert info["shards"] == 1 and info["name"] == "cfs-local"
    again = _cfs(
        env, "cluster", "init", "--bootstrap-node", "solo", "--cluster-name", "cfs-local",
        "--config-dir", str(tmp_path / "cfg"), "--json",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["created"] is False
    # The dev site's own keys were used, and its servers refuse anonymous clients.
    assert summary["credentials_dir"] == str(tmp_path / "state" / "credentials")
    assert summary["nats_auth_enforced"] is True
    assert summary["nats_tls"] is True  # cfs dev: TLS on every connection
    assert (tmp_path / "state" / "credentials" / "tls" / "ca.pem").is_file()
    token = tmp_path / "cfg" / "cluster-token"
    assert token.stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / "cfg" / "cluster.json").read_text())["shards"] == 1
    other = _cfs(
        env, "cluster", "init", "--bootstrap-node", "solo", "--cluster-name", "cfs-local",
        "--shards", "4", "--config-dir", str(tmp_path / "cfg"),
    )  # fmt: skip
    _one_line_error(other, 1, "these are fixed at init")

    _one_line_error(_cfs(env, "node", "add", "--node", "solo"), 1, "already a member")

    # kill -9 and start a node through the daemon; the file system answers again.
    assert _cfs(env, "dev", "kill", "solo", "--services-only").returncode == 0
    status = json.loads(_cfs(env, "dev", "status", "--json").stdout)
    assert not any(s["running"] for s in status["nodes"]["solo"]["services"].values())
    assert _cfs(env, "dev", "start", "solo").returncode == 0
    made = _cfs(env, "fs", "mkdir", "/after-restart", timeout=60)
    assert made.returncode == 0, made.stderr

    # Keys rotated through the daemon: servers reloaded, the chunk-store restarted.
    client_key = tmp_path / "state" / "credentials" / "client.nk"
    before = client_key.read_text()
    rotated = _cfs(
        env, "cluster", "rotate-credentials", "--role", "client", "--role", "chunkstore",
        "--json",
    )  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["rotated"] == ["client", "chunkstore@solo"]
    assert client_key.read_text() != before
    made = _cfs(env, "fs", "mkdir", "/after-rotation", timeout=60)
    assert made.returncode == 0, made.stderr
