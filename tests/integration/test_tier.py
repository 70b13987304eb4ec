"""The s3-tierer with real processes (issue 15): a 3-node site whose services reach a
real S3 server (moto) through the fault proxy, a client with the mount's credentials.

The tests share one site and run in file order: cache mode first (every acknowledged
file's chunks end up in blobs, byte for byte), then an S3 outage with a small flash
quota (the watermark climbs NORMAL -> WRITE_THROUGH -> CRITICAL -> FULL, writes are
acknowledged while flash allows and refused with ENOSPC at FULL, then S3 returns and
the queue drains by itself back to NORMAL).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest

from cfs.bus import Bus
from cfs.bus.kv import bucket_keys
from cfs.client import FileStore, MetadataClient
from cfs.client.chunks import ChunkStoreClient, FragmentError
from cfs.client.tier import read_blob_records
from cfs.objstore import S3ObjectStore, S3Settings, S3Url
from cfs.security import Role
from cfs.supervisor import LocalSite, S3Server
from cfs.supervisor.s3proxy import S3FaultProxy
from cfs_contracts.data import fragment_key
from cfs_contracts.fs.records import ROOT_INO, ChunkRef
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.streams import DATA, NODES, TIER_INDEX
from cfs_contracts.tier import (
    TIER_STATE_KEY,
    ChunkLocation,
    FlashCopy,
    TierSnapshot,
    TierState,
    blob_object_key,
    blob_record_key,
    chunk_location_key,
)
from cfs_tierer.backfill import PAGE
from cfs_tierer.blob import read_index
from tests.integration.test_admin_cli import CFS, cfs

SERVICES = ("metadata-raft", "chunk-store", "s3-tierer", "backup")
BUCKET = "cfs-tier"
URL = f"s3://{BUCKET}/data"
KiB = 1024
pytestmark = pytest.mark.expected_logs(
    "tier.s3_failing", "tier.watermark", "tier.alert", "retry.*", "data.put_failed",
    "data.put_straggling",
    "fault.crash", "site.restarted", "lease.*", "singleton.*", "service.*",
    "data.degraded_read", "fragment.*",
)  # fmt: skip


@pytest.fixture(scope="module")
def proxy(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(tmp_path_factory.mktemp("tierproxy"), s3_server.endpoint_url) as running:
        yield running


@pytest.fixture(scope="module")
def s3_direct(s3_server: S3Server, s3_env: dict[str, str]) -> S3Settings:
    """The S3 server itself (not through the proxy): what is really in the bucket."""
    return S3Settings(
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.REGION,
        credentials_file=Path(s3_env["CFS_S3_CREDENTIALS_FILE"]),
    )


def CRASH_FILE(factory: pytest.TempPathFactory) -> Path:
    return factory.getbasetemp() / "tier-crash"


@pytest.fixture(scope="module")
def site(
    s3_env: dict[str, str], proxy: S3FaultProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalSite]:
    running = LocalSite(
        tmp_path_factory.mktemp("tier") / "site",
        nodes=3,
        servers=1,
        site="tier",
        services=SERVICES,
        env={
            **s3_env,
            "CFS_S3_ENDPOINT_URL": proxy.endpoint_url,
            "CFS_STATUS_S": "0.2",
            "CFS_S3_DEADLINE_S": "1.0",
            "CFS_PROBE_S": "0.5",
            "CFS_CRASH_FILE": str(CRASH_FILE(tmp_path_factory)),
            # Garbage: collected and compacted only when a test asks (`gc`, `s3-compact`).
            "CFS_GC_INTERVAL_S": "0",
            "CFS_GC_GRACE_S": "1",
            "CFS_COMPACT_S": "3600",
            "CFS_COMPACT_MIN_AGE_S": "1",
        },
    )
    try:
        asyncio.run(running.start())
        asyncio.run(running.wait_ready())
        out = _tier_config(running, s3_env, "--mode", "cache", "--url", URL, "--flush-after", "0.3")
        assert "Data tier: cache, s3://cfs-tier/data" in out, out
        yield running
    finally:
        running.stop()


@pytest.fixture(autouse=True)
def supervised(site: LocalSite) -> None:
    """A tierer a test killed -9 comes back before the next test, as systemd or Nomad
    would bring it back (else a few crash tests leave no standby)."""
    site.restart_exited()


def _tier_config(site: LocalSite, s3_env: dict[str, str], *args: str) -> str:
    return _admin_s3(site, s3_env, "tier-config", *args)


def _admin_s3(site: LocalSite, s3_env: dict[str, str], *args: str) -> str:
    """`cfs admin ARGS` with the S3 server's settings, as the operator's cluster file has."""
    env = site.cli_env(**s3_env)
    done = subprocess.run(
        [CFS, "admin", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=site.base_dir,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout


async def _state(bus: Bus) -> TierState | None:
    kv = await bus.key_value(NODES.bucket)
    try:
        entry = await kv.get(TIER_STATE_KEY)
    except nats.js.errors.KeyNotFoundError:
        return None
    return TierState.model_validate_json(entry.value or b"")


async def _until_state(bus: Bus, what: str, check: Any, timeout: float = 60.0) -> TierState:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = await _state(bus)
        if state is not None and check(state):
            return state
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {state}")


class Client:
    """The mount's role: FileStore over a CLIENT-credentialed connection."""

    def __init__(self, site: LocalSite, *, cache_bytes: int = 64 * 1024 * KiB) -> None:
        self.site = site
        self.cache_bytes = cache_bytes

    async def __aenter__(self) -> Client:
        self.bus = await self.site.client(role=Role.CLIENT)
        self.meta = MetadataClient(self.bus, deadline_s=30)
        self.files = FileStore(
            self.bus, self.meta, client_id=self.bus.node, cache_bytes=self.cache_bytes
        )
        await self.files.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.files.close()
        await self.bus.close()

    async def write(self, name: str, data: bytes) -> list[str]:
        """Create and write a file; its chunk ids once acknowledged (flushed)."""
        ino = (await self.meta.create(ROOT_INO, name)).ino
        inode = await self.files.write_all(ino, data)
        return [c.chunk_id for c in inode.chunks]


