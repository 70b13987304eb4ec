"""Restores from S3 after losing the metadata: guide scenario 8 (metadata half) and
scenario 3 option 3, both better than the guide's RPO.

Scenario 8: every metadata store and every NATS store is wiped; only the
chunk-stores' disks and the S3 bucket remain. Scenario 3 option 3: two of three nodes
are lost for good (no quorum), and the operator restores into a fresh cluster instead
of forcing a leader. Either way a new cluster (`cfs dev up` runs `cluster init`)
restores the last metadata snapshot from S3 and replays the journal archive from
S3, and every file acknowledged (fsync'd) before the loss reads back identical.
The guide accepts a 1-day RPO; these print the measured RTO.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cfs.supervisor import S3Server
from tests.scenarios.conftest import (
    NODE_LOSS_LOGS,
    DevSite,
    report,
    sha256_of,
    wait_for,
    write_file,
)

SNAPSHOTS = "s3://cfs-backups/metadata"
ARCHIVE = "s3://cfs-backups/archive"

pytestmark = [
    pytest.mark.slow,  # two cluster starts and a full restore: make test-slow
    # quorum loss kills two nodes -9; the rest is the shutdown before the wipe
    pytest.mark.expected_logs(*NODE_LOSS_LOGS, "membership.leave_unrecorded", "nats.*"),
]


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The bucket outlives the cluster: its own S3 server, not the dev cluster's."""
    server = S3Server(tmp_path / "s3")
    server.start()
    try:
        yield server.settings_env(server.write_credentials(tmp_path / "s3.ini"))
    finally:
        server.stop()


def _archived(site: DevSite) -> bool:
    backup = site.json("admin", "status").get("backup") or {}
    streams = backup.get("archive") or []
    return bool(streams) and all(
        s["archived_seq"] >= s["journal_seq"] and s["lag_s"] == 0 for s in streams
    )


@pytest.mark.parametrize("loss", ["total", "quorum"])
def test_metadata_loss_restore_from_s3_snapshot_and_archive(
    dev_site_factory: Callable[..., DevSite], s3: dict[str, str], loss: str
) -> None:
    env = {**s3, "CFS_ARCHIVE_URL": ARCHIVE, "CFS_ARCHIVE_SEGMENT_S": "0.5"}
    site = dev_site_factory(nodes=3, env=env)
    site.env.update(s3)  # the operator's `cfs` finds the bucket the same way
    acked = {}
    for i in range(10):
        path = site.mnt / f"before/{i}.bin"
        acked[path] = write_file(path, os.urandom(50_000))
    snapshot = json.loads(
        site.ok("admin", "snapshot-metadata", "--destination", SNAPSHOTS, "--json")
    )
    url = snapshot["path"]
    for i in range(10):
        path = site.mnt / f"after/{i}.bin"
        acked[path] = write_file(path, os.urandom(50_000))
    wait_for("the journal archive caught up", lambda: _archived(site), timeout=60, every=0.5)
    time.sleep(3.0)  # the archive's completeness claim lags its last idle check by ~2 s

    # -- the loss: every metadata and NATS store; chunk-stores and the bucket remain ---------
    lost_at = time.monotonic()
    if loss == "quorum":  # scenario 3: two of three nodes gone, writes fail fast
        site.ok("dev", "kill", "storage-1")
        site.ok("dev", "kill", "storage-2")
        failed = site.cfs("fs", "mkdir", "/during-loss", timeout=60, CFS_OP_TIMEOUT_S="5")
        assert failed.returncode != 0 and "Leader not available" in failed.stderr
    site.down()
    shutil.rmtree(site.state / "nats")
    for node in (site.state / "nodes").iterdir():
        shutil.rmtree(node / "metadata", ignore_errors=True)
        shutil.rmtree(node / "backup", ignore_errors=True)

    # -- recovery: a new cluster, the snapshot from S3, the archive from S3 ----------------
    site.up()
    site.mount()
    restored = site.ok("admin", "restore-metadata", "--from-snapshot", url)
    assert "read-only until" in restored
    replay = json.loads(site.ok("admin", "replay-journal", "--json"))
    assert replay["open"] and sum(s["messages"] for s in replay["shards"]) > 0

    def all_read_back() -> bool:
        try:
            return all(sha256_of(p) == digest for p, digest in acked.items())
        except OSError:
            return False

    wait_for("every acknowledged file reads back identical", all_read_back, timeout=120)
    rto = time.monotonic() - lost_at
    site.ok("fs", "mkdir", "/after-restore")
    report(
        "total metadata loss" if loss == "total" else "scenario 3 option 3",
        rto_s=rto,
        acknowledged_files_lost=0,
        files_back=f"{len(acked)}/{len(acked)}",
        replayed_messages=sum(s["messages"] for s in replay["shards"]),
        guide_rpo_s=86400.0,
        guide_rto_s=7200.0 if loss == "total" else 3600.0,
    )
