"""Consumer benchmark: our DurableConsumer against FastStream and raw nats-py, in one run.

    python bench/consumer.py [--quick] [--json PATH] [--batch N]

Starts one local nats-server (JetStream, file storage) through the supervisor,
provisions the CLUSTER stream from its spec, publishes N real `NodeAlive`
events through the bus, then drains all N from a fresh durable pull consumer
(explicit acks, same ConsumerConfig, same batch size) with:

- ours: `cfs.bus.DurableConsumer` (decode through the registry, a consumer
  span per message, settle, one flush per batch to confirm the acks);
- faststream: a FastStream `NatsBroker` JetStream pull subscriber
  (`PullSub(batch_size=B)`, `AckPolicy.NACK_ON_ERROR`), the registry decode
  as its (async) decoder, access log and FastDepends off: its best case (a
  sync decoder or a `NoCast` parameter costs a worker-thread hop per message);
- raw: a nats-py `fetch` loop that decodes and acks each message (the ceiling).

Each variant runs `ROUNDS` times, the order rotating per round; the medians of
messages/s and of this process's CPU per message (time.process_time) are
printed and written with `--json`. nats-server's own CPU is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
from faststream.middlewares import AckPolicy as FsAckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.message import NatsMessage
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from report import write_json
from cfs.bus import Bus, ConsumerSpec, Delivery, DurableConsumer, ensure_streams
from cfs.logs import setup_logging
from cfs.supervisor import NatsServer
from cfs_contracts import REGISTRY, DecodedEvent, Envelope
from cfs_contracts.events.cluster import NodeAlive
from cfs_contracts.streams import CLUSTER

SITE = "bench"
STREAM = CLUSTER.name
FILTER = f"cfs.{SITE}.cluster.node.*.alive"
ROUNDS = 3
VARIANTS = ("ours", "faststream", "raw")

# What FastStream 0.7 offers for our consumer contract, read from its source
# (faststream/middlewares/acknowledgement, faststream/nats/{message,parser}.py,
# faststream/nats/subscriber/usecases/stream_pull_subscriber.py).
FASTSTREAM_NOTES = {
    "ack_policy": "ACK_FIRST, ACK, REJECT_ON_ERROR (default: term), NACK_ON_ERROR "
    "(nak without delay), MANUAL; raising NackMessage(delay=s) naks with a delay",
    "max_deliver": "not read: no policy looks at num_delivered, so the last delivery "
    "is nak'd like any other and the server then drops it",
    "dead_letter": "none for NATS (only RabbitMQ queue arguments); publishing the "
    "original bytes with a reason header is ours to write as a middleware",
    "unknown_types": "no notion of event types or a skip counter; a decoder error "
    "goes through the ack policy (term or nak)",
    "trace_context": "opt-in NatsTelemetryMiddleware extracts W3C traceparent from "
    "the headers per message (batch mode: links only)",
    "ack_confirmation": "acks are fire-and-forget publishes; no flush per batch",
    "concurrency": "per-message mode starts one task per fetched message "
    "(anyio task group); batch mode settles the whole batch at once",
}


def _events(bus: Bus, n: int) -> Iterator[Envelope]:
    for i in range(n):
        yield bus.event(NodeAlive(node_id=f"n{i % 64}", incarnation=i))


def _consumer_config(durable: str, batch: int) -> ConsumerConfig:
    """What `DurableConsumer.ensure` creates, for the other two variants."""
    spec = ConsumerSpec(stream=STREAM, durable=durable, filter_subject=FILTER, batch=batch)
    return ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=spec.ack_wait_s,
        max_deliver=spec.max_deliver,
        filter_subject=FILTER,
        max_ack_pending=max(1000, batch * 4),
    )


class Counter:
    """Counts handled messages; `done` is set at the n-th."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = 0
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.seen += 1
        if self.seen >= self.n:
            self.done.set()


