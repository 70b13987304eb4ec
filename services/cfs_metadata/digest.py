"""Digests of a shard's stored records, identical wherever the same state is stored.

A replica (its projection at some sequence) and the checker (the shard rebuilt from
its journal to that same sequence) digest the same pairs, `Projection.image_pairs`:
sealed inode and entry records, open transactions and the inode counters. Records
fall into `DIGEST_BUCKETS` buckets by key, so a difference is narrowed to a few
buckets before any key is listed. `scan_pairs` also checks each sealed record's
CRC-32 on the way (the checksum every read verifies).
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from cfs_contracts.fs.check import DIGEST_BUCKETS, RecordDigest, StoredCorruption
from cfs_metadata.projection import key_record
from cfs_metadata.records import unseal_dentry, unseal_inode

_SEALED = ("inode", "dentry")
_INODE, _DENTRY = b"i", b"d"  # first byte of sealed records' keys (`projection.py`)


def bucket_of(key: bytes) -> int:
    return zlib.crc32(key) % DIGEST_BUCKETS


def value_digest(value: bytes) -> str:
    return hashlib.blake2b(value, digest_size=8).hexdigest()


def record_name(key: bytes) -> str:
    """`Inode 4097`, `Dentry 1/a.txt`, `Transaction <id>`, `Counter m:local`."""
    kind, number, name = key_record(key)
    if kind == "inode":
        return f"Inode {number}"
    if kind == "dentry":
        return f"Dentry {number}/{name}"
    if kind == "tx":
        return f"Transaction {name}"
    if kind == "tombstone":
        return f"Tombstone {number}"
    return f"Counter {name}"


def record_ino(key: bytes) -> int:
    """The inode a key is about (an entry: the directory holding it); 0 for the rest."""
    kind, number, _ = key_record(key)
    return number if kind in _SEALED else 0


def stored_corruption(key: bytes, value: bytes) -> StoredCorruption | None:
    """A sealed record (`crc32 || body`) whose checksum fails, described; else None."""
    if key_record(key)[0] not in _SEALED:
        return None
    if len(value) < 4:
        return StoredCorruption(
            key=key.hex(),
            what=record_name(key),
            expected=0,
            actual=0,
            detail=f"record truncated to {len(value)} bytes",
        )
    expected, actual = int.from_bytes(value[:4]), zlib.crc32(value[4:])
    if expected == actual:
        return None
    return StoredCorruption(key=key.hex(), what=record_name(key), expected=expected, actual=actual)


@dataclass
class PairScan:
    """Bucket digests, record count and damaged records of one pass over the pairs."""

    buckets: list[str] = field(default_factory=list)
    records: int = 0
    corrupt: list[StoredCorruption] = field(default_factory=list)
    seconds: float = 0.0


def scan_pairs(pairs: Iterable[tuple[bytes, bytes]], *, verify: bool = True) -> PairScan:
    """One pass: every pair into its bucket's digest, every sealed record's CRC checked.

    Pairs must come in key order (as a projection iterates them), so the same state
    digests the same on every node."""
    started = time.monotonic()
    hashers = [hashlib.blake2b(digest_size=16) for _ in range(DIGEST_BUCKETS)]
    out = PairScan()
    crc32, buckets, sealed = zlib.crc32, DIGEST_BUCKETS, (_INODE, _DENTRY)
    for key, value in pairs:  # the hot loop of a check: a few C calls per record
        hashers[crc32(key) % buckets].update(
            len(key).to_bytes(4) + key + len(value).to_bytes(4) + value
        )
        out.records += 1
        if verify and key[:1] in sealed and (bad := stored_corruption(key, value)) is not None:
            out.corrupt.append(bad)
    out.buckets = [h.hexdigest() for h in hashers]
    out.seconds = time.monotonic() - started
    return out


def bucket_records(
    pairs: Iterable[tuple[bytes, bytes]], buckets: Iterable[int]
) -> Iterator[RecordDigest]:
    """Key and value digest of every pair in `buckets`."""
    wanted = set(buckets)
    for key, value in pairs:
        if bucket_of(key) in wanted:
            yield RecordDigest(key=key.hex(), digest=value_digest(value))


def site_neutral(pairs: Iterable[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
    """Inode and entry records as two replicated sites must both hold them: without the
    nodes holding each chunk (each site its own), the erasure scheme (each site its
    own node count), merge stamps, access times and the conflict history of names.
    Counters, transactions, tombstones and positions are each site's own: left out."""
    for key, value in pairs:
        kind, number, name = key_record(key)
        if kind == "inode":
            inode = unseal_inode(value, number)
            chunks = [(c.index, c.chunk_id, c.length, c.coded_length) for c in inode.chunks]
            plain = inode.model_dump(mode="json", exclude={"chunks", "stamps", "atime_ns"})
            yield key, json.dumps({**plain, "chunks": chunks}, sort_keys=True).encode()
        elif kind == "dentry":
            dentry = unseal_dentry(value, number, name)
            plain = dentry.model_dump(mode="json", exclude={"stamp", "shadowed"})
            yield key, json.dumps(plain, sort_keys=True).encode()
