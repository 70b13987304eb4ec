"""`cfs admin metadata-consistency-check` and `metadata-repair` on a real 3-node site.

The real console script against real processes (NATS cluster, metadata-raft,
chunk-store and membership per node), with damage done the way it
happens: bytes flipped in one replica's stored record (its process stopped, the
RocksDB files edited, the process started again), bytes flipped in a fragment
file, and records a buggy operation could have journaled (sent as repairs). Each
test leaves the site clean: the check exits 0 at its end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cfs.admin.snapshot import read_record
from cfs.bus import NoResponders
from cfs.client import FileStore, MetadataClient
from cfs.client.shard_admin import shard_admin
from cfs.ids import new_id
from cfs.lease import Lease
from cfs.supervisor import LocalSite
from cfs_chunkstore.store import fragment_path, store_root
from cfs_contracts.data import fragment_key
from cfs_contracts.fs.changes import DelDentry, DelInode, PutInode
from cfs_contracts.fs.check import CHECK_STATUS_KEY, CheckStatus, ScanReplicas
from cfs_contracts.fs.records import DEFAULT_CHUNK_SIZE, ROOT_INO, Inode, shard_of
from cfs_contracts.fs.shard_admin import RepairRecords
from cfs_contracts.streams import shard_lease_key
from cfs_metadata.fsck import ask_node
from cfs_metadata.projection import Projection
from tests.integration.test_admin_cli import cfs

SITE = "chk"
SHARDS = 2


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    # No repair service: a damaged fragment must be rebuilt by metadata-repair itself.
    running = LocalSite(
        tmp_path_factory.mktemp("check") / "site",
        nodes=3,
        shards=SHARDS,
        site=SITE,
        services=("metadata-raft", "chunk-store", "membership"),
    )
    try:
        asyncio.run(running.start())
        asyncio.run(running.wait_ready())
        asyncio.run(_make_tree(running))
        yield running
    finally:
        running.stop()


TREE: dict[str, Any] = {}


async def _make_tree(site: LocalSite) -> None:
    """Directories in both shards, files with data (2+1 over three nodes), a hard link,
    a symlink: what every test starts from (and checks clean again at its end)."""
    async with await site.client() as bus:
        meta = MetadataClient(bus, deadline_s=30)
        files = FileStore(bus, meta, client_id=bus.node, fragment_timeout_s=5.0)
        await files.start()
        try:
            dirs = [await meta.mkdir(ROOT_INO, f"d{i}") for i in range(6)]
            assert {shard_of(d.ino) for d in dirs} == {1, 2}
            for d in dirs:
                sub = await meta.mkdir(d.ino, "sub")
                for k in range(3):
                    await meta.create(sub.ino, f"e{k}")
                await meta.symlink(d.ino, "link", "sub/e0")
            data = random.Random(5).randbytes(DEFAULT_CHUNK_SIZE + 4096)
            big = await meta.create(dirs[0].ino, "big")
            await files.write_all(big.ino, data)
            small = await meta.create(dirs[1].ino, "small")
            await files.write_all(small.ino, b"hello, world\n")
            await meta.link(small.ino, dirs[2].ino, "small-link")
            TREE.update(
                dirs=[d.ino for d in dirs],
                big=big.ino,
                big_sha=hashlib.sha256(data).hexdigest(),
                small=small.ino,
            )
        finally:
            await files.close()


def check(site: LocalSite, *args: str) -> tuple[int, dict[str, Any]]:
    result = cfs(site, "metadata-consistency-check", "--json", *args, timeout=180)
    assert result.returncode in (0, 1, 2), (result.stdout, result.stderr)
    return result.returncode, json.loads(result.stdout)


def lines(report: dict[str, Any]) -> list[str]:
    return [f["line"] for f in report["findings"]]


def assert_clean(site: LocalSite) -> dict[str, Any]:
    code, report = check(site)
    assert code == 0, (lines(report), report["unchecked"])
    return report


def repair(site: LocalSite, *args: str) -> tuple[int, str]:
    result = cfs(site, "metadata-repair", *args, timeout=300)
    assert result.returncode in (0, 1, 2), (result.stdout, result.stderr)
    return result.returncode, result.stdout


async def _writer(site: LocalSite, shard: int) -> str:
    async with await site.client() as bus:
        status = await Lease.read_status(bus, shard_lease_key(f"{shard:03d}"))
    assert status is not None and status.holder
    return status.holder


async def _inject(site: LocalSite, shard: int, *changes: Any) -> None:
    """Journal changes as a buggy operation would have (a repair op with no checks)."""
    async with await site.client() as bus:
        await shard_admin(
            bus,
            shard,
            RepairRecords(repair_id=new_id(), problem="test-damage", finding="", changes=changes),
        )


async def _getattr(site: LocalSite, ino: int) -> Inode:
    async with await site.client() as bus:
        return await MetadataClient(bus).getattr(ino)


def _flip_record(site: LocalSite, node: str, shard: int, ino: int) -> None:
    """Stop the node's metadata-raft, flip one byte of the inode's stored record, start it."""
    process = site.metadata(node)
    process.stop(15)
    projection = Projection(site.data_dir(node) / "metadata" / f"shard-{shard:03d}", shard)
    try:
        raw = bytearray(projection.raw_get(Projection.inode_key(ino)) or b"")
        assert raw, f"inode {ino} is not on {node}"
        raw[len(raw) // 2] ^= 0x20
        projection.raw_put(Projection.inode_key(ino), bytes(raw))
    finally:
        projection.close()
    process.start()
    asyncio.run(site.wait_ready())
    asyncio.run(_answering(site, node))


async def _answering(site: LocalSite, node: str) -> None:
    """Until the node's replica checks answer (they start after its replicas)."""
    async with await site.client() as bus:
        for _ in range(100):
            try:
                await ask_node(bus, node, ScanReplicas(shards=(1,)), 10.0)
                return
            except NoResponders:
                await asyncio.sleep(0.2)
    raise AssertionError(f"metadata-raft on {node} does not answer checks")


