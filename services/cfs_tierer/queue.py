"""The flush queue as the tierer holds it: pure, no I/O (DESIGN.md §7).

The TIER stream is the durable queue: a writer appends `ChunkQueued` before its chunk
map commits, and the stream is purged below the oldest chunk still pending once the
chunks before it are in S3. So after any crash the stream from its first message is
exactly what may still be missing from S3 (plus some already flushed, which the tier
index answers), and a new holder rebuilds this object by reading it.

It also gives the flash figures the watermark machine needs: what each node holds
that S3 does not have yet (each fragment's share of its chunk).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from cfs.erasure import Scheme
from cfs_contracts.events.tier import ChunkQueued


@dataclass
class Pending:
    chunk: ChunkQueued
    seqs: list[int]  # every message that queued it (a chunk written twice is one upload)
    queued_ms: int
    fragment_bytes: int

    @property
    def first_seq(self) -> int:
        return self.seqs[0]


@dataclass
class FlushQueue:
    pending: dict[str, Pending] = field(default_factory=dict)  # by chunk id, in seq order
    last_seq: int = 0  # the last stream message applied
    unflushed: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # per node
    bytes: int = 0

    def apply(self, seq: int, chunk: ChunkQueued, queued_ms: int) -> bool:
        """One stream message; True when the chunk is new to the queue."""
        if seq <= self.last_seq:
            return False  # a redelivery after a reconnect
        self.last_seq = seq
        known = self.pending.get(chunk.chunk_id)
        if known is not None:
            known.seqs.append(seq)
            return False
        share = fragment_bytes(chunk)
        self.pending[chunk.chunk_id] = Pending(chunk, [seq], queued_ms, share)
        for node in chunk.fragments:
            self.unflushed[node] += share
        self.bytes += chunk.length
        return True

    def done(self, chunk_id: str) -> Pending | None:
        """The chunk is in S3 (or needs no upload): no longer holds flash or the queue."""
        entry = self.pending.pop(chunk_id, None)
        if entry is None:
            return None
        for node in entry.chunk.fragments:
            left = self.unflushed[node] - entry.fragment_bytes
            if left > 0:
                self.unflushed[node] = left
            else:
                del self.unflushed[node]
        self.bytes -= entry.chunk.length
        return entry

    def purge_below(self) -> int:
        """Every stream message below this sequence is flushed: the stream may drop them."""
        if not self.pending:
            return self.last_seq + 1
        return min(min(entry.seqs) for entry in self.pending.values())

    def oldest_ms(self) -> int | None:
        return min((e.queued_ms for e in self.pending.values()), default=None)

    def take(
        self, limit_bytes: int, first: list[str] | None = None, busy: set[str] | None = None
    ) -> list[Pending]:
        """Chunks for one blob, oldest first (the ones in `first` before the rest), up to
        `limit_bytes` (at least one chunk), none of those `busy` (being uploaded)."""
        chosen: list[Pending] = []
        size = 0
        ids = [*(first or ()), *self.pending]
        seen: set[str] = set(busy or ())
        for chunk_id in ids:
            entry = self.pending.get(chunk_id)
            if entry is None or chunk_id in seen:
                continue
            if chosen and size + entry.chunk.length > limit_bytes:
                break
            seen.add(chunk_id)
            chosen.append(entry)
            size += entry.chunk.length
        return chosen


def fragment_bytes(chunk: ChunkQueued) -> int:
    """What one fragment of the chunk takes on its node (k data fragments share it)."""
    try:
        return Scheme.parse(chunk.scheme).fragment_size(chunk.length)
    except ValueError:
        return chunk.length  # a scheme this release does not know: count it whole
