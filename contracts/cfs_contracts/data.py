"""Data path contracts: fragment RPC to chunk-store nodes and their KV record (DESIGN.md §5).

File data never passes through a stream. A client talks to each node's
chunk-store over request/reply on `cfs.<site>.rpc.chunk.<node>.<verb>`:

- `put`: body = fragment bytes; headers `Cfs-Key` (see `fragment_key`) and
  `Cfs-Crc` (CRC-32 of the body, 8 hex digits). The store verifies the CRC,
  makes the fragment durable (fsync), publishes `FragmentStored`, then replies
  with a `StoreReply` JSON body.
- `get`: headers `Cfs-Key`; reply body = fragment bytes with headers `Cfs-Crc`,
  or an empty body with `Cfs-Errno` and `Cfs-Error-Message` (ENOENT: not held; EIO:
  failed its checksum, already reported as `FragmentDamaged`).
- `delete`, `verify`: headers `Cfs-Key`; reply `StoreReply`. A `delete` may carry
  `Cfs-Stored-Ms` (decimal): remove only the fragment stored at exactly that time,
  else ESTALE and nothing changes (garbage collection: a client that stored the
  same chunk again since the collector listed it wins). Older stores ignore it.
- `list`: body = `ListRequest` JSON; reply `StoreReply` with `fragments`.
- `stat`: reply `StoreReply` with `status`.
- `rebuild`: body = `RebuildRequest` JSON. The node re-creates the fragment
  named by `Cfs-Key` itself: it copies it from `copy_from` when that answers,
  otherwise reads k fragments of `sources` and decodes, checks the chunk's
  SHA-256, then stores it as `put` does (`FragmentStored`). Reply `StoreReply`
  with `fragment`; ENODATA with `readable` when fewer than k fragments could be
  read (the chunk is lost).

Each chunk-store also keeps `store.<node>` in the `nodes` KV bucket current
(`StoreRecord`), which is what placement reads until membership (DESIGN.md §6)
adds liveness.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cfs_contracts.streams import site_subject

HEADER_KEY = "Cfs-Key"
HEADER_CRC = "Cfs-Crc"
HEADER_ERRNO = "Cfs-Errno"
HEADER_ERROR = "Cfs-Error-Message"  # same header as a failed `Bus.serve` handler
HEADER_STORED_MS = "Cfs-Stored-Ms"  # delete: only if the fragment's stored_ms is this

Verb = Literal["put", "get", "delete", "verify", "list", "stat", "rebuild", "touched"]
VERBS: tuple[Verb, ...] = (
    "put",
    "get",
    "delete",
    "verify",
    "list",
    "stat",
    "rebuild",
    "touched",
)

SCHEME_RE = re.compile(r"^(ec(?P<k>[1-9][0-9]?)\+(?P<m>[0-9][0-9]?)|copy(?P<n>[1-9]))$")
KEY_RE = re.compile(r"^(?P<chunk>[0-9a-f]{64})\.(?P<scheme>[a-z0-9+]+)\.(?P<index>[0-9]{1,3})$")


def chunk_rpc_subject(site: str, node: str, verb: Verb) -> str:
    return site_subject(site, "rpc", "chunk", node, verb)


def store_record_key(node: str) -> str:
    return f"store.{node}"


def fragment_key(chunk_id: str, scheme: str, index: int) -> str:
    """`<sha256 hex>.<scheme>.<fragment index>`; the scheme is part of the key because
    the same chunk coded two ways gives different fragments at the same index."""
    key = f"{chunk_id}.{scheme}.{index}"
    if KEY_RE.match(key) is None or SCHEME_RE.match(scheme) is None:
        raise ValueError(f"invalid fragment key {key!r}")
    return key


def parse_fragment_key(key: str) -> tuple[str, str, int]:
    match = KEY_RE.match(key)
    if match is None or SCHEME_RE.match(match["scheme"]) is None:
        raise ValueError(f"invalid fragment key {key!r}")
    return match["chunk"], match["scheme"], int(match["index"])


def scheme_shape(scheme: str) -> tuple[int, int]:
    """(k, m): fragments needed to read, extra fragments that may be lost.

    `copyN` is N full copies: k=1, m=N-1.
    """
    match = SCHEME_RE.match(scheme)
    if match is None:
        raise ValueError(f"unknown erasure scheme {scheme!r} (expected ecK+M or copyN)")
    if match["n"] is not None:
        return 1, int(match["n"]) - 1
    return int(match["k"]), int(match["m"])


class FragmentInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    size: int = Field(ge=0, description="bytes")
    crc32: int = Field(ge=0, le=0xFFFFFFFF)
    stored_ms: int = Field(ge=0, description="wall clock when it became durable")


class StoreStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    node: str
    capacity_bytes: int = Field(ge=0, description="file system size under the data dir")
    used_bytes: int = Field(ge=0, description="bytes of fragments held")
    free_bytes: int = Field(ge=0, description="bytes still writable (less the reserve)")
    fragments: int = Field(ge=0)


class ListRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    after: str = Field(default="", description="resume after this key ('' = from the start)")
    limit: int = Field(default=1000, ge=1, le=10000)
    chunk_id: str = Field(default="", description="only fragments of this chunk")


class TouchedRequest(BaseModel):
    """Which of these chunks had a fragment read or written here since `since_ms` (the
    tiered mode's coldness: a chunk nobody touched leaves flash)."""

    model_config = ConfigDict(frozen=True)

    chunk_ids: tuple[str, ...] = Field(max_length=4096)
    since_ms: int = Field(ge=0)


class RebuildRequest(BaseModel):
    """Re-create the fragment named by the request's key on the node asked."""

    model_config = ConfigDict(frozen=True)

    sources: dict[int, str] = Field(
        default_factory=dict, description="fragment index -> node holding it, to decode from"
    )
    copy_from: str = Field(default="", description="a node still holding this very fragment")
    length: int | None = Field(
        default=None, ge=0, description="the chunk's coded length; None skips the SHA-256 check"
    )


class StoreReply(BaseModel):
    model_config = ConfigDict(frozen=True)

    errno: int = 0
    message: str = ""
    fragment: FragmentInfo | None = None
    fragments: tuple[FragmentInfo, ...] = ()
    more: bool = False
    status: StoreStatus | None = None
    readable: int | None = Field(
        default=None, ge=0, description="rebuild: fragments that could be read, when too few"
    )
    touched: tuple[str, ...] = Field(default=(), description="touched: the chunks asked about")
    history_from_ms: int | None = Field(
        default=None, description="touched: accesses before this time are not known"
    )


class StoreRecord(BaseModel):
    """`store.<node>` in the `nodes` KV bucket, refreshed every few seconds."""

    model_config = ConfigDict(frozen=True)

    node: str
    labels: dict[str, str] = Field(default_factory=dict, description="failure domains")
    capacity_bytes: int = Field(ge=0)
    free_bytes: int = Field(ge=0)
    used_bytes: int = Field(ge=0)
    fragments: int = Field(ge=0)
    draining: bool = False
    updated_ms: int = Field(ge=0, description="wall clock of this refresh")
    started_ms: int = Field(ge=0, description="when this chunk-store process started")
