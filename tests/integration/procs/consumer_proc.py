"""A consumer process for restart tests: records `seq event_id` per handled event.

python -m tests.integration.procs.consumer_proc URL DURABLE OUTFILE DELAY_S
"""

from __future__ import annotations

import asyncio
import os
import sys

from cfs.bus import Bus, ConsumerSpec, Delivery, DurableConsumer
from cfs_contracts import DecodedEvent


async def main(url: str, durable: str, outfile: str, delay: float) -> None:
    bus = await Bus.connect(url, site="t", node="consumer")
    out = open(outfile, "a", buffering=1)  # noqa: SIM115 - closed at exit

    async def handle(event: DecodedEvent, delivery: Delivery) -> None:
        out.write(f"{delivery.stream_seq} {event.envelope.id}\n")
        os.fsync(out.fileno())
        await asyncio.sleep(delay)

    consumer = DurableConsumer(
        bus, ConsumerSpec(stream="CLUSTER", durable=durable, ack_wait_s=2.0, batch=8), handle
    )
    await consumer.run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
