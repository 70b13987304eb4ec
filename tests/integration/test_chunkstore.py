"""chunk-store processes on a LocalSite: the RPC contract, DATA events, damage, scrub,
full disk, crash."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from cfs.bus import Bus
from cfs.erasure import Scheme, encode
from cfs.supervisor import LocalSite
from cfs_chunkstore.store import fragment_path, store_root
from cfs_contracts import REGISTRY, EventPayload
from cfs_contracts.data import (
    HEADER_CRC,
    HEADER_ERRNO,
    HEADER_ERROR,
    HEADER_KEY,
    ListRequest,
    RebuildRequest,
    StoreRecord,
    StoreReply,
    Verb,
    chunk_rpc_subject,
    fragment_key,
    store_record_key,
)
from cfs_contracts.events.data import FragmentDamaged, FragmentDeleted, FragmentStored
from cfs_contracts.streams import DATA, NODES

SITE = "t"
NODE = "a"
CHUNK = "c0" * 32
FAST = {"CFS_HEARTBEAT_S": "0.3"}
# What these tests exercise; membership, repair and backup would only add processes.
SERVICES = ("metadata-raft", "chunk-store")


def key(index: int) -> str:
    return fragment_key(CHUNK, "ec2+1", index)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[LocalSite]:
    """One node (metadata-raft + chunk-store) on one nats-server."""
    local = LocalSite(tmp_path / "site", [NODE], site=SITE, env=FAST, services=SERVICES)
    try:
        await local.start()
        await local.wait_ready()
        yield local
    finally:
        local.stop()


async def call(
    bus: Bus, node: str, verb: Verb, k: str = "", data: bytes = b"", crc: int | None = None
) -> Msg:
    headers = {HEADER_KEY: k} if k else {}
    if crc is not None:
        headers[HEADER_CRC] = f"{crc:08x}"
    return await bus.request(
        chunk_rpc_subject(SITE, node, verb), data, headers=headers, timeout=10.0
    )


async def control(bus: Bus, node: str, verb: Verb, k: str = "", data: bytes = b"") -> StoreReply:
    return StoreReply.model_validate_json((await call(bus, node, verb, k, data)).data)


async def put(bus: Bus, node: str, k: str, data: bytes) -> StoreReply:
    msg = await call(bus, node, "put", k, data, zlib.crc32(data))
    return StoreReply.model_validate_json(msg.data)


async def data_events(bus: Bus) -> list[EventPayload]:
    info = await bus.js.stream_info(DATA.name)
    events = []
    if not info.state.messages:
        return []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await bus.js.get_msg(DATA.name, seq=seq, direct=True)
        events.append(REGISTRY.decode(raw.data or b"").payload)
    return events


async def store_record(bus: Bus, node: str) -> StoreRecord:
    kv = await bus.key_value(NODES.bucket)
    entry = await kv.get(store_record_key(node))
    assert entry.value
    return StoreRecord.model_validate_json(entry.value)


async def test_put_get_list_verify_stat_delete(site: LocalSite) -> None:
    async with await site.client() as bus:
        data = os.urandom(4 * 1024 * 1024)  # a whole default chunk fits one message
        reply = await put(bus, NODE, key(0), data)
        assert reply.errno == 0, reply.message
        assert reply.fragment is not None
        assert (reply.fragment.size, reply.fragment.crc32) == (len(data), zlib.crc32(data))
        assert (await put(bus, NODE, key(1), b"small")).errno == 0

        got = await call(bus, NODE, "get", key(0))
        assert got.data == data
        assert got.headers is not None
        assert got.headers[HEADER_CRC] == f"{zlib.crc32(data):08x}"

        listed = await control(
            bus, NODE, "list", data=ListRequest(limit=1).model_dump_json().encode()
        )
        assert [f.key for f in listed.fragments] == [key(0)]
        assert listed.more
        rest = ListRequest(after=key(0), chunk_id=CHUNK).model_dump_json().encode()
        listed = await control(bus, NODE, "list", data=rest)
        assert [f.key for f in listed.fragments] == [key(1)]
        assert not listed.more

        verified = await control(bus, NODE, "verify", key(0))
        assert verified.errno == 0
        assert verified.fragment == reply.fragment

        status = (await control(bus, NODE, "stat")).status
        assert status is not None
        assert (status.node, status.fragments, status.used_bytes) == (NODE, 2, len(data) + 5)

        # the put's CRC header is checked: nothing is stored from damaged bytes
        bad = await call(bus, NODE, "put", key(2), b"payload", zlib.crc32(b"payload") ^ 1)
        refused = StoreReply.model_validate_json(bad.data)
        assert refused.errno == errno.EIO
        assert "arrived damaged" in refused.message
        missing = await call(bus, NODE, "get", key(2))
        assert missing.headers is not None
        assert missing.headers[HEADER_ERRNO] == str(errno.ENOENT)
        assert "not held by node a" in missing.headers[HEADER_ERROR]
        assert missing.data == b""

        deleted = await control(bus, NODE, "delete", key(1))
        assert deleted.errno == 0
        again = await control(bus, NODE, "delete", key(1))
        assert again.errno == errno.ENOENT
        invalid = await control(bus, NODE, "verify", "not-a-key")
        assert invalid.errno == errno.EINVAL

        events = await data_events(bus)
        assert (
            FragmentStored(node_id=NODE, key=key(0), size=len(data), crc32=zlib.crc32(data))
            in events
        )
        assert FragmentDeleted(node_id=NODE, key=key(1)) in events
        assert not any(getattr(e, "key", "") == key(2) for e in events)
        stored = [e.key for e in events if isinstance(e, FragmentStored)]
        assert stored == [key(0), key(1)]

        # the record follows the store within a heartbeat
        deadline = time.monotonic() + 5
        while (record := await store_record(bus, NODE)).fragments != 1:
            assert time.monotonic() < deadline, record
            await asyncio.sleep(0.1)
        assert record.used_bytes == len(data)
        assert record.free_bytes > 0
        assert record.capacity_bytes >= record.free_bytes
        assert time.time() * 1000 - record.updated_ms < 5000


@pytest.mark.expected_logs("fragment.damaged")
async def test_corrupt_fragment_is_eio_and_reported(site: LocalSite) -> None:
    async with await site.client() as bus:
        data = os.urandom(64 * 1024)
        assert (await put(bus, NODE, key(0), data)).errno == 0
        path = fragment_path(store_root(site.data_dir(NODE)), key(0))
        raw = bytearray(path.read_bytes())
        raw[1000] ^= 0x01
        path.write_bytes(bytes(raw))

        got = await call(bus, NODE, "get", key(0))
        assert got.data == b""
        assert got.headers is not None
        assert got.headers[HEADER_ERRNO] == str(errno.EIO)
        assert "failed its checksum" in got.headers[HEADER_ERROR]
        assert f"0x{zlib.crc32(data):08x}" in got.headers[HEADER_ERROR]

        verified = await control(bus, NODE, "verify", key(0))
        assert verified.errno == errno.EIO

        damaged = [e for e in await data_events(bus) if isinstance(e, FragmentDamaged)]
        assert len(damaged) == 2  # one for the get, one for the verify
        assert {(e.node_id, e.key, e.reason, e.reported_by) for e in damaged} == {
            (NODE, key(0), "corrupt", NODE)
        }
        assert "failed its checksum" in damaged[0].detail


@pytest.mark.expected_logs("fragment.damaged")
async def test_scrub_reports_a_flipped_byte_without_any_read(tmp_path: Path) -> None:
    scrub = {**FAST, "CFS_SCRUB_MB_S": "50", "CFS_SCRUB_PASS_INTERVAL_S": "0.2"}
    local = LocalSite(tmp_path / "site", [NODE], site=SITE, env=scrub, services=SERVICES)
    try:
        await local.start()
        await local.wait_ready()
        async with await local.client() as bus:
            data = os.urandom(256 * 1024)
            assert (await put(bus, NODE, key(0), data)).errno == 0
            assert (await put(bus, NODE, key(1), b"healthy")).errno == 0
            path = fragment_path(store_root(local.data_dir(NODE)), key(0))
            with path.open("r+b") as f:  # in place, as a bad sector would
                f.seek(5000)
                f.write(bytes([data[5000] ^ 0x40]))

            deadline = time.monotonic() + 10
            while not (
                damaged := [e for e in await data_events(bus) if isinstance(e, FragmentDamaged)]
            ):
                assert time.monotonic() < deadline, "scrub did not report the damage"
                await asyncio.sleep(0.1)
            event = damaged[0]
            assert (event.node_id, event.key, event.reason, event.reported_by) == (
                NODE,
                key(0),
                "corrupt",
                f"{NODE}/scrub",
            )
            assert "failed its checksum" in event.detail
            assert {e.key for e in damaged} == {key(0)}  # the healthy one is left alone
        log_lines = local.chunkstore(NODE).log_path.read_text().splitlines()
        passes = [json.loads(line) for line in log_lines if '"scrub.pass_done"' in line]
        assert passes
        assert {"fragments", "bytes", "damaged", "seconds"} <= set(passes[-1])
    finally:
        local.stop()


async def test_full_disk_is_enospc(tmp_path: Path) -> None:
    reserve = {**FAST, "CFS_RESERVE_BYTES": str(10**18)}
    local = LocalSite(tmp_path / "site", [NODE], site=SITE, env=reserve, services=SERVICES)
    try:
        await local.start()
        await local.wait_ready()
        async with await local.client() as bus:
            reply = await put(bus, NODE, key(0), b"no room")
            assert reply.errno == errno.ENOSPC
            assert reply.message.startswith(f"node {NODE} is full: ")
            assert " bytes free" in reply.message
            record = await store_record(bus, NODE)
            assert record.free_bytes == 0
            status = (await control(bus, NODE, "stat")).status
            assert status is not None
            assert status.free_bytes == 0
            assert not [e for e in await data_events(bus) if isinstance(e, FragmentStored)]
    finally:
        local.stop()


async def test_acknowledged_put_survives_kill9(tmp_path: Path) -> None:
    """A three-node site on a 3-server NATS cluster; one chunk-store is killed after a put."""
    labels = {f"storage-{i}": {"rack": f"r{i}"} for i in range(1, 4)}
    local = LocalSite(tmp_path / "site", site=SITE, labels=labels, env=FAST, services=SERVICES)
    assert len(local.nats_servers) == 3
    try:
        await local.start()
        await local.wait_ready()
        async with await local.client() as bus:
            for node in local.node_names:
                record = await store_record(bus, node)
                assert record.labels == labels[node]
            data = os.urandom(1024 * 1024)
            assert (await put(bus, "storage-2", key(0), data)).errno == 0
            before = local.chunkstore("storage-2").pid

            local.chunkstore("storage-2").kill9()
            assert local.metadata("storage-2").running  # only the chunk-store crashed
            local.start_node("storage-2")
            await local.wait_ready()
            assert local.chunkstore("storage-2").pid != before

            got = await call(bus, "storage-2", "get", key(0))
            assert got.data == data
            verified = await control(bus, "storage-2", "verify", key(0))
            assert verified.errno == 0
            assert verified.fragment is not None
            assert verified.fragment.crc32 == zlib.crc32(data)
            record = await store_record(bus, "storage-2")
            assert (record.fragments, record.used_bytes) == (1, len(data))
        log_lines = local.chunkstore("storage-2").log_path.read_text().splitlines()
        started = [json.loads(line) for line in log_lines if '"chunkstore.started"' in line]
        assert [entry["fragments"] for entry in started] == [0, 1]
    finally:
        local.stop()
    assert not any(proc.running for proc in local.processes())
    assert not any(server.running for server in local.nats_servers)


async def test_rebuild_recreates_a_fragment_from_the_survivors(tmp_path: Path) -> None:
    """`rebuild`: decoded from k sources (its own read from disk), copied from a draining
    holder, refused with ENODATA and the count readable when too few survive."""
    nodes = ["a", "b", "c"]
    local = LocalSite(tmp_path / "site", nodes, site=SITE, env=FAST, services=SERVICES)
    chunk = os.urandom(3 * 1024 * 1024 + 17)
    chunk_id = hashlib.sha256(chunk).hexdigest()
    scheme = Scheme.parse("ec2+1")
    fragments = encode(scheme, chunk)

    def fkey(index: int) -> str:
        return fragment_key(chunk_id, scheme.name, index)

    async def rebuild(bus: Bus, node: str, index: int, request: RebuildRequest) -> StoreReply:
        return await control(bus, node, "rebuild", fkey(index), request.model_dump_json().encode())

    try:
        await local.start()
        await local.wait_ready()
        async with await local.client() as bus:
            for index, node in enumerate(nodes):
                assert (await put(bus, node, fkey(index), fragments[index])).errno == 0
            gets: list[str] = []

            async def seen(msg: Msg) -> None:
                gets.append(msg.subject.split(".")[-2])

            await bus.nc.subscribe(f"cfs.{SITE}.rpc.chunk.*.get", cb=seen)
            await bus.nc.flush()

            # fragment 1 rebuilt onto a (doubled placement): a reads fragment 0 from its
            # own disk and only fragment 2 over NATS, from c
            sources = {0: "a", 2: "c"}
            reply = await rebuild(bus, "a", 1, RebuildRequest(sources=sources, length=len(chunk)))
            assert reply.errno == 0, reply.message
            assert reply.fragment is not None
            assert reply.fragment.crc32 == zlib.crc32(fragments[1])
            assert (await call(bus, "a", "get", fkey(1))).data == fragments[1]
            assert gets.count("c") == 1 and "a" not in gets[:-1], gets
            stored = [e for e in await data_events(bus) if isinstance(e, FragmentStored)]
            assert (stored[-1].node_id, stored[-1].key) == ("a", fkey(1))

            # a drain copies from the old holder: no decode, one read of b
            gets.clear()
            copy = RebuildRequest(sources=sources, copy_from="b", length=len(chunk))
            assert (await rebuild(bus, "c", 1, copy)).errno == 0
            assert gets == ["b"]
            assert (await call(bus, "c", "get", fkey(1))).data == fragments[1]

            # bytes that pass their CRC but are not this chunk's: the SHA-256 catches them
            assert (await put(bus, "c", fkey(2), os.urandom(len(fragments[2])))).errno == 0
            wrong = await rebuild(bus, "b", 1, RebuildRequest(sources=sources, length=len(chunk)))
            assert wrong.errno == errno.ENODATA
            assert "fails its SHA-256" in wrong.message

            # too few readable fragments: ENODATA with how many were, nothing stored
            await control(bus, "c", "delete", fkey(2))
            lost = await rebuild(bus, "b", 0, RebuildRequest(sources={2: "c"}, length=len(chunk)))
            assert lost.errno == errno.ENODATA
            assert lost.readable == 0
            assert "0 of 2 fragments needed are readable" in lost.message
            assert "not held by node c" in lost.message

            bad = await control(bus, "b", "rebuild", fkey(0), b"{not json")
            assert bad.errno == errno.EINVAL
    finally:
        local.stop()
