"""The bus against real nats-server processes (no mocks of NATS)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cfs.bus import (
    Bus,
    BusUnavailable,
    ConsumerSpec,
    Delivery,
    DurableConsumer,
    NoResponders,
    PayloadTooLarge,
    Reject,
    RequestTimeout,
    SequenceConflict,
    ensure_buckets,
    ensure_streams,
)
from cfs.bus.provision import Change
from cfs.supervisor import NatsCluster, NatsServer
from cfs.supervisor.linkproxy import LinkProxy
from cfs.tls import ca_path, ensure_server_cert
from cfs_contracts import DecodedEvent, EventPayload, SchemaVersionError, UnknownEventType
from cfs_contracts.events.cluster import NodeDown, NodeJoinedV1, NodeLeft
from cfs_contracts.events.metadata import LeaderFenced
from cfs_contracts.streams import CLUSTER, DLQ, SITE_BUCKETS, meta_stream, site_streams

SITE = "t"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_server.url, site=SITE, node="n1")
    await ensure_streams(b.js, site_streams(1), site=SITE, replicas=1)
    yield b
    await b.close()


def down(i: int = 0) -> NodeDown:
    return NodeDown(node_id=f"n{i}", incarnation=i, detected_by="test")


async def stream_ids(b: Bus, stream: str) -> list[str]:
    """Every Nats-Msg-Id in a stream, in order (direct get by sequence)."""
    info = await b.js.stream_info(stream)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await b.js.get_msg(stream, seq=seq, direct=True)
        ids.append((msg.headers or {})["Nats-Msg-Id"])
    return ids


async def test_publish_retried_with_the_same_id_is_stored_once(bus: Bus) -> None:
    event = bus.event(down())
    first = await bus.publish(event)
    again = await bus.publish(event)
    batch = await bus.publish_many([event, event])
    assert not first.duplicate
    assert again.duplicate and again.seq == first.seq
    assert all(a.duplicate and a.seq == first.seq for a in batch)
    assert await stream_ids(bus, "CLUSTER") == [event.id]


async def test_retry_with_expected_sequence_after_a_lost_ack_is_a_duplicate(bus: Bus) -> None:
    # The server checks the expected sequence before the dedupe id; the bus must
    # still recognise its own earlier append instead of reporting a conflict.
    event = bus.event(LeaderFenced(shard="001", term=1, leader="n1"))
    first = await bus.publish(event, expected_last_seq=0)
    lookups: list[Msg] = []  # no service role may ask for stream names: not needed

    async def looked_up(msg: Msg) -> None:
        lookups.append(msg)

    sub = await bus.nc.subscribe("$JS.API.STREAM.NAMES", cb=looked_up)
    retry = await bus.publish(event, expected_last_seq=0)
    await sub.unsubscribe()
    assert (retry.seq, retry.duplicate) == (first.seq, True)
    assert not lookups


async def test_racing_writers_exactly_one_wins(nats_server: NatsServer, bus: Bus) -> None:
    other = await Bus.connect(nats_server.url, site=SITE, node="n2")
    try:
        for round_ in range(20):
            last = (await bus.js.stream_info("META_001")).state.last_seq
            results = await asyncio.gather(
                bus.publish(
                    bus.event(LeaderFenced(shard="001", term=1, leader="n1")),
                    expected_last_seq=last,
                ),
                other.publish(
                    other.event(LeaderFenced(shard="001", term=1, leader="n2")),
                    expected_last_seq=last,
                ),
                return_exceptions=True,
            )
            wins = [r for r in results if not isinstance(r, BaseException)]
            losses = [r for r in results if isinstance(r, BaseException)]
            assert len(wins) == 1, f"round {round_}: {results}"
            assert len(losses) == 1 and isinstance(losses[0], SequenceConflict)
            assert wins[0].seq == last + 1
            assert "META_001" in str(losses[0]) and f"expected last sequence {last}" in str(
                losses[0]
            )
    finally:
        await other.close()


async def test_durable_consumer_resumes_after_kill9_without_loss_or_reapply(
    nats_server: NatsServer, bus: Bus, tmp_path: Path
) -> None:
    published = await bus.publish_many([bus.event(down(i)) for i in range(300)])
    out = tmp_path / "applied.txt"
    argv = [
        sys.executable,
        "-m",
        "tests.integration.procs.consumer_proc",
        nats_server.url,
        "resume",
        str(out),
        "0.005",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env)
    try:
        await _wait_for(lambda: _lines(out) >= 100, 30, "first consumer to make progress")
        proc.kill()  # kill -9 in the middle of the stream
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    info = await bus.js.consumer_info("CLUSTER", "resume")
    acked_floor = info.ack_floor.stream_seq
    first_run = _applied(out)
    assert acked_floor >= 50, "the consumer acked as it went"
    published += await bus.publish_many([bus.event(down(i)) for i in range(300, 400)])
    out2 = tmp_path / "applied2.txt"
    argv[5] = str(out2)
    argv[6] = "0"
    proc = subprocess.Popen(argv, cwd=ROOT, env=env)
    try:
        await _wait_for(lambda: _lines(out2) >= 400 - acked_floor, 60, "second consumer")
        await asyncio.sleep(0.5)  # would any extra redelivery show up?
    finally:
        proc.kill()
        proc.wait(10)
    second_run = _applied(out2)
    all_seqs = {a.seq for a in published}
    assert set(first_run) | set(second_run) == all_seqs, "no event lost"
    reapplied = set(second_run) & {s for s in first_run if s <= acked_floor}
    assert not reapplied, f"acknowledged events applied again: {sorted(reapplied)}"
    assert len(second_run) == len(set(second_run))


async def test_consumer_graceful_restart_applies_each_event_once(bus: Bus) -> None:
    await bus.publish_many([bus.event(down(i)) for i in range(60)])
    seen: list[int] = []

    async def handle(event: DecodedEvent, delivery: Delivery) -> None:
        seen.append(delivery.stream_seq)

    spec = ConsumerSpec(stream="CLUSTER", durable="graceful", batch=16)
    for expected in (60, 120):
        consumer = DurableConsumer(bus, spec, handle)
        task = asyncio.create_task(consumer.run())
        await _wait_for(lambda n=expected: len(seen) >= n, 20, "consumer")
        consumer.stop()
        await task
        await bus.publish_many([bus.event(down(i)) for i in range(60)])
    assert seen == list(range(1, 121)), "in order, none lost, none applied twice"


async def test_kill9_of_the_r3_stream_leader_loses_no_acknowledged_event(
    nats_cluster3: NatsCluster,
) -> None:
    bus = await Bus.connect(nats_cluster3.urls, site=SITE, node="w", publish_timeout=30)
    try:
        await ensure_streams(bus.js, [CLUSTER], site=SITE, replicas=3)
        acked: list[str] = []
        stop = asyncio.Event()
        ack_times: list[float] = []

        async def writer() -> None:
            i = 0
            while not stop.is_set():
                event = bus.event(down(i))
                await bus.publish(event)
                acked.append(event.id)
                ack_times.append(time.monotonic())
                i += 1

        task = asyncio.create_task(writer())
        await _wait_for(lambda: len(acked) >= 200, 30, "writer warm-up")
        leader = (await bus.js.stream_info("CLUSTER")).cluster.leader
        before = len(acked)
        killed_at = time.monotonic()
        nats_cluster3.server(leader).kill9()
        await _wait_for(lambda: len(acked) >= before + 200, 60, "writes to resume")
        resumed = next(t for t in ack_times[before:] if t > killed_at)
        stop.set()
        await task
        new_leader = (await bus.js.stream_info("CLUSTER")).cluster.leader
        assert new_leader != leader
        stored = await stream_ids(bus, "CLUSTER")
        missing = set(acked) - set(stored)
        assert not missing, f"{len(missing)} acknowledged events lost"
        assert len(stored) == len(set(stored)), "retries must not duplicate"
        print(
            f"\nR3 leader kill -9: first ack after {resumed - killed_at:.2f}s, "
            f"{len(acked)} events acked, none lost"
        )
        nats_cluster3.server(leader).restart()
        nats_cluster3.wait_healthy()
    finally:
        await bus.close()


@pytest.fixture
def tls_cluster3(tmp_path: Path) -> Iterator[tuple[NatsCluster, Path]]:
    """Three routed servers with TLS on every link, as `cfs dev` runs them; and the CA."""
    credentials = tmp_path / "credentials"
    cluster = NatsCluster(
        3, tmp_path / "tls-cluster", tls=lambda name: ensure_server_cert(credentials, SITE, name)
    )
    try:
        cluster.start()
        yield cluster, ca_path(credentials)
    finally:
        cluster.stop()


async def test_a_client_leaves_a_server_that_stopped_answering(
    tls_cluster3: tuple[NatsCluster, Path],
) -> None:
    """A frozen server (or one partitioned away) keeps the TCP connection open: only
    unanswered pings tell the client to go to another server, and its requests go on.
    Over TLS, where closing a connection waits for the peer's close_notify."""
    cluster, ca = tls_cluster3
    bus = await Bus.connect(cluster.urls, site=SITE, node="c", tls_ca=ca, ping_interval_s=0.5)
    assert bus.nc.connected_url is not None
    frozen = next(s for s in cluster.servers if s.port == bus.nc.connected_url.port)
    others = [s.url for s in cluster.servers if s is not frozen]
    responder = await Bus.connect(others, site=SITE, node="r", tls_ca=ca)

    async def echo(msg: object) -> bytes:
        return b"pong"

    sub = await responder.serve(f"cfs.{SITE}.rpc.echo", echo)
    await responder.nc.flush()
    frozen.pause()
    try:
        started = time.monotonic()
        while True:
            try:
                reply = await bus.request(f"cfs.{SITE}.rpc.echo", b"", timeout=0.5)
                break
            except (RequestTimeout, BusUnavailable, NoResponders):
                assert time.monotonic() - started < 15, "still on the frozen server"
        took = time.monotonic() - started
        assert reply.data == b"pong"
        assert bus.nc.connected_url.port != frozen.port
        # 2-3 ping intervals of 0.5 s go unanswered, then a reconnect (0.25 s back-off).
        assert took < 5, f"answered only after {took:.1f}s"
    finally:
        frozen.resume()
        await sub.unsubscribe()
        await responder.close()
        await bus.close()


