"""`cfs cluster rotate-credentials` under load: a client writing and fsyncing files
through the library while the client and chunk-store keys are replaced loses no
acknowledged write, and the old keys are refused afterwards.

Real processes: a 3-node site (one NATS server over TLS) with metadata, chunk-store and
membership per node; the rotation reloads the server and restarts the chunk-stores one
node at a time, while the writer's own connection is moved to the new client key by the
server closing it (`Bus` reads the credentials file again when it reconnects).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from pathlib import Path

import pytest

from cfs.bus import Bus, BusUnavailable
from cfs.client import FileStore, MetadataClient
from cfs.security import Role, load_credentials
from cfs.supervisor import LocalSite
from cfs_contracts.fs.records import ROOT_INO
from tests.integration.keymaterial import key_material_in_logs

SITE = "rot"
NODES = ("storage-1", "storage-2", "storage-3")


@pytest.mark.permission_violations  # the old client key, tried at the end, is refused
# A server reload resets the responses a service may send (`allow_responses`): a reply
# to a request received just before it is refused once, and the client retries it.
@pytest.mark.expected_logs("nats.disconnected", "nats.reconnected", "nats.permission_denied")
async def test_rotation_under_a_writing_client_loses_no_acknowledged_write(
    tmp_path: Path,
) -> None:
    site = LocalSite(
        tmp_path / "site",
        nodes=list(NODES),
        servers=1,
        site=SITE,
        services=["metadata-raft", "chunk-store", "membership"],
    )
    async with site:
        client_key = site.credentials(Role.CLIENT)
        assert client_key is not None
        old_client = client_key.read_text()
        old_stores = {n: load_credentials(_path(site.credentials("chunkstore", n))) for n in NODES}
        acked: dict[int, str] = {}  # ino -> sha256 of what write+flush acknowledged
        spans: list[tuple[float, float]] = []  # when each acknowledged write ran
        failed: list[str] = []
        stop = asyncio.Event()
        async with await site.client("writer", role=Role.CLIENT) as bus:
            meta = MetadataClient(bus, deadline_s=30)
            files = FileStore(bus, meta, client_id="writer")
            await files.start()
            rng = random.Random(17)

            async def write_until_stopped() -> None:
                i = 0
                while not stop.is_set():
                    data = rng.randbytes(32 * 1024 + i)
                    began = time.monotonic()
                    try:
                        inode = await meta.create(ROOT_INO, f"f{i}")
                        await files.write_all(inode.ino, data)  # write + flush: fsync'd
                    except Exception as exc:  # not acknowledged: allowed, but counted
                        failed.append(repr(exc))
                    else:
                        acked[inode.ino] = hashlib.sha256(data).hexdigest()
                        spans.append((began, time.monotonic()))
                    i += 1

            stores = {n: site.chunkstore(n).pid for n in NODES}
            writer = asyncio.create_task(write_until_stopped())
            await asyncio.sleep(1.0)
            started = time.monotonic()
            rotated = await site.rotate_credentials([Role.CLIENT, "chunkstore"])
            ended = time.monotonic()
            took = ended - started
            # and after: three more files on the new key (the connection the server
            # closed at the end had a request in flight: its retry takes a deadline)
            after = len(spans) + 3
            deadline = time.monotonic() + 60
            while len(spans) < after and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            stop.set()
            await writer
            during = sum(1 for began, done in spans if began < ended and done > started)
            print(
                f"rotation {took:.1f}s; {during} fsync'd writes overlapped it; {len(acked)} in all"
            )
            slowest = max(done - began for began, done in spans)
            print(f"slowest acknowledged write {slowest:.1f}s; failed {failed}")
            assert rotated == ["client", *(f"chunkstore@{n}" for n in NODES)]
            assert during > 0, "acknowledged writes overlapped the rotation"
            assert spans[-1][0] > ended, "and went on after it, on the new key"
            assert all(site.chunkstore(n).pid != pid for n, pid in stores.items()), "restarted"
            assert bus.nc.stats["reconnects"] >= 1, "the old key's connection was moved"
            for ino, digest in acked.items():
                assert hashlib.sha256(await files.read_all(ino)).hexdigest() == digest, ino
            await files.close()
        assert client_key.read_text() != old_client
        for node, old in old_stores.items():
            assert load_credentials(_path(site.credentials("chunkstore", node))).seed != old.seed
        assert not list(site.credentials_dir.glob("*.retiring")), "the old keys are dropped"
        auth = (site.credentials_dir / "nats-auth.conf").read_text()
        assert "chunkstore@storage-1" in auth
        stale = tmp_path / "stale" / "client.nk"
        stale.parent.mkdir()
        stale.write_text(old_client)
        with pytest.raises(BusUnavailable, match="Authorization Violation"):
            await Bus.connect(site.urls, site=SITE, node="stale", credentials=stale, tls_ca=site.ca)
        assert failed == [], failed
    assert key_material_in_logs(site.base_dir) == [], "rotation logged no key"


def _path(path: Path | None) -> Path:
    assert path is not None
    return path
