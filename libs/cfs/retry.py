"""The one retry helper (STYLE.md #3): classify at the boundary, back off with jitter,
stop at a hard deadline, log louder as attempts grow.

    policy = RetryPolicy("nodes bucket", temporary=is_temporary, deadline_s=120)
    kv = await retry(lambda: bus.key_value("nodes"), policy)

The first attempt runs with no overhead beyond a function call, so hot paths (a
metadata request, a journal append) can use it too. A failure that `temporary` does
not accept is raised at once; a temporary one is retried until `deadline_s` (None:
until cancelled) and then raised as it was, so callers keep their own error types.
Log levels rise with the attempt count: DEBUG for the first `quiet` retries (a leader
election is routine), INFO for the next few, WARNING after `loud_after` attempts, one
line per retry naming `what`, the attempt, the error and the delay.

`Backoff` is the same schedule for loops that are not one call (a consumer that must
run again after its connection broke): `await backoff.wait(exc)` sleeps the next
delay and logs like `retry` does; `reset()` after a success.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
import nats.js.errors

from cfs.bus.errors import BusError

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_DOUBLINGS = 64

# nats-py errors that mean "not now" (no leader yet, no reply, connection moving).
_NATS_TEMPORARY: tuple[type[BaseException], ...] = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.FlushTimeoutError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    ConnectionError,
)


def is_temporary(exc: BaseException) -> bool:
    """The bus boundary's classification: our `BusError.temporary`, or a nats-py error
    that a later attempt may not meet (no stream leader, no reply, reconnecting)."""
    if isinstance(exc, BusError):
        return exc.temporary
    return isinstance(exc, _NATS_TEMPORARY)


def any_bus_error(exc: BaseException) -> bool:
    """For loops that must outlive every bus failure (a consumer's session): anything
    the bus or nats-py raises, temporary or not, is worth another session later."""
    return isinstance(exc, (BusError, nats.errors.Error, *_NATS_TEMPORARY))


@dataclass(frozen=True)
class RetryPolicy:
    """How one kind of call is retried. Delays double from `first_delay_s` up to
    `max_delay_s`, each scaled by a random factor in [0.5, 1.5) so that many clients
    retrying the same server do not march in step."""

    what: str
    temporary: Callable[[BaseException], bool] = is_temporary
    deadline_s: float | None = 30.0
    first_delay_s: float = 0.1
    max_delay_s: float = 2.0
    quiet: int = 2
    loud_after: int = 5

    def delay(self, attempt: int) -> float:
        """The sleep after failed attempt number `attempt` (1-based)."""
        # The exponent is capped: 2**1024 does not fit a float, and a retry without a
        # deadline reaches that many attempts within an hour of a lasting outage.
        base = min(self.first_delay_s * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS), self.max_delay_s)
        return base * random.uniform(0.5, 1.5)

    def level(self, attempt: int) -> int:
        if attempt <= self.quiet:
            return logging.DEBUG
        return logging.INFO if attempt <= self.loud_after else logging.WARNING


async def retry(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    extra: Mapping[str, object] | None = None,
    logger: logging.Logger | None = None,
    failed: BaseException | None = None,
    started: float | None = None,
) -> T:
    """`await call()` until it succeeds, fails for good, or the deadline passes.

    The deadline counts from the first attempt: a call that fails slowly (a request
    timing out) spends the budget too. A hot path that made its first attempt inline
    (not even a coroutine for the retry machinery) passes its error as `failed` and
    the `time.monotonic()` it `started` at; retrying goes on from there."""
    if failed is None:
        started = time.monotonic() if started is None else started
        try:
            return await call()
        except Exception as exc:
            if not policy.temporary(exc):
                raise
            failed = exc
    elif not policy.temporary(failed):
        raise failed
    backoff = Backoff(policy, extra=extra, logger=logger, started=started)
    await backoff.wait(failed)
    while True:
        try:
            return await call()
        except Exception as exc:
            if not policy.temporary(exc):
                raise
            await backoff.wait(exc)


class Backoff:
    """The retry schedule as an object, for loops that are more than one call."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        extra: Mapping[str, object] | None = None,
        logger: logging.Logger | None = None,
        started: float | None = None,
    ) -> None:
        """`started`: the `time.monotonic()` the deadline counts from (default: now)."""
        self.policy = policy
        self.attempts = 0
        self._extra = dict(extra or {})
        self._log = logger or log
        self._started = time.monotonic() if started is None else started

    def reset(self) -> None:
        self.attempts = 0
        self._started = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    async def wait(self, exc: BaseException) -> None:
        """Sleep before the next attempt after `exc`; re-raise `exc` once the next
        attempt would start past the deadline."""
        self.attempts += 1
        delay = self.policy.delay(self.attempts)
        deadline = self.policy.deadline_s
        if deadline is not None and self.elapsed_s + delay > deadline:
            self._log.warning(
                "retry.gave_up",
                extra={
                    **self._extra,
                    "what": self.policy.what,
                    "attempts": self.attempts,
                    "seconds": round(self.elapsed_s, 2),
                    "error": _describe(exc),
                },
            )
            raise exc
        self._log.log(
            self.policy.level(self.attempts),
            "retry.waiting",
            extra={
                **self._extra,
                "what": self.policy.what,
                "attempt": self.attempts,
                "retry_in_s": round(delay, 3),
                "error": _describe(exc),
            },
        )
        await asyncio.sleep(delay)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
