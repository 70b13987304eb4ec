"""metadata-raft's instruments (README: telemetry): op latency, journal rates, lag.

Recorded on the request path, so each is a bound child or a dict hit away: no
per-operation allocation beyond a float."""

from __future__ import annotations

import time

from opentelemetry.trace import Span

from cfs.telemetry import LabelCache, counter, gauge, histogram

OP_SECONDS = histogram(
    "metadata_op_duration_seconds",
    "metadata request latency on the shard writer, from arrival to reply, by op",
    ("op",),
)
JOURNAL_APPENDS = counter(
    "metadata_journal_appends", "journal messages appended by this writer (one per group commit)"
)
JOURNAL_APPEND_SECONDS = histogram(
    "metadata_journal_append_duration_seconds", "one fenced journal append, until acked"
)
COMMITTED_OPS = counter(
    "metadata_committed_entries", "journal entries (changing operations) committed by this writer"
)
JOURNAL_APPLIED = counter(
    "metadata_journal_applied", "journal messages applied to this replica's projection"
)
APPLIED_SEQ = gauge("metadata_applied_seq", "last journal sequence applied, by shard", ("shard",))
REPLICA_LAG = gauge(
    "metadata_replica_lag_records",
    "journal messages this follower has still to apply (0 on the writer), by shard",
    ("shard",),
)
LEADER = gauge("metadata_leader", "1 while this process is the shard's writer", ("shard",))

_op_seconds = LabelCache(OP_SECONDS)


def op_finished(op: str, started: float, span: Span | None) -> None:
    """A request answered: its latency, and the end of its server span if traced."""
    _op_seconds(op).observe(time.perf_counter() - started)
    if span is not None:
        span.end()
