"""Registry of event types: schema per version, upcasters, subjects, codec.

Consumers upcast on read (vN -> vN+1 -> ... -> current), so a journal written
by an old release replays on a new one. Writers always emit the current
version. Parsing is lenient in production (unknown payload fields ignored) and
strict when `CFS_STRICT_CONTRACTS=1` (tests), as S3QL and nats.py do.
"""

from __future__ import annotations

import builtins
import functools
import json
import os
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import Field, TypeAdapter, ValidationError, create_model

from cfs_contracts.envelope import HLC, Envelope, EventPayload

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
P = TypeVar("P", bound="EventPayload")


class ContractError(ValueError):
    """Root of every contract violation; the message is meant for humans."""


class UnknownEventType(ContractError):
    def __init__(self, event_type: str) -> None:
        super().__init__(f"unknown event type {event_type!r}")
        self.event_type = event_type


class SchemaVersionError(ContractError):
    """An event version that this release cannot read or should not write."""


class MalformedEvent(ContractError):
    """Bytes that are not a valid envelope or payload; goes to the dead-letter subject."""


@dataclass(frozen=True)
class EventSpec:
    """Where an event version lives: its schema, stream and subject template."""

    type: str
    version: int
    model: builtins.type[EventPayload]
    stream: str
    subject_template: str

    @property
    def placeholders(self) -> tuple[str, ...]:
        return _placeholders(self.subject_template)

    def typed_envelope(self) -> builtins.type[Envelope]:
        """The envelope with `type`, `v` and `payload` narrowed to this schema version."""
        literal: Any = Literal  # the values are only known at run time
        return create_model(
            f"{self.type}Event",
            __base__=Envelope,
            __doc__=self.model.__doc__,
            type=(literal[self.type], Field(description="event type name")),
            v=(literal[self.version], Field(description="schema version of the payload")),
            payload=(self.model, ...),
        )

    def subject(self, site: str, **keys: str) -> str:
        """Fill `{site}` and the other placeholders, e.g. `{shard}` or `{node_id}`."""
        names = _placeholders(self.subject_template)
        values = {"site": site}
        for name in names:
            if name == "site":
                continue
            if name not in keys:
                missing = sorted(n for n in names if n != "site" and n not in keys)
                raise ContractError(
                    f"subject for {self.type} needs {', '.join(missing)} "
                    f"(template {self.subject_template!r})"
                )
            values[name] = keys[name]
        for name, value in values.items():
            if not _valid_token(value):
                raise ContractError(f"invalid subject token {name}={value!r} for {self.type}")
        return self.subject_template.format(**values)


_TOKEN = re.compile(r"[^\s.*>]+")


@functools.lru_cache(maxsize=4096)
def _valid_token(value: str) -> bool:
    """Site, node and shard names repeat endlessly; check each once."""
    return _TOKEN.fullmatch(value) is not None


@functools.cache
def _placeholders(template: str) -> tuple[str, ...]:
    return tuple(f for _, f, _, _ in string.Formatter().parse(template) if f)


@dataclass(frozen=True)
class DecodedEvent:
    """An envelope plus its payload, upcast to the current schema version."""

    envelope: Envelope
    payload: EventPayload
    stored_version: int


def strict_by_default() -> bool:
    return os.environ.get("CFS_STRICT_CONTRACTS", "") == "1"