async def test_malformed_message_is_dead_lettered_and_consumer_keeps_going(bus: Bus) -> None:
    subject = f"cfs.{SITE}.cluster.node.x.down"
    await bus.js.publish(subject, b"{not json", headers={"Nats-Msg-Id": "garbage-1"})
    unknown = bus.event(down(1)).model_copy(update={"type": "FromTheFuture"})
    await bus.js.publish(subject, unknown.model_dump_json().encode())
    poison = bus.event(down(2))
    await bus.publish(poison)
    good = bus.event(down(3))
    await bus.publish(good)
    handled: list[str] = []

    async def handle(event: DecodedEvent, delivery: Delivery) -> None:
        if event.envelope.id == poison.id:
            raise Reject("node n2 is not in this cluster")
        handled.append(event.envelope.id)

    consumer = DurableConsumer(bus, ConsumerSpec(stream="CLUSTER", durable="dlq-test"), handle)
    task = asyncio.create_task(consumer.run())
    await _wait_for(lambda: handled == [good.id], 20, "good event handled")
    consumer.stop()
    await task
    assert consumer.stats.dead_lettered == 2
    assert consumer.stats.skipped_unknown == 1
    info = await bus.js.stream_info(DLQ.name)
    assert info.state.messages == 2
    garbage = await bus.js.get_msg(DLQ.name, seq=info.state.first_seq, direct=True)
    assert garbage.data == b"{not json"
    headers = garbage.headers or {}
    assert headers["Cfs-Dlq-Reason"].startswith("undecodable: not JSON")
    assert headers["Cfs-Dlq-Stream"] == "CLUSTER" and headers["Cfs-Dlq-Seq"] == "1"
    rejected = await bus.js.get_msg(DLQ.name, seq=info.state.last_seq, direct=True)
    assert (rejected.headers or {})["Cfs-Dlq-Reason"] == "rejected: node n2 is not in this cluster"


