"""Journal archive segments: the byte format, key names and when to cut one (pure).

A segment is one S3 object holding consecutive messages of one stream:

    <archive>/<cluster_id>/<stream>/<first:020d>-<last:020d>.seg

    line 1   SegmentManifest as JSON (sequences, first/last stamp, count, SHA-256)
    rest     zlib( for each message: seq u64 | length u32 | the message bytes as stored )

The name alone says which sequences it holds, so a new archiver resumes after the
highest `last` it lists (no gap, no duplicate after a kill -9), and a reader finds
the segments for a range by listing.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from cfs_contracts.envelope import HLC

_HEAD = struct.Struct(">QI")
_NAME = re.compile(r"^(\d{20})-(\d{20})\.seg$")
PROGRESS = "progress.json"


class SegmentCorrupt(ValueError):
    """A segment's bytes do not match its manifest."""


class SegmentManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stream: str
    first: int = Field(ge=1)
    last: int = Field(ge=1)
    count: int = Field(ge=1, description="messages held (a purged gap makes it < last-first+1)")
    first_hlc: HLC
    last_hlc: HLC
    sha256: str = Field(description="of the uncompressed body")
    bytes: int = Field(ge=0, description="uncompressed body size")


@dataclass(frozen=True)
class Message:
    seq: int
    hlc: HLC
    data: bytes


def segment_key(stream: str, first: int, last: int) -> str:
    return f"{stream}/{first:020d}-{last:020d}.seg"


def parse_segment_key(key: str) -> tuple[int, int] | None:
    """(first, last) of a segment object name (the part after the stream's prefix)."""
    match = _NAME.match(key.rsplit("/", 1)[-1])
    return (int(match.group(1)), int(match.group(2))) if match else None


def encode_segment(stream: str, messages: list[Message]) -> tuple[bytes, SegmentManifest]:
    body = b"".join(_HEAD.pack(m.seq, len(m.data)) + m.data for m in messages)
    manifest = SegmentManifest(
        stream=stream,
        first=messages[0].seq,
        last=messages[-1].seq,
        count=len(messages),
        first_hlc=messages[0].hlc,
        last_hlc=messages[-1].hlc,
        sha256=hashlib.sha256(body).hexdigest(),
        bytes=len(body),
    )
    return manifest.model_dump_json().encode() + b"\n" + zlib.compress(body, 1), manifest


def decode_segment(blob: bytes) -> tuple[SegmentManifest, Iterator[tuple[int, bytes]]]:
    """The manifest and the (seq, message bytes) pairs, after checking the checksum."""
    head, sep, packed = blob.partition(b"\n")
    if not sep:
        raise SegmentCorrupt("no manifest line")
    try:
        manifest = SegmentManifest.model_validate_json(head)
        body = zlib.decompress(packed)
    except (ValueError, zlib.error) as exc:
        raise SegmentCorrupt(f"unreadable segment: {exc}") from None
    if hashlib.sha256(body).hexdigest() != manifest.sha256:
        raise SegmentCorrupt(
            f"{manifest.stream} {manifest.first}-{manifest.last}: checksum mismatch"
        )
    return manifest, _messages(body)


def _messages(body: bytes) -> Iterator[tuple[int, bytes]]:
    at = 0
    while at < len(body):
        seq, length = _HEAD.unpack_from(body, at)
        at += _HEAD.size
        yield seq, body[at : at + length]
        at += length


@dataclass
class SegmentBuffer:
    """Messages read but not yet archived, and when to ship them.

    Cut at `max_bytes` (big segments are cheap to store and list) or when the oldest
    buffered message is `max_age_s` old (the archive lag is bounded by it).
    """

    max_bytes: int
    max_age_s: float
    messages: list[Message] = field(default_factory=list)
    size: int = 0
    opened_at: float = 0.0  # monotonic time the first buffered message arrived

    def add(self, message: Message, now: float) -> None:
        if not self.messages:
            self.opened_at = now
        self.messages.append(message)
        self.size += len(message.data) + _HEAD.size

    def due(self, now: float) -> bool:
        if not self.messages:
            return False
        return self.size >= self.max_bytes or now - self.opened_at >= self.max_age_s

    def take(self) -> list[Message]:
        taken, self.messages, self.size = self.messages, [], 0
        return taken

    def oldest_wall_ms(self) -> int | None:
        return self.messages[0].hlc.wall_ms if self.messages else None


class StreamProgress(BaseModel):
    """How far one stream is archived, and up to when that is known to be complete."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stream: str
    archived_seq: int = 0
    last_hlc: HLC | None = None
    complete_through_ms: int = Field(
        default=0,
        description="wall ms up to which every message of the stream is archived: the "
        "last archived stamp, or (caught up) when the archiver saw nothing newer, minus "
        "the allowed clock offset between nodes",
    )


class ArchiveProgress(BaseModel):
    """`<archive>/<cluster_id>/progress.json`: what replay-journal may rely on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cluster_id: str
    updated_ms: int
    streams: tuple[StreamProgress, ...]

    def complete_through_ms(self, streams: list[str]) -> int:
        """The latest wall time at which all `streams` are archived completely."""
        known = {s.stream: s.complete_through_ms for s in self.streams}
        return min((known.get(name, 0) for name in streams), default=0)
