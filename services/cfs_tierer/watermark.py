"""The flash watermark machine of the s3-tierer (guide scenario 7, DESIGN.md §7): pure.

In cache mode every write is acknowledged on flash and flushed to S3 afterwards;
flash holds what S3 does not have yet. While S3 cannot take it, that share grows:

    NORMAL         fill < 80 %   acknowledged on flash, flushed later
    WRITE_THROUGH  fill >= 80 %  acknowledged only after its S3 PUT (slower, no loss)
    CRITICAL       fill >= 95 %  as WRITE_THROUGH, and the critical alert
    FULL           fill >= 100 % ENOSPC: nothing more is accepted

`fill` is the part of a node's flash that cannot be given back: data not in S3 yet
(clean data in cache mode is only a cache, and evicted as needed). The machine goes
up as soon as a reading crosses a threshold (several levels at once if need be: a
write must never be acknowledged on flash above the high watermark). It comes down
one level only once the fill is `resume_margin` below that level's threshold (no
flapping on a reading that hovers at one), and to NORMAL only when the flush queue
has drained, as the guide says. Every change is a `Transition` whose `reason` is
the log line and the event.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from cfs_contracts.tier import WritePolicy


class Level(IntEnum):
    """Ordered by severity: comparisons mean 'at least as bad as'."""

    NORMAL = 0
    WRITE_THROUGH = 1
    CRITICAL = 2
    FULL = 3


@dataclass(frozen=True)
class Thresholds:
    high: float = 0.80
    critical: float = 0.95
    full: float = 1.0
    resume_margin: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.high < self.critical <= self.full <= 1.0:
            raise ValueError(
                f"watermarks must rise: 0 < high ({self.high}) < critical "
                f"({self.critical}) <= full ({self.full}) <= 1"
            )
        if not 0 <= self.resume_margin < self.high:
            raise ValueError(f"resume_margin {self.resume_margin} must be in [0, high)")

    def entered_at(self, level: Level) -> float:
        """The fill at which `level` starts (NORMAL: 0)."""
        return {
            Level.NORMAL: 0.0,
            Level.WRITE_THROUGH: self.high,
            Level.CRITICAL: self.critical,
            Level.FULL: self.full,
        }[level]

    def level_of(self, fill: float) -> Level:
        """The level a reading calls for on the way up."""
        for level in (Level.FULL, Level.CRITICAL, Level.WRITE_THROUGH):
            if fill >= self.entered_at(level):
                return level
        return Level.NORMAL


@dataclass(frozen=True)
class Reading:
    """One node's flash and flush queue, as its chunk-store and the tierer see them."""

    node: str
    capacity_bytes: int
    unflushed_bytes: int  # on flash, not yet in S3: cannot be evicted
    queue_entries: int
    s3_reachable: bool

    @property
    def fill(self) -> float:
        if self.capacity_bytes <= 0:
            return 1.0  # no flash at all: nothing can be accepted
        return self.unflushed_bytes / self.capacity_bytes


@dataclass(frozen=True)
class Transition:
    node: str
    before: Level
    after: Level
    fill: float
    reason: str
    alert: str | None = None  # the operator-facing line, on entering CRITICAL or FULL


def decide(level: Level, reading: Reading, thresholds: Thresholds) -> Transition | None:
    """The next level for this reading, or None when the node stays where it is."""
    fill = reading.fill
    up = thresholds.level_of(fill)
    pct = f"{fill:.0%}"
    if up > level:
        return _enter(level, up, reading, thresholds, f"flash {pct} used, not in S3")
    if level == Level.NORMAL:
        return None
    if reading.queue_entries == 0 and fill < thresholds.high - thresholds.resume_margin:
        return _enter(level, Level.NORMAL, reading, thresholds, f"queue drained, flash {pct}")
    below = Level(level - 1)
    if below > Level.NORMAL and fill < thresholds.entered_at(level) - thresholds.resume_margin:
        reason = f"flash {pct}, below {thresholds.entered_at(level):.0%} by the margin"
        return _enter(level, below, reading, thresholds, reason)
    return None


def settle(level: Level, reading: Reading, thresholds: Thresholds) -> list[Transition]:
    """Every transition one reading causes (down moves one level per step)."""
    steps: list[Transition] = []
    while (step := decide(level, reading, thresholds)) is not None:
        steps.append(step)
        level = step.after
    return steps


def policy(level: Level) -> WritePolicy:
    if level == Level.FULL:
        return WritePolicy.REFUSE
    if level >= Level.WRITE_THROUGH:
        return WritePolicy.ACK_AFTER_S3
    return WritePolicy.ACK_ON_FLASH


def worst(levels: Iterable[Level]) -> Level:
    """The cluster's level: a write is striped over several nodes, the worst one rules."""
    return max(levels, default=Level.NORMAL)


def _enter(
    before: Level, after: Level, reading: Reading, thresholds: Thresholds, why: str
) -> Transition:
    alert = None
    if after > before and after >= Level.CRITICAL:
        s3 = "S3 unreachable" if not reading.s3_reachable else "S3 flush behind"
        if after == Level.FULL:
            alert = f"Flash full on {reading.node}, {s3}: writes refused (ENOSPC)"
        else:
            alert = f"Flash critical, {s3}, write-through active"
    return Transition(
        node=reading.node,
        before=before,
        after=after,
        fill=reading.fill,
        reason=f"{reading.node}: {before.name} -> {after.name}: {why}",
        alert=alert,
    )