def test_a_healthy_tree_checks_clean_with_its_speed(site: LocalSite) -> None:
    report = assert_clean(site)
    stats = report["stats"]
    assert stats["shards"] == SHARDS and stats["replicas"] == 3 * SHARDS
    assert stats["inodes"] >= 1 + 6 * (1 + 1 + 3 + 1) + 2
    assert stats["fragments"] >= 3 * 3  # big: 2 chunks, small: 1; 2+1 each
    print(f"\ncheck: {stats['inodes']} inodes in {stats['seconds']} s")
    text = cfs(site, "metadata-consistency-check")
    assert text.returncode == 0 and "Metadata consistent" in text.stdout, text.stdout
    last = asyncio.run(_last_check(site))  # what the "consistency check missed" alert reads
    assert last is not None and last.status == "clean" and last.inodes == stats["inodes"]
    assert time.time() * 1000 - last.finished_ms < 60_000


async def _last_check(site: LocalSite) -> CheckStatus | None:
    async with await site.client() as bus:
        return await read_record(bus, CHECK_STATUS_KEY, CheckStatus)


def test_a_replica_that_does_not_answer_makes_the_check_incomplete(site: LocalSite) -> None:
    node = site.node_names[-1]
    process = site.metadata(node)
    process.stop(15)
    try:
        result = cfs(site, "metadata-consistency-check", timeout=180)
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert f"Could not check: replicas on {node}" in result.stdout, result.stdout
        assert "the check is incomplete" in result.stdout
    finally:
        process.start()
        asyncio.run(site.wait_ready())
        asyncio.run(_answering(site, node))
    assert_clean(site)


def test_a_record_flipped_on_one_follower_is_found_there_and_rebuilt(site: LocalSite) -> None:
    ino = TREE["small"]
    shard = shard_of(ino)
    writer = asyncio.run(_writer(site, shard))
    follower = next(n for n in site.node_names if n != writer)
    _flip_record(site, follower, shard, ino)

    code, report = check(site)
    assert code == 1, (lines(report), report["unchecked"])
    found = [f for f in report["findings"] if f["problem"] == "checksum"]
    assert len(found) == 1, lines(report)
    line = found[0]["line"]
    assert line.startswith(f"Inode {ino} checksum mismatch: expected 0x"), line
    assert ", got 0x" in line and f"replica on {follower}" in line
    assert len(report["findings"]) == 1, lines(report)  # the other replicas are fine

    dry_code, planned = repair(site, "--dry-run")
    assert (
        dry_code == 1 and f"would rebuild the replica of shard {shard:03d} on {follower}" in planned
    )
    code, out = repair(site, "--auto-fix")
    assert code == 0, out
    assert f"repaired: rebuild the replica of shard {shard:03d} on {follower}" in out, out
    assert_clean(site)


def test_the_writers_own_damaged_record_is_rebuilt_after_a_lease_handoff(
    site: LocalSite,
) -> None:
    ino = TREE["big"]
    shard = shard_of(ino)
    damaged = asyncio.run(_writer(site, shard))
    _flip_record(site, damaged, shard, ino)  # its lease moved while it was stopped
    asyncio.run(_hand_lease(site, shard, damaged))  # make it the writer again

    code, report = check(site)
    assert code == 1, lines(report)
    assert [f["node"] for f in report["findings"]] == [damaged], lines(report)
    code, out = repair(site)
    assert code == 0, out
    assert f"repaired: rebuild the replica of shard {shard:03d} on {damaged}" in out, out
    assert_clean(site)
    assert asyncio.run(_read_sha(site, ino)) == TREE["big_sha"]