async def test_handler_failure_is_retried_then_dead_lettered(bus: Bus) -> None:
    event = bus.event(down(7))
    await bus.publish(event)
    attempts: list[int] = []

    async def handle(ev: DecodedEvent, delivery: Delivery) -> None:
        attempts.append(delivery.num_delivered)
        raise RuntimeError("disk on fire")

    spec = ConsumerSpec(stream="CLUSTER", durable="flaky", max_deliver=3, retry_delay_s=0.05)
    consumer = DurableConsumer(bus, spec, handle)
    task = asyncio.create_task(consumer.run())
    await _wait_for(lambda: consumer.stats.dead_lettered == 1, 20, "dead letter")
    consumer.stop()
    await task
    assert attempts == [1, 2, 3]
    msg = await bus.js.get_last_msg(DLQ.name, f"cfs.{SITE}.dlq.cluster.flaky")
    assert (
        "gave up after 3 deliveries: RuntimeError: disk on fire"
        in (msg.headers or {})["Cfs-Dlq-Reason"]
    )


class NotRegistered(EventPayload):
    x: int = 1


async def test_bad_input_gets_one_clear_error(bus: Bus) -> None:
    cases: list[tuple[type[Exception], str, object]] = []

    def expect(exc_type: type[Exception], text: str, exc: BaseException) -> None:
        assert isinstance(exc, exc_type), repr(exc)
        message = str(exc)
        assert text in message and "\n" not in message and "Traceback" not in message
        assert exc.__cause__ is None

    with pytest.raises(UnknownEventType) as e1:
        bus.event(NotRegistered())
    expect(UnknownEventType, "unknown event type 'NotRegistered'", e1.value)
    with pytest.raises(SchemaVersionError) as e2:
        bus.event(NodeJoinedV1(node_id="n", address="h:1"))
    expect(SchemaVersionError, "writers emit v2", e2.value)
    with pytest.raises(PayloadTooLarge) as e3:
        await bus.publish(bus.event(NodeLeft(node_id="n", reason="x" * 2_000_000)))
    expect(PayloadTooLarge, "limit for events is", e3.value)
    with pytest.raises(BusUnavailable) as e4:
        await Bus.connect("nats://127.0.0.1:1", site=SITE, node="n", connect_timeout=1)
    expect(BusUnavailable, "cannot reach NATS at nats://127.0.0.1:1 within 1s", e4.value)
    with pytest.raises(NoResponders) as e5:
        await bus.request(f"cfs.{SITE}.rpc.nobody", b"")
    expect(NoResponders, f"no service is listening on cfs.{SITE}.rpc.nobody", e5.value)

    async def slow(msg: object) -> bytes:
        await asyncio.sleep(5)
        return b""

    sub = await bus.serve(f"cfs.{SITE}.rpc.slow", slow)
    with pytest.raises(RequestTimeout) as e6:
        await bus.request(f"cfs.{SITE}.rpc.slow", b"", timeout=0.2)
    expect(RequestTimeout, f"no reply on cfs.{SITE}.rpc.slow within 0.2s", e6.value)
    await sub.unsubscribe()
    del cases


