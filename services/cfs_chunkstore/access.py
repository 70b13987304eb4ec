"""When each chunk was last read or written on this node: the tiered mode's coldness.

Kept in memory, newest last, bounded: past `max_entries` the oldest half is forgotten
and `history_from_ms` moves up to the newest time forgotten, so an answer never says
"not touched" about a time it no longer knows (nor about the time before the process
started). A restart therefore delays eviction by one `evict_after`; it never hastens it.
"""

from __future__ import annotations

from collections.abc import Iterable

from cfs_contracts.data import parse_fragment_key


class AccessLog:
    def __init__(self, started_ms: int, max_entries: int = 500_000) -> None:
        self.history_from_ms = started_ms
        self.max_entries = max_entries
        self._last: dict[str, int] = {}

    def touch_key(self, key: str, now_ms: int) -> None:
        try:
            chunk_id, _, _ = parse_fragment_key(key)
        except ValueError:
            return
        self.touch(chunk_id, now_ms)

    def touch(self, chunk_id: str, now_ms: int) -> None:
        self._last.pop(chunk_id, None)
        self._last[chunk_id] = now_ms
        if len(self._last) > self.max_entries:
            drop = len(self._last) - self.max_entries // 2
            for _ in range(drop):
                forgotten = next(iter(self._last))
                self.history_from_ms = max(self.history_from_ms, self._last.pop(forgotten))

    def touched(self, chunk_ids: Iterable[str], since_ms: int) -> list[str]:
        """Those of `chunk_ids` touched at or after `since_ms` (valid only when
        `since_ms >= history_from_ms`; the caller compares)."""
        return [c for c in chunk_ids if self._last.get(c, -1) >= since_ms]

    def __len__(self) -> int:
        return len(self._last)
