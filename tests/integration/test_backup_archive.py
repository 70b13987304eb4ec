"""The continuous journal archive and a restore after total loss, with real processes.

A site ships its journals to a real S3 server (moto) while files are created; a
snapshot goes to S3 too. Then the whole cluster is gone: a new cluster (`cluster
init` of a new state directory) restores the snapshot from S3 and replays the
archive, and every acknowledged file is there (RPO = archive lag). An S3 outage
shows in the archive lag and is caught up when S3 returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cfs.supervisor import LocalSite, S3Server
from cfs_contracts.backup import BACKUP_STATUS_KEY, BackupStatus
from cfs_contracts.streams import NODES
from tests.integration.test_admin_cli import CFS
from tests.integration.test_backup import _create, _names

ARCHIVE = "s3://cfs-backups/archive"
SNAPSHOTS = "s3://cfs-backups/metadata"


def admin(site: LocalSite, s3_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`cfs admin ARGS` as an operator runs it, with the S3 settings configured."""
    env = site.cli_env(**s3_env)
    return subprocess.run(
        [CFS, "admin", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=site.base_dir,
        timeout=120,
        check=False,
    )


def ok(site: LocalSite, s3_env: dict[str, str], *args: str) -> str:
    done = admin(site, s3_env, *args)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def _site(base: Path, env: dict[str, str], name: str) -> LocalSite:
    return LocalSite(
        base,
        nodes=1,
        shards=2,
        site=name,
        env={**env, "CFS_ARCHIVE_URL": ARCHIVE, "CFS_ARCHIVE_SEGMENT_S": "0.3"},
    )


async def _status(site: LocalSite) -> BackupStatus | None:
    async with await site.client() as bus:
        kv = await bus.js.key_value(NODES.bucket)
        try:
            entry = await kv.get(BACKUP_STATUS_KEY)
        except Exception:
            return None
        return BackupStatus.model_validate_json(entry.value) if entry.value else None


@contextlib.contextmanager
def _outage(site: LocalSite, server: S3Server) -> Iterator[LocalSite]:
    """`site` started and archived, then S3 paused for the body; once S3 is back the
    archive must catch up (lag under 2 s)."""
    asyncio.run(site.start())
    try:
        asyncio.run(site.wait_ready())
        asyncio.run(_create(site, "warm", 1))
        asyncio.run(_archived(site))
        server.pause()
        try:
            yield site
        finally:
            server.resume()
        caught_up = asyncio.run(_archived(site, timeout=60.0))
        assert max(a.lag_s for a in caught_up.archive) < 2.0
    finally:
        site.stop()


async def _archived(site: LocalSite, timeout: float = 30.0) -> BackupStatus:
    """Wait until every journal message so far is in S3; returns that status."""
    async with await site.client() as bus:
        lasts = {}
        for shard in ("001", "002"):
            info = await bus.js.stream_info(f"META_{shard}")
            lasts[f"META_{shard}"] = int(info.state.last_seq)
    deadline = time.monotonic() + timeout
    while True:
        status = await _status(site)
        if status is not None:
            done = {a.stream: a.archived_seq for a in status.archive}
            if all(done.get(s, 0) >= last for s, last in lasts.items()):
                return status
        assert time.monotonic() < deadline, f"archive did not catch up: {status}"
        await asyncio.sleep(0.3)


@pytest.mark.slow  # make test-slow: its guide scenario covers the same (3, 7 or 8)
def test_total_loss_restore_from_s3_snapshot_and_archive(
    s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    env = s3_env
    lost = _site(tmp_path / "lost", env, "arc")
    asyncio.run(lost.start())
    try:
        asyncio.run(lost.wait_ready())
        before = asyncio.run(_create(lost, "before", 5))
        snap = json.loads(ok(lost, env, "snapshot-metadata", "--destination", SNAPSHOTS, "--json"))
        url = snap["path"]
        assert url.startswith(SNAPSHOTS + "/metadata-")
        after = asyncio.run(_create(lost, "after", 5))
        acknowledged = before | after
        status = asyncio.run(_archived(lost))
        # The archive claims completeness up to a moment a clock offset allowance
        # (archive_clock_offset_ms, 1 s) before it last saw the journals idle, and
        # records that every second: writes acknowledged 3 s before a total loss are
        # all back; the RPO figure printed below is what a replay recovered.
        time.sleep(3.0)
        lost_at = time.time()
        assert status.archive_url and status.archive_url.startswith(ARCHIVE)
        assert status.last_snapshot_url == url
        shown = ok(lost, env, "status")
        assert "Backup: last metadata snapshot" in shown and url in shown, shown
        assert "Backup: journal archive lag" in shown, shown
    finally:
        lost.kill9("storage-1")  # the whole cluster is lost: nothing shuts down cleanly
        lost.stop()

    fresh = _site(tmp_path / "fresh", env, "arc")
    asyncio.run(fresh.start())
    try:
        asyncio.run(fresh.wait_ready())
        started = time.monotonic()
        scratch = tmp_path / "tmp"  # where the download from S3 goes, and is removed
        scratch.mkdir()
        restored = ok(
            fresh, {**env, "TMPDIR": str(scratch)}, "restore-metadata", "--from-snapshot", url
        )
        assert "read-only until" in restored
        assert not list(scratch.iterdir()), "the downloaded snapshot was left behind"
        replay: dict[str, Any] = json.loads(ok(fresh, env, "replay-journal", "--json"))
        rto = time.monotonic() - started
        names = asyncio.run(_names(fresh))
        assert acknowledged <= names, f"lost: {sorted(acknowledged - names)[:5]}"
        assert sum(s["messages"] for s in replay["shards"]) > 0
        last_ms = max(s["last_ms"] or 0 for s in replay["shards"])
        print(
            f"total-loss restore: RTO {rto:.1f} s, RPO {lost_at - last_ms / 1000:.1f} s "
            f"(loss to the last replayed change), {len(names)} names back"
        )
        again = json.loads(ok(fresh, env, "replay-journal", "--json"))
        assert sum(s["messages"] for s in again["shards"]) == 0  # idempotent
        assert asyncio.run(_names(fresh)) == names
        assert asyncio.run(_create(fresh, "new", 1)) <= asyncio.run(_names(fresh))
    finally:
        fresh.stop()


@pytest.mark.expected_logs("retry.*", "backoff.*", "objstore.*")
def test_s3_outage_shows_in_archive_lag_and_catches_up(
    s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    with _outage(_site(tmp_path / "outage", s3_env, "out"), s3_server) as site:
        asyncio.run(_create(site, "during", 3))  # writes go on during the outage
        time.sleep(3.0)
        status = asyncio.run(_status(site))
        assert status is not None
        lag = max(a.lag_s for a in status.archive)
        assert lag >= 2.0, status


@pytest.mark.expected_logs("retry.*", "site.restarted")  # the store's retries giving up
def test_a_backup_term_that_starts_while_s3_is_down_waits_for_it(
    s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    """A backup restarted (a new term) during an S3 outage waits for S3 (the lag shows)
    instead of crashing on its first LIST: make chaos found `service.task_crashed`,
    and the expected-logs check fails this test on it."""
    site = _site(tmp_path / "restart", {**s3_env, "CFS_S3_DEADLINE_S": "1"}, "rst")
    with _outage(site, s3_server):
        backup = site.service(site.node_names[0], "backup")
        assert backup.pid is not None
        os.kill(backup.pid, signal.SIGKILL)  # died unasked: its restart policy applies
        deadline = time.monotonic() + 10
        while not site.restart_exited():
            assert time.monotonic() < deadline, "backup was not restarted"
            time.sleep(0.1)
        asyncio.run(_create(site, "during", 2))
        time.sleep(8.0)  # the new term meets S3 down at its start
