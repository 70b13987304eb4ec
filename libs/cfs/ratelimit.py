"""The one rate limiter: a token bucket, pure, with the clock passed in.

    bucket = TokenBucket(50 * MiB, full=False, now=clock())
    await sleep(bucket.take(len(data), clock()))

`take(cost, now)` spends `cost` tokens at once (the balance may go negative) and
answers how long to wait before using them, so a caller paces itself by sleeping
off its debt. Over any stretch, waits plus the time spent working add up to at
least (tokens taken - tokens at the start) / rate.
"""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens (bytes) per second, with up to `burst` saved up.

    `rate <= 0` means unlimited: `take` always answers 0. `burst` defaults to one
    second's worth. `full` is the choice of how the bucket starts: full (the first
    `burst` tokens go without waiting, as a repair throttle wants) or empty (paced
    from the first token, as a background scrub wants); `now` is the time it
    starts filling from.
    """

    def __init__(
        self, rate: float, *, burst: float | None = None, full: bool = True, now: float = 0.0
    ) -> None:
        self.rate = rate
        self.burst = max(0.0, rate if burst is None else burst)
        self.tokens = self.burst if full else 0.0
        self.stamp = now

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def take(self, cost: float, now: float) -> float:
        """Spend `cost` tokens at `now`; seconds to wait before using them (0: none)."""
        if self.rate <= 0:
            return 0.0
        # A clock that steps back refills nothing (and takes nothing back).
        elapsed = max(0.0, now - self.stamp)
        self.stamp = max(self.stamp, now)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate) - cost
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
