"""The node view after its bucket was re-seeded shorter (quorum loss, guide scenario 3).

The view watches the nodes KV. After the re-seed the bucket is the survivor's copy,
whose last sequence is below what the view had seen: a watch resumed where it was
would deliver nothing until new records outnumbered the lost ones (a minute of a
frozen view in CI, and no shard writer elected meanwhile). It starts over instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cfs.bus import Bus, ensure_buckets
from cfs.client.nodes import NodeView
from cfs.recovery.streams import export_streams, import_streams
from cfs.supervisor import NatsServer
from cfs_contracts.data import StoreRecord
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


@pytest.fixture
async def buses(nats_server: NatsServer) -> AsyncIterator[tuple[Bus, Bus]]:
    """A writer's and a viewer's connection to a server with the site's buckets."""
    bus = await Bus.connect(nats_server.url, site=SITE, node="a")
    viewer = await Bus.connect(nats_server.url, site=SITE, node="viewer")
    try:
        await ensure_buckets(bus.js, SITE_BUCKETS, replicas=1)
        yield bus, viewer
    finally:
        await viewer.close(drain=False)
        await bus.close(drain=False)


async def test_the_view_is_rebuilt_from_a_bucket_reseeded_shorter(
    nats_server: NatsServer, buses: tuple[Bus, Bus], tmp_path: Path
) -> None:
    server, (bus, viewer) = nats_server, buses
    view: NodeView | None = None
    try:
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


async def _put_store(bus: Bus, node: str, serial: int) -> None:
    kv = await bus.key_value(NODES.bucket)
    record = StoreRecord(
        node=node,
        capacity_bytes=1 << 30,
        free_bytes=1 << 29,
        used_bytes=1 << 29,
        fragments=serial,
        updated_ms=int(time.time() * 1000),
        started_ms=0,
    )
    await kv.put(f"store.{node}", record.model_dump_json().encode())


async def test_a_watch_that_died_silently_is_started_over(buses: tuple[Bus, Bus]) -> None:
    """The watch's consumer is gone and nats-py's own heartbeat check, which would
    re-create it, has ended (as it does when a re-creation fails while the bucket's
    stream has no quorum): the view notices the silence of stores that refresh their
    records and watches again."""
    bus, viewer = buses
    view: NodeView | None = None
    try:
        await _put_store(bus, "a", 1)
        view = NodeView(viewer, stale_after_s=2.0)
        await view.start()
        await _until(lambda: "a" in view.records, 10)
        watcher = view._watcher
        assert watcher is not None and watcher._sub is not None
        jsi = watcher._sub._sub._jsi
        jsi._hbtask.cancel()  # nats-py's check, ended
        consumer = (await watcher._sub.consumer_info()).name
        deleted = await bus.nc.request(  # the consumer, gone with its server's copy
            f"$JS.API.CONSUMER.DELETE.KV_{NODES.bucket}.{consumer}", b""
        )
        assert b'"success":true' in deleted.data, deleted.data
        for serial in range(2, 40):  # the store goes on refreshing its record
            await _put_store(bus, "a", serial)
            if view.records["a"].fragments == serial:
                break
            await asyncio.sleep(0.25)
        assert view.records["a"].fragments > 1, "the view never saw the refreshed record"
    finally:
        if view is not None:
            await view.stop()