async def _timed(start: Callable[[], Awaitable[None]], counter: Counter) -> tuple[float, float]:
    """Wall and CPU seconds from starting consumption until the n-th message is handled."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    await start()
    await asyncio.wait_for(counter.done.wait(), timeout=600)
    return time.perf_counter() - t0, time.process_time() - cpu0


async def run_ours(url: str, n: int, durable: str, batch: int) -> tuple[float, float]:
    bus = await Bus.connect(url, site=SITE, node="bench")
    counter = Counter(n)

    async def handle(event: DecodedEvent, delivery: Delivery) -> None:
        counter.hit()

    spec = ConsumerSpec(stream=STREAM, durable=durable, filter_subject=FILTER, batch=batch)
    consumer = DurableConsumer(bus, spec, handle)
    task: asyncio.Task[None] | None = None

    async def start() -> None:
        nonlocal task
        task = asyncio.create_task(consumer.run())

    try:
        return await _timed(start, counter)
    finally:
        consumer.stop()
        if task is not None:
            await task
        await bus.close()


async def run_faststream(url: str, n: int, durable: str, batch: int) -> tuple[float, float]:
    counter = Counter(n)
    # Best case: no access log, no FastDepends (a sync custom field such as
    # NoCast would run in a worker thread per message).
    broker = NatsBroker(url, logger=None, apply_types=False)

    # Async on purpose: FastStream runs a sync decoder in a worker thread per message.
    async def decode(msg: NatsMessage) -> DecodedEvent:
        return REGISTRY.decode(msg.body)

    @broker.subscriber(
        FILTER,
        stream=JStream(STREAM, declare=False),
        durable=durable,
        config=_consumer_config(durable, batch),
        pull_sub=PullSub(batch_size=batch, timeout=1.0),
        ack_policy=FsAckPolicy.NACK_ON_ERROR,
        decoder=decode,
    )
    async def handle(event: DecodedEvent) -> None:
        counter.hit()

    await broker.connect()
    try:
        return await _timed(broker.start, counter)
    finally:
        await broker.stop()


async def run_raw(url: str, n: int, durable: str, batch: int) -> tuple[float, float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    counter = Counter(n)
    task: asyncio.Task[None] | None = None

    async def loop() -> None:
        await js.add_consumer(STREAM, _consumer_config(durable, batch))
        sub = await js.pull_subscribe_bind(durable, stream=STREAM)
        while not counter.done.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                REGISTRY.decode(msg.data)
                await msg.ack()
                counter.hit()

    async def start() -> None:
        nonlocal task
        task = asyncio.create_task(loop())

    try:
        return await _timed(start, counter)
    finally:
        if task is not None:
            await task
        await nc.close()


RUNNERS: dict[str, Callable[[str, int, str, int], Awaitable[tuple[float, float]]]] = {
    "ours": run_ours,
    "faststream": run_faststream,
    "raw": run_raw,
}


async def _settled(js: Any, durable: str, n: int) -> bool:
    """True once the server has every one of the n deliveries acknowledged."""
    for _ in range(50):
        info = await js.consumer_info(STREAM, durable)
        if info.ack_floor.stream_seq >= n and info.num_ack_pending == 0:
            return True
        await asyncio.sleep(0.1)
    return False


async def measure(url: str, n: int, batch: int) -> dict[str, Any]:
    setup = await Bus.connect(url, site=SITE, node="bench", publish_window=256)
    await ensure_streams(setup.js, [CLUSTER], site=SITE, replicas=1)
    await setup.publish_many(_events(setup, n), timeout=600)
    payload = len(next(_events(setup, 1)).model_dump_json())
    # Warm up every path (imports, validators, page cache) on a short run.
    for name, runner in RUNNERS.items():
        await runner(url, min(n, 1000), f"warm-{name}", batch)
        await setup.js.delete_consumer(STREAM, f"warm-{name}")
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_us: dict[str, list[float]] = {v: [] for v in VARIANTS}
    unsettled: list[str] = []
    for r in range(ROUNDS):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for name in order:
            durable = f"{name}-{r}"
            wall, cpu = await RUNNERS[name](url, n, durable, batch)
            rates[name].append(n / wall)
            cpu_us[name].append(cpu / n * 1e6)
            if not await _settled(setup.js, durable, n):
                unsettled.append(durable)
            await setup.js.delete_consumer(STREAM, durable)
    await setup.close()
    results: dict[str, Any] = {"events": n, "batch": batch, "rounds": ROUNDS}
    results["payload_bytes"] = payload
    for name in VARIANTS:
        rate = statistics.median(rates[name])
        us = statistics.median(cpu_us[name])
        results[f"{name}_msgs_per_s"] = rate
        results[f"{name}_cpu_us_per_msg"] = us
        results[f"{name}_cpu_s_per_1k"] = us / 1000
        results[f"{name}_msgs_per_s_rounds"] = rates[name]
        results[f"{name}_cpu_us_per_msg_rounds"] = cpu_us[name]
    results["unsettled_durables"] = unsettled
    results["faststream_notes"] = FASTSTREAM_NOTES
    return results


def main() -> None:
    setup_logging(os.environ.get("CFS_LOG_LEVEL", "ERROR"), service="bench")
    parser = argparse.ArgumentParser(description="durable consumer: ours vs FastStream vs raw")
    parser.add_argument("--quick", action="store_true", help="fewer events (smoke run)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--batch", type=int, default=ConsumerSpec.batch, help="messages per fetch (all three)"
    )
    args = parser.parse_args()
    n = 5_000 if args.quick else 20_000
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cfs-bench-consumer-") as tmp:
        server = NatsServer.standalone(Path(tmp))
        server.start()
        try:
            results = asyncio.run(measure(server.url, n, args.batch))
        finally:
            server.stop()
    results["cpu_count"] = os.cpu_count() or 0
    # Wall rates depend on what else runs; CPU per message much less so.
    results["loadavg_1m"] = [load_before, os.getloadavg()[0]]
    print(
        f"{n} events, batch {args.batch}, median of {ROUNDS} rounds, load average "
        f"{results['loadavg_1m'][0]:.1f} -> {results['loadavg_1m'][1]:.1f}"
    )
    print(f"{'variant':12s} {'msgs/s':>10s} {'CPU us/msg':>11s} {'CPU s/1k':>9s}")
    for name in VARIANTS:
        print(
            f"{name:12s} {results[f'{name}_msgs_per_s']:10.0f} "
            f"{results[f'{name}_cpu_us_per_msg']:11.1f} {results[f'{name}_cpu_s_per_1k']:9.4f}"
        )
    ours, fs, raw = (results[f"{v}_msgs_per_s"] for v in VARIANTS)
    ours_us, fs_us, raw_us = (results[f"{v}_cpu_us_per_msg"] for v in VARIANTS)
    unsettled = results["unsettled_durables"]
    print(
        f"ours {ours / raw:.2f}x raw rate, faststream {fs / raw:.2f}x raw; "
        f"CPU per message ours {ours_us / raw_us:.2f}x raw, faststream {fs_us / raw_us:.2f}x "
        f"raw; all acked: {'yes' if not unsettled else 'NO: ' + ', '.join(unsettled)}"
    )
    write_json(args.json, results)


if __name__ == "__main__":
    main()
