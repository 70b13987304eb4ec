"""`make run` as a new user runs it: a fresh clone with no `.venv`, then Ctrl-C.

The clone holds only what is committed, so a missing file or install step fails
here as it would on a new machine. pip's cache makes the install a minute, not ten.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cfs.fuse.config import is_fuse_mount

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse")
        or shutil.which("git") is None
        or shutil.which("make") is None,
        reason="needs /dev/fuse, git and make",
    ),
    # A fresh venv is a pip install (about a minute): in `make test-slow`, keeping the
    # default suite well under 15 minutes on 2 cores.
    pytest.mark.slow,
]


def _processes_under(path: Path) -> list[str]:
    """Command lines of live processes that mention `path` (what must be gone)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def test_make_run_from_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "claudefs"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    assert not (clone / ".venv").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CFS_", "VIRTUAL_ENV"))}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p)
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        make = subprocess.Popen(
            ["make", "run"],
            cwd=clone,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal gives it
        )
    mnt = clone / "mnt"
    try:
        deadline = time.monotonic() + 600
        while not (is_fuse_mount(mnt) and (mnt / "README.txt").exists()):
            assert make.poll() is None, (
                f"make run exited {make.returncode}:\n{log_path.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, (
                f"no mount after 600s:\n{log_path.read_text()[-3000:]}"
            )
            time.sleep(1)
        assert (mnt / "README.txt").read_text().startswith("Welcome to ClaudeFS")
        deadline = time.monotonic() + 60
        while "press Ctrl-C" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        output = log_path.read_text()
        assert 'Node "storage-1" is UP' in output, output[-3000:]
        assert "Data tier: cache, s3://cfs-dev-tier/data" in output, output[-3000:]
        assert (mnt / "data" / "sample-6MiB.bin").stat().st_size == 6 * 1024 * 1024
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C: make itself then reports "Interrupt"
        make.wait(timeout=120)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(timeout=30)
        if is_fuse_mount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert not is_fuse_mount(mnt)
    time.sleep(1)
    assert _processes_under(clone) == [], "processes left behind"
    assert "stopped: unmounted and every process ended" in log_path.read_text()
