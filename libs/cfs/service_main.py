"""The one way a service process starts: flags, settings, logging, signals, one-line failures.

Every service's `main(argv)` is `run_service(...)` with its settings class and
`serve(settings, stop)` coroutine, so `cfs service run NAME` and `python -m`
behave the same for all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cfs.bus import Bus, BusError
from cfs.logs import setup_logging
from cfs.security import CredentialsError

log = logging.getLogger(__name__)

T = TypeVar("T")
_NOT_READY = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)


async def until_jetstream_answers(
    what: str, call: Callable[[], Awaitable[T]], *, wait_s: float = 120.0
) -> T:
    """Start-up reads of a restarted node: JetStream answers only once the streams involved
    have elected leaders again (seconds after servers restart), so retry until `wait_s`."""
    deadline = time.monotonic() + wait_s
    delay = 0.25
    while True:
        try:
            return await call()
        except _NOT_READY as exc:
            if time.monotonic() > deadline:
                raise
            log.warning(
                "service.jetstream_not_ready",
                extra={"what": what, "error": repr(exc), "retry_in_s": delay},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class ServiceSettings(BaseSettings):
    """What every service process needs: who it is and where NATS is (CFS_* env)."""

    model_config = SettingsConfigDict(env_prefix="CFS_", extra="ignore")

    node: str = Field(min_length=1, description="this node's id, e.g. storage-1")
    site: str = "local"
    nats_urls: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    nats_credentials: Path | None = None
    log_level: str = "INFO"

    async def connect(self, service: str) -> Bus:
        return await Bus.connect(
            self.nats_urls,
            site=self.site,
            node=self.node,
            name=f"{service}@{self.node}",
            credentials=self.nats_credentials,
            connect_timeout=10.0,
        )


S = TypeVar("S", bound=ServiceSettings)


def run_service(
    name: str,
    description: str,
    settings_type: type[S],
    serve: Callable[[S, asyncio.Event], Awaitable[None]],
    argv: list[str] | None = None,
    *,
    fatal: tuple[type[BaseException], ...] = (),
) -> None:
    """Parse `--node/--data-dir/--config`, build settings (flags over CFS_* env over the
    file), run `serve` until SIGTERM/SIGINT. NATS unreachable (BusError) and any of
    `fatal` end the process with one line, not a traceback."""
    parser = argparse.ArgumentParser(prog=name, description=description)
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
        raise SystemExit(f"{name}: bad settings: {problems}") from None
    node = settings.node
    setup_logging(settings.log_level, service=name, node=node)
    one_line: tuple[type[BaseException], ...] = (BusError, CredentialsError, *fatal)
    try:
        asyncio.run(_until_signalled(serve, settings))
    except one_line as exc:
        log.error(f"{name}.failed", extra={"node": node, "error": str(exc)})
        raise SystemExit(f"{name} {node}: {exc}") from None


async def _until_signalled(
    serve: Callable[[S, asyncio.Event], Awaitable[None]], settings: S
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


def _load_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read settings file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a JSON object")
    return data
