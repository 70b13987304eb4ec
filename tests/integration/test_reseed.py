"""Quorum loss (guide scenario 3): copy the survivor's streams, reform, import, grow back.

Real nats-server processes: 2 of 3 are killed with -9, the survivor's copy is read
by direct get, the survivor becomes the seed of a fresh cluster, the copy is
published back in order (journals keep every sequence number), two new servers
join, everything is raised to R3 and survives losing one of them. Also: a metadata
projection that applied more than the re-seeded journal holds is rebuilt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from cfs.bus import Bus, ensure_buckets, ensure_streams
from cfs.bus.pipeline import AckPipeline
from cfs.client import MetadataClient
from cfs.recovery.streams import export_streams, import_streams, scale_streams
from cfs.security import Role as SecurityRole
from cfs.security import credentials_path, ensure_credentials
from cfs.supervisor import NatsCluster, NatsServer
from cfs_contracts.streams import SITE_BUCKETS, site_streams
from cfs_metadata.projection import Projection
from cfs_metadata.replica import ReplicaSettings, Role, ShardReplica

SITE = "t"
SHARDS = 2
JOURNALS = {"META_001": 3000, "META_002": 1500}
NAMES = [s.name for s in site_streams(SHARDS)] + [f"KV_{b.bucket}" for b in SITE_BUCKETS]


async def _reseed_closed(server: NatsServer, tmp_path: Path) -> None:
    """The re-seed as quorum recovery runs it: the server restarts on an empty store
    admitting the recovery's admin only, the export goes in, then every client is
    admitted again (the replicas reconnect to a complete journal)."""
    server.stop()
    server.store_dir.rename(tmp_path / "store.lost")
    creds = tmp_path / "creds"
    server.admission = ensure_credentials(creds, SITE, 1, only=[SecurityRole.ADMIN])
    server.start()
    admin = credentials_path(creds, SecurityRole.ADMIN)
    await import_streams([server.url], SITE, 1, tmp_path / "export", credentials=admin)
    await asyncio.to_thread(server.open_to_clients)


def _journal_subject(stream: str) -> str:
    return f"cfs.{SITE}.meta.{stream.removeprefix('META_')}.journal"


async def _write_journal(nc: NATS, stream: str, count: int) -> None:
    """Fenced appends as the metadata writers make them: msg id + expected last seq."""

    def message(seq: int) -> tuple[bytes, dict[str, str]]:
        headers = {
            "Nats-Msg-Id": f"{stream}-{seq:06d}",
            "Nats-Expected-Last-Sequence": str(seq - 1),
            "traceparent": f"00-{seq:032x}-{seq:016x}-01",
        }
        data = json.dumps({"type": "MetaCommitted", "n": seq, "pad": "x" * (seq % 200)}).encode()
        return data, headers

    # The first append waits until the new R3 stream answers (interest spreads over routes).
    data, headers = message(1)
    assert await _publish_retrying(nc.jetstream(), _journal_subject(stream), data, headers) == 1
    pipeline = AckPipeline(nc, 512)
    acks = []
    for seq in range(2, count + 1):
        data, headers = message(seq)
        acks.append(await pipeline.send(_journal_subject(stream), data, headers))
    assert [a.seq for a in await asyncio.gather(*acks)] == list(range(2, count + 1))


def _records(path: Path) -> list[dict[str, Any]]:
    """Exported messages without the arrival time (the import stamps a new one)."""
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record.pop("time")
        out.append(record)
    return out


async def _publish_retrying(
    js: JetStreamContext, subject: str, data: bytes, headers: dict[str, str] | None = None
) -> int:
    """Publish until a stream leader answers (one may be re-elected after a kill)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return int((await js.publish(subject, data, timeout=2, headers=headers)).seq)
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_quorum_loss_reseed_keeps_every_stream_and_grows_back_to_r3(
    nats_cluster3: NatsCluster, tmp_path: Path
) -> None:
    cluster = nats_cluster3
    old_urls = cluster.urls
    nc = await nats.connect(old_urls)
    js = nc.jetstream(timeout=10)
    await ensure_streams(js, site_streams(SHARDS), site=SITE, replicas=3)
    await ensure_buckets(js, SITE_BUCKETS, replicas=3)
    for stream, count in JOURNALS.items():
        await _write_journal(nc, stream, count)
    leases, nodes = await js.key_value("leases"), await js.key_value("nodes")
    await _put_retrying(js, "leases", "meta.001", b"holder=n1 term=0")
    await _put_retrying(js, "nodes", "store.n0", b"ready")
    await leases.put("meta.001", b"holder=n1 term=1")
    await leases.put("meta.001", b"holder=n2 term=2")
    await leases.put("meta.002", b"holder=n3 term=1")
    for i in range(3):
        await nodes.put("store.n1", f"free={i}".encode())
    await nodes.put("member.n9", b"alive")
    await nodes.delete("member.n9")
    for i in range(5):
        await _publish_retrying(js, f"cfs.{SITE}.dlq.data.c1", f"bad {i}".encode())
    await js.delete_msg("DLQ", 2)  # a gap: DLQ is renumbered on import, and says so
    await nc.close()

    # Quorum loss: 2 of 3 servers die; the survivor no longer accepts writes.
    cluster.server("n1").kill9()
    cluster.server("n2").kill9()
    survivor = cluster.server("n3")
    nc = await nats.connect(survivor.url)
    with pytest.raises((nats.errors.Error, TimeoutError)):  # no ack: timeout or 503
        await nc.jetstream().publish(f"cfs.{SITE}.cmd.probe", b"x", timeout=1)
    await nc.close()

    # 1. Export from whichever URL answers (the dead ones refuse), by direct get only.
    exported_dir = tmp_path / "export"
    exported = await export_streams(old_urls, NAMES, exported_dir)
    assert all(e.found for e in exported.values()), exported
    for stream, count in JOURNALS.items():
        assert (exported[stream].messages, exported[stream].first_seq) == (count, 1)
        assert (exported[stream].last_seq, exported[stream].gaps) == (count, 0)
    assert exported["DLQ"].messages == 4 and exported["DLQ"].gaps == 1
    manifest = json.loads((exported_dir / "manifest.json").read_text())
    assert manifest["streams"]["META_001"]["sha256"] == exported["META_001"].sha256

    # 2. Reform: fresh store on the survivor, the old one kept.
    lost_store = cluster.reform("n3")
    assert lost_store.parent == survivor.state_dir and any(lost_store.rglob("*"))
    assert cluster.urls == [survivor.url] and survivor.meta_leader() == "n3"

    # 3. Import at R1: journals keep every sequence number.
    report = await import_streams(cluster.urls, SITE, SHARDS, exported_dir, replicas=1)
    for stream, count in JOURNALS.items():
        imported = report.streams[stream]
        assert (imported.messages, imported.last_seq, imported.renumbered) == (count, count, 0)
    assert report.streams["DLQ"].renumbered == 3  # seqs 3..5 became 2..4, reported
    await export_streams(cluster.urls, NAMES, tmp_path / "reread")
    for name in NAMES:
        before = _records(exported_dir / f"{name}.jsonl")
        after = _records(tmp_path / "reread" / f"{name}.jsonl")
        if not name.startswith("META_"):  # gaps (deletes, KV history) are renumbered
            for record in before + after:
                record.pop("seq")
        assert after == before, name  # subjects, headers (msg ids), data, journal seqs
    nc = await nats.connect(cluster.urls)
    js = nc.jetstream(timeout=10)
    leases, nodes = await js.key_value("leases"), await js.key_value("nodes")
    assert (await leases.get("meta.001")).value == b"holder=n2 term=2"
    assert (await nodes.get("store.n1")).value == b"free=2"
    assert len(await nodes.history("store.n1")) == 3
    with pytest.raises(nats.js.errors.KeyNotFoundError):  # KeyDeletedError is a subclass
        await nodes.get("member.n9")
    # The fenced writer goes on exactly where the journal ended.
    last = JOURNALS["META_001"]
    subject = _journal_subject("META_001")
    headers = {"Nats-Expected-Last-Sequence": str(last), "Nats-Msg-Id": "after-reseed"}
    assert await _publish_retrying(js, subject, b"next", headers) == last + 1

    # 4. Two new servers join; everything goes back to R3, current everywhere.
    cluster.add_server("n4")
    cluster.add_server("n5")
    placed = await scale_streams(cluster.urls, SITE, SHARDS, 3, timeout=60)
    assert set(placed) == set(NAMES)
    assert all(set(peers) == {"n3", "n4", "n5"} for peers in placed.values()), placed
    for name in NAMES:
        info = await js.stream_info(name)
        extra = 1 if name == "META_001" else 0
        assert info.state.messages == exported[name].messages + extra, name
    # A lost member that comes back with its old store is refused by the new cluster.
    assert "n1" not in {s.name for s in cluster.servers}
    old = next(s for s in cluster.lost if s.name == "n1")
    old.start(wait=False)
    await asyncio.sleep(1.0)
    peers = {r["name"] for r in survivor.meta_cluster().get("replicas") or []}
    assert peers == {"n4", "n5"}
    old.stop()
    assert "Cluster Name Conflict" in old.log_tail(200)

    # 5. Losing one of three is a quorum of two: writes go on.
    cluster.server("n4").kill9()
    headers = {"Nats-Expected-Last-Sequence": str(last + 1), "Nats-Msg-Id": "after-kill"}
    assert await _publish_retrying(js, subject, b"again", headers) == last + 2
    await _put_retrying(js, "leases", "meta.002", b"holder=n5 term=2")
    await nc.close()


