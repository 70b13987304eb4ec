"""kill -9 of backup and restore at the worst moments, with real processes.

The tests share one site and run in file order.

A fault point (`cfs.faults`) ends the first process that reaches it as `kill -9`
would. After each crash the result is either complete and verified or absent and
reported, never half-written, and the next run (or the restarted process) finishes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfs.backup.segments import parse_segment_key
from cfs.objstore import open_store, s3_settings
from cfs.supervisor import LocalSite
from tests.integration.test_backup import _create, _names
from tests.integration.test_backup_archive import ARCHIVE, admin, ok
from tests.integration.test_backup_archive import _archived as archived

CRASHES = "site.restarted", "fault.crash", "lease.*", "singleton.*", "retry.*", "leader.*"


@pytest.fixture(scope="module")
def site(
    s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalSite, Path]]:
    """One site for the module (its start dominates): each test arms one fault point
    and leaves the site whole (crashed processes restarted) for the next."""
    base = tmp_path_factory.mktemp("faults")
    crash = base / "crash"
    running = LocalSite(
        base / "site",
        nodes=3,
        shards=2,
        site="flt",
        env={
            **s3_env,
            "CFS_ARCHIVE_URL": ARCHIVE,
            "CFS_ARCHIVE_SEGMENT_S": "0.3",
            "CFS_CRASH_FILE": str(crash),
        },
    )
    try:
        asyncio.run(running.start())
        asyncio.run(running.wait_ready())
        yield running, crash
    finally:
        running.stop()


def _until(what: str, check: object, site: LocalSite, timeout: float = 60.0) -> None:
    """Poll `check()` while restarting crashed processes, as an init system would."""
    deadline = time.monotonic() + timeout
    while True:
        site.restart_exited()
        if check():  # type: ignore[operator]
            return
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.5)


def _crash_taken(site: LocalSite, crash: Path, timeout: float = 60.0) -> str:
    """Wait for the armed fault point to end its process, restart that process and
    return its name. The point's file goes a moment before the process exits: a test
    that only waited for the file could end with the process still to die, and the
    next test find it dead."""
    deadline = time.monotonic() + timeout
    while True:
        restarted = site.restart_exited()
        if restarted:
            assert not crash.exists() and len(restarted) == 1, restarted
            return restarted[0]
        assert time.monotonic() < deadline, f"the fault point: not within {timeout:.0f} s"
        time.sleep(0.2)


@pytest.mark.slow  # make test-slow (the default suite keeps under 15 min)
@pytest.mark.expected_logs(*CRASHES)
def test_backup_killed_during_a_snapshot_leaves_nothing_then_the_next_succeeds(
    site: tuple[LocalSite, Path], s3_env: dict[str, str], tmp_path: Path
) -> None:
    running, crash = site
    asyncio.run(_create(running, "snap", 5))
    output = tmp_path / "metadata.tar.gz"
    crash.write_text("backup.snapshot_cut")
    failed = admin(running, s3_env, "snapshot-metadata", "--output", str(output))
    assert failed.returncode != 0
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert not crash.exists(), "the fault point was not reached"
    assert not output.exists() and not list(tmp_path.glob("*.partial"))

    def snapshot_taken() -> bool:
        return admin(running, s3_env, "snapshot-metadata", "--output", str(output)).returncode == 0

    _until("a snapshot by the standby backup service", snapshot_taken, running)
    names = asyncio.run(_names(running))
    ok(running, s3_env, "restore-metadata", "--from-snapshot", str(output), "--force")
    ok(running, s3_env, "replay-journal", "--none")
    assert asyncio.run(_names(running)) == names


@pytest.mark.expected_logs(*CRASHES)
def test_backup_killed_after_a_segment_upload_resumes_without_gap_or_duplicate(
    site: tuple[LocalSite, Path], s3_env: dict[str, str]
) -> None:
    running, crash = site
    crash.write_text("backup.segment_uploaded")
    asyncio.run(_create(running, "arc", 10))
    assert "backup" in _crash_taken(running, crash)
    asyncio.run(_create(running, "arc2", 5))
    status = asyncio.run(archived(running, timeout=60.0))
    assert status.archive_url is not None
    cluster_dir = status.archive_url.rsplit("/", 1)[-1]

    async def segments() -> dict[str, list[tuple[int, int]]]:
        found: dict[str, list[tuple[int, int]]] = {}
        async with open_store(
            ARCHIVE,
            s3_settings(s3_env["CFS_S3_ENDPOINT_URL"], Path(s3_env["CFS_S3_CREDENTIALS_FILE"])),
        ) as store:
            async for info in store.list(""):
                parsed = parse_segment_key(info.key)
                if parsed is not None and info.key.startswith(f"{cluster_dir}/META_"):
                    found.setdefault(info.key.split("/")[-2], []).append(parsed)
        return found

    found = asyncio.run(segments())
    assert set(found) == {"META_001", "META_002"}
    for stream, ranges in found.items():
        ranges.sort()
        assert ranges[0][0] == 1, (stream, ranges)
        for (_, last), (first, _) in itertools.pairwise(ranges):
            assert first == last + 1, f"{stream}: gap or overlap in {ranges}"


@pytest.mark.expected_logs(*CRASHES, "projection.*", "follower.*", "restore.*")
def test_a_replica_killed_while_swapping_in_a_restore_finishes_it_after_restart(
    site: tuple[LocalSite, Path], s3_env: dict[str, str], tmp_path: Path
) -> None:
    running, crash = site
    asyncio.run(_create(running, "kept", 5))
    output = tmp_path / "metadata.tar.gz"
    ok(running, s3_env, "snapshot-metadata", "--output", str(output))
    names = asyncio.run(_names(running))
    asyncio.run(_create(running, "dropped", 3))
    crash.write_text("restore.swap@metadata-raft")  # not the backup's shadow
    ok(running, s3_env, "restore-metadata", "--from-snapshot", str(output), "--force")
    assert not crash.exists(), "the fault point was not reached"
    processes = [p for n in running.node_names for p in running.node_processes(n).values()]
    crashed = [p for p in processes if p.exited_unasked]
    assert len(crashed) == 1 and "metadata-raft" in crashed[0].name, crashed
    _until("the crashed replica back", lambda: not crashed[0].exited_unasked, running)

    def installed_after_restart() -> bool:
        log = Path(crashed[0].log_path).read_text()
        restart = log.rfind("--- cfs.supervisor: start")
        return log.count('"restore.installed"', restart) >= 2  # both shards

    _until("the restarted replica installs the image", installed_after_restart, running)
    ok(running, s3_env, "replay-journal", "--none")
    assert asyncio.run(_names(running)) == names
