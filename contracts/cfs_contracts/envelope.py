"""The event envelope (DESIGN.md §3) shared by every stream."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator

_CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def is_ulid(value: str) -> bool:
    """True for a canonical 26-character Crockford base32 ULID."""
    return len(value) == 26 and set(value) <= _CROCKFORD and value[0] in "01234567"


class HLC(BaseModel):
    """Hybrid logical clock stamp; orders events across nodes and sites.

    Compare with `key()`: wall time first, then the logical counter, then the
    node id as the deterministic tie-breaker (used by last-writer-wins merges).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    wall_ms: int = Field(ge=0, description="physical component, ms since the Unix epoch")
    counter: int = Field(ge=0, description="logical counter within one wall_ms")
    node: str = Field(min_length=1, description="node that issued the stamp")

    def key(self) -> tuple[int, int, str]:
        return (self.wall_ms, self.counter, self.node)

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.counter}@{self.node}"


class EventPayload(BaseModel):
    """Base of every event payload. Subclasses are registered with `Registry.event`."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    EVENT_TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 0


class Envelope(BaseModel):
    """One immutable event as stored in a stream.

    `id` is a ULID and doubles as the `Nats-Msg-Id` header, so a retried
    publish or a redelivery is stored once. `payload` is a plain dict when read
    generically: it is validated against the schema of (`type`, `v`) by the
    registry, after upcasting, so an envelope from an older release still
    parses. Envelopes the registry builds or decodes at the current version
    carry the payload model itself, so it is never converted twice.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="ULID; also the Nats-Msg-Id dedupe header")
    type: str = Field(min_length=1, description="event type name, e.g. NodeDown")
    v: int = Field(ge=1, description="schema version of the payload")
    site: str = Field(min_length=1, description="site where the event originated")
    node: str = Field(min_length=1, description="node that produced the event")
    hlc: HLC
    correlation_id: str | None = Field(
        default=None, description="id of the command or request this event belongs to"
    )
    causation_id: str | None = Field(default=None, description="id of the event that caused it")
    payload: dict[str, Any] | SerializeAsAny[EventPayload] = Field(union_mode="left_to_right")

    def payload_dict(self) -> dict[str, Any]:
        """The payload as JSON-ready data, whichever form it is held in."""
        if isinstance(self.payload, EventPayload):
            return self.payload.model_dump(mode="json")
        return self.payload

    @field_validator("id", "correlation_id", "causation_id")
    @classmethod
    def _must_be_ulid(cls, value: str | None) -> str | None:
        if value is not None and not is_ulid(value):
            raise ValueError(f"not a ULID: {value!r}")
        return value