class Registry:
    def __init__(self) -> None:
        self._specs: dict[tuple[str, int], EventSpec] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._current: dict[str, int] = {}
        self._typed: TypeAdapter[Envelope] | None = None

    # -- registration --------------------------------------------------------------
    def event(
        self, event_type: str, *, version: int, stream: str, subject: str
    ) -> Callable[[type[P]], type[P]]:
        """Class decorator registering one schema version of an event type."""

        def register(model: type[P]) -> type[P]:
            key = (event_type, version)
            if key in self._specs:
                raise ContractError(f"{event_type} v{version} registered twice")
            model.EVENT_TYPE = event_type
            model.VERSION = version
            self._specs[key] = EventSpec(event_type, version, model, stream, subject)
            self._current[event_type] = max(version, self._current.get(event_type, 0))
            self._typed = None
            return model

        return register

    def upcaster(self, event_type: str, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register the function turning a `from_version` payload into the next version."""

        def register(fn: Upcaster) -> Upcaster:
            self._upcasters[(event_type, from_version)] = fn
            return fn

        return register

    def check_complete(self) -> None:
        """Every old version must have an upcaster; called by the contract tests."""
        for event_type, current in self._current.items():
            for version in range(1, current):
                if (event_type, version) in self._specs and (
                    event_type,
                    version,
                ) not in self._upcasters:
                    raise ContractError(
                        f"{event_type} v{version} has no upcaster to v{version + 1}"
                    )

    # -- lookup ----------------------------------------------------------------------
    def current_version(self, event_type: str) -> int:
        try:
            return self._current[event_type]
        except KeyError:
            raise UnknownEventType(event_type) from None

    def spec(self, event_type: str, version: int | None = None) -> EventSpec:
        current = self.current_version(event_type)
        version = current if version is None else version
        try:
            return self._specs[(event_type, version)]
        except KeyError:
            raise SchemaVersionError(
                f"{event_type} has no schema version {version} (current is v{current})"
            ) from None

    def specs(self) -> Iterator[EventSpec]:
        yield from sorted(self._specs.values(), key=lambda s: (s.type, s.version))

    def is_known(self, event_type: str) -> bool:
        return event_type in self._current

    # -- writing ---------------------------------------------------------------------
    def envelope(
        self,
        payload: EventPayload,
        *,
        event_id: str,
        site: str,
        node: str,
        hlc: HLC,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Envelope:
        """Wrap a payload; only the current schema version may be written."""
        event_type = type(payload).EVENT_TYPE
        if not event_type:
            raise UnknownEventType(type(payload).__name__)
        current = self.current_version(event_type)
        if current != type(payload).VERSION:
            raise SchemaVersionError(
                f"{event_type} v{type(payload).VERSION} is not the current schema "
                f"(v{current}); writers emit v{current}"
            )
        return Envelope(
            id=event_id,
            type=event_type,
            v=current,
            site=site,
            node=node,
            hlc=hlc,
            correlation_id=correlation_id,
            causation_id=causation_id,
            payload=payload,
        )

    # -- reading ---------------------------------------------------------------------
    def upcast(self, event_type: str, version: int, payload: dict[str, Any]) -> dict[str, Any]:
        current = self.current_version(event_type)
        if version > current:
            raise SchemaVersionError(
                f"{event_type} v{version} is newer than this release understands (v{current})"
            )
        while version < current:
            step = self._upcasters.get((event_type, version))
            if step is None:
                raise SchemaVersionError(
                    f"no upcaster for {event_type} v{version} -> v{version + 1}"
                )
            try:
                payload = step(dict(payload))
            except Exception as exc:  # an upcaster meets whatever an old writer stored
                raise MalformedEvent(
                    f"{event_type} v{version}: cannot upcast to v{version + 1}: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            version += 1
        return payload

    def parse(self, envelope: Envelope, *, strict: bool | None = None) -> DecodedEvent:
        """Validate an envelope's payload after upcasting it to the current version."""
        strict = strict_by_default() if strict is None else strict
        spec = self.spec(envelope.type)  # raises UnknownEventType
        if isinstance(envelope.payload, spec.model) and envelope.v == spec.version:
            return DecodedEvent(envelope, envelope.payload, envelope.v)
        if (envelope.type, envelope.v) not in self._specs and envelope.v < spec.version:
            raise SchemaVersionError(f"{envelope.type} v{envelope.v} was never a schema version")
        data = self.upcast(envelope.type, envelope.v, envelope.payload_dict())
        if strict:
            extra = sorted(set(data) - set(spec.model.model_fields))
            if extra:
                raise MalformedEvent(f"{envelope.type} v{spec.version}: unexpected fields {extra}")
        try:
            payload = spec.model.model_validate(data)
        except ValidationError as exc:
            raise MalformedEvent(f"{envelope.type} v{spec.version}: {_first_error(exc)}") from None
        return DecodedEvent(envelope, payload, envelope.v)

    def decode(self, raw: bytes, *, strict: bool | None = None) -> DecodedEvent:
        """bytes -> upcast, validated event. Raises a ContractError subclass.

        Current-version events are parsed in one pass straight into their models;
        anything else (older versions, unknown types, malformed bytes) takes the
        generic path, which upcasts or says exactly what is wrong.
        """
        strict = strict_by_default() if strict is None else strict
        try:
            typed = self._typed_adapter().validate_json(raw, extra="forbid" if strict else None)
        except ValidationError:
            return self.parse(decode_envelope(raw), strict=strict)
        envelope = Envelope.model_construct(
            typed.model_fields_set, **{name: getattr(typed, name) for name in _ENVELOPE_FIELDS}
        )
        return DecodedEvent(envelope, typed.payload, typed.v)  # type: ignore[arg-type]

    def _typed_adapter(self) -> TypeAdapter[Envelope]:
        if self._typed is None:
            models = [self.spec(t).typed_envelope() for t in sorted(self._current)]
            one_of: Any = Union  # a union of classes built at run time
            tagged: Any = Annotated[one_of[tuple(models)], Field(discriminator="type")]
            self._typed = TypeAdapter(tagged if len(models) > 1 else models[0])
        return self._typed


_ENVELOPE_FIELDS = tuple(Envelope.model_fields)


def encode_envelope(envelope: Envelope) -> bytes:
    unset = {name for name in ("correlation_id", "causation_id") if getattr(envelope, name) is None}
    payload = envelope.payload
    if not isinstance(payload, EventPayload):
        return envelope.model_dump_json(exclude=unset).encode()
    # A model's own serializer is several times faster than SerializeAsAny's duck typing;
    # `payload` is the envelope's last field, so the bytes are the same either way.
    head = envelope.model_dump_json(exclude=unset | {"payload"})
    return f'{head[:-1]},"payload":{payload.model_dump_json()}}}'.encode()


def decode_envelope(raw: bytes) -> Envelope:
    try:
        data = json.loads(raw)
    except RecursionError:
        raise MalformedEvent("not JSON: nested too deeply") from None
    except ValueError as exc:  # bad UTF-8, bad syntax, an integer of too many digits
        raise MalformedEvent(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedEvent(f"envelope must be a JSON object, got {type(data).__name__}")
    try:
        return Envelope.model_validate(data)
    except ValidationError as exc:
        raise MalformedEvent(f"bad envelope: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "<root>"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


REGISTRY = Registry()
