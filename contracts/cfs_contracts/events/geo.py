"""Cross-site events (DESIGN.md §8): what a merge of the peer's changes found."""

from __future__ import annotations

from pydantic import Field

from cfs_contracts.envelope import EventPayload
from cfs_contracts.fs.conflicts import FieldConflict
from cfs_contracts.registry import REGISTRY


@REGISTRY.event(
    "ConflictDetected", version=1, stream="CONFLICTS", subject="cfs.{site}.conflicts.detected"
)
class ConflictDetected(EventPayload):
    """One conflict a shard writer found merging the peer's changes, with both versions
    and who won. Published by the geo-replicator with the conflict's id as message id,
    so a replicator killed and run again records it once."""

    conflict_id: str = Field(description="FieldConflict.conflict_id: the same on both sites")
    shard: int = Field(ge=1)
    conflict: FieldConflict


@REGISTRY.event(
    "ConflictResolved", version=1, stream="CONFLICTS", subject="cfs.{site}.conflicts.resolved"
)
class ConflictResolved(EventPayload):
    """An operator's decision on a conflict (`cfs admin resolve-conflicts`), audited."""

    conflict_id: str
    strategy: str = Field(description="last-write-wins | manual")
    winner: str = Field(description="the site whose value stays")
    applied: bool = Field(description="whether a change was needed to make it so")
    by: str = Field(description="who resolved it")
    ino: int = Field(default=0, ge=0, description="the conflict's inode")
    kind: str = Field(default="", description="the conflict's kind: field, name, deleted")
    group: str = Field(default="", description="the conflict's field group (or name)")
    through_ns: int = Field(
        default=0,
        ge=0,
        description="every conflict of this inode, kind and group between changes made "
        "up to this time is resolved too: the other site may have recorded the same "
        "divergence as other pairs of changes (other ids)",
    )
