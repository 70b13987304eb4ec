"""s3-tierer events (DESIGN.md §7): the flush queue and the flash watermark."""

from __future__ import annotations

from pydantic import Field

from cfs_contracts.envelope import EventPayload
from cfs_contracts.registry import REGISTRY


@REGISTRY.event("ChunkQueued", version=1, stream="TIER", subject="cfs.{site}.tier.chunk")
class ChunkQueued(EventPayload):
    """A chunk stored on flash that S3 must get: published by the writer before its
    chunk map is committed, removed from the queue once the chunk is in a blob."""

    chunk_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    length: int = Field(ge=0)
    scheme: str
    fragments: tuple[str, ...] = Field(min_length=1, description="holder of each fragment")
    ino: int = Field(default=0, ge=0)


@REGISTRY.event(
    "WatermarkChanged", version=1, stream="CLUSTER", subject="cfs.{site}.cluster.tier.watermark"
)
class WatermarkChanged(EventPayload):
    """A node's flash moved between NORMAL, WRITE_THROUGH, CRITICAL and FULL."""

    node_id: str
    before: str
    after: str
    fill: float = Field(ge=0)
    reason: str
