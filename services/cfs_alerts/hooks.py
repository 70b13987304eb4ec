"""Where alert notifications go: a webhook (JSON POST), a command (the alert as JSON on
its stdin), the log.

Delivery never holds up the evaluation: `Dispatcher.notify` starts one task per hook
and returns. Each delivery has a timeout (a webhook is retried with backoff within
its deadline); a hook that hangs or fails is counted and logged, and its counts are
what the service reports as its health, so a broken hook is never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from typing import Any, Protocol

import aiohttp

from cfs.retry import RetryPolicy, retry
from cfs_alerts.rules import HookSpec, Kind, Notification

log = logging.getLogger(__name__)

STDERR_KEPT = 300  # bytes of a failed command's stderr in the error


class HookError(Exception):
    """A delivery that failed; one line."""


def document(note: Notification, site: str) -> dict[str, Any]:
    """What every hook gets: the alert as JSON (Alertmanager's fields, more or less)."""
    return {
        "status": "resolved" if note.kind is Kind.RESOLVED else "firing",
        "notification": note.kind.value,
        "rule": note.rule.name,
        "key": note.key,
        "site": site,
        "severity": note.rule.severity.value,
        "summary": note.summary,
        "labels": dict(note.rule.labels),
        "value": note.value,
        "since": note.since,
        "dedupe_key": note.dedupe_key,
    }


class Hook(Protocol):
    name: str

    async def send(self, alert: dict[str, Any]) -> None: ...


class WebhookHook:
    def __init__(self, spec: HookSpec) -> None:
        assert spec.url is not None
        self.name, self.url = spec.name, spec.url
        self.timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
        self.policy = RetryPolicy(
            f"webhook {spec.name}",
            temporary=lambda exc: isinstance(exc, HookError | aiohttp.ClientError | TimeoutError),
            deadline_s=spec.deadline_s,
            first_delay_s=0.5,
            max_delay_s=10.0,
        )

    async def send(self, alert: dict[str, Any]) -> None:
        async with aiohttp.ClientSession(timeout=self.timeout) as session:

            async def post() -> None:
                async with session.post(self.url, json=alert) as response:
                    if response.status >= 300:
                        raise HookError(f"{self.url} answered HTTP {response.status}")

            try:
                await retry(post, self.policy, extra={"hook": self.name})
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise HookError(f"{self.url}: {type(exc).__name__} {exc}".strip()) from None


class CommandHook:
    def __init__(self, spec: HookSpec) -> None:
        assert spec.argv
        self.name, self.argv, self.timeout_s = spec.name, spec.argv, spec.timeout_s

    async def send(self, alert: dict[str, Any]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise HookError(f"{self.argv[0]}: {exc.strerror or exc}") from None
        try:
            async with asyncio.timeout(self.timeout_s):
                _, stderr = await proc.communicate(json.dumps(alert).encode())
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise HookError(f"{self.argv[0]} ran past {self.timeout_s:g}s: killed") from None
        if proc.returncode:
            tail = stderr[-STDERR_KEPT:].decode(errors="replace").strip()
            raise HookError(f"{self.argv[0]} exited {proc.returncode}: {tail}")


class LogHook:
    def __init__(self, spec: HookSpec) -> None:
        self.name = spec.name

    async def send(self, alert: dict[str, Any]) -> None:
        level = logging.INFO if alert.get("status") == "resolved" else logging.WARNING
        log.log(level, "alert.notified", extra={"alert": alert})


def build(spec: HookSpec) -> Hook:
    if spec.kind == "webhook":
        return WebhookHook(spec)
    if spec.kind == "command":
        return CommandHook(spec)
    return LogHook(spec)


class Dispatcher:
    """Every notification to every hook, each delivery in a task of its own."""

    def __init__(self, hooks: list[Hook]) -> None:
        self.hooks = hooks
        self.delivered: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.last_error: dict[str, str] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def notify(self, alert: dict[str, Any]) -> None:
        for hook in self.hooks:
            task = asyncio.create_task(self._deliver(hook, alert), name=f"alert hook {hook.name}")
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _deliver(self, hook: Hook, alert: dict[str, Any]) -> None:
        try:
            await hook.send(alert)
        except HookError as exc:
            self.failed[hook.name] += 1
            self.last_error[hook.name] = str(exc)
            log.warning(
                "alert.hook_failed",
                extra={"hook": hook.name, "rule": alert.get("rule"), "error": str(exc)},
            )
        else:
            self.delivered[hook.name] += 1

    async def close(self, timeout_s: float = 5.0) -> None:
        """Let deliveries under way finish for a while, then cancel the rest."""
        if self._pending:
            _, late = await asyncio.wait(set(self._pending), timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
