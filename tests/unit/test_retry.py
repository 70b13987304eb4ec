"""The retry helper: one first attempt for free, jittered backoff, a hard deadline
counted from the first attempt, the last error raised unchanged, louder logs."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import nats.errors
import nats.js.errors
import pytest

import cfs.retry as retry_module
from cfs.bus.errors import BusError, BusUnavailable, PublishFailed, RequestTimeout
from cfs.retry import Backoff, RetryPolicy, any_bus_error, is_temporary, retry


class FakeClock:
    """Monotonic time that only moves when slept on (or by a slow fake call)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(retry_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    monkeypatch.setattr(retry_module, "asyncio", SimpleNamespace(sleep=fake.sleep))
    # No jitter: delays are the plain doubling schedule.
    monkeypatch.setattr(retry_module, "random", SimpleNamespace(uniform=lambda a, b: 1.0))
    return fake


class Flaky:
    """Fails with the given errors in turn, then returns "ok"; each try takes `cost_s`."""

    def __init__(self, errors: list[BaseException], clock: FakeClock, cost_s: float = 0.0):
        self.errors = list(errors)
        self.clock = clock
        self.cost_s = cost_s
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        self.clock.now += self.cost_s
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def waiting_levels(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [r.levelno for r in caplog.records if r.getMessage() == "retry.waiting"]


async def test_first_success_does_not_sleep_or_log(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cfs.retry")
    call = Flaky([], clock)
    assert await retry(call, RetryPolicy("thing")) == "ok"
    assert call.calls == 1
    assert clock.sleeps == []
    assert caplog.records == []


async def test_temporary_errors_are_retried_until_success(clock: FakeClock) -> None:
    call = Flaky([BusUnavailable("down"), RequestTimeout("s", 1.0), TimeoutError()], clock)
    policy = RetryPolicy("thing", first_delay_s=0.1, max_delay_s=0.3)
    assert await retry(call, policy) == "ok"
    assert call.calls == 4
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.3])  # doubling, capped


async def test_a_permanent_error_is_raised_at_once(clock: FakeClock) -> None:
    refused = PublishFailed("no stream captures x")
    call = Flaky([refused], clock)
    with pytest.raises(PublishFailed) as raised:
        await retry(call, RetryPolicy("thing"))
    assert raised.value is refused
    assert call.calls == 1
    assert clock.sleeps == []


async def test_the_caller_classifies(clock: FakeClock) -> None:
    call = Flaky([KeyError("a"), KeyError("b"), ValueError("c")], clock)
    policy = RetryPolicy("thing", temporary=lambda exc: isinstance(exc, KeyError))
    with pytest.raises(ValueError, match="c"):
        await retry(call, policy)
    assert call.calls == 3


async def test_at_the_deadline_the_last_error_is_raised_unchanged(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cfs.retry")  # an earlier CLI test may raise root's
    errors: list[BaseException] = [BusUnavailable(f"down {i}") for i in range(100)]
    call = Flaky(errors[:], clock)
    started = clock.now
    policy = RetryPolicy("nodes bucket", deadline_s=5.0, first_delay_s=1.0, max_delay_s=1.0)
    with pytest.raises(BusUnavailable) as raised:
        await retry(call, policy)
    # Attempts at t=0..5 (the last one at the deadline); a seventh would start at 6.
    assert call.calls == 6
    assert raised.value is errors[call.calls - 1]
    assert clock.now - started <= 5.0
    gave_up = [r for r in caplog.records if r.getMessage() == "retry.gave_up"]
    assert len(gave_up) == 1
    assert gave_up[0].levelno == logging.WARNING
    assert gave_up[0].__dict__["what"] == "nodes bucket"
    assert gave_up[0].__dict__["attempts"] == 6


async def test_the_deadline_counts_the_first_attempt(clock: FakeClock) -> None:
    """A request that times out slowly spends the budget: no second try past it."""
    call = Flaky([RequestTimeout("s", 4.0)] * 3, clock, cost_s=4.0)
    policy = RetryPolicy("thing", deadline_s=6.0, first_delay_s=0.5)
    with pytest.raises(RequestTimeout):
        await retry(call, policy)
    assert call.calls == 2  # 0-4 s, then 4.5-8.5 s; a third would start past 6 s


async def test_log_level_rises_with_attempts(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cfs.retry")
    call = Flaky([BusUnavailable("down")] * 8, clock)
    policy = RetryPolicy("thing", deadline_s=None, quiet=2, loud_after=5)
    assert await retry(call, policy, extra={"shard": "s1"}) == "ok"
    quiet, info, loud = logging.DEBUG, logging.INFO, logging.WARNING
    assert waiting_levels(caplog) == [quiet] * 2 + [info] * 3 + [loud] * 3
    first = caplog.records[0]
    assert first.__dict__["what"] == "thing"
    assert first.__dict__["attempt"] == 1
    assert first.__dict__["shard"] == "s1"
    assert first.__dict__["error"] == "BusUnavailable: down"


async def test_no_deadline_keeps_going(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    # Past 1024 attempts the doubling would overflow a float if it were not capped.
    call = Flaky([BusUnavailable("down")] * 1500, clock)
    policy = RetryPolicy("thing", deadline_s=None, first_delay_s=0.1, max_delay_s=2.0)
    assert await retry(call, policy) == "ok"
    assert call.calls == 1501
    assert max(clock.sleeps) == 2.0
    assert not [r for r in caplog.records if r.getMessage() == "retry.gave_up"]


async def test_cancellation_is_not_retried(clock: FakeClock) -> None:
    call = Flaky([asyncio.CancelledError()], clock)
    with pytest.raises(asyncio.CancelledError):
        await retry(call, RetryPolicy("thing", temporary=lambda exc: True))
    assert call.calls == 1


async def test_backoff_resets_after_a_success(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cfs.retry")
    backoff = Backoff(RetryPolicy("session", deadline_s=10.0, first_delay_s=1.0, quiet=1))
    await backoff.wait(BusUnavailable("a"))
    await backoff.wait(BusUnavailable("b"))
    assert backoff.attempts == 2
    assert clock.sleeps == [1.0, 2.0]
    clock.now += 100.0  # a long healthy session: the deadline must not carry over
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.elapsed_s == 0.0
    await backoff.wait(BusUnavailable("c"))
    assert clock.sleeps[-1] == 1.0
    assert waiting_levels(caplog) == [logging.DEBUG, logging.INFO, logging.DEBUG]


async def test_backoff_raises_the_error_it_was_given_at_the_deadline(clock: FakeClock) -> None:
    backoff = Backoff(RetryPolicy("session", deadline_s=1.0, first_delay_s=0.6))
    await backoff.wait(BusUnavailable("a"))
    last = BusUnavailable("b")
    with pytest.raises(BusUnavailable) as raised:
        await backoff.wait(last)  # 0.6 s gone, next delay 1.2 s
    assert raised.value is last


def test_jitter_stays_within_half_and_one_and_a_half() -> None:
    policy = RetryPolicy("thing", first_delay_s=0.02, max_delay_s=0.1)
    for attempt, base in ((1, 0.02), (2, 0.04), (3, 0.08), (4, 0.1), (50, 0.1)):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0.5 * base <= d < 1.5 * base for d in delays)
        assert len(set(delays)) > 1  # clients do not march in step


def test_bus_boundary_classification() -> None:
    assert is_temporary(BusUnavailable("x"))
    assert is_temporary(RequestTimeout("s", 1.0))
    assert not is_temporary(PublishFailed("x"))
    assert not is_temporary(BusError("x"))
    assert is_temporary(nats.errors.NoRespondersError())
    assert is_temporary(nats.errors.TimeoutError())
    assert is_temporary(TimeoutError())
    assert is_temporary(nats.js.errors.ServiceUnavailableError())
    assert not is_temporary(nats.js.errors.NotFoundError())
    assert not is_temporary(ValueError())
    # A session-level loop outlives any bus failure, but not a bug.
    assert any_bus_error(PublishFailed("x"))
    assert any_bus_error(nats.js.errors.NotFoundError())
    assert any_bus_error(nats.errors.ConnectionClosedError())
    assert not any_bus_error(ValueError())


async def test_a_hot_path_hands_over_its_inline_first_failure(clock: FakeClock) -> None:
    """The caller made attempt 1 itself; retry sleeps first and keeps its deadline."""
    started = clock.now
    clock.now += 3.25  # the inline attempt took 3.25 s
    call = Flaky([BusUnavailable("still")] * 10, clock, cost_s=1.0)
    policy = RetryPolicy("thing", deadline_s=5.0, first_delay_s=0.5, max_delay_s=0.5)
    with pytest.raises(BusUnavailable):
        await retry(call, policy, failed=BusUnavailable("first"), started=started)
    assert clock.sleeps[0] == 0.5  # no immediate second try
    assert call.calls == 1  # 3.75-4.75 s; another would start at 5.25 > 5


async def test_a_permanent_inline_failure_is_raised_without_a_call(clock: FakeClock) -> None:
    call = Flaky([], clock)
    refused = PublishFailed("refused")
    with pytest.raises(PublishFailed) as raised:
        await retry(call, RetryPolicy("thing"), failed=refused, started=clock.now)
    assert raised.value is refused
    assert call.calls == 0
    assert clock.sleeps == []
