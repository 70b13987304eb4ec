"""Bad input to the event decoders (issue 19, "bad input everywhere").

Every registered event type and schema version, starting from its golden sample:
malformed JSON, wrong types anywhere in the tree, truncation, unknown types, versions
from the past and the future, oversized bodies, garbage headers. Decoding either gives
the event or raises a `ContractError` subclass (`MalformedEvent`, `SchemaVersionError`,
`UnknownEventType`), never another exception; and the consumer path dead-letters what
cannot be decoded (skips an unknown type) without calling the handler.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cfs_contracts
from cfs.bus.consumer import ConsumerSpec, Delivery, DurableConsumer, Outcome
from cfs_contracts import REGISTRY, DecodedEvent, SchemaVersionError, UnknownEventType
from cfs_contracts.registry import ContractError, MalformedEvent

GOLDEN = Path(cfs_contracts.__file__).parent / "golden"
SAMPLES: dict[str, bytes] = {p.stem: p.read_bytes() for p in sorted(GOLDEN.glob("*.json"))}
NAMES = sorted(SAMPLES)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def decode_outcome(raw: bytes, *, strict: bool) -> DecodedEvent | ContractError:
    """The decoder's answer: an event or a typed contract error; anything else fails."""
    try:
        return REGISTRY.decode(raw, strict=strict)
    except ContractError as exc:
        assert str(exc), "a contract error must say what is wrong"
        return exc


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location in a JSON tree (the root included)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


def replaced(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    copy[path[0]] = replaced(tree[path[0]], path[1:], value)
    return copy


# -- the decoder ----------------------------------------------------------------------


@FUZZ
@given(raw=st.binary(max_size=300), strict=st.booleans())
def test_random_bytes_are_a_typed_error(raw: bytes, strict: bool) -> None:
    assert isinstance(decode_outcome(raw, strict=strict), MalformedEvent | DecodedEvent)


@FUZZ
@given(name=st.sampled_from(NAMES), data=st.data(), strict=st.booleans())
def test_truncated_sample_is_malformed(name: str, data: st.DataObject, strict: bool) -> None:
    raw = SAMPLES[name]
    cut = data.draw(st.integers(0, len(raw) - 2), label="cut")
    assert isinstance(decode_outcome(raw[:cut], strict=strict), MalformedEvent)


@FUZZ
@given(name=st.sampled_from(NAMES), data=st.data(), value=json_values, strict=st.booleans())
def test_any_field_replaced_by_any_value(
    name: str, data: st.DataObject, value: Any, strict: bool
) -> None:
    tree = json.loads(SAMPLES[name])
    where = data.draw(st.sampled_from(paths(tree)), label="path")
    raw = json.dumps(replaced(tree, where, value)).encode()
    decode_outcome(raw, strict=strict)


@FUZZ
@given(name=st.sampled_from(NAMES), data=st.data(), strict=st.booleans())
def test_any_field_removed(name: str, data: st.DataObject, strict: bool) -> None:
    tree = json.loads(SAMPLES[name])
    where = data.draw(st.sampled_from([p for p in paths(tree) if p]), label="path")
    container: Any = tree
    for step in where[:-1]:
        container = container[step]
    if isinstance(container, dict):
        smaller: Any = {k: v for k, v in container.items() if k != where[-1]}
    else:
        smaller = [v for i, v in enumerate(container) if i != where[-1]]
    raw = json.dumps(replaced(tree, where[:-1], smaller)).encode()
    decode_outcome(raw, strict=strict)


@FUZZ
@given(name=st.sampled_from(NAMES), version=st.integers(-(2**40), 2**40), strict=st.booleans())
def test_any_schema_version(name: str, version: int, strict: bool) -> None:
    tree = json.loads(SAMPLES[name])
    kind = tree["type"]
    tree["v"] = version
    outcome = decode_outcome(json.dumps(tree).encode(), strict=strict)
    current = REGISTRY.current_version(kind)
    if version > current:
        assert isinstance(outcome, SchemaVersionError), outcome
        assert "newer than this release" in str(outcome)
    elif version < 1:
        assert isinstance(outcome, MalformedEvent), outcome
    elif not any(s.type == kind and s.version == version for s in REGISTRY.specs()):
        assert isinstance(outcome, SchemaVersionError), outcome


@FUZZ
@given(name=st.sampled_from(NAMES), kind=st.text(min_size=1, max_size=30), strict=st.booleans())
def test_unknown_event_type(name: str, kind: str, strict: bool) -> None:
    tree = json.loads(SAMPLES[name])
    tree["type"] = kind
    outcome = decode_outcome(json.dumps(tree).encode(), strict=strict)
    if not REGISTRY.is_known(kind):
        assert isinstance(outcome, UnknownEventType), outcome


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than any parser's recursion limit
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"v": ' + b"9" * 5000 + b"}",  # more digits than int() converts
        b'{"id": "x", "v": 1e999}',
        b"\xff\xfe{\x00}\x00",  # UTF-16 with a BOM
        b"\xef\xbb\xbf{}",  # UTF-8 BOM
        b"\x00" * 64,
        b"",
        b"null",
        b'"just a string"',
        b"NaN",
    ],
    ids=[
        "deep-list",
        "deep-object",
        "huge-int",
        "huge-float",
        "utf16",
        "bom",
        "nul",
        "empty",
        "null",
        "string",
        "nan",
    ],
)
@pytest.mark.parametrize("strict", [True, False])
def test_pathological_bytes(raw: bytes, strict: bool) -> None:
    assert isinstance(decode_outcome(raw, strict=strict), MalformedEvent)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "payload",
    [{}, None, [], "x", 7, {"address": 7}, {"address": "no-port"}, {"address": "h:99999999"}],
    ids=["empty", "null", "list", "str", "int", "addr-int", "addr-no-port", "addr-big-port"],
)
def test_payload_of_the_wrong_shape_for_every_version(name: str, payload: Any) -> None:
    """Old versions go through their upcasters, which must not crash on garbage either."""
    tree = json.loads(SAMPLES[name])
    tree["payload"] = payload
    outcome = decode_outcome(json.dumps(tree).encode(), strict=True)
    if not isinstance(payload, dict):
        assert isinstance(outcome, MalformedEvent), outcome


