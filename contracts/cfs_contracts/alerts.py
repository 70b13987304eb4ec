"""The alerts service's published state (`alerts.state` in the `nodes` bucket): its
rules, what fires now, and how its hooks fare (`cfs admin alerts list`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ALERTS_STATE_KEY = "alerts.state"


class RuleInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    severity: str
    watches: str = Field(description="`figure replication.lag_s > 10 for 30s`, `event ...`")


class FiringAlert(BaseModel):
    model_config = ConfigDict(frozen=True)

    rule: str
    key: str
    severity: str
    summary: str
    since_ms: int = Field(description="when its condition started to hold")
    notified_ms: int = Field(description="when it was last sent to the hooks")
    value: float | None = None


class HookInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    delivered: int = 0
    failed: int = 0
    last_error: str | None = None


class AlertsState(BaseModel):
    model_config = ConfigDict(frozen=True)

    node: str = Field(description="the alerts service instance that evaluates")
    updated_ms: int
    rules: tuple[RuleInfo, ...] = ()
    firing: tuple[FiringAlert, ...] = ()
    hooks: tuple[HookInfo, ...] = ()