async def _put_retrying(js: JetStreamContext, bucket: str, key: str, value: bytes) -> None:
    deadline = time.monotonic() + 20
    kv = await js.key_value(bucket)
    while True:
        try:
            await kv.put(key, value)
            return
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_export_reports_streams_that_do_not_exist(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_server.url)
    await ensure_streams(nc.jetstream(), site_streams(1), site=SITE, replicas=1)
    await nc.close()
    exported = await export_streams([nats_server.url], ["META_001", "NOPE"], tmp_path, timeout=5)
    assert exported["META_001"].found and exported["META_001"].messages == 0
    assert not exported["NOPE"].found and exported["NOPE"].reason == "stream does not exist"


# -- metadata projection after a re-seed -----------------------------------------------
FAST = ReplicaSettings(lease_s=1.0, renew_s=0.2)


async def _copy_journal(src: Bus, dst: Bus, upto: int) -> None:
    """What a re-seed from a survivor that held only the first `upto` messages leaves."""
    for seq in range(1, upto + 1):
        msg = await src.js.get_msg("META_001", seq=seq, direct=True)
        headers = {
            "Nats-Msg-Id": (msg.headers or {})["Nats-Msg-Id"],
            "Nats-Expected-Last-Sequence": str(seq - 1),
        }
        ack = await dst.js.publish(str(msg.subject), msg.data or b"", headers=headers)
        assert ack.seq == seq


