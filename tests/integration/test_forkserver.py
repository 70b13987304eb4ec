"""The fork server: a forked service process is what `python -m PACKAGE` would be."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfs.supervisor import ManagedProcess
from cfs.supervisor.forkserver import ForkServer
from cfs.supervisor.site import child_pythonpath

PROBE = "tests.integration.fork_probe"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ForkServer]:
    path = os.pathsep.join([str(REPO), child_pythonpath()])
    forks = ForkServer(tmp_path / "forkserver.log", env={**os.environ, "PYTHONPATH": path})
    try:
        yield forks
    finally:
        forks.stop()


def _probe(server: ForkServer, tmp_path: Path, name: str, *args: str) -> ManagedProcess:
    return ManagedProcess(
        name,
        [sys.executable, "-m", PROBE, *args],
        log_path=tmp_path / f"{name}.log",
        env={"PROBE": name},
        cwd=tmp_path,
        forkserver=server,
    )


def _seen(proc: ManagedProcess) -> dict[str, object]:
    proc.wait_until(lambda: "{" in proc.log_tail(), 30, "its JSON line")
    line = next(x for x in proc.log_tail().splitlines() if x.startswith("{"))
    seen: dict[str, object] = json.loads(line)
    return seen


def test_a_child_has_its_own_argv_env_cwd_session_and_random_seed(
    server: ForkServer, tmp_path: Path
) -> None:
    one, two = (_probe(server, tmp_path, n, "30", "0") for n in ("one", "two"))
    try:
        one.start()
        two.start()
        first, second = _seen(one), _seen(two)
        assert first["argv"] == ["30", "0"] and first["env"] == "one" and second["env"] == "two"
        assert first["cwd"] == str(tmp_path) and first["stdin"] == ""
        assert first["pid"] == one.pid and first["sid"] == one.pid  # a session of its own
        assert first["random"] != second["random"]
    finally:
        one.stop(5)
        two.stop(5)
    assert one.returncode == -signal.SIGTERM


def test_exit_codes_kill9_and_restart_are_reported_like_popen(
    server: ForkServer, tmp_path: Path
) -> None:
    quick = _probe(server, tmp_path, "quick", "0", "3")
    quick.start()
    assert quick.wait(30) == 3 and not quick.running and quick.returncode == 3
    slow = _probe(server, tmp_path, "slow", "60", "0")
    slow.start()
    _seen(slow)
    pid = slow.pid
    assert slow.kill9() == -signal.SIGKILL
    slow.start()  # restartable, a new process, the log keeps both runs
    assert slow.pid != pid and slow.running
    assert slow.log_tail().count("--- cfs.supervisor: start slow") == 2
    slow.stop(5)


def test_children_die_with_the_fork_server(server: ForkServer, tmp_path: Path) -> None:
    child = _probe(server, tmp_path, "orphan", "60", "0")
    child.start()
    _seen(child)
    server.stop()
    assert child.wait(10) == -signal.SIGKILL  # PDEATHSIG from the kernel
    assert _gone(child.pid or 0)  # dead; a zombie until init reaps it


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        time.sleep(0.05)
    return False


def test_a_module_that_cannot_be_run_fails_its_start_visibly(
    server: ForkServer, tmp_path: Path
) -> None:
    broken = ManagedProcess(
        "broken",
        [sys.executable, "-m", "no_such_module_here"],
        log_path=tmp_path / "broken.log",
        forkserver=server,
    )
    broken.start()
    assert broken.wait(30) == 1
    assert "No module named no_such_module_here" in broken.log_tail()
    with pytest.raises(ValueError, match="python -m PACKAGE"):
        ManagedProcess("bad", ["/bin/true"], log_path=tmp_path / "x.log", forkserver=server)
