"""Which sampled files the drill compares, and what a difference means: pure.

The restored tree *is* the snapshot's view, so the sample is drawn from it and each
file is compared with the live file at the same path. The live site keeps taking
writes during the drill, so a difference is a restore failure only when the live
file provably did not change since the snapshot's cut:

- the live inode is the restored one, unchanged (same inode number, size, mtime
  and ctime): their contents must be identical, byte for byte (SHA-256);
- the live file changed after the cut (its ctime is later than the cut, less
  `CLOCK_MARGIN_NS` for the writers' clock against the cut's hybrid logical clock),
  or is gone (removed or renamed since): not comparable, counted as skipped;
- otherwise (unchanged since before the cut, yet different from the restored
  inode): the restore lost or altered it, a failure.

Every change to a file's data or attributes moves its ctime, so "ctime not after
the cut" is "as the snapshot saw it". Reading the live file's old version instead
would need the journal at the cut for every sampled file; skipping the changed
ones costs only sample size, and the skipped count is reported.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

CLOCK_MARGIN_NS = 1_000_000_000


@dataclass(frozen=True)
class FileFacts:
    """What the comparison needs of one file's inode."""

    path: str
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


class Verdict(StrEnum):
    COMPARE = "compare"  # unchanged since the snapshot: contents must match
    CHANGED = "changed since the snapshot"
    GONE = "gone since the snapshot"
    DIFFERENT = "differs from the snapshot but unchanged since before it"


def classify(restored: FileFacts, live: FileFacts | None, cut_ns: int) -> Verdict:
    if live is None:
        return Verdict.GONE
    if (live.ino, live.size, live.mtime_ns, live.ctime_ns) == (
        restored.ino,
        restored.size,
        restored.mtime_ns,
        restored.ctime_ns,
    ):
        return Verdict.COMPARE
    if live.ctime_ns > cut_ns - CLOCK_MARGIN_NS:
        return Verdict.CHANGED
    return Verdict.DIFFERENT


def choose(paths: Iterable[str], n: int, seed: int) -> list[str]:
    """Up to `n` of `paths`, uniformly (reservoir sampling: one pass, memory for `n`),
    reproducible with the same `seed`; sorted."""
    rng = random.Random(seed)
    chosen: list[str] = []
    for i, path in enumerate(paths):
        if i < n:
            chosen.append(path)
        else:
            j = rng.randint(0, i)
            if j < n:
                chosen[j] = path
    return sorted(chosen)


@dataclass
class SampleTally:
    """The compare-sample step's outcome."""

    sampled: int = 0
    compared: int = 0
    matched: int = 0
    changed: int = 0
    gone: int = 0
    bytes: int = 0
    failures: list[str] | None = None

    def fail(self, line: str) -> None:
        if self.failures is None:
            self.failures = []
        self.failures.append(line)

    @property
    def ok(self) -> bool:
        """No failure, and something verified (an empty tree has nothing to verify)."""
        return not self.failures and (self.compared > 0 or self.sampled == 0)

    def describe(self) -> str:
        text = (
            f"{self.compared} of {self.sampled} sampled files compared, {self.matched} "
            f"identical ({self.bytes} bytes); skipped: {self.changed} changed and "
            f"{self.gone} gone on the live site since the snapshot"
        )
        if self.failures:
            text += f"; {len(self.failures)} FAILED: " + "; ".join(self.failures[:5])
        elif self.compared == 0:
            text += "; nothing could be compared"
        return text