@pytest.mark.parametrize("name", NAMES)
def test_oversized_event(name: str) -> None:
    """Ten MiB in a payload field: the decoder does not choke (size limits are the
    server's max_payload and the stream's max_msg_size)."""
    tree = json.loads(SAMPLES[name])
    tree["payload"]["padding"] = "x" * (10 * 1024 * 1024)
    assert isinstance(decode_outcome(json.dumps(tree).encode(), strict=True), MalformedEvent)
    lenient = decode_outcome(json.dumps(tree).encode(), strict=False)
    assert isinstance(lenient, DecodedEvent), lenient  # unknown fields are ignored


# -- the consumer path ----------------------------------------------------------------


@dataclass
class FakeMsg:
    """What `DurableConsumer` reads of a JetStream message, and how it was settled."""

    data: bytes
    headers: dict[str, str] | None
    subject: str = "cfs.t.cluster.node.n1.down"
    settled: list[str] = field(default_factory=list)

    @property
    def metadata(self) -> Any:
        sequence = SimpleNamespace(stream=7, consumer=3)
        return SimpleNamespace(stream="CLUSTER", sequence=sequence, num_delivered=1)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append("nak")

    async def term(self) -> None:
        self.settled.append("term")


class FakeJetStream:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        self.published.append((subject, data, headers))


def consume_one(msg: FakeMsg) -> tuple[Outcome, list[DecodedEvent], FakeJetStream]:
    """One message through the consumer's decode-handle-settle path; the bus is a fake
    (the real-server path is covered by tests/integration/test_bus.py)."""
    js = FakeJetStream()
    bus: Any = SimpleNamespace(site="t", registry=REGISTRY, js=js)
    handled: list[DecodedEvent] = []

    async def handle(event: DecodedEvent, delivery: Delivery) -> None:
        handled.append(event)

    consumer = DurableConsumer(bus, ConsumerSpec(stream="CLUSTER", durable="fuzz"), handle)

    async def run() -> Outcome:
        nats_msg: Any = msg
        meta = msg.metadata
        delivery = Delivery(meta.stream, 7, 3, 1, msg.subject)
        outcome, reason, delay = await consumer._handle(nats_msg, delivery)
        await consumer._settle(nats_msg, delivery, outcome, reason, delay)
        return outcome

    return asyncio.run(run()), handled, js


headers_strategy = st.none() | st.dictionaries(
    st.sampled_from(["traceparent", "tracestate", "Nats-Msg-Id", "X", "baggage"])
    | st.text(min_size=1, max_size=10),
    st.text(max_size=60),
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    data=st.data(),
    value=json_values,
    headers=headers_strategy,
)
def test_consumer_dead_letters_what_it_cannot_decode(
    name: str, data: st.DataObject, value: Any, headers: dict[str, str] | None
) -> None:
    tree = json.loads(SAMPLES[name])
    where = data.draw(st.sampled_from(paths(tree)), label="path")
    raw = json.dumps(replaced(tree, where, value)).encode()
    raw = raw[: data.draw(st.integers(1, len(raw)), label="cut")]
    expected = decode_outcome(raw, strict=True)
    msg = FakeMsg(raw, headers)
    outcome, handled, js = consume_one(msg)
    if isinstance(expected, DecodedEvent):
        assert outcome is Outcome.ACK and len(handled) == 1 and msg.settled == ["ack"]
        assert not js.published
    elif isinstance(expected, UnknownEventType):
        assert outcome is Outcome.SKIP and not handled and msg.settled == ["ack"]
        assert not js.published
    else:
        assert outcome is Outcome.DEAD_LETTER and not handled and msg.settled == ["term"]
        [(subject, body, sent)] = js.published
        assert subject == "cfs.t.dlq.cluster.fuzz" and body == raw
        assert sent["Cfs-Dlq-Reason"].startswith("undecodable: ")
        assert sent["Cfs-Dlq-Seq"] == "7" and sent["Cfs-Dlq-Stream"] == "CLUSTER"


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(NAMES), headers=headers_strategy)
def test_garbage_headers_on_a_good_event_are_harmless(
    name: str, headers: dict[str, str] | None
) -> None:
    msg = FakeMsg(SAMPLES[name], headers)
    outcome, handled, js = consume_one(msg)
    assert outcome is Outcome.ACK and len(handled) == 1 and not js.published
