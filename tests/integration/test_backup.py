"""Metadata snapshots and restores through `cfs admin`, against a real 3-node site.

The backup service cuts a snapshot across both shards while a writer keeps
creating files; the file restores onto the same cluster (`--force`), which then
holds exactly the snapshot's namespace, read-only until it is opened. Damaged
snapshot files are refused with the reason before anything changes.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfs.backup.image import split_chunks
from cfs.backup.snapshot_file import read_snapshot
from cfs.bus import Bus
from cfs.cli import backup as cli_backup
from cfs.client.metadata import MetadataClient
from cfs.client.shard_admin import ShardAdminRefused, shard_admin
from cfs.supervisor import LocalSite
from cfs_contracts.backup import BACKUP_STATUS_KEY, BackupStatus
from cfs_contracts.fs.records import ROOT_INO, Kind
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.fs.shard_admin import AnyShardAdminOp, RestoreChunk, ShardAdminReply
from cfs_contracts.streams import NODES
from tests.integration.test_admin_cli import cfs, ok

SITE = "bak"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    running = LocalSite(tmp_path_factory.mktemp("backup") / "site", nodes=3, shards=2, site=SITE)
    try:
        asyncio.run(running.start())
        asyncio.run(running.wait_ready())
        yield running
    finally:
        running.stop()


async def _names(site: LocalSite) -> set[str]:
    """Every path in the namespace (two levels: the test's shape)."""
    async with await site.client() as bus:
        meta = MetadataClient(bus)
        found = set()
        async for top in meta.readdir(ROOT_INO):
            if top.name in (".", ".."):
                continue
            found.add(top.name)
            if top.kind is Kind.DIR:
                async for entry in meta.readdir(top.ino):
                    if entry.name not in (".", ".."):
                        found.add(f"{top.name}/{entry.name}")
        return found


async def _create(site: LocalSite, prefix: str, count: int) -> set[str]:
    async with await site.client() as bus:
        meta = MetadataClient(bus)
        made = set()
        for d in range(4):  # directories are placed by hash: both shards get some
            name = f"{prefix}-dir{d}"
            parent = await meta.mkdir(ROOT_INO, name)
            made.add(name)
            for i in range(count):
                await meta.create(parent.ino, f"f{i}")
                made.add(f"{name}/f{i}")
        return made


async def _shadows_follow(site: LocalSite, timeout: float = 30.0) -> dict[str, int]:
    """Wait until the backup's own projections have applied every journal to its end,
    with no snapshot asked for; returns the positions."""
    async with await site.client() as bus:
        lasts = {
            shard: int((await bus.js.stream_info(f"META_{shard}")).state.last_seq)
            for shard in ("001", "002")
        }
        kv = await bus.js.key_value(NODES.bucket)
        deadline = time.monotonic() + timeout
        while True:
            entry = await kv.get(BACKUP_STATUS_KEY)
            status = BackupStatus.model_validate_json(entry.value or b"")
            if all(status.shadow_seqs.get(s, 0) >= last for s, last in lasts.items()):
                return status.shadow_seqs
            assert time.monotonic() < deadline, (status.shadow_seqs, lasts)
            await asyncio.sleep(0.2)


def test_the_backup_projections_follow_the_journals_between_snapshots(
    site: LocalSite, tmp_path: Path
) -> None:
    """A snapshot applies only what came since the last status: the rest was applied
    as it was journaled (from empty, a large tree's journal takes minutes)."""
    asyncio.run(_create(site, "followed", 20))
    positions = asyncio.run(_shadows_follow(site))
    assert set(positions) == {"001", "002"}
    out = ok(site, "snapshot-metadata", "--output", str(tmp_path / "f.tar.gz"), "--json")
    shards = json.loads(out)["manifest"]["shards"]
    for cut in shards:  # the marker and what little came after the status
        assert cut["seq"] >= positions[cut["shard"]]


def test_snapshot_while_writing_then_restore_gives_exactly_the_cut(
    site: LocalSite, tmp_path: Path
) -> None:
    existing = asyncio.run(_names(site))  # other tests' files (a shared site)
    before = existing | asyncio.run(_create(site, "before", 10))
    snapshot = tmp_path / "metadata.tar.gz"

    async def snapshot_during_writes() -> tuple[set[str], str]:
        writer = asyncio.create_task(_create(site, "during", 30))
        await asyncio.sleep(0.2)
        result = await asyncio.to_thread(
            cfs, site, "snapshot-metadata", "--output", str(snapshot), "--json"
        )
        return await writer, result.stdout if result.returncode == 0 else result.stderr

    during, out = asyncio.run(snapshot_during_writes())
    report = json.loads(out)
    manifest = report["manifest"]
    assert [s["shard"] for s in manifest["shards"]] == ["001", "002"]
    at_snapshot = report["manifest"]["shards"]
    assert sum(s["inodes"] for s in at_snapshot) >= len(before) + 1  # + root
    after = asyncio.run(_create(site, "after", 3))
    assert after <= asyncio.run(_names(site))

    refused = cfs(site, "restore-metadata", "--from-snapshot", str(snapshot))
    assert refused.returncode == 1 and "holds metadata" in refused.stderr

    before_restore = tmp_path / "pre-restore.tar.gz"
    restored = ok(
        site,
        "restore-metadata",
        "--from-snapshot",
        str(snapshot),
        "--force",
        "--pre-restore-output",
        str(before_restore),
    )
    assert "read-only until" in restored and "saved first" in restored
    saved = read_snapshot(before_restore)  # the replaced state, verified
    assert saved.manifest.inodes >= sum(s["inodes"] for s in at_snapshot) + len(after)
    names = asyncio.run(_names(site))
    assert before <= names
    assert not (after & names), "files created after the snapshot survived its restore"
    # A consistent cut: a directory made while the snapshot ran is there with all the
    # files the cut holds, and the inode count is exactly the namespace's.
    assert sum(s["inodes"] for s in at_snapshot) == len(names) + 1
    assert names - before <= during

    async def write_refused() -> int:
        async with await site.client() as bus:
            try:
                await MetadataClient(bus).mkdir(ROOT_INO, "while-held")
            except FsError as exc:
                return exc.errno
            return 0

    assert asyncio.run(write_refused()) == errno.EROFS
    opened = ok(site, "replay-journal", "--none")
    assert "open for writes" in opened
    assert asyncio.run(_create(site, "reopened", 1)) <= asyncio.run(_names(site))


def test_a_restore_sent_in_many_chunks_overtaking_each_other_is_exact(
    site: LocalSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image goes to each writer with several chunks in flight; one that overtakes
    another (here: chunk 1 held back) is refused with the writer's position and sent
    again from there. The restored tree is exactly the snapshot's."""
    asyncio.run(_create(site, "chunked", 40))
    path = tmp_path / "chunked.tar.gz"
    ok(site, "snapshot-metadata", "--output", str(path))
    expected = asyncio.run(_names(site))
    asyncio.run(_create(site, "not-in-it", 2))
    snapshot = read_snapshot(path)
    monkeypatch.setattr(cli_backup, "split_chunks", lambda data: split_chunks(data, 2048))
    held_back: set[int] = set()
    overtaken: list[int] = []

    async def slow_first_chunk_1(bus: Bus, shard: int, op: AnyShardAdminOp) -> ShardAdminReply:
        if isinstance(op, RestoreChunk) and op.index == 1 and shard not in held_back:
            held_back.add(shard)
            await asyncio.sleep(0.5)  # chunk 2 reaches the writer first
        try:
            return await shard_admin(bus, shard, op)
        except ShardAdminRefused as exc:
            overtaken.append(shard)
            raise exc

    monkeypatch.setattr(cli_backup, "shard_admin", slow_first_chunk_1)

    async def restore() -> None:
        async with await site.client() as bus:
            await cli_backup._restore(bus, snapshot, True, tmp_path / "pre.tar.gz")

    asyncio.run(restore())
    assert sorted(overtaken) == [1, 2], overtaken  # each shard resynchronized once
    ok(site, "replay-journal", "--none")
    assert asyncio.run(_names(site)) == expected


def _rewrite(source: Path, target: Path, edit: str) -> None:
    with tarfile.open(source, "r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    if edit == "newer":
        manifest = json.loads(files["manifest.json"])
        manifest["format"] = 99
        files["manifest.json"] = json.dumps(manifest).encode()
    elif edit == "flip":
        name = next(n for n in files if n.startswith("shards/"))
        data = bytearray(files[name])
        data[len(data) // 2] ^= 0x01
        files[name] = bytes(data)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    target.write_bytes(out.getvalue())


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip", "checksum mismatch"),
        ("truncate", "truncated or corrupt"),
        ("newer", "format 99 is newer"),
    ],
)
def test_a_damaged_snapshot_is_refused_with_the_reason(
    site: LocalSite, tmp_path: Path, damage: str, reason: str
) -> None:
    good = tmp_path / "good.tar.gz"
    ok(site, "snapshot-metadata", "--output", str(good))
    bad = tmp_path / "bad.tar.gz"
    if damage == "truncate":
        bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    else:
        _rewrite(good, bad, damage)
    names = asyncio.run(_names(site))
    result = cfs(site, "restore-metadata", "--from-snapshot", str(bad), "--force")
    assert result.returncode == 1
    assert reason in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert asyncio.run(_names(site)) == names  # nothing changed
    assert gzip  # (tar.gz handled by tarfile)