async def _until_indexed(
    site: LocalSite, chunks: dict[str, list[str]], timeout: float = 90
) -> None:
    """Until every chunk is in the tier index (flushed), read as an admin: a client may
    not read the index."""
    async with await site.client() as admin:
        index = await admin.key_value(TIER_INDEX.bucket)
        deadline = time.monotonic() + timeout
        for chunk_id in {c for ids in chunks.values() for c in ids}:
            while True:
                try:
                    await index.get(chunk_location_key(chunk_id))
                    break
                except nats.js.errors.KeyNotFoundError:
                    assert time.monotonic() < deadline, f"chunk {chunk_id} never flushed"
                    await asyncio.sleep(0.2)


async def _snapshot_covers(
    site: LocalSite, s3: S3Settings, path: str, chunks: dict[str, list[str]]
) -> None:
    """The manifest names blobs whose footers index every chunk written before it."""
    url = S3Url.parse(path.rsplit("/", 1)[0])
    async with S3ObjectStore(url, s3) as store:
        snapshot = TierSnapshot.model_validate_json(await store.get(path.rsplit("/", 1)[1]))
    async with S3ObjectStore(S3Url(BUCKET, "data"), s3) as tier:
        found = set()
        for blob in snapshot.blobs:
            data = await tier.get(blob_object_key(blob.blob_id))
            found |= {e.chunk_id for e in read_index(data, blob.blob_id).entries}
    wanted = {c for ids in chunks.values() for c in ids}
    assert wanted <= found, wanted - found
    assert snapshot.chunks == sum(b.chunks for b in snapshot.blobs) >= len(wanted)


async def _in_s3(site: LocalSite, s3: S3Settings, chunk_ids: list[str]) -> bytes:
    """The chunks as the bucket holds them, each checked against its SHA-256."""
    parts = []
    async with await site.client() as bus:
        index = await bus.key_value(TIER_INDEX.bucket)
        async with S3ObjectStore(S3Url(BUCKET, "data"), s3) as store:
            blobs: dict[str, bytes] = {}
            for chunk_id in chunk_ids:
                location = ChunkLocation.model_validate_json(
                    (await index.get(chunk_location_key(chunk_id))).value or b""
                )
                if location.blob_id not in blobs:
                    blobs[location.blob_id] = await store.get(blob_object_key(location.blob_id))
                data = blobs[location.blob_id][location.offset : location.offset + location.length]
                assert hashlib.sha256(data).hexdigest() == chunk_id == location.sha256
                parts.append(data)
    return b"".join(parts)


