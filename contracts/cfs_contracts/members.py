"""Membership records in the `nodes` KV bucket (DESIGN.md §6).

Keys, all in the `nodes` bucket:
- `member.<node>` (`MemberRecord`): SWIM's verdict on a node. Written with
  compare-and-set by whichever member observed a change, merged by SWIM's
  precedence rules (`supersedes`), so concurrent observers converge.
- `admin.<node>` (`NodeAdmin`): the operator's lifecycle state (active,
  draining, drained, removed), written by admin commands and the repair
  coordinator.
- `store.<node>` (`cfs_contracts.data.StoreRecord`): the chunk-store's capacity.
- `cluster.config` (`ClusterConfig`): what `cfs cluster init` fixed for the site.

Placement takes a node only when all three agree: alive, active, with room.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class Liveness(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DOWN = "down"
    LEFT = "left"


class Lifecycle(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    DRAINED = "drained"
    REMOVED = "removed"


_RANK = {Liveness.ALIVE: 0, Liveness.SUSPECT: 1, Liveness.DOWN: 2, Liveness.LEFT: 3}


CLUSTER_CONFIG_KEY = "cluster.config"


class ClusterConfig(BaseModel):
    """Written once by `cfs cluster init`; the shard count can never change after."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="cluster name, e.g. claudefs-prod")
    site: str
    shards: int = Field(ge=1, le=999)
    ec: str = Field(
        default="auto",
        description="erasure code for new chunks when enough nodes are up (ec4+2, ec2+1, "
        "copy3, ...); auto = 4+2 on 6+ nodes, 2+1 on 3-5, copies below",
    )
    bootstrap_node: str
    created_ms: int
    created_by: str
    site_index: int = Field(
        default=0,
        ge=0,
        le=127,
        description="distinct per replicated site: its inode numbers come from its own range",
    )

    @property
    def cluster_id(self) -> str:
        """Unique per `cfs cluster init`: a cluster re-made with the same name after a
        total loss has another id, so its journal archive never mixes with the old one."""
        return f"{self.name}.{self.site}.{self.created_ms}"


def member_key(node: str) -> str:
    return f"member.{node}"


def admin_key(node: str) -> str:
    return f"admin.{node}"


class MemberRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    node: str
    state: Liveness
    incarnation: int = Field(ge=0, description="bumped only by the node itself, to refute")
    host: str = Field(description="SWIM UDP address")
    port: int = Field(ge=1, le=65535)
    labels: dict[str, str] = Field(default_factory=dict, description="failure domains")
    since_ms: int = Field(ge=0, description="wall clock when `state` began")
    detected_by: str = Field(default="", description="member whose report set `state`")
    method: str = Field(default="SWIM", description="detector, shown by `cfs admin status`")
    last_seen_ms: int = Field(
        default=0, ge=0, description="wall clock of the node's last own refresh; 0 = never"
    )

    def supersedes(self, other: MemberRecord) -> bool:
        """SWIM precedence: higher incarnation wins; at equal incarnation the worse state
        wins (suspect over alive, down over suspect); LEFT is final."""
        if other.state is Liveness.LEFT:
            return False
        if self.state is Liveness.LEFT:
            return True
        if self.incarnation != other.incarnation:
            return self.incarnation > other.incarnation
        return _RANK[self.state] > _RANK[other.state]


class NodeAdmin(BaseModel):
    model_config = ConfigDict(frozen=True)

    node: str
    lifecycle: Lifecycle = Lifecycle.ACTIVE
    since_ms: int = Field(ge=0)
    requested_by: str = Field(default="", description="operator or service that set it")
    reason: str = ""
    leases: tuple[str, ...] = Field(
        default=(), description="draining: writer leases the node held when asked to drain"
    )


def repair_key(node: str) -> str:
    return f"repair.{node}"


class RepairJob(BaseModel):
    """`repair.<node>` in the `nodes` bucket: where the repair of a node stands.

    Written only by the coordinator holding the `service.repair` lease; a new
    holder resumes from `shard`/`after_ino`.
    """

    model_config = ConfigDict(frozen=True)

    node: str
    job_id: str
    reason: str = Field(description="down | removed | draining")
    trigger_ms: int = Field(ge=0, description="since when the node needed repair")
    started_ms: int = Field(ge=0)
    shard: int = Field(default=1, ge=1, description="shard being scanned")
    after_ino: int = Field(default=0, ge=0, description="files up to here are done")
    files_scanned: int = Field(default=0, ge=0)
    fragments_rebuilt: int = Field(default=0, ge=0)
    bytes_rebuilt: int = Field(default=0, ge=0)
    chunks_lost: int = Field(default=0, ge=0)
    progress_ms: int = Field(default=0, ge=0, description="when the last page of files was done")
    done_ms: int = Field(default=0, ge=0, description="0 while running")


def health_key(node: str, service: str) -> str:
    """The key of a service process's `ServiceHealth` in the `health` bucket."""
    return f"{node}.{service}"


class ComponentState(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"


class ServiceHealth(BaseModel):
    """`health.<node>.<service>` in the `nodes` bucket: one service process's own report.

    Written by the service runtime (`cfs.kernel`) when it starts, whenever a component
    degrades or recovers, and every `heartbeat_s`; `cfs admin status` shows it, so a
    background task that failed is never silent. A record older than three heartbeats
    means the process is gone (or cannot reach NATS).
    """

    model_config = ConfigDict(frozen=True)

    service: str
    node: str
    pid: int = Field(ge=0)
    started_ms: int = Field(ge=0)
    updated_ms: int = Field(ge=0)
    heartbeat_s: float = Field(gt=0, description="the writer's refresh interval")
    degraded: dict[str, str] = Field(
        default_factory=dict, description="component -> why it is not working; empty = ok"
    )
    singleton: str = Field(
        default="", description="site-singleton services: holding | standby; '' otherwise"
    )

    @property
    def state(self) -> ComponentState:
        return ComponentState.DEGRADED if self.degraded else ComponentState.OK
