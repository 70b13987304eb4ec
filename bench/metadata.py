"""Metadata benchmark on a local 3-server site (R3, fsync'd), three metadata-raft processes.

    python bench/metadata.py [--quick] [--json PATH]

Figures: creates/s and stats/s with many concurrent clients, p50/p99 create
latency at low load, writer-process failover and NATS-server failover seconds
(median of several kill -9), and, in the same run, the raw rate of fsync'd R3
JetStream publishes of one event each, pipelined, for the ratio.

Telemetry: the create run again, telemetry off and on in alternating rounds (metrics
endpoints scraped every second, spans exported to a receiver in this process, each
create a traced root span): `telemetry_overhead_ratio` = creates/s on / off.

Where the create rate comes from, measured in the same run: the CPU each
process spends per create (writer, followers, NATS servers, client), and the
rate and one-at-a-time latency of the same message flow with no file-system work
in it (bench/flow.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfs.client import MetadataClient
from cfs.ids import new_id
from cfs.logs import setup_logging
from cfs.supervisor import NatsCluster
import flow
from cpu_accounting import cpu_us_per_op, role_cpu_seconds
from report import print_goals, write_json
from telemetry_mode import alternate, span_or_nothing
from tests.integration.metadata_harness import MetaSite

SITE = "t"


async def raw_r3_publish_rate(urls: list[str], n: int) -> float:
    """Plain nats-py publish_async of one ~300 B event per message into the R3 CLUSTER stream."""
    nc = await nats.connect(urls)
    js = nc.jetstream(publish_async_max_pending=256)
    payload = b"x" * 300
    start = time.perf_counter()
    futures = [
        await js.publish_async(
            f"cfs.{SITE}.cluster.node.raw.down", payload, headers={"Nats-Msg-Id": new_id()}
        )
        for _ in range(n)
    ]
    await asyncio.gather(*futures)
    rate = n / (time.perf_counter() - start)
    await nc.close()
    return rate


async def create_rate(
    client: MetadataClient, n: int, concurrency: int, roles: dict[str, list[int | None]]
) -> dict[str, float]:
    """Creates/s, and the CPU each role spent per create (µs) while they ran."""
    parents = [await client.mkdir(1, f"bench-{new_id()}") for _ in range(concurrency)]
    per = n // concurrency

    async def worker(parent: int) -> None:
        for i in range(per):
            await client.create(parent, f"f{i}")

    cpu_before = role_cpu_seconds(roles)
    start = time.perf_counter()
    await asyncio.gather(*(worker(p.ino) for p in parents))
    elapsed = time.perf_counter() - start
    cpu_after = role_cpu_seconds(roles)
    done = per * concurrency
    per_role = cpu_us_per_op(cpu_before, cpu_after, done, "create_cpu_us")
    total = sum(per_role.values())
    out = {"creates_per_s": done / elapsed, **per_role, "create_cpu_us_total": total}
    # What this machine's cores could do at that cost per create, were they never idle.
    out["creates_per_s_cpu_bound"] = len(os.sched_getaffinity(0)) * 1e6 / total
    return out


def site_roles(site: MetaSite, writer: str) -> dict[str, list[int | None]]:
    """Processes by role: the shard writer, its followers, the NATS servers, this client."""
    return {
        "writer": [site.nodes[writer].pid],
        "followers": [proc.pid for name, proc in site.nodes.items() if name != writer],
        "nats": [server.pid for server in site.cluster.servers],
        "client": [None],
    }


async def stat_rate(client: MetadataClient, n: int, concurrency: int) -> float:
    target = await client.create(1, f"stat-{new_id()}")
    per = n // concurrency

    async def worker() -> None:
        for _ in range(per):
            await client.getattr(target.ino)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return per * concurrency / (time.perf_counter() - start)


async def create_latency(client: MetadataClient, n: int) -> tuple[float, float]:
    parent = await client.mkdir(1, f"lat-{new_id()}")
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await client.create(parent.ino, f"f{i}")
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


async def failover_time(site: MetaSite, client: MetadataClient, kill) -> float:
    """Seconds from kill -9 to the next acknowledged create, with creates running."""
    parent = await client.mkdir(1, f"fo-{new_id()}")
    stop = asyncio.Event()
    done: list[tuple[float, float]] = []  # (sent, acknowledged)

    async def writer() -> None:
        i = 0
        while not stop.is_set():
            sent = time.monotonic()
            await client.create(parent.ino, f"f{i}")
            done.append((sent, time.monotonic()))
            i += 1

    task = asyncio.create_task(writer())
    await asyncio.sleep(1.0)
    killed_at, restore = await kill()
    while not any(sent > killed_at for sent, _ in done[-3:]):
        await asyncio.sleep(0.02)
    stop.set()
    await task
    # The first create issued after the kill: its wait is the outage a client sees.
    resumed = min(acked for sent, acked in done if sent > killed_at) - killed_at
    await restore()
    return resumed


async def traced_create_rate(
    client: MetadataClient, n: int, concurrency: int, tracer: Any | None
) -> float:
    """Creates/s as in `create_rate`; with a tracer each create is a root span (as the
    mount's `fuse create`), so its context reaches the writer and its commit."""
    parents = [await client.mkdir(1, f"tel-{new_id()}") for _ in range(concurrency)]
    per = n // concurrency

    async def worker(parent: int) -> None:
        for i in range(per):
            with span_or_nothing(tracer, "create"):
                await client.create(parent, f"f{i}")

    start = time.perf_counter()
    await asyncio.gather(*(worker(p.ino) for p in parents))
    return per * concurrency / (time.perf_counter() - start)


async def telemetry_overhead(
    site: MetaSite, client: MetadataClient, n: int, rounds: int
) -> dict[str, float]:
    """The create run with telemetry off and on, alternating (bench/telemetry_mode.py)."""
    procs = {(node, "metadata-raft"): proc for node, proc in site.nodes.items()}
    ports = site.local.metrics_ports()

    async def ready() -> None:
        await site.wait_ready(60)
        await traced_create_rate(client, 640, 64, None)  # warm: the writer just got elected

    async def measure_one(tracer: Any | None) -> float:
        return await traced_create_rate(client, n, 64, tracer)

    nats = [server.pid for server in site.cluster.servers]
    return await alternate(rounds, procs, ports, ready, measure_one, nats)


async def measure(site: MetaSite, quick: bool) -> dict[str, float]:
    n = 3_000 if quick else 20_000
    kills = 2 if quick else 5
    results: dict[str, float] = {}
    results["raw_r3_pub_per_s"] = await raw_r3_publish_rate(site.cluster.urls, n)
    nats_pids: list[int | None] = [server.pid for server in site.cluster.servers]
    results.update(
        await flow.measure(
            site.cluster.urls,
            nats_pids,
            site.base,
            n=n,
            concurrency=64,
            one_at_a_time=300 if quick else 1000,
        )
    )
    bus, client = await site.client(deadline_s=60)
    try:
        roles = site_roles(site, await site.writer())
        results.update(await create_rate(client, n, concurrency=64, roles=roles))
        results["stats_per_s"] = await stat_rate(client, n, concurrency=64)
        p50, p99 = await create_latency(client, 300 if quick else 1000)
        results["create_p50_ms"], results["create_p99_ms"] = p50, p99

        async def kill_writer():
            victim = await site.writer()
            site.nodes[victim].kill9()
            killed_at = time.monotonic()

            async def restore() -> None:
                site.nodes[victim].start()
                await asyncio.sleep(3.0)

            return killed_at, restore

        async def kill_stream_leader():
            leader = (await bus.js.stream_info("META_001")).cluster.leader
            site.cluster.server(leader).kill9()
            killed_at = time.monotonic()

            async def restore() -> None:
                site.cluster.server(leader).restart()
                await asyncio.to_thread(site.cluster.wait_healthy)
                await asyncio.sleep(2.0)

            return killed_at, restore

        writer_times = [await failover_time(site, client, kill_writer) for _ in range(kills)]
        nats_times = [await failover_time(site, client, kill_stream_leader) for _ in range(kills)]
        results["writer_failover_s"] = statistics.median(writer_times)
        results["nats_failover_s"] = statistics.median(nats_times)
        results["writer_failover_max_s"] = max(writer_times)
        results["nats_failover_max_s"] = max(nats_times)
        results.update(await telemetry_overhead(site, client, n, rounds=7 if quick else 9))
    finally:
        await bus.close()
    results["ratio_creates_to_raw_pub"] = results["creates_per_s"] / results["raw_r3_pub_per_s"]
    results["ratio_creates_to_flow_ceiling"] = (
        results["creates_per_s"] / results["flow_ceiling_creates_per_s"]
    )
    return results


async def run(quick: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="cfs-bench-meta-") as tmp:
        cluster = NatsCluster(3, Path(tmp) / "nats")
        cluster.start()
        site = MetaSite(Path(tmp) / "meta", cluster)
        try:
            await site.provision()
            site.start_all()
            await site.wait_ready()
            return await measure(site, quick)
        finally:
            site.stop_all()
            cluster.stop()


def main() -> None:
    # The runs kill nodes and servers on purpose; only errors are worth a line each.
    setup_logging(os.environ.get("CFS_LOG_LEVEL", "ERROR"), service="bench")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = asyncio.run(run(args.quick))
    for key, value in results.items():
        print(f"{key:28s} {value:12.3f}")
    goals = {
        "creates_per_s >= 10000": results["creates_per_s"] >= 10_000,
        "create_p50_ms <= 5": results["create_p50_ms"] <= 5,
        "writer_failover_s <= 1": results["writer_failover_s"] <= 1,
        "nats_failover_s <= 10": results["nats_failover_s"] <= 10,
        "telemetry_overhead_ratio >= 0.95": results["telemetry_overhead_ratio"] >= 0.95,
    }
    print_goals(goals)
    flow_us = sum(v for k, v in results.items() if k.startswith("flow_cpu_us_"))
    print(
        f"the message flow alone allows {results['flow_ceiling_creates_per_s']:.0f} creates/s "
        f"here ({flow_us:.0f} µs of CPU per create); with the file-system work "
        f"({results['create_cpu_us_total'] - flow_us:.0f} µs more) the cores allow "
        f"{results['creates_per_s_cpu_bound']:.0f}"
    )
    write_json(args.json, results)


if __name__ == "__main__":
    main()
