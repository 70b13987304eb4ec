"""The client side of the `cfs dev` daemon (`cfs.supervisor.devcluster`): its files
under the state directory and its control socket, one JSON request per line.

Kept apart from the daemon so that `cfs node add` and quorum recovery can ask a dev
site for processes without loading what runs one.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from cfs.supervisor.errors import SupervisorError

CLUSTER_FILE = "cluster.json"
STATE_FILE = "dev.json"
CONTROL_SOCKET = "control.sock"
LOG_FILE = "devd.log"


class DevUsageError(SupervisorError):
    """A request the operator got wrong (an unknown node or site, a partition of a
    single site): `cfs dev` exits 2 on it."""


def cluster_file_name(site: str | None = None) -> str:
    """`cluster.json` (the first site), or `cluster-<site>.json`."""
    return CLUSTER_FILE if site is None else f"cluster-{site}.json"


class DevControl:
    """The client side of the control socket (what `cfs dev status|kill|...` use)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir).resolve()

    def state(self) -> dict[str, Any] | None:
        """The daemon's state file, or None if there never was one."""
        try:
            data: dict[str, Any] = json.loads((self.state_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return data

    def daemon_pid(self) -> int | None:
        """The daemon's pid if it is alive."""
        state = self.state()
        if state is None or not isinstance(state.get("pid"), int):
            return None
        pid = int(state["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def call(self, op: str, timeout: float = 120.0, **args: Any) -> Any:
        """Send one request; SupervisorError with the daemon's message if it fails."""
        if self.daemon_pid() is None:
            raise SupervisorError(
                f"no dev cluster is running in {self.state_dir} (start one: cfs dev up)"
            )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.state_dir / CONTROL_SOCKET))
                sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError as exc:
                raise SupervisorError(f"dev cluster in {self.state_dir}: {exc}") from exc
        try:
            answer = json.loads(data)
        except ValueError as exc:
            raise SupervisorError(f"dev cluster in {self.state_dir} did not answer") from exc
        if not answer.get("ok"):
            error = DevUsageError if answer.get("usage") else SupervisorError
            raise error(str(answer.get("error")))
        return answer.get("result")

    def wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False


def running_dev_site() -> DevControl | None:
    """The dev site this shell's client config points at ($CFS_DEV_DIR, else the
    directory of the cluster config file), if its daemon runs."""
    from cfs.fuse.config import DEFAULT_CONFIG, config_path

    named = os.environ.get("CFS_DEV_DIR")
    state_dir = Path(named) if named else (config_path() or DEFAULT_CONFIG).resolve().parent
    control = DevControl(state_dir)
    return control if control.daemon_pid() is not None else None
