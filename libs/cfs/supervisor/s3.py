"""A real S3 endpoint for tests and `cfs dev`: moto in server mode as a child process.

Running moto out of process (rather than `mock_aws` in-process) means the code under
test talks plain HTTP to a separate server, the same way it talks to real S3, and the
endpoint can be killed or paused like any other dependency. Moto keeps its state in
memory, so a restart starts with no buckets.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import TracebackType
from typing import Self

from cfs.supervisor._http import http_get
from cfs.supervisor.errors import SupervisorError
from cfs.supervisor.ports import free_port
from cfs.supervisor.process import ManagedProcess, log_event

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class S3Server:
    """Moto's S3-compatible server on 127.0.0.1 with moto's fake test credentials."""

    ACCESS_KEY_ID = "testing"
    SECRET_ACCESS_KEY = "testing"
    REGION = "us-east-1"

    def __init__(
        self,
        state_dir: Path,
        *,
        name: str = "s3",
        port: int | None = None,
        die_with_parent: bool = True,
    ) -> None:
        """The port is fixed now so the endpoint URL survives restarts."""
        if importlib.util.find_spec("moto") is None:
            raise SupervisorError(
                f"moto is not installed for {sys.executable}: pip install 'moto[server]'"
            )
        self.name = name
        self.state_dir = Path(state_dir)
        self.port = port if port is not None else free_port(HOST)
        env = {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": self.REGION,
            "PYTHONUNBUFFERED": "1",
        }
        self.process = ManagedProcess(
            name,
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            log_path=self.state_dir / "moto.log",
            env=env,
            cwd=self.state_dir,
            die_with_parent=die_with_parent,
        )

    def __repr__(self) -> str:
        return f"<S3Server {self.name} {self.endpoint_url} pid={self.pid} running={self.running}>"

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for `boto3.client("s3", **kwargs)` (or aioboto3)."""
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.ACCESS_KEY_ID,
            "aws_secret_access_key": self.SECRET_ACCESS_KEY,
            "region_name": self.REGION,
        }

    def write_credentials(self, path: Path) -> Path:
        """Moto's fake keys as a credentials file (mode 0600), what services and `cfs`
        commands name in `CFS_S3_CREDENTIALS_FILE` or cluster.json's `s3_credentials_file`."""
        from cfs.objstore.settings import write_credentials_file

        return write_credentials_file(path, self.ACCESS_KEY_ID, self.SECRET_ACCESS_KEY)

    def settings_env(self, credentials_file: Path) -> dict[str, str]:
        """The `CFS_S3_*` variables that point a process's `S3Settings` at this server."""
        return {
            "CFS_S3_ENDPOINT_URL": self.endpoint_url,
            "CFS_S3_REGION": self.REGION,
            "CFS_S3_CREDENTIALS_FILE": str(credentials_file),
        }

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.running

    def ready(self) -> bool:
        """True when moto's management API (GET /moto-api/) answers 200."""
        return http_get(f"{self.endpoint_url}/moto-api/")[0] == 200

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.process.wait_until(self.ready, timeout, f"GET {self.endpoint_url}/moto-api/ == 200")

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Launch moto; with `wait`, block until it serves requests (kill it on failure)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.process.start()
        log_event(
            log, logging.INFO, "s3.started", server=self.name, url=self.endpoint_url, pid=self.pid
        )
        if wait:
            try:
                self.wait_ready(timeout)
            except SupervisorError:
                self.process.kill9()
                raise

    def restart(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Stop if running and start again on the same port (all S3 state is lost)."""
        self.process.stop()
        self.start(wait=wait, timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.process.stop(timeout)

    def kill9(self) -> int | None:
        return self.process.kill9()

    def pause(self) -> None:
        self.process.pause()

    def resume(self) -> None:
        self.process.resume()

    def log_tail(self, n: int = 40) -> str:
        return self.process.log_tail(n)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
