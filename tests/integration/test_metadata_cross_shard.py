"""Cross-shard operations on a 3-shard site: atomic through the two-phase protocol."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cfs.supervisor import NatsCluster
from cfs_contracts.events.metadata import MetaCommitted
from cfs_contracts.fs.records import shard_of
from cfs_contracts.fs.rpc import FsError
from cfs_metadata.check import check_tree
from cfs_metadata.state import MemoryShard, apply_entries
from tests.integration.metadata_harness import MetaSite, replay_journal

SHARDS = 3


@pytest.fixture
async def site(tmp_path: Path, nats_cluster3: NatsCluster) -> AsyncIterator[MetaSite]:
    meta = MetaSite(tmp_path / "meta", nats_cluster3, shards=SHARDS)
    await meta.provision()
    meta.start_all()
    try:
        await meta.wait_ready()
        yield meta
    finally:
        meta.stop_all()


async def whole_namespace(site: MetaSite) -> MemoryShard:
    """All shards' committed state in one view (inode numbers are unique across shards)."""
    merged = MemoryShard(1)
    for shard in range(1, SHARDS + 1):
        journal = await replay_journal(site, shard)
        for _, payload in journal:
            if isinstance(payload, MetaCommitted):
                apply_entries(merged, payload.entries)
    merged.txs.clear()
    return merged


async def test_cross_shard_mkdir_rename_link_rmdir(site: MetaSite) -> None:
    bus, client = await site.client(deadline_s=60)
    try:
        dirs = [await client.mkdir(1, f"d{i}") for i in range(9)]
        shards = {shard_of(d.ino) for d in dirs}
        assert len(shards) > 1, "directories spread over shards"
        a, b = next((x, y) for x in dirs for y in dirs if shard_of(x.ino) != shard_of(y.ino))
        f = await client.create(a.ino, "file")
        await client.rename(a.ino, "file", b.ino, "moved")
        assert (await client.lookup(b.ino, "moved")).ino == f.ino
        with pytest.raises(FsError) as gone:
            await client.lookup(a.ino, "file")
        assert gone.value.errno == errno.ENOENT
        linked = await client.link(f.ino, a.ino, "hardlink")
        assert linked.nlink == 2
        await client.unlink(b.ino, "moved")
        assert (await client.getattr(f.ino)).nlink == 1
        sub = await client.mkdir(a.ino, "sub")
        await client.rename(a.ino, "sub", b.ino, "sub2")  # a directory between shards
        assert (await client.getattr(sub.ino)).parent == b.ino
        assert (await client.getattr(a.ino)).nlink == 2
        assert (await client.getattr(b.ino)).nlink == 3
        with pytest.raises(FsError) as loop:
            await client.rename(1, f"d{dirs.index(b)}", sub.ino, "inside")
        assert loop.value.errno == errno.EINVAL
        with pytest.raises(FsError) as busy:
            await client.rmdir(1, f"d{dirs.index(b)}")
        assert busy.value.errno == errno.ENOTEMPTY
        await client.rmdir(b.ino, "sub2")
        await client.rmdir(1, f"d{dirs.index(b)}")
        assert (await client.getattr(1)).nlink == 2 + 8
        totals = await client.statfs(SHARDS)
    finally:
        await bus.close()
    merged = await whole_namespace(site)
    assert check_tree(merged, merged.inodes) == []
    assert totals["inodes"] == len(merged.inodes)


CRASH_POINTS = [
    "coordinator_prepared",
    "participant_prepared",
    "coordinator_committed",
    "participant_decided",
    "coordinator_delivered",
]


@pytest.mark.expected_logs("fault.crash", "retry.waiting")
@pytest.mark.parametrize("point", CRASH_POINTS)
async def test_crash_at_every_step_of_a_cross_shard_rename(site: MetaSite, point: str) -> None:
    """kill -9 (os._exit) at each step: afterwards the file is in the old place or the new
    one, never both or neither, and the namespace is consistent."""
    bus, client = await site.client(deadline_s=60)
    try:
        dirs = [await client.mkdir(1, f"d{i}") for i in range(6)]
        a, b = next((x, y) for x in dirs for y in dirs if shard_of(x.ino) != shard_of(y.ino))
        await client.create(a.ino, "file")
        site.crash_file.write_text(point)
        rename = asyncio.create_task(client.rename(a.ino, "file", b.ino, "moved"))
        crashed: list[str] = []
        while not rename.done():
            crashed += site.restart_dead()
            await asyncio.sleep(0.05)
        renamed = rename.exception() is None
        assert not site.crash_file.exists(), f"crash point {point} was never reached"
        crashed += site.restart_dead()
        await _until_no_transaction_in_doubt(site)
        old = await _exists(client, a.ino, "file")
        new = await _exists(client, b.ino, "moved")
        assert old != new, f"after a crash at {point}: old={old} new={new}"
        if renamed:
            assert new, "an acknowledged rename must have happened"
        print(
            f"\ncrash at {point}: processes restarted {crashed}, rename "
            f"{'acknowledged' if renamed else 'failed'}, file is in the "
            f"{'new' if new else 'old'} place"
        )
    finally:
        await bus.close()
    merged = await whole_namespace(site)
    assert check_tree(merged, merged.inodes) == []


async def _exists(client, parent: int, name: str) -> bool:
    try:
        await client.lookup(parent, name)
    except FsError as exc:
        assert exc.errno == errno.ENOENT
        return False
    return True


async def _until_no_transaction_in_doubt(site: MetaSite, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        site.restart_dead()
        prepared = []
        for shard in range(1, SHARDS + 1):
            state = MemoryShard(shard)
            for _, payload in await replay_journal(site, shard):
                if isinstance(payload, MetaCommitted):
                    apply_entries(state, payload.entries)
            prepared += [t.tx_id for t in state.txs.values() if t.state == "prepared"]
        if not prepared:
            return
        assert asyncio.get_running_loop().time() < deadline, f"still in doubt: {prepared}"
        await asyncio.sleep(0.5)
