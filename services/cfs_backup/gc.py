"""Fragment garbage collection, the pure part: which fragments may go, and why.

Nothing else deletes the fragments of unlinked or overwritten files (issue 14). A
fragment may go only when no state the cluster can still return to names its chunk:

    keep = chunks named by the live metadata
       + chunks named by the OLDEST retained snapshot's image
       + chunks named by any journal message after that snapshot's cut

A point-in-time restore starts from a retained snapshot and may stop anywhere after
its cut, so every state it can produce names only chunks of that union; each later
snapshot's state is such a state. Without a retained snapshot nothing can be
restored to an earlier point, and the keep set is the live metadata alone.

And never a young fragment: data is stored before the metadata commit names its
chunk, so an in-flight write's fragments are unreferenced for a while. Age is taken
at the moment the keep set was marked (`KeepSet.marked_ms`), never later: a commit
after the mark is not in the keep set, but its fragments were then stored less than
`grace` before the mark unless that one write took longer than the grace. A client
that stores a chunk again (the same content written anew) refreshes its stored time;
the sweep deletes conditionally on the stored time it listed (chunk-store `delete`
with `Cfs-Stored-Ms`), so such a fragment is never removed from under the new commit.
Stored times are each chunk-store's wall clock, the mark the collector's: the grace
must also cover the clock offset between nodes (an hour by default dwarfs NTP's).

Keep sets are chunk ids, not fragment keys: a fragment of a referenced chunk under
another scheme or on a node the chunk map no longer names is kept (repair's business).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from cfs.backup.image import decode_pairs
from cfs_contracts.data import parse_fragment_key
from cfs_contracts.events.metadata import MetaCommitted, MetaReplayed, ShardImageChunk
from cfs_contracts.fs.changes import PutInode, TxPut, TxRecord
from cfs_contracts.fs.records import Inode
from cfs_metadata.projection import key_record
from cfs_metadata.records import unseal_inode


class Verdict(StrEnum):
    DELETE = "delete"
    REFERENCED = "referenced"
    YOUNG = "young"
    UNKNOWN_KEY = "unknown key"


@dataclass(frozen=True)
class Candidate:
    """A fragment as its chunk-store listed it; `stored_ms` by that node's clock."""

    node: str
    key: str
    size: int
    stored_ms: int


@dataclass(frozen=True)
class KeepSet:
    chunks: frozenset[str]
    marked_ms: int  # wall ms before anything of the keep set was read


@dataclass(frozen=True)
class Judgement:
    candidate: Candidate
    verdict: Verdict
    reason: str
    age_ms: int  # at the mark

    @property
    def delete(self) -> bool:
        return self.verdict is Verdict.DELETE


def chunk_of(key: str) -> str | None:
    try:
        return parse_fragment_key(key)[0]
    except ValueError:
        return None


def judge(candidate: Candidate, keep: KeepSet, grace_ms: int, now_ms: int) -> Judgement:
    """One fragment: delete only an unreferenced one stored `grace_ms` before the mark."""
    at = min(now_ms, keep.marked_ms)
    age = at - candidate.stored_ms
    chunk = chunk_of(candidate.key)
    if chunk is None:
        return Judgement(candidate, Verdict.UNKNOWN_KEY, "not a fragment key: kept", age)
    if chunk in keep.chunks:
        return Judgement(candidate, Verdict.REFERENCED, f"chunk {chunk[:12]} is referenced", age)
    if age < grace_ms:
        why = f"unreferenced, stored {max(age, 0) / 1000:.1f}s ago, grace {grace_ms / 1000:g}s"
        return Judgement(candidate, Verdict.YOUNG, why, age)
    return Judgement(candidate, Verdict.DELETE, f"unreferenced for {age / 1000:.1f}s", age)


def decide(
    candidates: Iterable[Candidate], keep: KeepSet, grace_ms: int, now_ms: int
) -> list[Judgement]:
    """Every candidate judged; the ones with `delete` go. Pure: the sweep's whole logic."""
    if grace_ms < 0:
        raise ValueError(f"grace_ms must be >= 0, got {grace_ms}")
    return [judge(c, keep, grace_ms, now_ms) for c in candidates]


# -- what names a chunk --------------------------------------------------------------
def chunks_of_inode(inode: Inode) -> Iterator[str]:
    return (ref.chunk_id for ref in inode.chunks)


def chunks_of_changes(changes: Iterable[object]) -> Iterator[str]:
    """Chunks named by journaled changes, including a prepared transaction's."""
    for change in changes:
        if isinstance(change, PutInode):
            yield from chunks_of_inode(change.inode)
        elif isinstance(change, TxPut):
            yield from chunks_of_changes(change.tx.changes)


def chunks_of_image(pairs: Iterable[tuple[bytes, bytes]]) -> Iterator[str]:
    """Chunks named by a shard image (snapshot, restore chunk, live projection): every
    inode record (its checksum checked: CorruptRecord on damage) and open transaction."""
    for key, value in pairs:
        kind, number, _ = key_record(key)
        if kind == "inode":
            yield from chunks_of_inode(unseal_inode(value, number))
        elif kind == "tx":
            yield from chunks_of_changes(TxRecord.model_validate_json(value).changes)


def chunks_of_payload(payload: object) -> Iterator[str]:
    """Chunks named by one journal message: committed or replayed entries, restore chunks."""
    if isinstance(payload, MetaCommitted | MetaReplayed):
        for entry in payload.entries:
            yield from chunks_of_changes(entry.changes)
    elif isinstance(payload, ShardImageChunk):
        yield from chunks_of_image(decode_pairs(payload.data_b64))
