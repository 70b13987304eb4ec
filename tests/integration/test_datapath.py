"""The client data path on a real 6-node site (EC 4+2): NATS, metadata-raft and
chunk-store processes, kill -9 and on-disk corruption."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cfs.bus import Bus
from cfs.client import FileStore, MetadataClient
from cfs.fuse.config import is_fuse_mount
from cfs.security import Role
from cfs.supervisor import LocalSite, ManagedProcess
from cfs.supervisor.site import child_pythonpath
from cfs_chunkstore.store import fragment_path, store_root
from cfs_contracts.data import fragment_key
from cfs_contracts.envelope import Envelope
from cfs_contracts.fs.records import DEFAULT_CHUNK_SIZE, ROOT_INO
from cfs_contracts.fs.rpc import FsError

CS = DEFAULT_CHUNK_SIZE
SIZES = [0, 1, CS - 1, CS, CS + 1, 2 * CS + 12345]
ROOT = Path(__file__).resolve().parents[2]


# The data path's services, and membership, whose verdict steers writes off lost nodes;
# repair and backup would only add processes to start.
SERVICES = ("metadata-raft", "chunk-store", "membership")


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[LocalSite]:
    """A site of its own, for a test that kills or corrupts."""
    local = LocalSite(tmp_path / "site", nodes=6, servers=1, site="t", services=SERVICES)
    async with local as running:
        yield running


@pytest.fixture(scope="module")
def shared_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    """One site for the tests that write and read their own files, pausing chunk-stores
    at most (SIGSTOP, always resumed): the last ones of the module, so it never runs
    beside another test's site."""
    base = tmp_path_factory.mktemp("datapath") / "site"
    running = LocalSite(base, nodes=6, servers=1, site="t", services=SERVICES)
    try:
        asyncio.run(running.start())
        asyncio.run(running.wait_ready())
        yield running
    finally:
        running.stop()


async def _files(
    site: LocalSite, placement_wait_s: float = 30.0, fragment_timeout_s: float = 3.0
) -> tuple[Bus, MetadataClient, FileStore]:
    bus = await site.client()
    meta = MetadataClient(bus, deadline_s=30)
    files = FileStore(
        bus,
        meta,
        client_id=bus.node,
        fragment_timeout_s=fragment_timeout_s,
        placement_wait_s=placement_wait_s,
    )
    await files.start()
    return bus, meta, files


def _blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.expected_logs("member.down")
async def test_files_of_every_size_round_trip_and_survive_two_lost_nodes(
    site: LocalSite,
) -> None:
    bus, meta, files = await _files(site)
    written: dict[str, tuple[int, str]] = {}
    try:
        for seed, size in enumerate(SIZES):
            inode = await meta.create(ROOT_INO, f"f{size}")
            data = _blob(size, seed)
            stored = await files.write_all(inode.ino, data)
            assert stored.size == size
            assert all(c.scheme == "ec4+2" and len(set(c.fragments)) == 6 for c in stored.chunks)
            written[f"f{size}"] = (inode.ino, hashlib.sha256(data).hexdigest())
        for _name, (ino, digest) in written.items():
            assert hashlib.sha256(await files.read_all(ino)).hexdigest() == digest
    finally:
        await files.close()
        await bus.close()

    # Lose m=2 nodes: every file still reads (degraded), from a fresh client (no cache).
    site.kill9("storage-1")
    site.kill9("storage-4")
    bus, meta, files = await _files(site)
    try:
        for ino, digest in written.values():
            assert hashlib.sha256(await files.read_all(ino)).hexdigest() == digest
        damaged = await _damage_reports(bus)
        assert {r["node_id"] for r in damaged} <= {"storage-1", "storage-4"}
        assert {r["reason"] for r in damaged} == {"unreachable"}
        # New writes go 2+1 or 4+2 over the four survivors, never to a dead node.
        inode = await meta.create(ROOT_INO, "after-loss")
        stored = await files.write_all(inode.ino, _blob(CS + 7, 99))
        assert all(not {"storage-1", "storage-4"} & set(c.fragments) for c in stored.chunks)
        assert await files.read_all(inode.ino) == _blob(CS + 7, 99)
    finally:
        await files.close()
        await bus.close()


@pytest.mark.expected_logs("fragment.damaged")
async def test_corrupt_fragment_is_detected_reported_and_read_around(site: LocalSite) -> None:
    bus, meta, files = await _files(site)
    try:
        inode = await meta.create(ROOT_INO, "victim")
        data = _blob(CS + 1000, 7)
        stored = await files.write_all(inode.ino, data)
        chunk = stored.chunks[0]
        victim = chunk.fragments[1]  # a data fragment: a healthy read needs it
        key = fragment_key(chunk.chunk_id, chunk.scheme, 1)
        path = fragment_path(store_root(site.data_dir(victim)), key)
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    finally:
        await files.close()
        await bus.close()
    bus, meta, files = await _files(site)
    try:
        assert await files.read_all(inode.ino) == data
        damaged = await _damage_reports(bus)
        assert any(
            r["key"] == key and r["node_id"] == victim and r["reason"] == "corrupt" for r in damaged
        ), damaged
    finally:
        await files.close()
        await bus.close()


