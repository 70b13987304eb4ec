"""Replica checks: what `cfs admin metadata-consistency-check` asks each metadata node.

Every metadata-raft process serves `cfs.<site>.rpc.metacheck.<node>` (admin role
only). It answers for its own replica of each shard, at a consistent point (a
checkpoint of the projection taken between two journal applies), so the checker
can compare every replica with a rebuild of the shard from its journal at exactly
the same sequence, and find a record damaged on one replica only.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from cfs_contracts.streams import site_subject

DIGEST_BUCKETS = 256  # records are compared bucket by bucket (blake2b of the key, first byte)


def meta_check_subject(site: str, node: str) -> str:
    """Checks of one node's metadata replicas (its metadata-raft process)."""
    return site_subject(site, "rpc", "metacheck", node)


class _CheckOp(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScanReplicas(_CheckOp):
    """Verify every stored record's checksum and digest the state, per shard."""

    op: Literal["scan"] = "scan"
    shards: tuple[int, ...] = Field(default=(), description="shard indexes; () = every shard")
    site_neutral: bool = Field(
        default=False,
        description="digest inodes and entries only, without what differs by site (chunk "
        "holders, stamps, access times): two replicated sites' shards then compare",
    )


class ListRecords(_CheckOp):
    """Key and value digest of every record in some buckets (to name what differs)."""

    op: Literal["records"] = "records"
    shard: int = Field(ge=1, le=999)
    buckets: tuple[int, ...] = Field(min_length=1)
    site_neutral: bool = False


class RebuildReplica(_CheckOp):
    """Wipe this node's projection of the shard and replay it from the journal.

    A writer first steps down and releases the shard's lease (a healthy replica takes
    it); the replica is eligible to lead again once it has caught up."""

    op: Literal["rebuild"] = "rebuild"
    shard: int = Field(ge=1, le=999)
    reason: str


AnyCheckOp = Annotated[ScanReplicas | ListRecords | RebuildReplica, Field(discriminator="op")]


class CheckRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    body: AnyCheckOp


class StoredCorruption(BaseModel):
    """A record that fails its checksum (or does not parse) on this replica."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(description="stored key, hex")
    what: str = Field(description="`Inode 4097`, `Dentry 1/a.txt`, ...")
    expected: int = Field(description="checksum stored with the record")
    actual: int = Field(description="checksum of the stored bytes")
    detail: str = ""


class ReplicaShard(BaseModel):
    """One shard on one node, at `applied_seq`."""

    model_config = ConfigDict(frozen=True)

    shard: int
    applied_seq: int = Field(ge=0)
    role: str = Field(description="follower, fencing, leader, stopped")
    caught_up: bool = Field(description="reached the journal's end since (re)starting")
    records: int = Field(ge=0, description="inode, entry and transaction records")
    buckets: tuple[str, ...] = Field(
        default=(), description="DIGEST_BUCKETS hex digests of the records at applied_seq"
    )
    corrupt: tuple[StoredCorruption, ...] = ()
    seconds: float = 0.0


class RecordDigest(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str = Field(description="stored key, hex")
    digest: str = Field(description="of the stored value, hex")


class CheckReply(BaseModel):
    model_config = ConfigDict(frozen=True)

    node: str
    errno: int = 0
    message: str = ""
    shards: tuple[ReplicaShard, ...] = Field(default=(), description="scan")
    applied_seq: int = Field(default=0, description="records: the position they were read at")
    records: tuple[RecordDigest, ...] = ()


CHECK_STATUS_KEY = "check.last"


class CheckStatus(BaseModel):
    """`check.last` in the `nodes` bucket: how the last metadata-consistency-check of
    the site ended, written by the check itself. The alert "consistency check missed"
    watches its age; the daily run is the orchestrator's (cron, a Nomad periodic job)."""

    model_config = ConfigDict(frozen=True)

    finished_ms: int = Field(ge=0)
    status: Literal["clean", "findings", "incomplete"]
    problems: int = Field(default=0, ge=0)
    inodes: int = Field(default=0, ge=0)
    seconds: float = Field(default=0.0, ge=0)
    by: str = Field(description="who ran it (the CLI's node id)")