def test_cache_mode_puts_every_acknowledged_file_in_s3_blobs(
    site: LocalSite, s3_env: dict[str, str], s3_direct: S3Settings
) -> None:
    rng = random.Random(15)
    files = {
        f"cached-{i}": rng.randbytes(rng.choice([10, 70 * KiB, 5 * 1024 * KiB])) for i in range(8)
    }

    chunks: dict[str, list[str]] = {}

    async def go() -> None:
        async with Client(site) as client:
            chunks.update({name: await client.write(name, data) for name, data in files.items()})
            state = await _until_state(
                client.bus,
                "the queue flushed",
                lambda s: s.queue_entries == 0 and s.flushed_chunks > 0 and s.s3.reachable,
            )
            assert state.level == "NORMAL" and state.policy.value == "ack_on_flash"
        await _until_indexed(site, chunks)
        for name, data in files.items():
            assert await _in_s3(site, s3_direct, chunks[name]) == data, name
        async with await site.client() as admin:  # the queue is purged below what is flushed
            for _ in range(50):
                left = (await admin.js.stream_info("TIER")).state.messages
                if left == 0:
                    break
                await asyncio.sleep(0.1)
            assert left == 0, f"{left} TIER messages not purged"

    asyncio.run(go())
    snapshot = json.loads(
        _admin_s3(site, s3_env, "s3-snapshot", "--output", "s3://cfs-tier-drill/data", "--json")
    )
    assert snapshot["path"].startswith("s3://cfs-tier-drill/data/tier-snapshot-"), snapshot
    asyncio.run(_snapshot_covers(site, s3_direct, snapshot["path"], chunks))
    status = cfs(site, "s3-queue-status")
    assert status.returncode == 0, (status.stdout, status.stderr)
    assert "Queue depth: 0 entries" in status.stdout and "Watermark: NORMAL" in status.stdout
    health = cfs(site, "s3-health")
    assert health.returncode == 0 and "S3 reachable (s3://cfs-tier/data)" in health.stdout
    status = cfs(site, "status")
    assert "Data tier: cache to s3://cfs-tier/data; S3 reachable; queue 0 chunks" in status.stdout


@pytest.mark.slow  # half a minute of outage: make test-slow (scenario 7 too)
def test_an_s3_outage_climbs_the_watermark_in_order_then_drains_by_itself(
    site: LocalSite, s3_env: dict[str, str], s3_direct: S3Settings, proxy: S3FaultProxy
) -> None:
    # 256 KiB files in ec2+1: 128 KiB per node each; 4 MiB of flash per node for
    # unflushed data: write-through from file 26, critical from 31, full at 32.
    _tier_config(site, s3_env, "--flash-bytes", str(4096 * KiB), "--write-through-wait", "1.5")
    rng = random.Random(7)
    acked: dict[str, tuple[bytes, list[str]]] = {}
    outcomes: list[tuple[str, str]] = []  # (level when written, "ok" | errno name)

    async def go() -> None:
        async with Client(site) as client:
            await _until_state(client.bus, "a healthy tier", lambda s: s.s3.reachable)
            proxy.set_fault("status", status=503)
            await _until_state(client.bus, "S3 seen failing", lambda s: not s.s3.reachable)
            for i in range(60):
                state = await _state(client.bus)
                name, data = f"outage-{i}", rng.randbytes(256 * KiB)
                try:
                    acked[name] = (data, await client.write(name, data))
                    outcomes.append((state.level if state else "?", "ok"))
                except FsError as exc:
                    outcomes.append((state.level if state else "?", errno.errorcode[exc.errno]))
                    if exc.errno == errno.ENOSPC:
                        break
                await asyncio.sleep(0.25)  # the tierer's reading follows (0.2 s)
            full = await _state(client.bus)
            assert full is not None and full.level == "FULL", (full, outcomes)
            assert full.policy.value == "refuse"
            assert outcomes[-1][1] == "ENOSPC", outcomes
            status = cfs(site, "s3-queue-status")
            assert status.returncode == 1 and "Watermark: FULL" in status.stdout, status.stdout
            health = cfs(site, "s3-health")
            assert health.returncode == 1 and "S3 unreachable" in health.stdout, health.stdout
            assert "error class: service" in health.stdout, health.stdout

            proxy.set_fault("pass")
            returned = time.monotonic()
            drained = await _until_state(
                client.bus, "the queue drained", lambda s: s.queue_entries == 0, timeout=90
            )
            await _until_state(client.bus, "NORMAL again", lambda s: s.level == "NORMAL")
            assert drained.s3.reachable
            print(
                f"\n[tier outage] acknowledged_on_flash={[r for _, r in outcomes].count('ok')} "
                f"refused={len(outcomes) - [r for _, r in outcomes].count('ok')} "
                f"queued_at_full={full.queue_entries} ({full.queue_bytes} B) "
                f"drained_to_normal_s={time.monotonic() - returned:.2f}"
            )
            name, data = "after-outage", rng.randbytes(256 * KiB)
            acked[name] = (data, await client.write(name, data))
        await _until_indexed(site, {n: ids for n, (_, ids) in acked.items()})

    asyncio.run(go())
    written = [result for _, result in outcomes]
    assert written[:20] == ["ok"] * 20, outcomes  # acknowledged on flash while it allows
    levels = [level for level, _ in outcomes]
    assert "WRITE_THROUGH" in levels and "CRITICAL" in levels, outcomes
    transitions = asyncio.run(_watermark_events(site))
    ups = [(t["before"], t["after"]) for t in transitions if t["after"] != "NORMAL"]
    for step in (("NORMAL", "WRITE_THROUGH"), ("WRITE_THROUGH", "CRITICAL"), ("CRITICAL", "FULL")):
        assert step in ups, transitions
    assert transitions[-1]["after"] == "NORMAL", transitions
    for name, (data, chunk_ids) in acked.items():
        assert asyncio.run(_in_s3(site, s3_direct, chunk_ids)) == data, name