@pytest.mark.expected_logs("member.down")
async def test_fsynced_file_survives_kill9_of_client_and_one_chunkstore(
    site: LocalSite, tmp_path: Path
) -> None:
    """A writer process flushes (fsync) a file, says so, and is killed -9 right after;
    then one chunk-store dies too. The acknowledged contents must read back."""
    writer = ManagedProcess(
        "writer",
        [
            sys.executable,
            str(ROOT / "tests" / "integration" / "procs" / "file_writer.py"),
            json.dumps(site.urls),
            site.site,
            str(CS * 2 + 5),
            str(site.credentials(Role.CLIENT)),  # a client needs no more than its role
        ],
        log_path=tmp_path / "writer.log",
        env={"PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("libs", "contracts"))},
    )
    writer.start()
    try:
        writer.wait_until(lambda: "FSYNCED" in writer.log_tail(200), 60, "FSYNCED")
        writer.kill9()
    finally:
        if writer.running:
            writer.kill9()
    line = next(x for x in writer.log_tail(200).splitlines() if x.startswith("FSYNCED"))
    _, ino, digest = line.split()
    bus, meta, files = await _files(site)
    try:
        holder = (await meta.getattr(int(ino))).chunks[0].fragments[0]
        site.kill9(holder)
        data = await files.read_all(int(ino))
        assert hashlib.sha256(data).hexdigest() == digest
    finally:
        await files.close()
        await bus.close()


async def test_writes_wait_out_chunkstores_that_answer_nothing_then_fail_with_eio(
    shared_site: LocalSite,
) -> None:
    """No node answering is not a full disk: a write waits for the chunk-stores to come
    back (the application sees a stall, not an error), and past its bounded wait it
    fails with EIO naming the nodes, never with ENOSPC."""
    site = shared_site
    stores = [site.chunkstore(node) for node in site.node_names]
    bus, meta, files = await _files(site, placement_wait_s=60.0, fragment_timeout_s=1.0)
    try:
        ino = (await meta.create(ROOT_INO, "stalled", 0o644)).ino
        for proc in stores:
            proc.pause()
        resumed = asyncio.get_running_loop().call_later(
            4.0, lambda: [proc.resume() for proc in stores]
        )
        data = _blob(CS + 7, 1)
        try:
            await files.write_all(ino, data)
        finally:
            resumed.cancel()
            for proc in stores:
                proc.resume()
        assert await files.read_all(ino) == data
    finally:
        await files.close()
        await bus.close()

    bus, meta, files = await _files(site, placement_wait_s=2.0, fragment_timeout_s=1.0)
    try:
        ino = (await meta.create(ROOT_INO, "unavailable", 0o644)).ino
        for proc in stores:
            proc.pause()
        started = asyncio.get_running_loop().time()
        with pytest.raises(FsError) as failed:
            await files.write_all(ino, _blob(CS, 2))
        waited = asyncio.get_running_loop().time() - started
        assert failed.value.errno == errno.EIO, failed.value
        assert waited >= 2.0, waited
    finally:
        for proc in stores:
            proc.resume()
        await files.close()
        await bus.close()


async def test_a_stopped_chunkstore_costs_a_writer_seconds_not_its_timeout(
    shared_site: LocalSite,
) -> None:
    """One chunk-store stopped (SIGSTOP: it neither answers nor fails): each chunk's
    put to it is given up a little after its siblings answered and the fragment goes
    elsewhere (the chunk coded again for the nodes that answer), instead of the
    writer waiting out the 10 s request timeout; a read asks another holder beside
    a stopped one."""
    site = shared_site
    bus, meta, files = await _files(site, fragment_timeout_s=10.0)
    stopped = site.chunkstore(site.node_names[0])
    try:
        ino = (await meta.create(ROOT_INO, "one-stopped", 0o644)).ino
        data = _blob(2 * CS + 11, 3)
        stopped.pause()
        try:
            started = time.monotonic()
            await files.write_all(ino, data)
            took = time.monotonic() - started
        finally:
            stopped.resume()
        assert took < 6.0, f"the write waited {took:.1f}s"
        assert await files.read_all(ino) == data
        print(f"\nwrite with one chunk-store stopped: {took:.2f}s")
    finally:
        await files.close()
        await bus.close()

    # Reading: the holder of a data fragment stopped; another holder is asked beside it.
    bus, meta, files = await _files(site, fragment_timeout_s=10.0)  # nothing cached
    try:
        chunk = (await meta.getattr(ino)).chunks[0]
        holder = site.chunkstore(chunk.fragments[0])
        holder.pause()
        try:
            started = time.monotonic()
            assert await files.read_all(ino) == data
            took = time.monotonic() - started
        finally:
            holder.resume()
        assert took < 6.0, f"the read waited {took:.1f}s"
        print(f"read with a data fragment's holder stopped: {took:.2f}s")
    finally:
        await files.close()
        await bus.close()


async def _damage_reports(bus: Bus, wait_s: float = 5.0) -> list[dict[str, object]]:
    """FragmentDamaged payloads in the DATA stream (waits for the async reports)."""
    found: list[dict[str, object]] = []
    deadline = asyncio.get_running_loop().time() + wait_s
    while not found and asyncio.get_running_loop().time() < deadline:
        sub = await bus.js.subscribe(f"cfs.{bus.site}.data.*.damaged", ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except TimeoutError:
                    break
                found.append(Envelope.model_validate_json(msg.data).payload)
        finally:
            await sub.unsubscribe()
        if not found:
            await asyncio.sleep(0.2)
    return found


def _mount(site: LocalSite, mountpoint: Path, log: Path) -> ManagedProcess:
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = ManagedProcess(
        "fuse-mount",
        [
            sys.executable,
            "-m",
            "cfs.fuse",
            str(mountpoint),
            "--cluster",
            ",".join(site.urls),
            "--site",
            site.site,
            "--credentials",
            str(site.credentials(Role.CLIENT)),
        ],
        log_path=log,
        env={"PYTHONPATH": child_pythonpath()},
    )
    proc.start()
    proc.wait_until(lambda: is_fuse_mount(mountpoint), 30, "the FUSE mount")
    return proc


def _unmount(proc: ManagedProcess, mountpoint: Path) -> None:
    try:
        if proc.running:
            assert proc.stop(timeout=30) == 0, proc.log_tail()  # SIGTERM: flush, unmount
    finally:
        if is_fuse_mount(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    assert not is_fuse_mount(mountpoint)


async def test_partial_writes_truncate_sparse_and_concurrent_readers(
    shared_site: LocalSite,
) -> None:
    bus, meta, files = await _files(shared_site)
    try:
        inode = await meta.create(ROOT_INO, "edit")
        model = bytearray(_blob(2 * CS + 100, 1))
        handle = await files.open(inode.ino)
        await handle.write(0, bytes(model))
        await handle.flush()
        # overwrite across a chunk boundary, append, then a sparse write far away
        patch = _blob(5000, 2)
        await handle.write(CS - 2500, patch)
        model[CS - 2500 : CS + 2500] = patch
        await handle.write(len(model), b"tail")
        model += b"tail"
        assert await handle.read(CS - 3000, 6000) == bytes(model[CS - 3000 : CS + 3000])
        await handle.write(5 * CS + 10, b"far")
        model += bytes(5 * CS + 10 - len(model)) + b"far"
        await files.release(handle)
        assert (await meta.getattr(inode.ino)).size == len(model)
        assert await files.read_all(inode.ino) == bytes(model)
        # truncate into the middle of a chunk, grow again: the cut bytes read as zeros
        handle = await files.open(inode.ino)
        await handle.truncate(CS + 10)
        await handle.truncate(2 * CS)
        del model[CS + 10 :]
        model += bytes(2 * CS - len(model))
        await files.release(handle)
        # several readers of the same file at once, from a fresh client
        other_bus, _, other = await _files(shared_site)
        try:
            reads = await asyncio.gather(*(other.read_all(inode.ino) for _ in range(4)))
            assert all(r == bytes(model) for r in reads)
        finally:
            await other.close()
            await other_bus.close()
        # the inode is a file; a directory is refused with EISDIR
        with pytest.raises(FsError) as err:
            await files.open(ROOT_INO)
        assert err.value.errno == 21
    finally:
        await files.close()
        await bus.close()


async def test_files_through_the_mount_survive_unmount_and_remount(
    shared_site: LocalSite, tmp_path: Path
) -> None:
    """0 B, 1 B, chunk-1, chunk, chunk+1 and 100 MiB through a real FUSE mount."""
    mnt = tmp_path / "mnt"
    folder = "through-the-mount"  # the shared site's root holds other tests' files
    sizes = [0, 1, CS - 1, CS, CS + 1, 100 * 1024 * 1024]
    digests: dict[str, str] = {}
    mount = _mount(shared_site, mnt, tmp_path / "mount-1.log")
    try:
        (mnt / folder).mkdir()
        for seed, size in enumerate(sizes):
            data = _blob(size, 100 + seed)
            name = f"size-{size}"
            with open(mnt / folder / name, "wb") as out:
                for offset in range(0, size, 1 << 20):
                    out.write(data[offset : offset + (1 << 20)])
                os.fsync(out.fileno())
            digests[name] = hashlib.sha256(data).hexdigest()
        for name, digest in digests.items():
            assert hashlib.sha256((mnt / folder / name).read_bytes()).hexdigest() == digest
    finally:
        await asyncio.to_thread(_unmount, mount, mnt)
    mount = _mount(shared_site, mnt, tmp_path / "mount-2.log")
    try:
        assert folder in os.listdir(mnt)
        assert sorted(os.listdir(mnt / folder)) == sorted(digests)
        for name, digest in digests.items():
            assert (mnt / folder / name).stat().st_size == int(name.split("-")[1])
            assert hashlib.sha256((mnt / folder / name).read_bytes()).hexdigest() == digest
    finally:
        await asyncio.to_thread(_unmount, mount, mnt)
