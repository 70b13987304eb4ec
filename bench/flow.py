"""The message flow of a create with no file-system work in it (bench/metadata, bench/mount).

In plain nats-py, in processes laid out as the real ones: requests from the bench
process to a writer process, which group-commits them into an R3 fsync'd stream
with an expected last sequence and then replies to each; two follower processes
tail the stream. No parsing, no checks, no records: the most any Python
implementation of this design can reach on this machine, in rate (many in flight)
and in latency (one at a time). The writer also answers a plain echo: a lookup's
least cost (one request and reply to the writer, nothing stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import textwrap
import time
from pathlib import Path

import nats
import nats.js.errors
from nats.js.api import StorageType, StreamConfig

from cfs.security import connect_options
from cfs.supervisor import ManagedProcess
from cpu_accounting import cpu_us_per_op, role_cpu_seconds

BYTES = 200  # per op: request, journal record and reply, each
STREAM = "FLOW"
SUBJECT = "cfs.bench.flow"  # under cfs.>: a site's admin key may use it

_CONNECT = """
    import asyncio, sys, nats
    from pathlib import Path
    from cfs.security import connect_options
    async def connect():
        creds = Path(sys.argv[3]) if sys.argv[3] else None
        nc = await nats.connect(sys.argv[1].split(","), **connect_options(creds))
        return nc, nc.jetstream()
"""
WRITER = textwrap.dedent(
    _CONNECT
    + """
    async def main():
        nc, js = await connect()
        record = b"j" * int(sys.argv[2])
        reply = b"r" * int(sys.argv[2])
        queue, wake = [], asyncio.Event()
        async def on_request(msg):
            queue.append(msg)
            wake.set()
        async def on_echo(msg):
            await nc.publish(msg.reply, reply)
        await nc.subscribe(f"{sys.argv[4]}.rpc", queue="writer", cb=on_request)
        await nc.subscribe(f"{sys.argv[4]}.echo", cb=on_echo)
        last = (await js.stream_info(sys.argv[5])).state.last_seq
        print("READY", flush=True)
        while True:
            await wake.wait()
            wake.clear()
            batch = queue[:512]
            del queue[:512]
            if queue:
                wake.set()
            ack = await js.publish(
                f"{sys.argv[4]}.journal", record * len(batch),
                headers={"Nats-Expected-Last-Sequence": str(last)},
            )
            last = ack.seq
            for msg in batch:
                await nc.publish(msg.reply, reply)
    asyncio.run(main())
    """
)
FOLLOWER = textwrap.dedent(
    _CONNECT
    + """
    async def main():
        nc, js = await connect()
        sub = await js.subscribe(
            f"{sys.argv[4]}.journal", stream=sys.argv[5], ordered_consumer=True
        )
        print("READY", flush=True)
        while True:
            await sub.next_msg(timeout=None)
    asyncio.run(main())
    """
)


async def measure(
    urls: list[str],
    nats_pids: list[int | None],
    log_dir: Path,
    *,
    n: int = 0,
    concurrency: int = 64,
    one_at_a_time: int = 0,
    credentials: Path | None = None,
) -> dict[str, float]:
    """`n` requests `concurrency` at a time (`flow_ceiling_creates_per_s` and the CPU
    per op by role), then `one_at_a_time` requests and as many echoes in sequence
    (`flow_p50_ms_1`, `echo_p50_ms`)."""
    args = [",".join(urls), str(BYTES), str(credentials or ""), SUBJECT, STREAM]
    procs = [
        ManagedProcess(
            name, [sys.executable, "-c", script, *args], log_path=log_dir / f"{name}.log"
        )
        for name, script in (
            ("flow-writer", WRITER),
            ("flow-follower-1", FOLLOWER),
            ("flow-follower-2", FOLLOWER),
        )
    ]
    out: dict[str, float] = {}
    nc = await nats.connect(urls, **connect_options(credentials))
    js = nc.jetstream()
    try:
        await js.add_stream(
            StreamConfig(
                name=STREAM,
                subjects=[f"{SUBJECT}.journal"],
                num_replicas=3,
                storage=StorageType.FILE,
            )
        )
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_until(lambda p=proc: "READY" in p.log_tail(5), 30, proc.name)
        request = b"q" * BYTES
        if n:
            roles: dict[str, list[int | None]] = {
                "writer": [procs[0].pid],
                "followers": [proc.pid for proc in procs[1:]],
                "nats": nats_pids,
                "client": [None],
            }
            queue = iter(range(n))

            async def worker() -> None:
                for _ in queue:
                    await nc.request(f"{SUBJECT}.rpc", request, timeout=30)

            cpu_before = role_cpu_seconds(roles)
            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
            cpu_after = role_cpu_seconds(roles)
            out["flow_ceiling_creates_per_s"] = n / elapsed
            out.update(cpu_us_per_op(cpu_before, cpu_after, n, "flow_cpu_us"))
        if one_at_a_time:
            out["flow_p50_ms_1"] = await _p50_ms(nc, f"{SUBJECT}.rpc", request, one_at_a_time)
            out["echo_p50_ms"] = await _p50_ms(nc, f"{SUBJECT}.echo", request, one_at_a_time)
        return out
    finally:
        for proc in procs:
            proc.stop()
        with contextlib.suppress(nats.js.errors.NotFoundError):  # add_stream failed
            await js.delete_stream(STREAM)
        await nc.close()


async def _p50_ms(nc: nats.NATS, subject: str, data: bytes, n: int) -> float:
    samples = []
    for _ in range(n):
        began = time.perf_counter()
        await nc.request(subject, data, timeout=30)
        samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)
