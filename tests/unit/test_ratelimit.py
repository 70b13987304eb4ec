"""The one token bucket: paced to the rate, a capped burst, started full or empty,
unlimited at rate 0 (the repair throttle's and the scrubber's behaviours)."""

from __future__ import annotations

import pytest

from cfs.ratelimit import TokenBucket

MiB = 1024 * 1024


def test_a_full_bucket_paces_to_the_rate() -> None:
    """Repair: the first burst goes at once, then the rate holds."""
    bucket = TokenBucket(1000, burst=1000, full=True)
    assert bucket.take(1000, now=0.0) == 0.0
    assert bucket.take(500, now=0.0) == 0.5
    assert bucket.take(0, now=10.0) == 0.0  # refilled, capped at the burst
    assert bucket.tokens == 1000


def test_an_empty_bucket_sleeps_off_its_debt() -> None:
    """Scrub: paced from its first byte."""
    bucket = TokenBucket(MiB, full=False, now=0.0)  # 1 MiB/s, 1 s of burst
    assert bucket.take(MiB // 2, now=0.0) == pytest.approx(0.5)
    # slept 0.5 s: the debt is paid, the next half MiB costs another 0.5 s
    assert bucket.take(MiB // 2, now=0.5) == pytest.approx(0.5)
    # idle for 10 s: only one second's worth was saved up
    assert bucket.take(MiB, now=11.0) == 0.0
    assert bucket.take(MiB, now=11.0) == pytest.approx(1.0)
    # time spent working counts as pacing too
    assert bucket.take(MiB // 4, now=12.0 + 0.25) == 0.0


def test_an_empty_bucket_fills_from_when_it_was_made() -> None:
    bucket = TokenBucket(100, full=False, now=50.0)
    assert bucket.take(100, now=51.0) == 0.0
    assert bucket.take(100, now=51.0) == pytest.approx(1.0)


@pytest.mark.parametrize("rate", [0, -1])
@pytest.mark.parametrize("full", [True, False])
def test_rate_zero_or_less_is_unlimited(rate: float, full: bool) -> None:
    bucket = TokenBucket(rate, full=full)
    assert bucket.unlimited
    assert bucket.take(10**12, now=0.0) == 0.0
    assert bucket.take(10**12, now=0.0) == 0.0


def test_burst_defaults_to_one_second() -> None:
    assert TokenBucket(250).burst == 250
    assert TokenBucket(250, burst=1000).burst == 1000


def test_a_clock_stepping_back_refills_nothing() -> None:
    bucket = TokenBucket(100, full=False, now=10.0)
    assert bucket.take(100, now=9.0) == pytest.approx(1.0)
    # Back at 10 s no time has passed since the bucket was made: still in debt.
    assert bucket.take(0, now=10.0) == pytest.approx(1.0)
    assert bucket.take(0, now=11.0) == 0.0


def test_long_run_rate_holds_whatever_the_sizes() -> None:
    """Waits plus working time add up to at least (taken - burst) / rate."""
    bucket = TokenBucket(1000, burst=500, full=True)
    now = 0.0
    taken = 0
    for size in [1, 700, 30, 2500, 0, 90, 400] * 20:
        now += bucket.take(size, now) + 0.01  # sleep off the debt, then work 10 ms
        taken += size
    assert now >= (taken - 500) / 1000