async def _watermark_events(site: LocalSite) -> list[dict[str, Any]]:
    """Every WatermarkChanged on CLUSTER, in order (one node's is enough: ec2+1 on three
    nodes puts a fragment of every chunk on each)."""
    found: list[dict[str, Any]] = []
    async with await site.client() as bus:
        sub = await bus.js.subscribe(
            f"cfs.{site.site}.cluster.tier.watermark", ordered_consumer=True
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except TimeoutError:
                    break
                payload = json.loads(msg.data)["payload"]
                if payload["node_id"] == "storage-1":
                    found.append(payload)
        finally:
            await sub.unsubscribe()
    return found


async def _holding(
    site: LocalSite, s3: S3Settings, wanted: set[str]
) -> dict[str, tuple[bool, set[str]]]:
    """Every blob in the bucket that holds one of the `wanted` chunks (by its footer):
    blob id -> (recorded: live, else an orphan; which of them it holds). Listed first,
    recorded after: a blob PUT meanwhile has its record by then, or is an orphan."""
    holders: dict[str, set[str]] = {}
    async with S3ObjectStore(S3Url(BUCKET, "data"), s3) as store:
        async for info in store.list("blobs/"):
            blob_id = info.key.removeprefix("blobs/")
            entries = read_index(await store.get(info.key), blob_id).entries
            if held := wanted & {e.chunk_id for e in entries}:
                holders[blob_id] = held
    async with await site.client() as bus:
        index = await bus.key_value(TIER_INDEX.bucket)
        found = {}
        for blob_id, held in holders.items():
            try:
                await index.get(blob_record_key(blob_id))
                found[blob_id] = (True, held)
            except nats.js.errors.KeyNotFoundError:
                found[blob_id] = (False, held)
    return found


@pytest.mark.parametrize("point", ["tier.blob_put", "tier.blob_indexed"])
def test_a_tierer_killed_mid_flush_loses_nothing_and_indexes_each_chunk_once(
    site: LocalSite,
    s3_direct: S3Settings,
    tmp_path_factory: pytest.TempPathFactory,
    point: str,
) -> None:
    """kill -9 right after the PUT (the blob is in S3, nothing points at it) or right
    after indexing (the queue still holds its chunks): the next holder reads the queue
    again; the first case re-uploads into a new blob and leaves one orphan, the second
    finds every chunk in the index and uploads nothing twice."""
    CRASH_FILE(tmp_path_factory).write_text(f"{point}@s3-tierer")
    rng = random.Random(point)
    files = {f"{point}-{i}": rng.randbytes(300 * KiB) for i in range(4)}

    async def go() -> dict[str, list[str]]:
        async with Client(site) as client:
            chunks = {name: await client.write(name, data) for name, data in files.items()}
        await _until_indexed(site, chunks)
        return chunks

    chunks = asyncio.run(go())
    assert not CRASH_FILE(tmp_path_factory).exists(), "the crash point was never reached"
    for name, data in files.items():
        assert asyncio.run(_in_s3(site, s3_direct, chunks[name])) == data, name
    wanted = {c for ids in chunks.values() for c in ids}
    holding = asyncio.run(_holding(site, s3_direct, wanted))
    orphans = [b for b, (recorded, _) in holding.items() if not recorded]
    for chunk_id in wanted:  # in exactly one live blob
        assert len([b for b, (rec, held) in holding.items() if rec and chunk_id in held]) == 1
    if point == "tier.blob_put":
        assert len(orphans) == 1, f"the dead holder's PUT: one orphan, not {holding}"
        time.sleep(1.0)  # the orphan's minimum age
        swept = cfs(site, "s3-compact", "--json", timeout=60)
        assert swept.returncode == 0, (swept.stdout, swept.stderr)
        assert json.loads(swept.stdout)["orphans"] >= 1, swept.stdout
        after = asyncio.run(_holding(site, s3_direct, wanted))
        assert [b for b, (rec, _) in after.items() if not rec] == [], after
        for name, data in files.items():
            assert asyncio.run(_in_s3(site, s3_direct, chunks[name])) == data, name
    else:
        assert orphans == [], f"nothing uploaded twice: {holding}"
    print(f"\n[tier kill -9 at {point}] blobs holding the files {len(holding)}, "
          f"orphans {len(orphans)}")  # fmt: skip


async def _write_untiered(site: LocalSite, files: dict[str, bytes]) -> dict[str, list[str]]:
    """Files written by a client that sees no tier (as one that has not yet seen a new
    `tier-config`, or any write before a tier existed): none of it is queued for S3."""
    async with Client(site) as client:
        assert client.files.tier.nodes.tier_config is None
        return {name: await client.write(name, data) for name, data in files.items()}


async def _tier_state(site: LocalSite) -> TierState:
    async with await site.client() as admin:
        state = await _state(admin)
    assert state is not None
    return state


def test_files_written_with_no_tier_reach_s3_by_the_backfill_pass(
    site: LocalSite, s3_env: dict[str, str], s3_direct: S3Settings
) -> None:
    """The tier off, files written, the tier on again: no client queued them, so the
    tierer's pass a few seconds later (`backfill_grace_s`) finds them in the chunk maps
    and queues them; after it, `s3-backfill` finds nothing left to queue."""
    rng = random.Random("backfill")
    files = {f"untiered-{i}": rng.randbytes(rng.randrange(1, 300) * KiB) for i in range(12)}
    _tier_config(site, s3_env, "--mode", "off")
    try:
        before = asyncio.run(_tier_state(site)).backfilled_chunks
        chunks = asyncio.run(_write_untiered(site, files))
    finally:
        _tier_config(site, s3_env, "--mode", "cache")
    asyncio.run(_until_indexed(site, chunks, timeout=60))
    for name, data in files.items():
        assert asyncio.run(_in_s3(site, s3_direct, chunks[name])) == data, name
    state = asyncio.run(_tier_state(site))
    assert state.backfilled_chunks - before >= len({c for ids in chunks.values() for c in ids})
    again = cfs(site, "s3-backfill", "--json", timeout=60)
    assert again.returncode == 0, (again.stdout, again.stderr)
    reply = json.loads(again.stdout)
    assert reply["queued"] == 0 and reply["files"] >= len(files), reply
    status = cfs(site, "s3-queue-status", timeout=60)
    assert "no client had queued" in status.stdout, status.stdout


def test_a_tierer_killed_mid_backfill_leaves_the_rest_to_the_next_holder(
    site: LocalSite,
    s3_env: dict[str, str],
    s3_direct: S3Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """kill -9 right after a pass queued its first page of files (of two): what it
    queued is in the TIER stream, and the next holder's own pass queues the rest."""
    rng = random.Random("backfill-kill")
    files = {f"kill-backfill-{i}": rng.randbytes(2 * KiB) for i in range(PAGE + 40)}
    _tier_config(site, s3_env, "--mode", "off")
    try:
        first = asyncio.run(_tier_state(site)).holder
        chunks = asyncio.run(_write_untiered(site, files))
        CRASH_FILE(tmp_path_factory).write_text("tier.backfill_queued@s3-tierer")
    finally:
        _tier_config(site, s3_env, "--mode", "cache")
    asyncio.run(_until_indexed(site, chunks, timeout=90))
    assert not CRASH_FILE(tmp_path_factory).exists(), "the crash point was never reached"
    state = asyncio.run(_tier_state(site))
    assert state.holder != first and state.backfilled_chunks > 0, state
    for name in rng.sample(sorted(files), 10):
        assert asyncio.run(_in_s3(site, s3_direct, chunks[name])) == files[name], name
    print(f"\n[tier kill -9 mid-backfill] holder {first} -> {state.holder}, which queued "
          f"{state.backfilled_chunks} of {len(files)} chunks")  # fmt: skip


def test_lost_fragments_come_back_from_s3_on_read_and_by_restore_data(
    site: LocalSite, s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every fragment of some files deleted from flash and the tier index wiped (all a
    total loss leaves is the bucket): `restore-data --from-s3` puts it all back, though
    the active tierer is killed -9 once the first recalled chunk is on flash (the next
    holder answers the batch sent again), and a read recalls a chunk by itself."""
    rng = random.Random(8)
    files = {
        f"lost-{i}": rng.randbytes(rng.choice([3000, 600 * KiB, 4500 * KiB])) for i in range(6)
    }

    async def write_and_lose() -> dict[str, list[ChunkRef]]:
        async with Client(site) as client:
            refs = {}
            for name, data in files.items():
                ino = (await client.meta.create(ROOT_INO, name)).ino
                refs[name] = list((await client.files.write_all(ino, data)).chunks)
        async with await site.client() as admin:
            index = await admin.key_value(TIER_INDEX.bucket)
            chunks = ChunkStoreClient(admin)
            every = [ref for refs_ in refs.values() for ref in refs_]
            for ref in every:  # flushed, then lost from flash
                while True:
                    try:
                        await index.get(chunk_location_key(ref.chunk_id))
                        break
                    except nats.js.errors.KeyNotFoundError:
                        await asyncio.sleep(0.2)
            for ref in every:
                for i, node in enumerate(ref.fragments):
                    await chunks.delete(node, fragment_key(ref.chunk_id, ref.scheme, i))
            for key in await bucket_keys(admin, TIER_INDEX.bucket):  # only the bucket is left
                await index.delete(key)
        return refs

    refs = asyncio.run(write_and_lose())
    CRASH_FILE(tmp_path_factory).write_text("tier.recall_stored@s3-tierer")
    result = cfs(site, "restore-data", "--from-s3", "--json", timeout=300)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert not CRASH_FILE(tmp_path_factory).exists(), "the crash point was never reached"
    summary = json.loads(result.stdout)
    lost = sum(len(r) for r in refs.values())
    assert summary["failed"] == [] and summary["reindex"]["blobs"] > 0, summary
    again = json.loads(cfs(site, "restore-data", "--from-s3", "--json", timeout=300).stdout)
    assert again["restored_fragments"] == 0, again  # nothing left to do: it resumes
    assert again["present_fragments"] >= lost * 3, again  # every fragment of ec2+1

    async def read_back(names: list[str]) -> dict[str, bytes]:
        async with Client(site) as client:
            return {n: await client.files.read_all((await client.meta.lookup(ROOT_INO, n)).ino)
                    for n in names}  # fmt: skip

    assert asyncio.run(read_back(list(files))) == files

    # A read alone: the fragments of one file lost again, read through a fresh client.
    async def lose_one(name: str) -> None:
        async with await site.client() as admin:
            chunks = ChunkStoreClient(admin)
            for ref in refs[name]:
                for i, node in enumerate(ref.fragments):
                    await chunks.delete(node, fragment_key(ref.chunk_id, ref.scheme, i))

    biggest = max(files, key=lambda n: len(files[n]))
    asyncio.run(lose_one(biggest))
    assert asyncio.run(read_back([biggest])) == {biggest: files[biggest]}
    print(f"\n[tier restore-data] {summary['chunks']} chunks, {summary['restored_bytes']} B "
          f"in {summary['seconds']} s")  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "fault", "error_class"),
    [
        ("slow", {"delay_s": 1.5}, None),  # seconds per request: slower, never failing
        ("cut", {"methods": ("PUT",)}, "network"),  # connections dropped mid-body
        ("status", {"status": 403}, "auth"),  # bad credentials or policy
        ("status", {"status": 500}, "service"),
    ],
    ids=["slow", "cut", "403", "500"],
)
def test_each_s3_fault_keeps_writes_acknowledged_and_names_its_class(
    site: LocalSite,
    s3_direct: S3Settings,
    proxy: S3FaultProxy,
    mode: str,
    fault: dict[str, Any],
    error_class: str | None,
) -> None:
    """Under each fault of the proxy, writes are acknowledged on flash; `s3-health`
    names the class the operator must look at; once the fault clears the queue drains
    by itself and the bucket holds exactly what was acknowledged."""
    rng = random.Random(mode + str(error_class))
    files = {f"fault-{mode}-{error_class}-{i}": rng.randbytes(100 * KiB) for i in range(4)}

    async def go() -> dict[str, list[str]]:
        async with Client(site) as client:
            await _until_state(client.bus, "a healthy tier", lambda s: s.s3.reachable)
            proxy.set_fault(mode, **fault)
            try:
                chunks = {n: await client.write(n, d) for n, d in files.items()}
                if error_class is not None:
                    state = await _until_state(
                        client.bus, "the fault seen", lambda s: not s.s3.reachable
                    )
                    assert state.s3.error_class == error_class, state.s3
                    health = cfs(site, "s3-health")
                    assert health.returncode == 1, health.stdout
                    assert f"error class: {error_class}" in health.stdout, health.stdout
            finally:
                proxy.set_fault("pass")
        await _until_indexed(site, chunks)
        return chunks

    chunks = asyncio.run(go())
    for name, data in files.items():
        assert asyncio.run(_in_s3(site, s3_direct, chunks[name])) == data, name


def test_failover_sends_new_blobs_to_the_target_and_back_copies_them_home(
    site: LocalSite, s3_env: dict[str, str], s3_direct: S3Settings
) -> None:
    """`s3-failover --target` (the full story with a failing bucket is scenario 7):
    a file written meanwhile lands in the other bucket; `--back` copies every blob
    recorded there home, and the queue status shows the copy."""
    out = _admin_s3(site, s3_env, "s3-failover", "--target", "s3://cfs-tier-b/data")
    assert "Data tier now writes to s3://cfs-tier-b/data" in out, out
    data = random.Random(11).randbytes(700 * KiB)

    async def write() -> list[str]:
        async with Client(site) as client:
            ids = await client.write("during-failover", data)
        await _until_indexed(site, {"during-failover": ids})
        return ids

    ids = asyncio.run(write())

    async def urls() -> set[str]:
        async with await site.client() as admin:
            index = await admin.key_value(TIER_INDEX.bucket)
            return {r.url for r in await read_blob_records(index)}

    assert "s3://cfs-tier-b/data" in asyncio.run(urls())
    out = _admin_s3(site, s3_env, "s3-failover", "--back")
    assert f"Data tier now writes to {URL}" in out, out

    async def home() -> TierState:
        async with await site.client() as admin:
            return await _until_state(
                admin,
                "every blob back home",
                lambda s: s.complete_url == URL and s.copied_blobs > 0,
            )

    asyncio.run(home())
    assert asyncio.run(urls()) == {URL}
    assert asyncio.run(_in_s3(site, s3_direct, ids)) == data


@pytest.mark.parametrize(
    "point",
    [
        # The new blob written, no location moved yet: the harder case below covers its
        # recovery (the emptied new blob deleted, the old one compacted again).
        pytest.param("tier.compact_written", marks=pytest.mark.slow),
        # make test-slow too: the default suite keeps under 15 min
        pytest.param("tier.compact_moved", marks=pytest.mark.slow),
    ],
)
def test_garbage_leaves_s3_through_gc_and_compaction_despite_a_kill9_mid_compaction(
    site: LocalSite,
    s3_env: dict[str, str],
    s3_direct: S3Settings,
    tmp_path_factory: pytest.TempPathFactory,
    point: str,
) -> None:
    """Files unlinked: backup's GC unindexes their chunks (its keep set is the live
    metadata here), compaction rewrites the blobs they leave half empty and deletes the
    empty ones. The tierer is killed -9 mid-compaction (the new blob written but no
    location moved; one location moved); the next holder's passes converge: every live
    chunk in exactly one recorded blob, the dead ones in no blob at all."""
    rng = random.Random(point)
    files = {f"gc-{point}-{i}": rng.randbytes(rng.choice([4000, 400 * KiB])) for i in range(6)}
    kept = f"gc-{point}-0"

    async def write_and_unlink() -> dict[str, list[str]]:
        async with Client(site) as client:
            written = await asyncio.gather(*(client.write(n, d) for n, d in files.items()))
            chunks = dict(zip(files, written, strict=True))
            await _until_indexed(site, chunks)
            for name in files:
                if name != kept:
                    await client.meta.unlink(ROOT_INO, name)
        return chunks

    _tier_config(site, s3_env, "--flush-after", "3")  # one blob for them all
    try:
        chunks = asyncio.run(write_and_unlink())
    finally:
        _tier_config(site, s3_env, "--flush-after", "0.3")
    dead = {c for name, ids in chunks.items() if name != kept for c in ids}
    shared = asyncio.run(_holding(site, s3_direct, dead | set(chunks[kept])))
    assert any(held & dead and held & set(chunks[kept]) for _, held in shared.values()), shared
    time.sleep(1.5)  # past the grace: the blobs were written before the mark
    gc = cfs(site, "gc", "--json", timeout=120)
    assert gc.returncode == 0, (gc.stdout, gc.stderr)
    report = json.loads(gc.stdout)
    assert report["tier_forgotten"] >= len(dead), report

    CRASH_FILE(tmp_path_factory).write_text(f"{point}@s3-tierer")
    time.sleep(1.0)  # the new blobs' minimum age
    first = cfs(site, "s3-compact", "--json", "--timeout", "15", timeout=60)
    assert first.returncode != 0, "the compaction should have died at the crash point"
    assert not CRASH_FILE(tmp_path_factory).exists(), "the crash point was never reached"

    deadline = time.monotonic() + 120
    while True:
        again = cfs(site, "s3-compact", "--json", "--timeout", "30", timeout=60)
        holding = asyncio.run(_holding(site, s3_direct, dead | set(chunks[kept])))
        recorded = {b: held for b, (rec, held) in holding.items() if rec}
        live_copies = [len([b for b, held in recorded.items() if c in held]) for c in chunks[kept]]
        dead_held = {b for b, (_, held) in holding.items() if held & dead}
        if again.returncode == 0 and live_copies == [1] * len(chunks[kept]) and not dead_held:
            break
        assert time.monotonic() < deadline, (again.stdout, again.stderr, holding)
        time.sleep(1.0)
    assert asyncio.run(_in_s3(site, s3_direct, chunks[kept])) == files[kept]
    status = cfs(site, "s3-queue-status")
    print(f"\n[tier compaction, kill -9 at {point}] {len(dead)} dead chunks gone from S3; "
          f"{[line for line in status.stdout.splitlines() if 'Garbage' in line]}")  # fmt: skip


def test_tiered_mode_evicts_cold_files_keeps_warm_ones_and_recalls_on_read(
    site: LocalSite, s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Tiered mode with a 2 s coldness: files nobody touches leave flash (verified in S3
    first, marked, fragments deleted), a file read all along stays. The tierer is
    killed -9 right after marking its first chunk EVICTING; the next holder finishes.
    Then the consistency check is clean (missing on purpose is no damage), a read
    brings the data back byte for byte without a damage report, and the chunks are
    marked present again."""
    rng = random.Random(15)
    cold = {f"cold-{i}": rng.randbytes(rng.choice([5000, 700 * KiB])) for i in range(4)}
    warm = {"warm": rng.randbytes(300 * KiB)}

    async def write() -> dict[str, list[ChunkRef]]:
        async with Client(site) as client:
            refs = {}
            for name, data in {**cold, **warm}.items():
                ino = (await client.meta.create(ROOT_INO, name)).ino
                refs[name] = list((await client.files.write_all(ino, data)).chunks)
        await _until_indexed(site, {n: [r.chunk_id for r in rs] for n, rs in refs.items()})
        return refs

    refs = asyncio.run(write())
    CRASH_FILE(tmp_path_factory).write_text("tier.evict_marked@s3-tierer")
    out = _tier_config(site, s3_env, "--mode", "tiered", "--url", URL, "--evict-after", "2")
    assert "files unread and unwritten for 2 s leave flash" in out, out

    async def flash(admin: Bus, ref: ChunkRef) -> list[bool]:
        chunks, held = ChunkStoreClient(admin), []
        for i, node in enumerate(ref.fragments):
            try:
                await chunks.verify(node, fragment_key(ref.chunk_id, ref.scheme, i))
                held.append(True)
            except FragmentError:
                held.append(False)
        return held

    async def marks(admin: Bus, names: list[str]) -> set[FlashCopy]:
        index = await admin.key_value(TIER_INDEX.bucket)
        found = set()
        for name in names:
            for ref in refs[name]:
                entry = await index.get(chunk_location_key(ref.chunk_id))
                found.add(ChunkLocation.model_validate_json(entry.value or b"").flash)
        return found

    async def evicted_while_warm_is_read() -> tuple[float, int]:
        started = time.monotonic()
        async with Client(site, cache_bytes=0) as reader, await site.client() as admin:
            ino = (await reader.meta.lookup(ROOT_INO, "warm")).ino
            while await marks(admin, list(cold)) != {FlashCopy.EVICTED}:
                assert time.monotonic() - started < 90, await marks(admin, list(cold))
                assert await reader.files.read_all(ino) == warm["warm"]
                await asyncio.sleep(0.3)
            for name in cold:
                for ref in refs[name]:
                    assert await flash(admin, ref) == [False] * len(ref.fragments), name
            assert await marks(admin, ["warm"]) == {FlashCopy.PRESENT}
            for ref in refs["warm"]:
                assert all(await flash(admin, ref))
            damaged = await _damage_reports(admin)
            return time.monotonic() - started, damaged

    seconds, damaged_before = asyncio.run(evicted_while_warm_is_read())
    assert not CRASH_FILE(tmp_path_factory).exists(), "the crash point was never reached"
    status = _admin_s3(site, s3_env, "s3-queue-status")
    assert "Evicted by" in status, status

    report = cfs(site, "metadata-consistency-check", "--json", timeout=180)
    checked = json.loads(report.stdout)
    assert report.returncode == 0, [f["line"] for f in checked["findings"]]
    notes = checked["notes"]
    assert any("evicted to S3" in n for n in notes), notes

    # Coldness off for the read-back (else the files could leave again meanwhile).
    _tier_config(site, s3_env, "--evict-after", "3600")

    async def read_back() -> tuple[dict[str, bytes], set[FlashCopy], int]:
        async with Client(site) as client:
            got = {n: await client.files.read_all((await client.meta.lookup(ROOT_INO, n)).ino)
                   for n in cold}  # fmt: skip
        async with await site.client() as admin:
            for name in cold:
                for ref in refs[name]:
                    assert all(await flash(admin, ref)), name
            return got, await marks(admin, list(cold)), await _damage_reports(admin)

    got, after, damaged_after = asyncio.run(read_back())
    assert got == cold
    assert after == {FlashCopy.PRESENT}
    assert damaged_after == damaged_before, "a recall of evicted data reported damage"
    _tier_config(site, s3_env, "--mode", "cache")
    print(f"\n[tier tiered] {sum(len(refs[n]) for n in cold)} chunks evicted within "
          f"{seconds:.1f} s of tiered mode (evict-after 2 s), read back identical")  # fmt: skip


async def _damage_reports(admin: Bus) -> int:
    """FragmentDamaged events so far on this site's DATA stream."""
    info = await admin.js.stream_info(DATA.name, subjects_filter=f"cfs.{admin.site}.data.*.damaged")
    return sum((info.state.subjects or {}).values())
