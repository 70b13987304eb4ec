"""The byte format of a tier blob: pure, no I/O (DESIGN.md §7, issue 15).

    record*  footer

    record  = "CFSc" | id length (u16) | chunk id | data length (u64) | SHA-256 (32) | data
    footer  = index JSON | index length (u64) | SHA-256 of the index (32) | "CFSB" | format (u16)

Reading one chunk costs two ranged GETs the first time a blob is met (its tail,
then its index; cached) and one per chunk after that. The footer makes the bucket
self-sufficient; the record headers make even a blob whose footer is damaged
readable (`scan`). Every read checks the chunk's SHA-256: S3 is trusted for
availability, never for integrity.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

from pydantic import ValidationError

from cfs_contracts.tier import BLOB_FORMAT, BlobEntry, BlobIndex

RECORD_MAGIC = b"CFSc"
FOOTER_MAGIC = b"CFSB"
_ID_LEN = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_FORMAT = struct.Struct(">H")
_DIGEST = 32
TAIL_BYTES = _U64.size + _DIGEST + len(FOOTER_MAGIC) + _FORMAT.size


class BlobError(ValueError):
    """Bytes that are not (this part of) a valid blob; the message says where."""


class BlobBuilder:
    """Collects chunks until the blob is big enough (`size`), then `seal`s it."""

    def __init__(self, blob_id: str) -> None:
        self.blob_id = blob_id
        self._parts: list[bytes] = []
        self._entries: list[BlobEntry] = []
        self._ids: set[str] = set()
        self.size = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def chunk_ids(self) -> frozenset[str]:
        return frozenset(self._ids)

    def add(self, chunk_id: str, data: bytes, *, sha256: bytes | None = None) -> BlobEntry:
        """Append one chunk; a chunk id appears at most once per blob. `sha256`: the
        data's digest when the caller has just checked it (it is not computed again)."""
        if chunk_id in self._ids:
            raise BlobError(f"chunk {chunk_id} is already in blob {self.blob_id}")
        raw_id = chunk_id.encode()
        digest = hashlib.sha256(data).digest() if sha256 is None else sha256
        header = RECORD_MAGIC + _ID_LEN.pack(len(raw_id)) + raw_id + _U64.pack(len(data)) + digest
        entry = BlobEntry(
            chunk_id=chunk_id,
            offset=self.size + len(header),
            length=len(data),
            sha256=digest.hex(),
        )
        self._parts += [header, data]
        self._entries.append(entry)
        self._ids.add(chunk_id)
        self.size += len(header) + len(data)
        return entry

    def seal(self) -> tuple[bytes, BlobIndex]:
        index = BlobIndex(blob_id=self.blob_id, format=BLOB_FORMAT, entries=tuple(self._entries))
        encoded = index.model_dump_json().encode()
        footer = (
            encoded
            + _U64.pack(len(encoded))
            + hashlib.sha256(encoded).digest()
            + FOOTER_MAGIC
            + _FORMAT.pack(BLOB_FORMAT)
        )
        return b"".join([*self._parts, footer]), index


def index_range(tail: bytes, blob_size: int) -> tuple[int, int, bytes]:
    """From a blob's last `TAIL_BYTES`: (offset, length, SHA-256) of its index."""
    if len(tail) != TAIL_BYTES:
        raise BlobError(f"footer tail is {len(tail)} bytes, expected {TAIL_BYTES}")
    (length,) = _U64.unpack_from(tail, 0)
    digest = tail[_U64.size : _U64.size + _DIGEST]
    magic = tail[_U64.size + _DIGEST : _U64.size + _DIGEST + len(FOOTER_MAGIC)]
    (fmt,) = _FORMAT.unpack_from(tail, TAIL_BYTES - _FORMAT.size)
    if magic != FOOTER_MAGIC:
        raise BlobError("no blob footer (truncated or not a blob)")
    if fmt > BLOB_FORMAT:
        raise BlobError(f"blob format {fmt} is newer than this release reads ({BLOB_FORMAT})")
    offset = blob_size - TAIL_BYTES - length
    if offset < 0:
        raise BlobError(f"index length {length} does not fit a {blob_size}-byte blob")
    return offset, length, digest


def parse_index(data: bytes, sha256: bytes, blob_id: str) -> BlobIndex:
    if hashlib.sha256(data).digest() != sha256:
        raise BlobError(f"blob {blob_id}: index checksum mismatch")
    try:
        index = BlobIndex.model_validate_json(data)
    except ValidationError as exc:
        raise BlobError(f"blob {blob_id}: index does not parse: {exc.errors()[0]['msg']}") from None
    if index.blob_id != blob_id:
        raise BlobError(f"blob {blob_id}: its index names blob {index.blob_id}")
    return index


def read_index(blob: bytes, blob_id: str) -> BlobIndex:
    """A whole blob's index (the ranged-GET path does the same in two reads)."""
    offset, length, digest = index_range(blob[-TAIL_BYTES:], len(blob))
    return parse_index(blob[offset : offset + length], digest, blob_id)


def chunk_bytes(data: bytes, entry: BlobEntry) -> bytes:
    """A chunk's bytes as read from its range; refused unless its SHA-256 matches."""
    if len(data) != entry.length:
        raise BlobError(f"chunk {entry.chunk_id}: {len(data)} bytes read, {entry.length} indexed")
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        raise BlobError(
            f"chunk {entry.chunk_id} checksum mismatch: expected {entry.sha256[:16]}…, "
            f"got {actual[:16]}…"
        )
    return data


def scan(blob: bytes, blob_id: str) -> Iterator[BlobEntry]:
    """Walk the records from the start (a blob whose footer is lost or damaged): every
    intact record up to the first one that is not, whose offset the error names."""
    at = 0
    end = len(blob)
    while at < end and blob[at : at + len(RECORD_MAGIC)] == RECORD_MAGIC:
        start = at
        at += len(RECORD_MAGIC)
        try:
            (id_len,) = _ID_LEN.unpack_from(blob, at)
            at += _ID_LEN.size
            chunk_id = blob[at : at + id_len].decode()
            at += id_len
            (length,) = _U64.unpack_from(blob, at)
            at += _U64.size
            digest = blob[at : at + _DIGEST]
            at += _DIGEST
        except (struct.error, UnicodeDecodeError):
            raise BlobError(f"blob {blob_id}: record at byte {start} is cut short") from None
        data = blob[at : at + length]
        if len(data) != length or hashlib.sha256(data).digest() != digest:
            raise BlobError(f"blob {blob_id}: record at byte {start} is damaged")
        yield BlobEntry(chunk_id=chunk_id, offset=at, length=length, sha256=digest.hex())
        at += length
