"""Repair progress and lost data (CLUSTER stream, DESIGN.md §6).

The repair coordinator (one active per site, by lease) re-protects the
fragments of a node that is down past its grace period, removed or draining,
and rebuilds single damaged fragments reported by readers and scrub.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cfs_contracts.envelope import EventPayload
from cfs_contracts.registry import REGISTRY

_REPAIR = "cfs.{site}.cluster.repair.{node_id}"
RepairReason = Literal["down", "removed", "draining"]


@REGISTRY.event("RepairStarted", version=1, stream="CLUSTER", subject=_REPAIR + ".started")
class RepairStarted(EventPayload):
    node_id: str = Field(description="node whose fragments are re-protected")
    job_id: str
    reason: RepairReason
    resumed: bool = Field(default=False, description="continues a job a crash interrupted")


@REGISTRY.event("RepairProgress", version=1, stream="CLUSTER", subject=_REPAIR + ".progress")
class RepairProgress(EventPayload):
    node_id: str
    job_id: str
    files_scanned: int = Field(ge=0)
    fragments_rebuilt: int = Field(ge=0)
    bytes_rebuilt: int = Field(ge=0, description="fragment bytes written to new nodes")
    chunks_lost: int = Field(ge=0)


@REGISTRY.event("RepairCompleted", version=1, stream="CLUSTER", subject=_REPAIR + ".completed")
class RepairCompleted(EventPayload):
    node_id: str
    job_id: str
    reason: RepairReason
    fragments_rebuilt: int = Field(ge=0)
    bytes_rebuilt: int = Field(ge=0)
    chunks_lost: int = Field(ge=0)
    seconds: float = Field(ge=0)


@REGISTRY.event("ChunkLost", version=1, stream="CLUSTER", subject=_REPAIR + ".lost")
class ChunkLost(EventPayload):
    """Fewer than k fragments of a chunk survive: that part of the file is gone.

    Never silent: named by inode and path so an operator can restore the file.
    """

    node_id: str = Field(description="the node whose loss was being repaired")
    ino: int = Field(ge=1)
    path: str = Field(description="a path of the file ('' if none could be found)")
    chunk_index: int = Field(ge=0)
    chunk_id: str
    scheme: str
    available: int = Field(ge=0, description="healthy fragments found")
    needed: int = Field(ge=1, description="fragments needed to decode (k)")


@REGISTRY.event(
    "FragmentRebuilt", version=1, stream="DATA", subject="cfs.{site}.data.{node_id}.rebuilt"
)
class FragmentRebuilt(EventPayload):
    """A damaged fragment was re-created (in place, or on another node for a move)."""

    node_id: str = Field(description="node that now holds the fragment")
    key: str
    source: Literal["scrub", "reader", "repair", "drain"]
    previous_node: str = ""
