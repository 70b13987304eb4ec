"""The node view after its bucket was re-seeded shorter (quorum loss, guide scenario 3).

The view watches the nodes KV. After the re-seed the bucket is the survivor's copy,
whose last sequence is below what the view had seen: a watch resumed where it was
would deliver nothing until new records outnumbered the lost ones (a minute of a
frozen view in CI, and no shard writer elected meanwhile). It starts over instead.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from cfs.bus import Bus, ensure_buckets
from cfs.client.nodes import NodeView
from cfs.recovery.streams import export_streams, import_streams
from cfs.supervisor import NatsServer
from cfs_contracts.members import NodeAdmin
from cfs_contracts.streams import NODES, SITE_BUCKETS

SITE = "t"


async def _put(bus: Bus, node: str, reason: str) -> None:
    kv = await bus.key_value(NODES.bucket)
    record = NodeAdmin(node=node, since_ms=int(time.time() * 1000), reason=reason)
    await kv.put(f"admin.{node}", record.model_dump_json().encode())


async def _until(check: object, timeout: float) -> float:
    started = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - started < timeout, f"not within {timeout}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_the_view_is_rebuilt_from_a_bucket_reseeded_shorter(tmp_path: Path) -> None:
    server = NatsServer.standalone(tmp_path / "nats")
    server.start()
    view: NodeView | None = None
    buses: list[Bus] = []
    try:
        buses = [await Bus.connect(server.url, site=SITE, node=n) for n in ("a", "viewer")]
        bus, viewer = buses
        await ensure_buckets(bus.js, SITE_BUCKETS, replicas=1)
        for node in ("a", "b", "c"):
            await _put(bus, node, "before")
        await export_streams([server.url], [f"KV_{NODES.bucket}"], tmp_path / "export")
        view = NodeView(viewer)
        await view.start()
        for i in range(30):  # acknowledged by a quorum that is lost below
            await _put(bus, "lost", f"update {i}")
        await _until(lambda: "lost" in view.admin, 10)

        server.stop()  # the re-seed: the survivor's copy of the bucket, and a restart
        server.store_dir.rename(tmp_path / "store.lost")
        server.start()
        await import_streams([server.url], SITE, 1, tmp_path / "export")
        await _put(bus, "d", "after the re-seed")
        took = await _until(lambda: "d" in view.admin, 15)
        assert sorted(view.admin) == ["a", "b", "c", "d"]  # "lost" went with the quorum
        print(f"\nview current {took:.2f}s after the re-seed's first record")
    finally:
        if view is not None:
            await view.stop()
        for b in buses:
            await b.close()
        server.stop()
