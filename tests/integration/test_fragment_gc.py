"""Fragment garbage collection (issue 14) with real processes: a 3-node site, S3.

The tests share one site and run in file order. The grace is 5 s (`CFS_GC_GRACE_S`)
and there is no periodic run: each collection is `cfs admin gc`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cfs.client import FileStore, MetadataClient
from cfs.client.chunks import ChunkStoreClient
from cfs.supervisor import LocalSite
from cfs_contracts.data import ListRequest
from cfs_contracts.fs.records import ROOT_INO
from cfs_contracts.fs.rpc import FsError
from tests.integration.test_backup_archive import admin, ok

SNAPSHOTS = "s3://cfs-gc/metadata"
GRACE_S = 5.0  # long enough that a loaded machine writes, unlinks and asks gc within it
SERVICES = ("metadata-raft", "chunk-store", "backup")
NODES = ("storage-1", "storage-2", "storage-3")
CRASHES = ("fault.crash", "lease.*", "singleton.*", "site.restarted")


@pytest.fixture(scope="module")
def site(
    s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalSite, Path]]:
    base = tmp_path_factory.mktemp("gc")
    crash = base / "crash"
    running = LocalSite(
        base / "site",
        nodes=3,
        servers=1,
        shards=1,
        site="gcs",
        services=SERVICES,
        env={
            **s3_env,
            "CFS_GC_GRACE_S": str(GRACE_S),
            "CFS_GC_INTERVAL_S": "0",
            "CFS_CRASH_FILE": str(crash),
        },
    )
    try:
        asyncio.run(running.start())
        asyncio.run(running.wait_ready())
        yield running, crash
    finally:
        running.stop()


def _blob(seed: int) -> bytes:
    return random.Random(seed).randbytes(5000 + seed)


async def _write(site: LocalSite, files: dict[str, bytes]) -> dict[str, set[str]]:
    """Create or overwrite each file; the chunk ids each one names now."""
    async with await site.client() as bus:
        meta = MetadataClient(bus, deadline_s=30)
        store = FileStore(bus, meta, client_id=bus.node, fragment_timeout_s=3.0)
        await store.start()
        try:
            named = {}
            for name, data in files.items():
                try:
                    ino = (await meta.lookup(ROOT_INO, name)).ino
                except FsError as exc:
                    assert exc.errno == errno.ENOENT
                    ino = (await meta.create(ROOT_INO, name)).ino
                stored = await store.write_all(ino, data)
                named[name] = {c.chunk_id for c in stored.chunks}
            return named
        finally:
            await store.close()


async def _read(site: LocalSite, name: str) -> bytes:
    async with await site.client() as bus:
        meta = MetadataClient(bus, deadline_s=30)
        store = FileStore(bus, meta, client_id=bus.node, fragment_timeout_s=3.0)
        await store.start()
        try:
            return await store.read_all((await meta.lookup(ROOT_INO, name)).ino)
        finally:
            await store.close()


async def _unlink(site: LocalSite, *names: str) -> None:
    async with await site.client() as bus:
        meta = MetadataClient(bus, deadline_s=30)
        for name in names:
            await meta.unlink(ROOT_INO, name)


async def _held(site: LocalSite) -> set[str]:
    """Chunk ids with a fragment on any node."""
    async with await site.client() as bus:
        chunks = ChunkStoreClient(bus)
        found: set[str] = set()
        for node in NODES:
            after = ""
            while True:
                page = await chunks.list(node, ListRequest(after=after))
                found |= {f.key.split(".")[0] for f in page.fragments}
                if not page.more or not page.fragments:
                    break
                after = page.fragments[-1].key
        return found


def outlive_grace(stored_at: float) -> None:
    """Sleep until fragments stored by `stored_at` (monotonic) are past the grace."""
    time.sleep(max(0.0, stored_at + GRACE_S + 0.5 - time.monotonic()))


def held(site: LocalSite) -> set[str]:
    return asyncio.run(_held(site))


def gc(site: LocalSite, s3_env: dict[str, str], *args: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(ok(site, s3_env, "gc", "--json", *args))
    return report


def test_deleted_and_overwritten_files_lose_their_fragments_after_the_grace(
    site: tuple[LocalSite, Path], s3_env: dict[str, str]
) -> None:
    running, _ = site
    first = asyncio.run(
        _write(running, {"kept": _blob(1), "gone": _blob(2), "rewritten": _blob(3)})
    )
    second = asyncio.run(_write(running, {"rewritten": _blob(4)}))
    stored = time.monotonic()
    asyncio.run(_unlink(running, "gone"))
    garbage = first["gone"] | first["rewritten"]
    live = first["kept"] | second["rewritten"]
    assert garbage <= held(running) and not garbage & live

    young = gc(running, s3_env)  # within the grace: an in-flight write looks just like this
    assert young["ok"] and young["deleted"] == 0 and young["kept_young"] >= 3 * len(garbage)
    assert young["protected_snapshot"] is None
    outlive_grace(stored)

    dry = gc(running, s3_env, "--dry-run")
    assert dry["dry_run"] and dry["deleted"] == 3 * len(garbage)  # ec2+1: 3 per chunk
    assert {d["key"].split(".")[0] for d in dry["deletions"]} == garbage
    assert garbage <= held(running), "a dry run deleted something"

    done = gc(running, s3_env)
    assert done["ok"] and done["deleted"] == 3 * len(garbage), done
    assert done["deleted_bytes"] == sum(d["size"] for d in done["deletions"]) > 0
    assert not garbage & held(running) and live <= held(running)
    assert asyncio.run(_read(running, "kept")) == _blob(1)
    assert asyncio.run(_read(running, "rewritten")) == _blob(4)
    assert gc(running, s3_env)["deleted"] == 0  # nothing left to collect


@pytest.mark.slow  # make test-slow (the default suite keeps under 15 min)
@pytest.mark.expected_logs("restore.*", "replay.*")
def test_a_retained_snapshot_keeps_its_chunks_until_it_expires_and_restores(
    site: tuple[LocalSite, Path], s3_env: dict[str, str]
) -> None:
    running, _ = site
    named = asyncio.run(_write(running, {"in-snapshot": _blob(5)}))["in-snapshot"]
    stored = time.monotonic()
    taken = json.loads(
        ok(
            running,
            s3_env,
            "snapshot-metadata",
            "--destination",
            SNAPSHOTS,
            "--keep",
            "1",
            "--json",
        )
    )
    asyncio.run(_unlink(running, "in-snapshot"))
    outlive_grace(stored)

    report = gc(running, s3_env)
    assert report["ok"] and report["protected_snapshot"] == taken["path"], report
    assert named <= held(running), "a chunk of the retained snapshot was collected"

    ok(running, s3_env, "restore-metadata", "--from-snapshot", taken["path"], "--force")
    ok(running, s3_env, "replay-journal", "--none")
    assert asyncio.run(_read(running, "in-snapshot")) == _blob(5)

    # Gone again, and the snapshot naming it expires (keep 1): now it is collected.
    asyncio.run(_unlink(running, "in-snapshot"))
    newer = json.loads(
        ok(
            running,
            s3_env,
            "snapshot-metadata",
            "--destination",
            SNAPSHOTS,
            "--keep",
            "1",
            "--json",
        )
    )
    outlive_grace(stored)
    report = gc(running, s3_env)
    assert report["protected_snapshot"] == newer["path"] != taken["path"]
    assert report["ok"] and report["deleted"] >= 3 * len(named), report
    assert not named & held(running)


@pytest.mark.slow  # make test-slow (the default suite keeps under 15 min)
@pytest.mark.expected_logs(*CRASHES)
def test_backup_killed_mid_sweep_then_a_rerun_finishes(
    site: tuple[LocalSite, Path], s3_env: dict[str, str]
) -> None:
    running, crash = site
    named = asyncio.run(_write(running, {f"doomed{i}": _blob(10 + i) for i in range(4)}))
    stored = time.monotonic()
    garbage = set().union(*named.values())
    asyncio.run(_unlink(running, *named))
    outlive_grace(stored)
    # Written and deleted after the retained snapshot's cut: a point-in-time restore
    # can stop while they existed, so they stay until that snapshot expires.
    window = gc(running, s3_env)
    assert window["ok"] and garbage <= held(running), window
    ok(running, s3_env, "snapshot-metadata", "--destination", SNAPSHOTS, "--keep", "1")

    crash.write_text("backup.gc_deleted")
    failed = admin(running, s3_env, "gc", "--timeout", "5")
    assert failed.returncode != 0 and not crash.exists(), failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    left = garbage & held(running)
    assert left, "the crash came after the whole sweep"

    deadline = time.monotonic() + 60
    while True:  # as an init system would: restart it; a standby may take over first
        running.restart_exited()
        again = admin(running, s3_env, "gc", "--json", "--timeout", "20")
        if again.returncode == 0:
            break
        assert time.monotonic() < deadline, again.stderr
        time.sleep(1.0)
    report = json.loads(again.stdout)
    assert report["ok"] and not garbage & held(running), report
    assert 0 < report["deleted"] < 3 * len(garbage)  # the rest went before the crash
