"""Repair on a real 6-node site: remove a dead node, drain a live one, kill the coordinator.

Lifecycle changes are made the way `cfs admin node-remove|node-drain` make them:
an `admin.<node>` record in the nodes KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cfs.bus import Bus
from cfs.client import ChunkStoreClient, FileStore, MetadataClient
from cfs.lease import Lease
from cfs.lifecycle import set_lifecycle
from cfs.supervisor import LocalSite
from cfs_contracts.data import ListRequest, fragment_key
from cfs_contracts.envelope import Envelope
from cfs_contracts.events.data import FragmentDamaged
from cfs_contracts.fs.records import DEFAULT_CHUNK_SIZE, ROOT_INO, Inode
from cfs_contracts.members import Lifecycle, NodeAdmin, admin_key
from cfs_contracts.streams import DATA, NODES, TIER_INDEX
from cfs_contracts.tier import ChunkLocation, FlashCopy, chunk_location_key

CS = DEFAULT_CHUNK_SIZE
SIZES = [1, CS - 1, CS + 1, 2 * CS + 99, 5000, 3 * CS]


# Repair and what it works with; a backup service would only add processes to start.
SERVICES = ("metadata-raft", "chunk-store", "membership", "repair")


def _site(base: Path, **env: str) -> LocalSite:
    env = {"CFS_REPAIR_GRACE_S": "3600", **env}
    return LocalSite(base, nodes=6, servers=1, site="t", env=env, services=SERVICES)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[LocalSite]:
    async with _site(tmp_path / "site") as running:
        yield running


@contextlib.asynccontextmanager
async def _client(
    site: LocalSite, name: str
) -> AsyncIterator[tuple[Bus, MetadataClient, FileStore]]:
    """An admin connection with its metadata client and a started FileStore."""
    bus = await site.client()
    meta = MetadataClient(bus)
    files = FileStore(bus, meta, client_id=name)
    await files.start()
    try:
        yield bus, meta, files
    finally:
        await files.close()
        await bus.close()


async def _write_files(site: LocalSite) -> dict[int, str]:
    async with _client(site, "writer") as (_, meta, files):
        digests = {}
        for seed, size in enumerate(SIZES):
            data = random.Random(seed).randbytes(size)
            inode = await meta.create(ROOT_INO, f"f{seed}")
            await files.write_all(inode.ino, data)
            digests[inode.ino] = hashlib.sha256(data).hexdigest()
        return digests


async def _set_lifecycle(bus: Bus, node: str, lifecycle: Lifecycle) -> None:
    await set_lifecycle(bus, node, lifecycle, requested_by="test")


async def _wait_event(bus: Bus, subject: str, timeout: float) -> dict[str, object]:
    sub = await bus.js.subscribe(subject, ordered_consumer=True)
    try:
        msg = await sub.next_msg(timeout=timeout)
        return dict(Envelope.model_validate_json(msg.data).payload)
    finally:
        await sub.unsubscribe()


async def _inodes(meta: MetadataClient, inos: list[int]) -> list[Inode]:
    return [await meta.getattr(ino) for ino in inos]


async def _check_redundancy(bus: Bus, inodes: list[Inode], gone: str) -> None:
    """Every chunk: k+m fragments, none on `gone`, each present and verified on its node."""
    chunks = ChunkStoreClient(bus)
    for inode in inodes:
        for chunk in inode.chunks:
            assert gone not in chunk.fragments, (inode.ino, chunk.fragments)
            assert len(chunk.fragments) == 6
            for index, node in enumerate(chunk.fragments):
                await chunks.verify(node, fragment_key(chunk.chunk_id, chunk.scheme, index))


async def _read_back(site: LocalSite, digests: dict[int, str]) -> None:
    async with _client(site, "reader") as (_, _, files):
        for ino, digest in digests.items():
            assert hashlib.sha256(await files.read_all(ino)).hexdigest() == digest


@pytest.mark.expected_logs("member.down", "retry.waiting", "lease.watch_failed", "nats.error")
async def test_removing_a_dead_node_restores_full_redundancy(site: LocalSite) -> None:
    digests = await _write_files(site)
    site.kill9("storage-3")
    async with await site.client() as bus:
        done = asyncio.create_task(_wait_event(bus, "cfs.t.cluster.repair.storage-3.completed", 90))
        await _set_lifecycle(bus, "storage-3", Lifecycle.REMOVED)
        completed = await done
        assert completed["chunks_lost"] == 0
        assert int(str(completed["fragments_rebuilt"])) >= len(SIZES)
        inodes = await _inodes(MetadataClient(bus), list(digests))
        await _check_redundancy(bus, inodes, "storage-3")
    await _read_back(site, digests)


# retry.waiting: repair's metadata requests while the killed nodes' leases move.
@pytest.mark.expected_logs("member.down", "retry.waiting")
async def test_an_evicted_chunk_is_neither_lost_nor_damage_for_repair(site: LocalSite) -> None:
    """Tiered mode's contract with repair: a chunk marked EVICTED in the tier index has
    no fragment on flash on purpose (S3 holds it; a read recalls it). A damage report
    for one of its fragments is no error, and removing a node its chunk map names
    completes with nothing lost, while the other files are re-protected as usual."""
    async with _client(site, "writer") as (bus, meta, files):
        cold = await meta.create(ROOT_INO, "cold")
        await files.write_all(cold.ino, random.Random(3).randbytes(CS))
        kept = await meta.create(ROOT_INO, "kept")
        await files.write_all(kept.ino, random.Random(4).randbytes(CS))
        chunk = (await meta.getattr(cold.ino)).chunks[0]
        index = await bus.key_value(TIER_INDEX.bucket)
        where = ChunkLocation(blob_id="b", offset=0, length=CS, sha256=chunk.chunk_id,
                              flash=FlashCopy.EVICTED)  # fmt: skip
        await index.put(chunk_location_key(chunk.chunk_id), where.model_dump_json().encode())
        chunks = ChunkStoreClient(bus)
        keys = [fragment_key(chunk.chunk_id, chunk.scheme, i) for i in range(6)]
        for node, key in zip(chunk.fragments, keys, strict=True):
            await chunks.delete(node, key)  # what the eviction does after the mark
        victim = chunk.fragments[0]
        site.kill9(victim)
        done = asyncio.create_task(_wait_event(bus, f"cfs.t.cluster.repair.{victim}.completed", 90))
        await _set_lifecycle(bus, victim, Lifecycle.REMOVED)
        completed = await done
        assert completed["chunks_lost"] == 0, completed
        await _check_redundancy(bus, await _inodes(meta, [kept.ino]), victim)
        holder = chunk.fragments[1]
        report = FragmentDamaged(node_id=holder, key=keys[1], reason="missing",
                                 reported_by=f"{holder}/scrub", ino=cold.ino)  # fmt: skip
        await bus.publish(bus.event(report))
        # Handled by the repair leader (an error log would fail the test at teardown).
        deadline = time.monotonic() + 30
        while (info := await bus.js.consumer_info(DATA.name, "repair-damaged")).num_pending or (
            info.num_ack_pending
        ):
            assert time.monotonic() < deadline, info
            await asyncio.sleep(0.2)


@pytest.mark.expected_logs("member.down", "repair.chunk_lost", "retry.waiting")
async def test_a_chunk_with_too_few_fragments_left_is_reported_lost_by_path(
    site: LocalSite,
) -> None:
    """Two fragments deleted behind the file system's back, a third node removed: fewer
    than k=4 survive, so the chunk is named lost (inode and path); the others are rebuilt."""
    async with _client(site, "writer") as (bus, meta, files):
        folder = await meta.mkdir(ROOT_INO, "precious")
        doomed = await meta.create(folder.ino, "ledger.db")
        await files.write_all(doomed.ino, random.Random(1).randbytes(CS))
        kept = await meta.create(ROOT_INO, "kept")
        await files.write_all(kept.ino, random.Random(2).randbytes(CS))
        chunk = (await meta.getattr(doomed.ino)).chunks[0]
        victim = chunk.fragments[0]
        chunks = ChunkStoreClient(bus)
        for index in (1, 2):
            key = fragment_key(chunk.chunk_id, chunk.scheme, index)
            await chunks.delete(chunk.fragments[index], key)
        site.kill9(victim)
        lost = asyncio.create_task(_wait_event(bus, f"cfs.t.cluster.repair.{victim}.lost", 90))
        done = asyncio.create_task(_wait_event(bus, f"cfs.t.cluster.repair.{victim}.completed", 90))
        await _set_lifecycle(bus, victim, Lifecycle.REMOVED)
        report, completed = await lost, await done
        assert (report["ino"], report["path"]) == (doomed.ino, "/precious/ledger.db")
        assert (report["chunk_id"], report["available"], report["needed"]) == (
            chunk.chunk_id,
            3,
            4,
        )
        assert completed["chunks_lost"] == 1
        await _check_redundancy(bus, await _inodes(meta, [kept.ino]), victim)


async def test_draining_a_live_node_moves_every_fragment_and_lease_off_it(
    site: LocalSite,
) -> None:
    digests = await _write_files(site)
    async with await site.client() as bus:
        lease = await Lease.read_status(bus, "meta.001")
        assert lease is not None and lease.holder
        victim = lease.holder  # the shard writer: its lease must move too
        drained = asyncio.create_task(_wait_event(bus, f"cfs.t.cluster.node.{victim}.drained", 90))
        await _set_lifecycle(bus, victim, Lifecycle.DRAINING)
        event = await drained
        assert int(str(event["fragments_moved"])) >= len(SIZES)
        assert event["leases_moved"] == 1
        after = await Lease.read_status(bus, "meta.001")
        assert after is not None and after.holder not in ("", victim)
        meta = MetadataClient(bus)
        inodes = await _inodes(meta, list(digests))
        await _check_redundancy(bus, inodes, victim)
        left = await ChunkStoreClient(bus).list(victim, ListRequest())
        assert left.fragments == (), "the drained node keeps no fragment"
        kv = await bus.key_value(NODES.bucket)
        admin = NodeAdmin.model_validate_json((await kv.get(admin_key(victim))).value or b"")
        assert admin.lifecycle is Lifecycle.DRAINED
    site.stop_node(victim)
    await _read_back(site, digests)


@pytest.mark.expected_logs("member.down")
async def test_a_coordinator_killed_mid_repair_is_resumed_without_double_rebuilds(
    tmp_path: Path,
) -> None:
    async with _site(tmp_path / "site", CFS_REPAIR_MB_S="1.5") as site:
        digests = await _write_files(site)
        site.kill9("storage-5")
        async with await site.client() as bus:
            progress = asyncio.create_task(
                _wait_event(bus, "cfs.t.cluster.repair.storage-5.progress", 60)
            )
            await _set_lifecycle(bus, "storage-5", Lifecycle.REMOVED)
            await progress
            status = await Lease.read_status(bus, "service.repair")
            assert status is not None and status.holder
            first = status.holder
            site.repair(first).kill9()
            deadline = time.monotonic() + 30
            while len(started := await _started_events(bus, "storage-5")) < 2:
                assert time.monotonic() < deadline, "no coordinator took over"
                await asyncio.sleep(0.2)
            assert started[1]["resumed"] is True, started
            await _wait_event(bus, "cfs.t.cluster.repair.storage-5.completed", 120)
            inodes = await _inodes(MetadataClient(bus), list(digests))
            await _check_redundancy(bus, inodes, "storage-5")
            # Each re-created fragment was written to exactly one new place.
            stored = await _stored_after(bus, "storage-5", inodes)
            assert all(len(nodes) == 1 for nodes in stored.values()), stored
            site.start_node(first)
        await _read_back(site, digests)


async def _started_events(bus: Bus, node: str) -> list[dict[str, object]]:
    found = []
    sub = await bus.js.subscribe(f"cfs.t.cluster.repair.{node}.started", ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)  # the wait of an empty stream
            except TimeoutError:
                return found
            found.append(dict(Envelope.model_validate_json(msg.data).payload))
            if msg.metadata.num_pending == 0:  # the last event there is
                return found
    finally:
        await sub.unsubscribe()


async def _stored_after(bus: Bus, gone: str, inodes: list[Inode]) -> dict[str, set[str]]:
    """For fragments that were on `gone`: every other node a FragmentStored event names."""
    moved = {
        fragment_key(c.chunk_id, c.scheme, i)
        for inode in inodes
        for c in inode.chunks
        for i, _ in enumerate(c.fragments)
    }
    seen: dict[str, set[str]] = {}
    sub = await bus.js.subscribe("cfs.t.data.*.stored", ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)  # the wait of an empty stream
            except TimeoutError:
                break
            payload = Envelope.model_validate_json(msg.data).payload
            if payload["key"] in moved:
                seen.setdefault(str(payload["key"]), set()).add(str(payload["node_id"]))
            if msg.metadata.num_pending == 0:  # the last event there is
                break
    finally:
        await sub.unsubscribe()
    return {key: nodes - {gone} for key, nodes in seen.items() if gone in nodes}
