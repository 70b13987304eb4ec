"""Restores from S3 after losing the metadata: guide scenario 8 (metadata half) and
scenario 3 option 3, both better than the guide's RPO.

Scenario 8: every metadata store and every NATS store is wiped; only the
chunk-stores' disks and the S3 bucket remain. Scenario 3 option 3: two of three nodes
are lost for good (no quorum), and the operator restores into a fresh cluster instead
of forcing a leader. Either way a new cluster (`cfs dev up` runs `cluster init`)
restores the last metadata snapshot from S3 and replays the journal archive from
S3. Every file acknowledged (fsync'd) before the archive caught up reads back
identical; files written one after another up to the moment of the loss measure the
RPO: the age at the loss of the oldest acknowledged file that did not come back (0 s
when all did), at most 10 s (the guide accepts a day). RTO and RPO are printed.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cfs.supervisor import S3Server
from tests.scenarios.conftest import (
    NODE_LOSS_LOGS,
    DevSite,
    backfill,
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


class _SteadyWriter(threading.Thread):
    """Writes and fsyncs small files one after another until stopped; keeps each
    acknowledged file's digest and the moment it was acknowledged."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.acked: dict[Path, tuple[str, float]] = {}
        self._stopping = threading.Event()

    def run(self) -> None:
        self.folder.mkdir()
        for i in itertools.count():
            if self._stopping.is_set():
                return
            path = self.folder / f"{i}.bin"
            try:
                digest = write_file(path, os.urandom(4096))
            except OSError:
                return
            self.acked[path] = (digest, time.monotonic())
            time.sleep(0.05)

    def stop(self) -> float:
        """Stop after the write under way; the moment of the loss that follows."""
        self._stopping.set()
        self.join(timeout=60)
        return time.monotonic()


def _reads_as(path: Path, digest: str) -> bool:
    try:
        return sha256_of(path) == digest
    except OSError:
        return False


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
    # Files acknowledged one after another up to the loss: the newest ones are only in
    # the journal's last seconds, what the archive lag puts at risk (the RPO).
    writer = _SteadyWriter(site.mnt / "until-loss")
    writer.start()
    wait_for("writes under way", lambda: len(writer.acked) >= 20, timeout=60)

    # -- the loss: every metadata and NATS store; chunk-stores and the bucket remain ---------
    lost_at = writer.stop()
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

    wait_for(
        "every file acknowledged before the archive caught up reads back",
        all_read_back,
        timeout=120,
    )
    rto = time.monotonic() - lost_at
    lost = [t for path, (digest, t) in writer.acked.items() if not _reads_as(path, digest)]
    rpo = lost_at - min(lost) if lost else 0.0
    assert rpo <= 10.0, f"{len(lost)} acknowledged files lost, the oldest {rpo:.1f} s before"
    site.ok("fs", "mkdir", "/after-restore")
    report(
        "total metadata loss" if loss == "total" else "scenario 3 option 3",
        rto_s=rto,
        rpo_s=rpo,
        acknowledged_files_lost=len(lost),
        files_back=f"{len(acked) + len(writer.acked) - len(lost)}/{len(acked) + len(writer.acked)}",
        replayed_messages=sum(s["messages"] for s in replay["shards"]),
        guide_rpo_s=86400.0,
        guide_rto_s=7200.0 if loss == "total" else 3600.0,
    )


DATA = "s3://cfs-backups/data"


def _flushing(site: DevSite) -> bool:
    """The flush keeps up: nothing waits for S3 longer than a couple of seconds."""
    state = site.cfs("admin", "s3-queue-status", "--json")
    if state.returncode != 0:
        return False
    oldest = json.loads(state.stdout)["oldest_queued_ms"]
    return oldest is None or time.time() * 1000 - oldest < 2000


def test_complete_cluster_loss_restores_metadata_and_data_from_s3_alone(
    dev_site_factory: Callable[..., DevSite], s3: dict[str, str]
) -> None:
    """Guide scenario 8 complete: a cluster in cache mode loses every node (every state
    directory of every process, NATS and chunk-stores included); only the bucket
    remains. A new cluster restores the metadata snapshot, replays the archive, brings
    the data back with `restore-data --from-s3`, checks clean, and every file
    acknowledged before the loss (its metadata archived and its data flushed) reads
    back identical through a fresh mount. Each step's time beside the guide's."""
    env = {**s3, "CFS_ARCHIVE_URL": ARCHIVE, "CFS_ARCHIVE_SEGMENT_S": "0.5"}
    site = dev_site_factory(nodes=3, env=env)
    site.env.update(s3)
    site.ok("admin", "tier-config", "--mode", "cache", "--url", DATA, "--flush-after", "0.5")
    acked = {}
    for i in range(8):
        path = site.mnt / f"before/{i}.bin"
        acked[path] = write_file(path, os.urandom(200_000 + i * 700_000))
    snapshot = json.loads(
        site.ok("admin", "snapshot-metadata", "--destination", SNAPSHOTS, "--json")
    )
    for i in range(8):
        path = site.mnt / f"after/{i}.bin"
        acked[path] = write_file(path, os.urandom(300_000))
    backfill(site)
    wait_for("the data flush keeping up", lambda: _flushing(site), timeout=60, every=0.5)
    wait_for("the journal archive caught up", lambda: _archived(site), timeout=60, every=0.5)
    writer = _SteadyWriter(site.mnt / "until-loss")
    writer.start()
    wait_for("writes under way", lambda: len(writer.acked) >= 20, timeout=60)

    # -- the loss: everything but the bucket -------------------------------------------------
    lost_at = writer.stop()
    site.down()
    shutil.rmtree(site.state / "nats")
    shutil.rmtree(site.state / "nodes")

    # -- recovery, step by step --------------------------------------------------------------
    steps: dict[str, float] = {}

    def step(name: str, *args: str) -> str:
        started = time.monotonic()
        out = site.ok(*args, timeout=600)
        steps[name] = time.monotonic() - started
        return out

    started = time.monotonic()
    site.up()
    site.mount()
    steps["new_cluster_s"] = time.monotonic() - started
    step("restore_metadata_s", "admin", "restore-metadata", "--from-snapshot", snapshot["path"])
    replay = json.loads(step("replay_journal_s", "admin", "replay-journal", "--json"))
    assert replay["open"]
    data = json.loads(
        step("restore_data_s", "admin", "restore-data", "--from-s3", "--url", DATA, "--json")
    )
    assert data["failed"] == [] and data["restored_fragments"] > 0, data
    step("consistency_check_s", "admin", "metadata-consistency-check", "--verbose")  # exit 0: clean
    for path, digest in acked.items():
        assert sha256_of(path) == digest, path
    rto = time.monotonic() - lost_at
    lost = [t for path, (digest, t) in writer.acked.items() if not _reads_as(path, digest)]
    rpo = lost_at - min(lost) if lost else 0.0
    assert rpo <= 10.0, f"{len(lost)} acknowledged files lost, the oldest {rpo:.1f} s before"
    report(
        "scenario 8 complete",
        rto_s=rto,
        rpo_s=rpo,
        acknowledged_files_lost=len(lost),
        files_back=f"{len(acked) + len(writer.acked) - len(lost)}/{len(acked) + len(writer.acked)}",
        restored_mb=data["restored_bytes"] / 1e6,
        **steps,
        guide_total_s=36 * 60.0,
        guide_target_s=7200.0,
    )