async def _wait_leader(replica: ShardReplica) -> None:
    deadline = time.monotonic() + 15
    while replica.role is not Role.LEADER:
        assert time.monotonic() < deadline, f"no leader: {replica.role}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("case", ["journal_shorter", "journal_diverged"])
async def test_a_projection_ahead_of_a_reseeded_journal_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    old = NatsServer.standalone(tmp_path / "old", name="old")
    new = NatsServer.standalone(tmp_path / "new", name="new")
    buses: list[Bus] = []
    replicas: list[ShardReplica] = []
    try:
        old.start()
        new.start()
        for url, node in ((old.url, "a"), (old.url, "cl"), (new.url, "a"), (new.url, "b")):
            buses.append(await Bus.connect(url, site=SITE, node=node))
        old_a, old_client, new_a, new_b = buses
        for bus in (old_a, new_a):
            await ensure_streams(bus.js, site_streams(1), site=SITE, replicas=1)
            await ensure_buckets(bus.js, SITE_BUCKETS, replicas=1)
        path = tmp_path / "a-shard-001"
        a = ShardReplica(old_a, 1, Projection(path, 1), FAST)
        replicas.append(a)
        await a.start()
        client = MetadataClient(old_client, deadline_s=10)
        await client.mkdir(1, "kept")
        kept = a.projection.applied_seq
        await client.mkdir(1, "lost-1")
        await client.mkdir(1, "lost-2")
        ahead = a.projection.applied_seq
        assert a.projection.applied_id is not None
        await a.stop()
        a.projection.close()
        replicas.remove(a)

        await _copy_journal(old_a, new_a, kept)
        if case == "journal_diverged":  # another writer appended after the re-seed
            b = ShardReplica(new_b, 1, Projection(tmp_path / "b-shard-001", 1), FAST)
            replicas.append(b)
            await b.start()
            await _wait_leader(b)
            other = MetadataClient(new_b, deadline_s=10)
            while b.projection.applied_seq < ahead:
                await other.mkdir(1, f"other-{b.projection.applied_seq}")
            await b.stop()
            b.projection.close()
            replicas.remove(b)

        caplog.set_level(logging.WARNING, logger="cfs_metadata.replica")
        a = ShardReplica(new_a, 1, Projection(path, 1), FAST)
        replicas.append(a)
        assert a.projection.applied_seq == ahead
        await a.start()
        await _wait_leader(a)
        rebuilt = [r for r in caplog.records if r.getMessage() == "projection.rebuilt"]
        assert len(rebuilt) == 1
        assert rebuilt[0].applied_seq == ahead  # type: ignore[attr-defined]
        journal_last = kept if case == "journal_shorter" else ahead
        assert rebuilt[0].journal_last_seq == journal_last  # type: ignore[attr-defined]
        names = {e.name async for e in MetadataClient(new_b, deadline_s=10).readdir(1)}
        assert "kept" in names and not names & {"lost-1", "lost-2"}
        assert a.projection.applied_seq == journal_last + 1  # replayed, then fenced
    finally:
        for replica in replicas:
            await replica.stop()
            replica.projection.close()
        for bus in buses:
            await bus.close()
        old.stop()
        new.stop()


