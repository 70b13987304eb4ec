"""Holds a shard lease in its own process, for kill -9 and SIGSTOP tests.

python -m tests.integration.procs.lease_holder URL KEY NODE LEASE_S RENEW_S

Prints one line per change on stdout: `HOLDING <term> <revision>` when it acquires,
`LOST <term> <reason>` when it steps down.
"""

from __future__ import annotations

import asyncio
import sys

from cfs.bus import Bus
from cfs.lease import Lease
from cfs.logs import setup_logging


async def main(url: str, key: str, node: str, lease_s: float, renew_s: float) -> None:
    setup_logging("INFO", service="lease-holder", node=node)  # JSON lines on stderr
    bus = await Bus.connect(url, site="t", node=node)
    lease: Lease

    async def acquired(term: int) -> None:
        print(f"HOLDING {term} {lease.revision}", flush=True)

    async def lost(term: int, reason: str) -> None:
        print(f"LOST {term} {reason}", flush=True)

    lease = Lease(
        bus, key, node, lease_s=lease_s, renew_s=renew_s, on_acquired=acquired, on_lost=lost
    )
    await lease.run()


if __name__ == "__main__":
    url, key, node, lease_s, renew_s = sys.argv[1:6]
    asyncio.run(main(url, key, node, float(lease_s), float(renew_s)))
