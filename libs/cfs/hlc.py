"""Hybrid logical clock (Kulkarni et al.): causal order with wall-clock meaning.

Stamps never go backwards on one node, even if the wall clock does, and a
received stamp pushes the local clock past it, so an effect is always stamped
after its cause. Last-writer-wins merges across sites compare these stamps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cfs_contracts.envelope import HLC

WallClock = Callable[[], int]

log = logging.getLogger(__name__)


def system_wall_ms() -> int:
    return time.time_ns() // 1_000_000


class ClockSkewError(RuntimeError):
    """A remote stamp is further ahead of our wall clock than we tolerate."""


def tick(last: HLC, wall_ms: int, node: str) -> HLC:
    """Pure send/local-event rule."""
    if wall_ms > last.wall_ms:
        return HLC(wall_ms=wall_ms, counter=0, node=node)
    return HLC(wall_ms=last.wall_ms, counter=last.counter + 1, node=node)


def merge(last: HLC, remote: HLC, wall_ms: int, node: str) -> HLC:
    """Pure receive rule: the result is greater than both `last` and `remote`."""
    top = max(last.wall_ms, remote.wall_ms, wall_ms)
    if top == last.wall_ms == remote.wall_ms:
        counter = max(last.counter, remote.counter) + 1
    elif top == last.wall_ms:
        counter = last.counter + 1
    elif top == remote.wall_ms:
        counter = remote.counter + 1
    else:
        counter = 0
    return HLC(wall_ms=top, counter=counter, node=node)


class HybridClock:
    """Thread-safe HLC for one node; the wall clock is injectable for tests."""

    def __init__(
        self,
        node: str,
        wall: WallClock = system_wall_ms,
        max_drift_ms: int = 60_000,
    ) -> None:
        self.node = node
        self._wall = wall
        self._max_drift_ms = max_drift_ms
        self._last = HLC(wall_ms=0, counter=0, node=node)
        self._lock = threading.Lock()

    def now(self) -> HLC:
        with self._lock:
            self._last = tick(self._last, self._wall(), self.node)
            return self._last

    def update(self, remote: HLC) -> HLC:
        """Observe a stamp from another node (on receiving its event)."""
        with self._lock:
            wall = self._wall()
            if remote.wall_ms - wall > self._max_drift_ms:
                raise ClockSkewError(
                    f"stamp {remote} from {remote.node} is {remote.wall_ms - wall} ms ahead "
                    f"of this node's clock (limit {self._max_drift_ms} ms)"
                )
            self._last = merge(self._last, remote, wall, self.node)
            return self._last

    @property
    def last(self) -> HLC:
        return self._last


def observe(clock: HybridClock, stamp: HLC) -> None:
    """Receive rule for a stamp that came with a message. One too far ahead is logged
    and ignored: refusing the message would turn a bad clock into an outage."""
    try:
        clock.update(stamp)
    except ClockSkewError as exc:
        log.warning("hlc.skew", extra={"error": str(exc)})
