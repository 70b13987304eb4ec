"""Membership and node lifecycle events (CLUSTER stream, DESIGN.md §6)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from cfs_contracts.envelope import EventPayload
from cfs_contracts.registry import REGISTRY

_NODE = "cfs.{site}.cluster.node.{node_id}"


@REGISTRY.event("NodeJoined", version=1, stream="CLUSTER", subject=_NODE + ".joined")
class NodeJoinedV1(EventPayload):
    """v1 (first release): one `host:port` string, no labels or capacity."""

    node_id: str
    address: str = Field(description="SWIM UDP endpoint as host:port")


@REGISTRY.event("NodeJoined", version=2, stream="CLUSTER", subject=_NODE + ".joined")
class NodeJoined(EventPayload):
    """A node was admitted; v2 split the address and added placement facts."""

    node_id: str
    host: str
    port: int = Field(ge=1, le=65535, description="SWIM UDP port")
    labels: dict[str, str] = Field(
        default_factory=dict, description="failure-domain labels, e.g. rack=r1"
    )
    capacity_bytes: int = Field(default=0, ge=0, description="0 = not reported yet")


@REGISTRY.upcaster("NodeJoined", from_version=1)
def node_joined_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """Split `address` at its last colon (IPv6 literals keep their brackets)."""
    host, _, port = str(payload.pop("address")).rpartition(":")
    payload["host"] = host.strip("[]")
    payload["port"] = int(port)
    payload.setdefault("labels", {})
    payload.setdefault("capacity_bytes", 0)
    return payload


@REGISTRY.event("NodeSuspect", version=1, stream="CLUSTER", subject=_NODE + ".suspect")
class NodeSuspect(EventPayload):
    node_id: str
    incarnation: int = Field(ge=0)
    suspected_by: str


@REGISTRY.event("NodeDown", version=1, stream="CLUSTER", subject=_NODE + ".down")
class NodeDown(EventPayload):
    node_id: str
    incarnation: int = Field(ge=0)
    detected_by: str = Field(description="member whose suspicion timed out")
    method: str = Field(default="SWIM", description="detector, shown by `cfs admin status`")


@REGISTRY.event("NodeAlive", version=1, stream="CLUSTER", subject=_NODE + ".alive")
class NodeAlive(EventPayload):
    node_id: str
    incarnation: int = Field(ge=0)


@REGISTRY.event("NodeLeft", version=1, stream="CLUSTER", subject=_NODE + ".left")
class NodeLeft(EventPayload):
    node_id: str
    reason: str


@REGISTRY.event("NodeDrained", version=1, stream="CLUSTER", subject=_NODE + ".drained")
class NodeDrained(EventPayload):
    node_id: str
    fragments_moved: int = Field(ge=0)
    leases_moved: int = Field(ge=0)