async def _hand_lease(site: LocalSite, shard: int, node: str) -> None:
    deadline = time.monotonic() + 30
    async with await site.client() as bus:
        lease = Lease(bus, shard_lease_key(f"{shard:03d}"), node="test")
        while time.monotonic() < deadline:
            status = await Lease.read_status(bus, shard_lease_key(f"{shard:03d}"))
            if status is not None and status.holder == node:
                return
            if status is not None and status.holder and status.handoff_to != node:
                await lease.request_handoff(node)
            await asyncio.sleep(0.2)
    raise AssertionError(f"{node} did not take the lease of shard {shard:03d}")


async def _read_sha(site: LocalSite, ino: int) -> str:
    async with await site.client() as bus:
        meta = MetadataClient(bus, deadline_s=30)
        files = FileStore(bus, meta, client_id=bus.node)
        await files.start()
        try:
            return hashlib.sha256(await files.read_all(ino)).hexdigest()
        finally:
            await files.close()


def test_wrong_link_count_orphan_and_dangling_entry(site: LocalSite) -> None:
    d0 = TREE["dirs"][0]
    small = asyncio.run(_getattr(site, TREE["small"]))
    sub = asyncio.run(_lookup(site, d0, "sub"))
    victim = asyncio.run(_lookup(site, sub.ino, "e1"))
    doomed = asyncio.run(_lookup(site, sub.ino, "e2"))
    # A link count off by three, a file whose only entry vanished, an inode gone under
    # its entry: what a buggy operation could leave behind, journaled like one.
    wrong = small.model_copy(update={"nlink": 5})
    asyncio.run(_inject(site, shard_of(small.ino), PutInode(inode=wrong)))
    asyncio.run(_inject(site, shard_of(sub.ino), DelDentry(parent=sub.ino, name="e1")))
    asyncio.run(_inject(site, shard_of(doomed.ino), DelInode(ino=doomed.ino)))

    code, report = check(site)
    assert code == 1, (lines(report), report["unchecked"])
    found = set(lines(report))
    assert f"Inode {small.ino}: link count 5, expected 2" in found, found
    assert f"Inode {victim.ino}: orphan file (no directory entry names it)" in found, found
    assert f"Entry {sub.ino}/e2: dangling (inode {doomed.ino} does not exist)" in found, found
    assert len(found) == 3, found

    code, out = repair(site)  # without --auto-fix: never removes an entry
    assert code == 1, out
    assert f"not repaired: Entry {sub.ino}/e2: dangling" in out, out
    code, report = check(site)
    assert lines(report) == [f"Entry {sub.ino}/e2: dangling (inode {doomed.ino} does not exist)"]
    assert asyncio.run(_getattr(site, small.ino)).nlink == 2
    lost_found = asyncio.run(_lookup(site, ROOT_INO, "lost+found"))
    adopted = asyncio.run(_lookup(site, lost_found.ino, f"#{victim.ino}"))
    assert adopted.ino == victim.ino and adopted.nlink == 1

    code, out = repair(site, "--auto-fix")
    assert code == 0, out
    assert f"repaired: remove dangling entry {sub.ino}/e2" in out, out
    assert_clean(site)


def test_a_size_the_chunk_map_contradicts_is_reported_in_the_guides_words(site: LocalSite) -> None:
    big = asyncio.run(_getattr(site, TREE["big"]))
    shrunk = big.model_copy(update={"size": 512})
    asyncio.run(_inject(site, shard_of(big.ino), PutInode(inode=shrunk)))
    code, report = check(site)
    assert code == 1, (lines(report), report["unchecked"])
    assert lines(report) == [f"Inode {big.ino}: corrupted (expected_size={big.size}, actual=512)"]
    code, out = repair(site)
    assert code == 1 and "run with --auto-fix" in out, out
    code, out = repair(site, "--auto-fix")
    assert code == 0, out
    assert asyncio.run(_getattr(site, big.ino)).size == big.size
    assert_clean(site)


@pytest.mark.expected_logs("fragment.damaged")
def test_a_flipped_byte_in_a_fragment_is_found_and_rebuilt(site: LocalSite) -> None:
    small = asyncio.run(_getattr(site, TREE["small"]))
    chunk = small.chunks[0]
    holder = chunk.fragments[1]
    key = fragment_key(chunk.chunk_id, chunk.scheme, 1)
    path = fragment_path(store_root(site.data_dir(holder)), key)
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0x01
    path.write_bytes(bytes(raw))

    code, report = check(site)
    assert code == 1, (lines(report), report["unchecked"])
    assert len(report["findings"]) == 1, lines(report)
    expected = f"Inode {small.ino}: chunk 0 fragment 1 on {holder} is corrupt"
    assert lines(report)[0].startswith(expected), lines(report)
    code, out = repair(site)
    assert code == 0, out
    assert_clean(site)
    assert path.read_bytes() != bytes(raw)


async def _lookup(site: LocalSite, parent: int, name: str) -> Inode:
    async with await site.client() as bus:
        return await MetadataClient(bus).lookup(parent, name)
