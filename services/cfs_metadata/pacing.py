"""When the writer's group commit waits for company (pure: no clock, no I/O).

A journal append costs the same whatever it carries: on a 3-node site about 3 ms of
NATS CPU (an R3, fsync'd publish and its deliveries to every replica) and 2 ms of
metadata CPU (encode, apply here and on each follower). Through the mount, 8 threads
creating files filled batches of 2.1 operations and 32 threads of 5.3, and CPU per
create fell from 4.1 to 2.5 ms (bench/mount.py's site). When requests are arriving
together, waiting a fraction of an append for the next ones makes batches larger and
every operation cheaper; a lone writer must never wait. That is PostgreSQL's
`commit_delay` with `commit_siblings`: here the siblings are seen in the batches
themselves, an average of recent batch sizes, so a single client (always batches of
one) is never delayed.
"""

from __future__ import annotations

from dataclasses import dataclass

# How much the last batch moves the average: a few batches of company start the
# waiting, about ten lone ones stop it.
WEIGHT = 0.25
# Average batch size above which requests are taken to arrive together.
COMPANY = 1.5


@dataclass
class CommitPacer:
    """Tracks recent batch sizes; says whether the batch being formed waits for more."""

    linger_s: float  # the longest a batch waits for company
    average: float = 1.0

    def committed(self, size: int) -> None:
        """One batch of `size` operations went out."""
        self.average += WEIGHT * (size - self.average)

    def wants_more(self, size: int, limit: int) -> bool:
        """Whether a batch of `size` (at most `limit`) waits for the next request:
        while recent batches had company and were larger than this one. A batch
        that has caught up with the average goes at once."""
        return (
            self.linger_s > 0 and self.average >= COMPANY and size < self.average and size < limit
        )
