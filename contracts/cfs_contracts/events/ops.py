"""Operational events: corruption reports, alerts, audit (DESIGN.md §4, §10)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from cfs_contracts.envelope import EventPayload
from cfs_contracts.registry import REGISTRY


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@REGISTRY.event(
    "CorruptionDetected", version=1, stream="ALERTS", subject="cfs.{site}.alerts.corruption"
)
class CorruptionDetected(EventPayload):
    """A stored record or fragment failed its checksum on read."""

    component: str = Field(description="metadata-raft, chunk-store, ...")
    object_id: str = Field(description="inode number, fragment id, ...")
    expected_checksum: str = Field(description="hex, 0x-prefixed")
    actual_checksum: str = Field(description="hex, 0x-prefixed")
    detail: str = ""


@REGISTRY.event("AlertRaised", version=1, stream="ALERTS", subject="cfs.{site}.alerts.raised")
class AlertRaised(EventPayload):
    rule: str
    severity: Severity
    summary: str
    dedupe_key: str = Field(description="alerts with one key are throttled together")


@REGISTRY.event("AlertResolved", version=1, stream="ALERTS", subject="cfs.{site}.alerts.resolved")
class AlertResolved(EventPayload):
    """A firing alert whose condition no longer holds (`dedupe_key` as it fired)."""

    rule: str
    severity: Severity
    summary: str
    dedupe_key: str
    fired_ms: int = Field(ge=0, description="when it started to hold")


@REGISTRY.event("AdminActionRecorded", version=1, stream="AUDIT", subject="cfs.{site}.audit.admin")
class AdminActionRecorded(EventPayload):
    """Audit record of an admin command, written before the command takes effect."""

    actor: str
    command: str
    arguments: dict[str, str] = Field(default_factory=dict)
    outcome: str = Field(description="requested, succeeded, failed: <reason>")