async def test_a_flush_that_timed_out_does_not_deafen_the_connection(
    nats_server: NatsServer, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    """CI saw it: a consumer's ack flush timed out while a server stalled, its PONG
    came later, and nats-py's read loop died on the cancelled future."""
    nats_server.pause()  # SIGSTOP: the socket stays open, nothing answers
    try:
        with pytest.raises(nats.errors.FlushTimeoutError):
            await bus.nc.flush(timeout=1)
    finally:
        nats_server.resume()

    # The late PONG arrives; the connection must still hear replies.
    async def echo(msg: object) -> bytes:
        return b"pong"

    sub = await bus.serve(f"cfs.{SITE}.rpc.echo", echo)
    for _ in range(3):
        reply = await bus.request(f"cfs.{SITE}.rpc.echo", b"", timeout=2)
        assert reply.data == b"pong"
    await bus.nc.flush(timeout=2)
    await sub.unsubscribe()
    assert bus.nc.is_connected
    assert "encountered error" not in caplog.text


async def test_trace_context_travels_in_headers(bus: Bus) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    seen: list[int] = []

    async def handle(event: DecodedEvent, delivery: Delivery) -> None:
        seen.append(trace.get_current_span().get_span_context().trace_id)

    with tracer.start_as_current_span("client op") as span:
        await bus.publish(bus.event(down(1)))
        trace_id = span.get_span_context().trace_id
    raw = await bus.js.get_msg("CLUSTER", seq=1, direct=True)
    assert f"{trace_id:032x}" in (raw.headers or {})["traceparent"]
    consumer = DurableConsumer(bus, ConsumerSpec(stream="CLUSTER", durable="traced"), handle)
    # The consumer's spans come from the global provider; install ours for the test.
    previous = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = provider
    try:
        task = asyncio.create_task(consumer.run())
        await _wait_for(lambda: bool(seen), 10, "traced event")
        consumer.stop()
        await task
    finally:
        trace._TRACER_PROVIDER = previous
    assert seen == [trace_id]


async def test_provisioning_is_idempotent_and_updates_drift(bus: Bus) -> None:
    again = await ensure_streams(bus.js, site_streams(1), site=SITE, replicas=1)
    assert {p.change for p in again} == {Change.UNCHANGED}
    created = await ensure_buckets(bus.js, SITE_BUCKETS, replicas=1)
    assert {p.change for p in created} == {Change.CREATED}
    assert {p.change for p in await ensure_buckets(bus.js, SITE_BUCKETS, replicas=1)} == {
        Change.UNCHANGED
    }
    # An operator (or an older release) changed a managed field: it is put back.
    info = await bus.js.stream_info("META_001")
    info.config.max_msg_size = 1234
    await bus.js.update_stream(info.config)
    fixed = await ensure_streams(bus.js, [meta_stream("001")], site=SITE, replicas=1)
    assert fixed[0].change is Change.UPDATED
    assert (await bus.js.stream_info("META_001")).config.max_msg_size == 1024 * 1024
    with pytest.raises(nats.js.errors.APIError):
        await bus.js.purge_stream("META_001")  # journals refuse purges


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _applied(path: Path) -> list[int]:
    return [int(line.split()[0]) for line in path.read_text().splitlines()] if path.exists() else []


async def _wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.expected_logs("nats.disconnected", "nats.error")
async def test_a_request_whose_reply_a_reset_connection_lost_is_sent_again_at_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The responder never answers the first delivery (as if the reply died with the
    connection); the requester's link is reset: the request goes again on the new
    connection and is answered long before its 10 s timeout."""
    port = int(nats_server.url.rsplit(":", 1)[1])
    proxy = LinkProxy("requester-link", tmp_path / "proxy", port)
    proxy.start()
    responder = await Bus.connect(nats_server.url, site=SITE, node="responder")
    requester = await Bus.connect(f"nats://{proxy.url}", site=SITE, node="requester")
    deliveries: list[bytes] = []

    async def answer_the_second(msg: nats.aio.msg.Msg) -> None:
        deliveries.append(msg.data)
        if len(deliveries) > 1:  # the first reply never comes
            await msg.respond(b"pong")

    try:
        await responder.nc.subscribe("cfs.t.test.ping", cb=answer_the_second)
        await responder.nc.flush()
        asked = asyncio.ensure_future(requester.request("cfs.t.test.ping", b"ping", timeout=10))
        while not deliveries:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await asyncio.to_thread(proxy.cut)
        await asyncio.to_thread(proxy.heal)
        reply = await asyncio.wait_for(asked, 10)
        assert reply.data == b"pong" and deliveries == [b"ping", b"ping"]
        assert time.monotonic() - started < 3.0  # the reconnect, not the timeout
        assert requester.link.epoch == 1
    finally:
        await requester.close(drain=False)
        await responder.close(drain=False)
        proxy.stop()
