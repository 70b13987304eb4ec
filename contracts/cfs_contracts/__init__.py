"""ClaudeFS contracts: versioned event schemas, subjects and stream definitions.

Everything that crosses a process boundary is defined here, so producers and
consumers of different releases agree on one source of truth.
"""

from cfs_contracts.envelope import HLC, Envelope, EventPayload
from cfs_contracts.registry import (
    REGISTRY,
    ContractError,
    DecodedEvent,
    EventSpec,
    Registry,
    SchemaVersionError,
    UnknownEventType,
)

__all__ = [
    "HLC",
    "REGISTRY",
    "ContractError",
    "DecodedEvent",
    "Envelope",
    "EventPayload",
    "EventSpec",
    "Registry",
    "SchemaVersionError",
    "UnknownEventType",
]

# Importing the event modules registers every event type in REGISTRY.
from cfs_contracts import events as _events  # noqa: F401
