"""Bad events through a real durable consumer (issue 19, "bad input everywhere").

Hypothesis batches of malformed, truncated, wrong-typed, unknown and wrong-version
events (mutations of every golden sample), published into a real JetStream stream
between good ones: the consumer hands the handler only what decodes, dead-letters
every undecodable message with its original bytes and a reason, skips unknown types,
and goes on to the next message.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfs.bus import Bus, ConsumerSpec, Delivery, DurableConsumer, ensure_streams
from cfs.supervisor import NatsServer
from cfs_contracts import DecodedEvent, UnknownEventType
from cfs_contracts.events.cluster import NodeDown
from cfs_contracts.streams import DLQ, site_streams
from tests.unit.test_decode_fuzz import NAMES, SAMPLES, decode_outcome, json_values, paths, replaced

SITE = "t"


@st.composite
def bad_event(draw: st.DrawFn) -> bytes:
    tree = json.loads(SAMPLES[draw(st.sampled_from(NAMES))])
    kind = draw(st.sampled_from(["replace", "truncate", "bytes", "version", "type"]))
    if kind == "replace":
        where = draw(st.sampled_from(paths(tree)))
        return json.dumps(replaced(tree, where, draw(json_values))).encode()
    raw = json.dumps(tree).encode()
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "bytes":
        return draw(st.binary(max_size=100))
    if kind == "version":
        tree["v"] = draw(st.sampled_from([0, -1, 99, 2**40, "2", None, 1.5]))
    else:
        tree["type"] = draw(st.sampled_from(["", "FromTheFuture", 7, None, "NodeDown "]))
    return json.dumps(tree).encode()


async def run_batch(url: str, batch: list[bytes], durable: str) -> None:
    """One batch on a subject of its own (the stream keeps earlier examples' messages)."""
    subject = f"cfs.{SITE}.cluster.node.{durable}.down"
    async with await Bus.connect(url, site=SITE, node="n1") as bus:
        await ensure_streams(bus.js, site_streams(1), site=SITE, replicas=1)
        dlq_before = (await bus.js.stream_info(DLQ.name)).state.messages
        first = (await bus.js.stream_info("CLUSTER")).state.last_seq + 1
        for raw in batch:
            await bus.js.publish(subject, raw)
        sentinel = bus.event(NodeDown(node_id=durable, incarnation=0, detected_by="test"))
        await bus.publish(sentinel)
        handled: list[DecodedEvent] = []

        async def handle(event: DecodedEvent, delivery: Delivery) -> None:
            handled.append(event)

        spec = ConsumerSpec(stream="CLUSTER", durable=durable, filter_subject=subject)
        consumer = DurableConsumer(bus, spec, handle)
        task = asyncio.create_task(consumer.run())
        deadline = time.monotonic() + 15
        while not any(e.envelope.id == sentinel.id for e in handled):
            assert time.monotonic() < deadline, "the consumer stopped before the sentinel"
            assert not task.done(), task
            await asyncio.sleep(0.02)
        consumer.stop()
        await task

        outcomes: list[Any] = [decode_outcome(raw, strict=True) for raw in batch]
        bad = [
            (seq, raw)
            for seq, (raw, outcome) in enumerate(zip(batch, outcomes, strict=True), first)
            if not isinstance(outcome, DecodedEvent | UnknownEventType)
        ]
        good = [o for o in outcomes if isinstance(o, DecodedEvent)]
        unknown = [o for o in outcomes if isinstance(o, UnknownEventType)]
        assert len(handled) == len(good) + 1  # nothing undecodable was applied
        assert consumer.stats.dead_lettered == len(bad)
        assert consumer.stats.skipped_unknown == len(unknown)
        info = await bus.js.stream_info(DLQ.name)
        assert info.state.messages == dlq_before + len(bad)
        for offset, (seq, raw) in enumerate(bad):
            kept = await bus.js.get_msg(
                DLQ.name, seq=info.state.last_seq - len(bad) + 1 + offset, direct=True
            )
            headers = kept.headers or {}
            assert (kept.data or b"") == raw  # nats-py reads an empty body as None
            assert headers["Cfs-Dlq-Seq"] == str(seq)
            assert headers["Cfs-Dlq-Reason"].startswith("undecodable: ")


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(bad_event(), min_size=5, max_size=25))
def test_bad_events_are_dead_lettered_and_never_applied(
    nats_server: NatsServer, batch: list[bytes]
) -> None:
    asyncio.run(run_batch(nats_server.url, batch, f"fuzz-{time.time_ns()}"))


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(bad_event(), min_size=5, max_size=60))
def test_many_bad_event_batches(nats_server: NatsServer, batch: list[bytes]) -> None:
    asyncio.run(run_batch(nats_server.url, batch, f"fuzz-{time.time_ns()}"))
