"""Alert rules and their evaluation (issue 17; the guide's "Prevention" sections). Pure.

A rules file (YAML) names conditions over the figures services publish (replication
lag, S3 queue depth, ...) or over events (a `CorruptionDetected`), each with a `for:`
duration, a severity, labels and a summary. Evaluation works as Prometheus and
Alertmanager do it: a condition that holds is *pending* until it has held for `for:`,
then *firing*, with one notification, repeated every `repeat:` while it keeps firing;
when it stops holding, one resolution. An event condition holds from the event until
`clear:` has passed without another.

    rules:
      - name: replication-lag
        figure: replication.lag_s
        above: 10
        for: 30s
        severity: warning
        summary: "replication lag {value:.0f}s (over 10s)"
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cfs.yamlfile import load_yaml_model
from cfs_contracts.events.ops import Severity

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class RulesError(ValueError):
    """A rules file that cannot be used; one line naming the file and the place."""


def seconds(text: str | float | int) -> float:
    """`30s`, `5m`, `2h`, `1d`, `250ms`, or a number of seconds."""
    if isinstance(text, int | float):
        return float(text)
    found = _DURATION.match(text.strip())
    if found is None:
        raise ValueError(f"bad duration {text!r} (e.g. 30s, 5m, 2h, 1d)")
    return float(found.group(1)) * _UNIT_S[found.group(2)]


class Rule(BaseModel):
    """One rule: a figure over or under a threshold, or an event seen."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    figure: str | None = Field(
        default=None, description="a published figure, e.g. replication.lag_s"
    )
    above: float | None = None
    below: float | None = None
    event: str | None = Field(default=None, description="an event type, e.g. CorruptionDetected")
    for_s: float = Field(default=0.0, alias="for", ge=0)
    clear_s: float = Field(default=300.0, alias="clear", gt=0, description="events: quiet time")
    repeat_s: float = Field(default=4 * 3600.0, alias="repeat", gt=0)
    severity: Severity = Severity.WARNING
    summary: str = ""
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("for_s", "clear_s", "repeat_s", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return seconds(value)

    @model_validator(mode="after")
    def _one_condition(self) -> Rule:
        if (self.figure is None) == (self.event is None):
            raise ValueError("a rule watches one figure or one event")
        if self.figure is not None and (self.above is None) == (self.below is None):
            raise ValueError(f"figure {self.figure}: give one of above or below")
        return self

    def holds(self, value: float) -> bool:
        if self.above is not None:
            return value > self.above
        return self.below is not None and value < self.below

    def describe(self, key: str, value: float | None) -> str:
        template = self.summary or f"{self.name}: {{value}}"
        try:
            return template.format(value=value if value is not None else 0.0, key=key)
        except (KeyError, ValueError, IndexError):
            return f"{template} (value {value})"


class HookSpec(BaseModel):
    """One hook of the rules file's `hooks:` list."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    kind: Literal["webhook", "command", "log"]
    url: str | None = Field(default=None, description="webhook: where to POST")
    argv: list[str] | None = Field(default=None, description="command: program and arguments")
    timeout_s: float = Field(default=10.0, gt=0, description="per delivery (webhook: per try)")
    deadline_s: float = Field(default=60.0, gt=0, description="webhook: retries end here")

    @model_validator(mode="after")
    def _target(self) -> HookSpec:
        if self.kind == "webhook" and not (self.url or "").startswith(("http://", "https://")):
            raise ValueError(f"webhook {self.name}: url must be http:// or https://")
        if self.kind == "command" and not self.argv:
            raise ValueError(f"command {self.name}: argv is empty")
        return self


class RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list)
    hooks: list[HookSpec] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[Rule]) -> list[Rule]:
        names = [r.name for r in rules]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"rule names used twice: {', '.join(twice)}")
        return rules


DEFAULT_RULES = Path(__file__).with_name("default.yaml")


def load_rules(path: Path) -> list[Rule]:
    return load_config(path).rules


def load_config(path: Path) -> RulesFile:
    """Parse a rules file; any problem is one RulesError naming the file and the place."""
    return load_yaml_model(path, RulesFile, "rules", RulesError)


class Phase(StrEnum):
    PENDING = "pending"
    FIRING = "firing"


class Kind(StrEnum):
    FIRED = "fired"
    REPEATED = "repeated"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class AlertState:
    """One rule for one key (a node, a shard, ...) while its condition holds."""

    rule: str
    key: str
    phase: Phase
    since: float  # when the condition started to hold
    last_seen: float  # when it last held (events: the last event)
    notified: float = 0.0  # when the last notification went out
    value: float | None = None


@dataclass(frozen=True)
class Notification:
    kind: Kind
    rule: Rule
    key: str
    value: float | None
    summary: str
    since: float

    @property
    def dedupe_key(self) -> str:
        return f"{self.rule.name}/{self.key}"


def observe(
    rule: Rule, key: str, held: bool, value: float | None, state: AlertState | None, now: float
) -> tuple[AlertState | None, Notification | None]:
    """One observation of `rule` for `key` (`held`: its condition holds now): the new
    state and what to notify, if anything. For event rules, `held` means an event was
    seen now; the state then lasts until `clear_s` passes without one."""
    if held:
        if state is None:
            state = AlertState(rule.name, key, Phase.PENDING, since=now, last_seen=now, value=value)
        else:
            state = replace(state, last_seen=now, value=value if value is not None else state.value)
    elif state is not None and rule.event is not None and now - state.last_seen < rule.clear_s:
        pass  # an event rule stays until its quiet time has passed
    elif state is not None:
        if state.phase is Phase.FIRING:
            summary = f"resolved: {rule.describe(key, state.value)}"
            return None, Notification(Kind.RESOLVED, rule, key, state.value, summary, state.since)
        return None, None  # pending only: it never fired, so nothing to resolve
    else:
        return None, None
    if state.phase is Phase.PENDING:
        if now - state.since < rule.for_s:
            return state, None
        state = replace(state, phase=Phase.FIRING, notified=now)
        return state, Notification(
            Kind.FIRED, rule, key, state.value, rule.describe(key, state.value), state.since
        )
    if now - state.notified >= rule.repeat_s:
        state = replace(state, notified=now)
        return state, Notification(
            Kind.REPEATED, rule, key, state.value, rule.describe(key, state.value), state.since
        )
    return state, None


class Evaluator:
    """Every rule over every key, one round at a time; the alert states between rounds
    (seeded from the published state, so a new leader does not notify again)."""

    def __init__(self, rules: list[Rule], states: dict[tuple[str, str], AlertState] | None = None):
        self.rules = rules
        self.states: dict[tuple[str, str], AlertState] = dict(states or {})

    def round(
        self, figures: dict[str, dict[str, float]], events: dict[str, set[str]], now: float
    ) -> list[Notification]:
        """`figures`: {figure: {key: value}}; `events`: {event type: keys seen since
        the last round}."""
        notes = []
        for rule in self.rules:
            values = figures.get(rule.figure, {}) if rule.figure is not None else {}
            seen = events.get(rule.event, set()) if rule.event is not None else set()
            keys = set(values) | seen | {k for r, k in self.states if r == rule.name}
            for key in sorted(keys):
                value = values.get(key)
                held = (
                    key in seen
                    if rule.event is not None
                    else (value is not None and rule.holds(value))
                )
                state, note = observe(
                    rule, key, held, value, self.states.get((rule.name, key)), now
                )
                if state is None:
                    self.states.pop((rule.name, key), None)
                else:
                    self.states[(rule.name, key)] = state
                if note is not None:
                    notes.append(note)
        return notes

    def firing(self) -> list[AlertState]:
        return [s for s in self.states.values() if s.phase is Phase.FIRING]
