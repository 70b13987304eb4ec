"""One shard's replicas in this process against a real nats-server: fencing, checksums."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cfs.bus import Bus, SequenceConflict, ensure_buckets, ensure_streams
from cfs.client import MetadataClient
from cfs.supervisor import NatsServer
from cfs_contracts.events.metadata import MetaCommitted
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.streams import SITE_BUCKETS, site_streams
from cfs_metadata.projection import Projection
from cfs_metadata.replica import ReplicaSettings, Role, ShardReplica

SITE = "t"
FAST = ReplicaSettings(lease_s=1.0, renew_s=0.2)


@pytest.fixture
async def buses(nats_server: NatsServer) -> AsyncIterator[list[Bus]]:
    opened = [await Bus.connect(nats_server.url, site=SITE, node=n) for n in ("a", "b", "cl")]
    await ensure_streams(opened[0].js, site_streams(1), site=SITE, replicas=1)
    await ensure_buckets(opened[0].js, SITE_BUCKETS, replicas=1)
    yield opened
    for bus in opened:
        await bus.close()


async def _leader(bus: Bus, path: Path) -> ShardReplica:
    replica = ShardReplica(bus, 1, Projection(path, 1), FAST)
    await replica.start()
    return replica


async def test_a_deposed_writer_append_is_rejected_by_the_journal(
    buses: list[Bus], tmp_path: Path
) -> None:
    a_bus, b_bus, client_bus = buses
    a = await _leader(a_bus, tmp_path / "a")
    client = MetadataClient(client_bus, deadline_s=10)
    await client.mkdir(1, "before")
    assert a.role is Role.LEADER
    stale_position = a.projection.applied_seq
    b = ShardReplica(b_bus, 1, Projection(tmp_path / "b", 1), FAST)
    await b.start()
    while b.projection.applied_seq < stale_position:  # a hot follower: caught up
        await asyncio.sleep(0.02)
    term = await b.lease.force_acquire()  # the operator's DANGER path, or a lost lease
    await client.mkdir(1, "after")  # served by whichever writer holds the lease now
    while b.role is not Role.LEADER:
        await asyncio.sleep(0.02)
    assert b.term == term
    # `a` still thinks its position is the journal's end: its append must fail.
    payload = MetaCommitted(shard="001", term=a.term, entries=())
    with pytest.raises(SequenceConflict):
        await a.journal.append(a.bus.event(payload), stale_position, timeout=2)
    assert {e.name async for e in client.readdir(1)} == {"before", "after"}
    for replica in (a, b):
        await replica.stop()
        replica.projection.close()


async def test_a_flipped_byte_in_a_stored_inode_is_caught_on_read(
    buses: list[Bus], tmp_path: Path
) -> None:
    a_bus, _, client_bus = buses
    a = await _leader(a_bus, tmp_path / "a")
    client = MetadataClient(client_bus, deadline_s=10)
    inode = await client.create(1, "victim")
    key = Projection.inode_key(inode.ino)
    raw = bytearray(a.projection.raw_get(key) or b"")
    raw[len(raw) // 2] ^= 0x01
    a.projection.raw_put(key, bytes(raw))
    with pytest.raises(FsError) as caught:
        await client.getattr(inode.ino)
    assert caught.value.errno == errno.EIO
    assert f"Inode {inode.ino} checksum mismatch: expected 0x" in str(caught.value)
    assert ", got 0x" in str(caught.value)
    alert = await client_bus.js.get_last_msg("ALERTS", f"cfs.{SITE}.alerts.corruption")
    event = client_bus.registry.decode(alert.data or b"")
    assert event.envelope.type == "CorruptionDetected"
    assert event.payload.object_id == f"Inode {inode.ino}"  # type: ignore[attr-defined]
    with pytest.raises(FsError) as again:  # writes touching it fail the same way
        await client.setattr(inode.ino, mode=0o600)
    assert again.value.errno == errno.EIO
    await a.stop()
    a.projection.close()
