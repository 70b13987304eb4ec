"""Two sites (DESIGN.md §8): the peer a site replicates with, and what comes from it.

A site that replicates with a peer holds a stream `GEO_IN` that sources the
peer's shard journals across JetStream domains (`$JS.<peer>.API`, over the leaf-node
link): only the messages the peer's own writers appended (`...meta.<shard>.journal`),
never the peer's copies of ours (those are appended under `...journal.remote`), so
nothing is shipped back. The sourcing is JetStream's: durable and resumable after a
partition of any length, and the peer's server never needs to know we exist.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from cfs_contracts.streams import shard_name

GEO_PEER_KEY = "geo.peer"  # in the `nodes` bucket: the site this one replicates with
GEO_APPLIED_KEY = "geo.applied"  # in the `nodes` bucket: how far the peer's journal is applied


class GeoPeer(BaseModel):
    model_config = ConfigDict(frozen=True)  # readers of another release ignore new fields

    site: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    shards: int = Field(ge=1, le=999, description="equal on both sites: shard i ships to i")
    linked_ms: int
    linked_by: str


# This site's copy of its peer's journals (one peer per site): a fixed name, so the
# geo-replicator's rights to consume it are declared once, whoever the peer is.
INBOUND_STREAM = "GEO_IN"


def peer_journal_subject(peer: str, shard: int) -> str:
    """What `peer`'s own writers append to shard `shard` (and only that)."""
    return f"cfs.{peer}.meta.{shard_name(shard)}.journal"


def peer_api(peer: str) -> str:
    """`peer`'s JetStream API as seen from this site, over the link."""
    return f"$JS.{peer}.API"


class ShardApplied(BaseModel):
    model_config = ConfigDict(frozen=True)

    position: int = Field(ge=0, description="the last GEO_IN message applied")
    pending: int = Field(ge=0, description="GEO_IN messages of the shard after it")
    newest_ms: int | None = Field(
        default=None, description="when the peer wrote the last message applied"
    )


class GeoApplied(BaseModel):
    """The geo-replicator's published progress (`replication-status` reads it)."""

    model_config = ConfigDict(frozen=True)

    peer: str
    shards: dict[int, ShardApplied]
    updated_ms: int

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self.shards.values())


GEO_ACTIVE_KEY = "geo.active"  # in the `nodes` bucket of both sites: where clients write


class ActiveSite(BaseModel):
    """Which site clients write to, replicated between the sites: each geo-replicator
    adopts its peer's record when that one is newer (`supersedes`), so the sites agree
    once they can talk. `fenced`: a site whose writers refuse client mutations (a
    failover in preparation: its journal drains to the other site first)."""

    model_config = ConfigDict(frozen=True)

    site: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    epoch: int = Field(ge=1, description="raised by every change; the higher one wins")
    changed_ms: int = Field(ge=0)
    changed_by: str = Field(description="`cfs admin ...` by whom, or the geo-replicator")
    reason: str = ""
    fenced: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")

    def supersedes(self, other: ActiveSite | None) -> bool:
        """Higher epoch; equal epochs (two sites changed it apart) by time, then name,
        so both sites pick the same record."""
        if other is None:
            return True
        return (self.epoch, self.changed_ms, self.site) > (
            other.epoch,
            other.changed_ms,
            other.site,
        )


def newest_active(records: Iterable[ActiveSite | None]) -> ActiveSite | None:
    """The record that supersedes the others (what both sites converge to)."""
    newest: ActiveSite | None = None
    for record in records:
        if record is not None and record.supersedes(newest):
            newest = record
    return newest


CONFLICTS_OPEN_KEY = "conflicts.open"  # in the `nodes` bucket: the conflict-resolver's count


class OpenConflicts(BaseModel):
    """How many conflicts between the sites no one has resolved yet (`show-conflicts`
    lists them)."""

    model_config = ConfigDict(frozen=True)

    open: int = Field(ge=0)
    kinds: dict[str, int] = Field(default_factory=dict, description="field, name, deleted")
    oldest_ns: int | None = Field(default=None, description="the oldest open one's change")
    updated_ms: int
