"""The one way a service process starts: flags, settings, logging, signals, one-line failures.

`run_spec(spec, argv)` is what `cfs service run NAME` and every service's `python -m`
call: settings from flags, `CFS_*` variables and a file, then the kernel runtime
(`cfs.kernel.runtime.run`) until SIGTERM/SIGINT. A crashed task, NATS out of reach,
unusable credentials or one of the spec's `fatal` errors end the process with one log
line, one stderr line and a non-zero exit, so the supervisor restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from cfs import faults
from cfs.bus import Bus, BusError
from cfs.kernel.spec import ServiceSpec
from cfs.logs import setup_logging
from cfs.security import CredentialsError
from cfs.settingtypes import UrlList
from cfs.telemetry import setup_tracing_from_env, shutdown_tracing

log = logging.getLogger(__name__)

# SIGTERM to exit: components stop in reverse order, each within a bounded time even
# with NATS out of reach (a lease release or health record removal is then given up).
# A stop still running after this is a bug; the process exits before the usual 10 s
# of a supervisor (docker, the test harness) would have it killed without a word.
STOP_DEADLINE_S = 8.0


class ServiceSettings(BaseSettings):
    """What every service process needs: who it is and where NATS is (CFS_* env)."""

    model_config = SettingsConfigDict(env_prefix="CFS_", extra="ignore")

    node: str = Field(min_length=1, description="this node's id, e.g. storage-1")
    site: str = "local"
    nats_urls: UrlList = Field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    nats_credentials: Path | None = None
    nats_ca: Path | None = Field(
        default=None, description="the site CA for NATS TLS (default: beside the credentials)"
    )
    log_level: str = "INFO"
    singleton_lease_s: float | None = Field(
        default=None, gt=0, description="site-singleton lease time; default: the spec's"
    )
    singleton_renew_s: float | None = Field(
        default=None, gt=0, description="site-singleton renew interval; default: the spec's"
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Prometheus `/metrics` HTTP port; 0: none"
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="address the metrics endpoint listens on"
    )

    async def connect(self, service: str) -> Bus:
        return await Bus.connect(
            self.nats_urls,
            site=self.site,
            node=self.node,
            name=f"{service}@{self.node}",
            credentials=self.nats_credentials,
            tls_ca=self.nats_ca,
            connect_timeout=10.0,
        )


def run_spec(spec: ServiceSpec, argv: list[str] | None = None) -> None:
    """Parse `--node/--data-dir/--config`, build settings (flags over CFS_* env over the
    file), run the spec until SIGTERM/SIGINT."""
    from cfs.kernel.runtime import ServiceCrashed, use_cancellable_wait_for

    use_cancellable_wait_for()  # a cancelled task must not go on (SIGTERM is a cancel)
    spec.load()  # every import now, none while the service runs
    import cfs.admin.executor
    import cfs.client.nodes
    import cfs.kernel.runtime
    import cfs.lease  # noqa: F401 - the runtime's own, for the same reason

    settings_type = spec.settings()
    parser = argparse.ArgumentParser(prog=spec.name, description=spec.description)
    parser.add_argument("--node", help="node id (or CFS_NODE)")
    parser.add_argument("--data-dir", type=Path, help="node data directory (or CFS_DATA_DIR)")
    parser.add_argument("--config", type=Path, help="JSON settings file")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.config is not None:
        overrides.update(_load_config(args.config))
    if args.node:
        overrides["node"] = args.node
    if args.data_dir is not None and "data_dir" in settings_type.model_fields:
        overrides["data_dir"] = args.data_dir
    try:
        settings = settings_type(**overrides)
    except ValidationError as exc:  # without the input values: they may hold secrets
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors(include_input=False)
        )
        raise SystemExit(f"{spec.name}: bad settings: {problems}") from None
    except SettingsError as exc:  # a CFS_* variable that is not what its field takes
        cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
        raise SystemExit(f"{spec.name}: bad settings: {exc}{cause}") from None
    node = settings.node
    setup_logging(settings.log_level, service=spec.name, node=node)
    faults.scope(spec.name)
    one_line: tuple[type[BaseException], ...] = (
        BusError,
        CredentialsError,
        ServiceCrashed,
        *spec.fatal,
    )
    tracing = setup_tracing_from_env(spec.name, node)  # OTEL_* variables; none: no-op spans
    try:
        asyncio.run(_until_signalled(spec, settings))
    except one_line as exc:
        log.error(f"{spec.name}.failed", extra={"node": node, "error": str(exc)})
        raise SystemExit(f"{spec.name} {node}: {exc}") from None
    finally:
        shutdown_tracing(tracing)  # the last batch of spans leaves before the process


async def _until_signalled(spec: ServiceSpec, settings: ServiceSettings) -> None:
    from cfs.kernel.runtime import run

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        if not stop.is_set():
            stop.set()
            loop.call_later(STOP_DEADLINE_S, _stop_overdue, spec.name, settings.node)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping)
    await run(spec, settings, stop)


def _stop_overdue(service: str, node: str) -> None:
    """A stop takes a second or two, NATS reachable or not; one that hangs is a bug (this
    line names where each task waits), and the process must end all the same rather
    than wait for its supervisor's SIGKILL."""
    waiting = sorted(_where(task) for task in asyncio.all_tasks())
    log.error(
        "service.stop_overdue",
        extra={"service": service, "node": node, "after_s": STOP_DEADLINE_S, "tasks": waiting},
    )
    os._exit(1)


def _where(task: asyncio.Task[Any]) -> str:
    """A task's name and the innermost line it waits at."""
    where = ""
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is not None:
            where = f" at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return f"{task.get_name()}{where}"


def _load_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read settings file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a JSON object")
    return data
