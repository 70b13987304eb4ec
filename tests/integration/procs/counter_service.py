"""A toy site-singleton service on the kernel, for hand-over tests with kill -9.

python -m tests.integration.procs.counter_service --node NAME   (CFS_* settings)

While it holds `service.counter`, it counts: item n is published to
`cfs.<site>.cluster.counter` with the dedupe id `item-<n>`, then the cursor
`counter.cursor` (nodes bucket) moves from n to n+1 by compare-and-set. A holder
killed between the two leaves the cursor at n; the next holder publishes item n
again, which the stream drops as a duplicate: every item exactly once, in order.
When the file named by `CFS_FAIL_FILE` appears, the holder removes it and its work
raises (a bug in singleton work).
"""

from __future__ import annotations

import asyncio
import json
import os

import nats.js.errors

from cfs.kernel.runtime import Context
from cfs.kernel.spec import Grants, ServiceSpec, Singleton
from cfs.service_main import ServiceSettings, run_spec

CURSOR = "counter.cursor"


class CounterSettings(ServiceSettings):
    step_s: float = 0.05


async def count(ctx: Context) -> None:
    kv = await ctx.bus.key_value("nodes")
    fail_file = os.environ.get("CFS_FAIL_FILE", "/nonexistent")
    while True:
        try:
            entry = await kv.get(CURSOR)
            n, revision = json.loads(entry.value or b"{}")["next"], entry.revision
        except nats.js.errors.KeyNotFoundError:
            n, revision = 1, 0
        if os.path.exists(fail_file):  # noqa: ASYNC240 - a test's trigger, checked per step
            os.unlink(fail_file)
            raise RuntimeError(f"injected failure at item {n}")
        body = json.dumps({"n": n, "by": ctx.node}).encode()
        await ctx.bus.js.publish(
            f"cfs.{ctx.site}.cluster.counter", body, headers={"Nats-Msg-Id": f"item-{n}"}
        )
        value = json.dumps({"next": n + 1, "by": ctx.node}).encode()
        if revision:
            await kv.update(CURSOR, value, last=revision)
        else:
            await kv.create(CURSOR, value)
        await asyncio.sleep(ctx.settings.step_s)


SPEC = ServiceSpec(
    name="counter",
    role="counter",
    package="tests.integration.procs.counter_service",
    description="a toy singleton that counts",
    settings=lambda: CounterSettings,
    grants=Grants(publish=("{s}.cluster.counter",), write_keys={"nodes": ("counter.*",)}),
    singleton=Singleton(count, lease_s=2.0, renew_s=0.4),
)

if __name__ == "__main__":
    run_spec(SPEC)
