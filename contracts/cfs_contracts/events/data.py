"""Data path events (DATA stream, DESIGN.md §5): what each node stores, and damage seen."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cfs_contracts.envelope import EventPayload
from cfs_contracts.registry import REGISTRY

_DATA = "cfs.{site}.data.{node_id}"


@REGISTRY.event("FragmentStored", version=1, stream="DATA", subject=_DATA + ".stored")
class FragmentStored(EventPayload):
    """A fragment became durable on a node ("what did node X hold" is a query)."""

    node_id: str
    key: str
    size: int = Field(ge=0)
    crc32: int = Field(ge=0, le=0xFFFFFFFF)


@REGISTRY.event("FragmentDeleted", version=1, stream="DATA", subject=_DATA + ".deleted")
class FragmentDeleted(EventPayload):
    node_id: str
    key: str


@REGISTRY.event("FragmentDamaged", version=1, stream="DATA", subject=_DATA + ".damaged")
class FragmentDamaged(EventPayload):
    """A fragment that should be on `node_id` is missing, corrupt or unreachable.

    Reported by the store itself (checksum on read or verify) or by a client
    that had to decode around it; repair (DESIGN.md §6) rebuilds it.
    """

    node_id: str
    key: str
    reason: Literal["missing", "corrupt", "unreachable"]
    detail: str = ""
    reported_by: str = Field(description="node or client id that saw it")
    ino: int = Field(default=0, ge=0, description="file it belongs to, when known")
