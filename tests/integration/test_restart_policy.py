"""The dev supervisor's restart policy: a process that exits by itself comes back; one
stopped or killed on purpose stays down (what `cfs dev kill` relies on)."""

from __future__ import annotations

import time
from pathlib import Path

from cfs.supervisor import ManagedProcess
from cfs.supervisor.site import LocalSite


def _wait_exit(proc: ManagedProcess) -> None:
    deadline = time.monotonic() + 10
    while proc.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_only_processes_that_exit_by_themselves_are_restarted(tmp_path: Path) -> None:
    site = LocalSite(tmp_path, nodes=1)
    crashing = ManagedProcess("crashing", ["sh", "-c", "exit 3"], log_path=tmp_path / "c.log")
    killed = ManagedProcess("killed", ["sleep", "30"], log_path=tmp_path / "k.log")
    site._procs = {("storage-1", "crashing"): crashing, ("storage-1", "killed"): killed}
    try:
        crashing.start()
        killed.start()
        killed.kill9()
        _wait_exit(crashing)
        assert crashing.exited_unasked and not killed.exited_unasked
        assert site.restart_exited(now=100.0) == ["crashing"]
        _wait_exit(crashing)
        assert site.restart_exited(now=100.5) == [], "the next restart waits (backoff)"
        assert site.restart_exited(now=102.1) == ["crashing"]
        _wait_exit(crashing)
        assert site.restart_exited(now=103.0) == [], "the delay doubled to 2 s"
        assert not killed.running, "a kill -9 on purpose is never undone"
        assert "site.restarted" not in killed.log_path.read_text()
    finally:
        crashing.stop()
        killed.stop()
