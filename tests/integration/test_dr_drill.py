"""`cfs admin dr-drill` end to end: a `cfs dev` site with a data tier and files written
through its mount; the drill runs as the operator runs it (a subprocess with the
site's cluster file) and restores into a temporary site of its own.

A clean drill exits 0 with every step ok and files compared; a drill whose restore
fails (a fault injected at the restore step) exits 1 naming that step, skips what
depends on it, still tears down, and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfs.supervisor import free_port
from tests.scenarios.conftest import DevSite, backfill, write_file

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse"), reason="the drill mounts the restored site (/dev/fuse)"
)

TIER = "s3://cfs-live-tier/data"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevSite]:
    """The live site: 3 nodes, an S3 server, the data tier in cache mode, files."""
    site = DevSite(tmp_path_factory.mktemp("live"), 3, s3_port=free_port())
    try:
        site.up()
        site.mount()
        site.ok("admin", "tier-config", "--mode", "cache", "--url", TIER, "--flush-after", "0.5")
        for i in range(12):
            write_file(site.mnt / f"docs/{i}.bin", os.urandom(1000 + i * 30_000))
        write_file(site.mnt / "top.txt", b"hello\n")
        backfill(site)
        yield site
    finally:
        site.down()


def _drill_processes(work: Path) -> list[str]:
    """Command lines of processes that belong to a drill under `work`."""
    out = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if str(work) in line]


def _drill(live: DevSite, work: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    work.mkdir(parents=True, exist_ok=True)
    return live.cfs(
        "admin", "dr-drill", "--work-dir", str(work), "--json", *args, timeout=600, **env
    )


def test_drill_restores_compares_and_smoke_tests_then_tears_down(
    live: DevSite, tmp_path: Path
) -> None:
    """While the drill runs, the live site keeps changing two of its files: they are
    skipped (changed since the snapshot), not failures; every other one matches."""
    report = tmp_path / "drill.md"
    stop = threading.Event()

    def keep_writing() -> None:
        while not stop.is_set():
            for i in (0, 1):
                write_file(live.mnt / f"docs/{i}.bin", os.urandom(5000))
            time.sleep(0.05)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    started = time.monotonic()
    try:
        result = _drill(live, tmp_path / "work", "--report", str(report))
    finally:
        stop.set()
        writer.join(timeout=30)
    seconds = time.monotonic() - started
    assert result.returncode == 0, f"stdout: {result.stdout}\nstderr: {result.stderr}"
    document = json.loads(result.stdout)
    statuses = {s["step"]: s["status"] for s in document["steps"]}
    assert set(statuses.values()) == {"ok"}, statuses
    assert document["ok"] and document["rto_s"] > 0
    compare = next(s for s in document["steps"] if s["step"] == "compare-sample")["figures"]
    assert compare["sampled"] == compare["files_in_snapshot"] == 13
    assert compare["changed"] == 2 and compare["compared"] == 11
    assert compare["matched"] == compare["compared"]
    assert "| posix-smoke-test | ok |" in report.read_text()
    assert _drill_processes(tmp_path / "work") == []
    assert list((tmp_path / "work").iterdir()) == []  # a clean drill leaves nothing
    print(f"\nDR drill: RTO {document['rto_s']:.1f} s, whole drill {seconds:.1f} s")


@pytest.mark.expected_logs("fault.raise")
def test_a_failed_restore_fails_the_drill_names_the_step_and_still_tears_down(
    live: DevSite, tmp_path: Path
) -> None:
    trigger = tmp_path / "fault"
    trigger.write_text("drill.restore-metadata")
    report = tmp_path / "drill.json"
    result = _drill(live, tmp_path / "work", "--report", str(report), CFS_CRASH_FILE=str(trigger))
    assert result.returncode == 1, f"stdout: {result.stdout}\nstderr: {result.stderr}"
    document = json.loads(report.read_text())
    statuses = {s["step"]: s["status"] for s in document["steps"]}
    assert statuses["restore-metadata"] == "failed"
    assert statuses["snapshot-metadata"] == statuses["start-site"] == "ok"
    for later in ("restore-data", "metadata-consistency-check", "compare-sample", "mount"):
        assert statuses[later] == "skipped", statuses
    assert statuses["teardown"] == "ok"
    assert not document["ok"] and document["rto_s"] is None
    assert _drill_processes(tmp_path / "work") == []


@pytest.mark.slow  # make test-slow
def test_ctrl_c_stops_the_drill_tears_down_and_still_reports(live: DevSite, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    report = tmp_path / "drill.json"
    drill = subprocess.Popen(
        [sys.executable, "-m", "cfs.cli", "admin", "dr-drill", "--work-dir", str(work),
         "--report", str(report)],
        env=live.env, cwd=live.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert drill.stderr is not None
        for line in drill.stderr:  # one line per finished step
            if "start-site" in line:
                assert line.split()[0] == "ok", line
                break
        drill.send_signal(signal.SIGINT)
        out, err = drill.communicate(timeout=120)
    finally:
        if drill.poll() is None:
            drill.kill()
    assert drill.returncode == 130, f"stdout: {out}\nstderr: {err}"
    document = json.loads(report.read_text())
    steps = {s["step"]: s for s in document["steps"]}
    assert document["interrupted"] and not document["ok"]
    # The step under way failed as "interrupted" (or, if a library swallowed the
    # cancel, finished); every later one but the teardown was skipped.
    assert steps["posix-smoke-test"] == {**steps["posix-smoke-test"], "status": "skipped",
                                         "details": "the drill was interrupted"}  # fmt: skip
    assert steps["teardown"]["status"] == "ok"
    assert _drill_processes(work) == []


@pytest.mark.slow  # make test-slow: a failed step is covered by the test above
@pytest.mark.expected_logs("fault.raise", "tier.recall_failed")
def test_a_corrupt_copy_of_the_data_fails_the_restore(live: DevSite, tmp_path: Path) -> None:
    """A byte flipped in the copied blob: the restore checks every chunk against its
    SHA-256, so the drill fails at restore-data instead of restoring bad data."""
    trigger = tmp_path / "fault"
    trigger.write_text("drill.corrupt-blob-copy")
    result = _drill(live, tmp_path / "work", CFS_CRASH_FILE=str(trigger))
    assert result.returncode == 1, f"stdout: {result.stdout}\nstderr: {result.stderr}"
    document = json.loads(result.stdout)
    statuses = {s["step"]: s["status"] for s in document["steps"]}
    assert statuses["restore-metadata"] == "ok"
    assert statuses["restore-data"] == "failed"
    assert statuses["teardown"] == "ok"
    assert _drill_processes(tmp_path / "work") == []
