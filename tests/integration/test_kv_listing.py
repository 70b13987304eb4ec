"""Listing a KV bucket on a real cluster (`cfs.bus.kv`).

nats-py's watcher marks the end of a bucket's initial values when its consumer info
says nothing is pending and nothing has arrived, which also holds while every value
is still on its way. Read so, 13 blob records listed 2,000 times on this cluster came
back empty 13 times: `s3-snapshot` recorded a tier of no blobs, and the failover copy
could have called itself complete with every blob still to copy.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import pytest

from cfs.bus.kv import bucket_keys, live_entries
from cfs.client.nodes import NodeView
from cfs.supervisor import LocalSite
from cfs_contracts.streams import NODES
from cfs_contracts.tier import TIER_CONFIG_KEY, TierConfig, TierMode


def test_a_listing_never_comes_back_short(tmp_path: Path) -> None:
    async def go() -> collections.Counter[int]:
        site = LocalSite(tmp_path / "site", nodes=3, site="kv", services=())
        async with site, await site.client() as bus:
            kv = await bus.js.create_key_value(bucket="listing", replicas=3, history=1)
            for i in range(13):
                await kv.put(f"blob.b{i:02d}", f"value {i}".encode())
            await kv.put("blob.gone", b"x")
            await kv.delete("blob.gone")  # its marker is the key's last message
            await kv.put("other.key", b"not listed")
            first = await live_entries(kv, "blob.*")
            assert sorted((k, v) for k, v, _ in first) == [
                (f"blob.b{i:02d}", f"value {i}".encode()) for i in range(13)
            ]
            assert all(revision > 0 for _, _, revision in first)
            counts: collections.Counter[int] = collections.Counter()
            for _ in range(1000):
                counts[len(await live_entries(kv, "blob.*"))] += 1
            return counts

    assert asyncio.run(go()) == {13: 1000}


def test_a_node_view_is_ready_only_with_every_record(tmp_path: Path) -> None:
    """The same race in the `nodes` bucket's view every client and service keeps: a
    view declared ready while empty told a writer there was no data tier (its write
    went unqueued) and an operator that a node did not exist."""

    async def go() -> int:
        site = LocalSite(tmp_path / "site", nodes=3, site="kv", services=())
        async with site, await site.client() as bus:
            kv = await bus.key_value(NODES.bucket)
            config = TierConfig(mode=TierMode.CACHE, url="s3://bucket/prefix")
            await kv.put(TIER_CONFIG_KEY, config.model_dump_json().encode())
            empty = 0
            for _ in range(1500):
                view = NodeView(bus)
                await view.start(timeout=10.0)
                empty += view.tier_config is None
                await view.stop()
            return empty

    assert asyncio.run(go()) == 0


@pytest.mark.slow  # 100,500 keys stored: about half a minute
def test_bucket_keys_pages_past_the_servers_hundred_thousand(tmp_path: Path) -> None:
    """The server answers a subject listing 100,000 at a time: one unpaged call saw
    no more (a GC sweep of a larger tier index never reached the rest)."""

    async def go() -> list[str]:
        site = LocalSite(tmp_path / "site", nodes=1, site="kv", services=())
        async with site, await site.client() as bus:
            await bus.js.create_key_value(bucket="big", replicas=1, history=1)
            for i in range(100_500):
                await bus.nc.publish(f"$KV.big.k.{i}", b"x")  # a KV put, unacknowledged
                if i % 5000 == 0:
                    await bus.nc.flush()
            await bus.nc.flush()
            while (await bus.js.stream_info("KV_big")).state.messages < 100_500:
                await asyncio.sleep(0.5)
            return await bucket_keys(bus, "big", "k.")

    assert asyncio.run(go()) == sorted(f"k.{i}" for i in range(100_500))