async def test_a_running_writer_rebuilds_when_its_journal_was_reseeded_shorter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The survivor's server is re-seeded under a running writer that applied more:
    its next append fails (expected last sequence), it steps down, rebuilds, leads."""
    server = NatsServer.standalone(tmp_path / "nats")
    buses: list[Bus] = []
    replica: ShardReplica | None = None
    try:
        server.start()
        buses = [await Bus.connect(server.url, site=SITE, node=n) for n in ("a", "cl")]
        bus, client_bus = buses
        await ensure_streams(bus.js, site_streams(1), site=SITE, replicas=1)
        await ensure_buckets(bus.js, SITE_BUCKETS, replicas=1)
        replica = ShardReplica(bus, 1, Projection(tmp_path / "a-shard-001", 1), FAST)
        await replica.start()
        client = MetadataClient(client_bus, deadline_s=15)
        await client.mkdir(1, "kept")
        names = [s.name for s in site_streams(1)] + [f"KV_{b.bucket}" for b in SITE_BUCKETS]
        await export_streams([server.url], names, tmp_path / "export")  # the survivor's copy
        await client.mkdir(1, "lost")
        ahead = replica.projection.applied_seq

        # The writer notices the re-seed when it is admitted again, after the import.
        caplog.set_level(logging.WARNING, logger="cfs_metadata.replica")
        await _reseed_closed(server, tmp_path)  # what `cfs admin raft-force-leader` does
        await client.mkdir(1, "after")  # retried by the client until the writer is back
        rebuilt = [r for r in caplog.records if r.getMessage() == "projection.rebuilt"]
        assert [r.applied_seq for r in rebuilt] == [ahead]  # type: ignore[attr-defined]
        assert {e.name async for e in client.readdir(1)} == {"kept", "after"}
    finally:
        if replica is not None:
            await replica.stop()
            replica.projection.close()
        for b in buses:
            await b.close()
        server.stop()


async def test_a_running_follower_rebuilds_before_it_leads_a_reseeded_journal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hot follower kept tailing through the re-seed with a projection ahead of the
    journal; when it takes the lease, its fence finds the journal short, it steps
    down, rebuilds from the journal and only then leads."""
    server = NatsServer.standalone(tmp_path / "nats")
    buses: list[Bus] = []
    replicas: list[ShardReplica] = []
    try:
        server.start()
        buses = [await Bus.connect(server.url, site=SITE, node=n) for n in ("a", "b", "cl")]
        a_bus, b_bus, client_bus = buses
        await ensure_streams(a_bus.js, site_streams(1), site=SITE, replicas=1)
        await ensure_buckets(a_bus.js, SITE_BUCKETS, replicas=1)
        a = ShardReplica(a_bus, 1, Projection(tmp_path / "a-shard-001", 1), FAST)
        replicas.append(a)
        await a.start()
        await _wait_leader(a)
        b = ShardReplica(b_bus, 1, Projection(tmp_path / "b-shard-001", 1), FAST)
        replicas.append(b)
        await b.start()
        client = MetadataClient(client_bus, deadline_s=15)
        await client.mkdir(1, "kept")
        names = [s.name for s in site_streams(1)] + [f"KV_{b.bucket}" for b in SITE_BUCKETS]
        await export_streams([server.url], names, tmp_path / "export")
        await client.mkdir(1, "lost")
        ahead = a.projection.applied_seq
        while b.projection.applied_seq < ahead:  # the follower applied it too
            await asyncio.sleep(0.02)

        await _reseed_closed(server, tmp_path)  # what `cfs admin raft-force-leader` does
        caplog.set_level(logging.INFO, logger="cfs_metadata.replica")
        await a.stop()  # releases the lease: the follower takes over
        a.projection.close()
        replicas.remove(a)
        await client.mkdir(1, "after")
        assert b.role is Role.LEADER
        rebuilt = [r for r in caplog.records if r.getMessage() == "projection.rebuilt"]
        assert [r.applied_seq for r in rebuilt] == [ahead]  # type: ignore[attr-defined]
        assert {e.name async for e in client.readdir(1)} == {"kept", "after"}
        assert b.projection.dentry(1, "lost") is None
    finally:
        for replica in replicas:
            await replica.stop()
            replica.projection.close()
        for bus in buses:
            await bus.close()
        server.stop()
