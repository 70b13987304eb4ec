"""Bus benchmark: our publish/consume path against raw nats-py, in one run.

    python bench/bus.py [--quick] [--json PATH]

Starts one local nats-server (JetStream, file storage, sync_interval: always)
through the supervisor, then measures on the same server and stream config:
raw nats-py publish+ack (sync and pipelined), the same through `cfs.bus`, and
the durable-consumer rate. Prints each figure and the ratios ours/raw.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nats

from report import write_json
from cfs.logs import setup_logging
from cfs.bus import Bus, ConsumerSpec, Delivery, DurableConsumer, ensure_streams
from cfs.ids import new_id
from cfs.supervisor import NatsServer
from cfs_contracts import DecodedEvent, Envelope
from cfs_contracts.events.cluster import NodeDown
from cfs_contracts.streams import CLUSTER

SITE = "bench"
WINDOW = 256


def _events(bus: Bus, n: int) -> Iterator[Envelope]:
    for i in range(n):
        yield bus.event(NodeDown(node_id=f"n{i % 64}", incarnation=i, detected_by="bench"))


async def raw_publish(
    url: str, n: int, payload: bytes, pipelined: bool, dedupe_ids: bool = False
) -> float:
    """Best plain nats-py: pipelined = all in flight, bounded by nats-py's own window.

    `dedupe_ids` adds a Nats-Msg-Id header per message, as the bus always does,
    to show how much of the gap is the server's deduplication work.
    """
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=WINDOW)
    subject = f"cfs.{SITE}.cluster.node.raw.down"
    start = time.perf_counter()
    if pipelined:
        futures = [
            await js.publish_async(
                subject, payload, headers={"Nats-Msg-Id": new_id()} if dedupe_ids else None
            )
            for _ in range(n)
        ]
        await asyncio.gather(*futures)
    else:
        for _ in range(n):
            await js.publish(subject, payload)
    elapsed = time.perf_counter() - start
    await nc.close()
    return n / elapsed


async def bus_publish(url: str, n: int, pipelined: bool) -> float:
    """Through the bus, including building each event (id, clock, envelope)."""
    bus = await Bus.connect(url, site=SITE, node="bench", publish_window=WINDOW)
    start = time.perf_counter()
    if pipelined:
        await bus.publish_many(_events(bus, n), timeout=600)
    else:
        for _ in range(n):
            await bus.publish(next(_events(bus, 1)))
    elapsed = time.perf_counter() - start
    await bus.close()
    return n / elapsed


async def bus_consume(url: str, n: int) -> float:
    bus = await Bus.connect(url, site=SITE, node="bench")
    done = asyncio.Event()
    seen = 0

    async def handle(event: DecodedEvent, delivery: Delivery) -> None:
        nonlocal seen
        seen += 1
        if seen >= n:
            done.set()

    consumer = DurableConsumer(
        bus,
        ConsumerSpec(
            stream="CLUSTER",
            durable="bench",
            filter_subject=f"cfs.{SITE}.cluster.node.*.down",
            batch=256,
        ),
        handle,
    )
    start = time.perf_counter()
    task = asyncio.create_task(consumer.run())
    await asyncio.wait_for(done.wait(), timeout=600)
    elapsed = time.perf_counter() - start
    consumer.stop()
    await task
    await bus.close()
    return n / elapsed


async def measure(url: str, n: int, rounds: int) -> dict[str, float]:
    setup = await Bus.connect(url, site=SITE, node="bench")
    await ensure_streams(setup.js, [CLUSTER], site=SITE, replicas=1)
    payload = next(_events(setup, 1)).model_dump_json().encode()
    await setup.close()
    # Warm up both paths, then alternate raw and bus in rounds so that machine
    # noise hits both alike; report medians of the rates and of per-round ratios.
    await raw_publish(url, min(n, 500), payload, True)
    await bus_publish(url, min(n, 500), True)
    published = 2 * min(n, 500)
    figures: dict[str, list[float]] = {}
    for _ in range(rounds):
        for mode, pipelined, count in (("sync", False, n // 8), ("pipe", True, n)):
            raw = await raw_publish(url, count, payload, pipelined)
            ours = await bus_publish(url, count, pipelined)
            published += 2 * count
            figures.setdefault(f"raw_{mode}", []).append(raw)
            figures.setdefault(f"bus_{mode}", []).append(ours)
            figures.setdefault(f"ratio_{mode}", []).append(ours / raw)
        raw_ids = await raw_publish(url, n, payload, True, dedupe_ids=True)
        published += n
        figures.setdefault("raw_pipe_ids", []).append(raw_ids)
    consume = await bus_consume(url, published)
    med = {key: statistics.median(values) for key, values in figures.items()}
    return {
        "raw_pub_sync_per_s": med["raw_sync"],
        "bus_pub_sync_per_s": med["bus_sync"],
        "ratio_pub_sync": med["ratio_sync"],
        "raw_pub_per_s": med["raw_pipe"],
        "bus_pub_per_s": med["bus_pipe"],
        "ratio_pub": med["ratio_pipe"],
        "raw_pub_with_msg_id_per_s": med["raw_pipe_ids"],
        "bus_consume_per_s": consume,
        "events_per_round": float(n),
        "rounds": float(rounds),
        "payload_bytes": float(len(payload)),
    }


def main() -> None:
    # The runs kill nodes and servers on purpose; only errors are worth a line each.
    setup_logging(os.environ.get("CFS_LOG_LEVEL", "ERROR"), service="bench")
    parser = argparse.ArgumentParser(description="bus throughput vs raw nats-py")
    parser.add_argument("--quick", action="store_true", help="fewer events (smoke run)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    n, rounds = (2_000, 2) if args.quick else (10_000, 5)
    with tempfile.TemporaryDirectory(prefix="cfs-bench-bus-") as tmp:
        server = NatsServer.standalone(Path(tmp))
        server.start()
        try:
            results = asyncio.run(measure(server.url, n, rounds))
        finally:
            server.stop()
    results["cpu_count"] = float(os.cpu_count() or 0)
    for key, value in results.items():
        print(f"{key:24s} {value:12.2f}")
    goal = "met" if results["ratio_pub"] >= 0.8 else "NOT met"
    print(f"goal ratio_pub >= 0.8 (pipelined, median of per-round ratios): {goal}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
