"""Guide scenario 7: S3 unavailable in cache mode, as the guide tells it.

A `cfs dev` site in cache mode whose services reach the S3 server through the fault
proxy; a writer fsyncs files through the mount all along. The tier's bucket starts
failing (503 for that bucket only: the journal archive goes on): writes keep being
acknowledged on flash (the guide's RTO is 0 s: the longest write is printed),
`s3-health` says S3 is unreachable and since when, `s3-queue-status` shows the queue
growing. The operator fails over to a backup bucket on the same server: the queue
drains there. When the first bucket is back, the failover copy fills it in the
background, and `s3-failover --back` returns to it. Every acknowledged file's chunks
are then in the primary bucket, checked byte for byte against what was written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cfs.bus import Bus
from cfs.client.metadata import MetadataClient
from cfs.objstore import S3ObjectStore, S3Settings, S3Url
from cfs.security import Role, credentials_path
from cfs.supervisor import free_port
from cfs.supervisor.s3 import HOST
from cfs.supervisor.s3proxy import S3FaultProxy
from cfs_contracts.fs.records import ROOT_INO
from cfs_contracts.streams import TIER_INDEX
from cfs_contracts.tier import BlobRecord, ChunkLocation, blob_object_key, blob_record_key
from tests.scenarios.conftest import DevSite, report, sha256_of, wait_for, write_file

pytestmark = [
    pytest.mark.slow,  # a dev site and a minute of outage: make test-slow (the integration
    # suite covers the same machinery in tests/integration/test_tier.py)
    pytest.mark.expected_logs("tier.s3_failing", "tier.copy_failed", "retry.*", "tier.watermark"),
]

PRIMARY, BACKUP = "cfs-tier", "cfs-tier-backup"


@pytest.fixture
def proxied_site(
    dev_site_factory: Callable[..., DevSite], tmp_path: Path
) -> Iterator[tuple[DevSite, S3FaultProxy, int]]:
    s3_port = free_port(HOST)
    with S3FaultProxy(tmp_path / "s3proxy", f"http://{HOST}:{s3_port}") as proxy:
        site = dev_site_factory(
            env={
                "CFS_S3_ENDPOINT_URL": proxy.endpoint_url,  # services: through the proxy
                "CFS_STATUS_S": "0.5",
                "CFS_S3_DEADLINE_S": "2",
                "CFS_PROBE_S": "1",
                "CFS_COPY_RETRY_S": "1",
            },
            s3_port=s3_port,
        )
        yield site, proxy, s3_port


class Writer(threading.Thread):
    """Files written and fsync'd through the mount, one after another, timed."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.acked: dict[str, str] = {}
        self.failures: list[str] = []
        self.longest_s = 0.0
        self.n = 0

    def run(self) -> None:
        while not self.stop.is_set():
            name = f"w{self.n:05d}"
            data = hashlib.sha256(name.encode()).digest() * (2048 + self.n % 7 * 1000)
            started = time.monotonic()
            try:
                digest = write_file(self.root / name, data)
            except OSError as exc:
                self.failures.append(f"{name}: {exc}")
            else:
                self.acked[name] = digest
            self.longest_s = max(self.longest_s, time.monotonic() - started)
            self.n += 1
            time.sleep(0.05)


def _queue(site: DevSite) -> dict[str, object]:
    result = site.cfs("admin", "s3-queue-status", "--json")
    assert result.returncode in (0, 1), (result.stdout, result.stderr)
    return json.loads(result.stdout)


async def _verify(site: DevSite, s3_port: int, bucket: str, files: dict[str, str]) -> int:
    """Every acknowledged file's chunks are in `bucket` and hash as written; the file's
    bytes put together from the bucket hash as the writer's SHA-256. Returns chunks."""
    cluster = json.loads((site.state / "cluster.json").read_text())
    s3 = S3Settings(
        endpoint_url=f"http://{HOST}:{s3_port}",
        region=cluster["s3_region"],
        credentials_file=Path(cluster["s3_credentials_file"]),
    )
    bus = await Bus.connect(
        cluster["nats_urls"],
        site=cluster["site"],
        node="scenario7",
        credentials=credentials_path(Path(cluster["credentials_dir"]), Role.ADMIN),
    )
    checked = 0
    try:
        meta = MetadataClient(bus)
        index = await bus.key_value(TIER_INDEX.bucket)
        root = (await meta.lookup(ROOT_INO, "s7")).ino
        async with S3ObjectStore(S3Url(bucket, "data"), s3) as store:
            for name, digest in files.items():
                inode = await meta.lookup(root, name)
                whole = hashlib.sha256()
                for ref in inode.chunks:
                    where = ChunkLocation.model_validate_json(
                        (await index.get(f"chunk.{ref.chunk_id}")).value or b""
                    )
                    record = BlobRecord.model_validate_json(
                        (await index.get(blob_record_key(where.blob_id))).value or b""
                    )
                    assert record.url.startswith(f"s3://{bucket}/"), (name, record)
                    blob = await store.get(blob_object_key(where.blob_id))
                    data = blob[where.offset : where.offset + where.length]
                    assert hashlib.sha256(data).hexdigest() == ref.chunk_id, name
                    whole.update(data[: ref.length])
                    checked += 1
                assert whole.hexdigest() == digest, name
    finally:
        await bus.close()
    return checked


def _reads_back(path: Path, digest: str) -> bool:
    try:
        return sha256_of(path) == digest
    except OSError:
        return False


def test_s3_outage_in_cache_mode_writes_go_on_failover_and_back(
    proxied_site: tuple[DevSite, S3FaultProxy, int],
) -> None:
    site, proxy, s3_port = proxied_site
    out = site.ok(
        "admin", "tier-config", "--mode", "cache", "--url", f"s3://{PRIMARY}/data",
        "--flush-after", "0.5",
    )  # fmt: skip
    assert f"Data tier: cache, s3://{PRIMARY}/data" in out, out
    wait_for("the tierer reporting", lambda: site.cfs("admin", "s3-health").returncode == 0, 30)
    writer = Writer(site.mnt / "s7")
    (site.mnt / "s7").mkdir()
    writer.start()
    try:
        wait_for("files written before the outage", lambda: len(writer.acked) >= 10, 60)
        wait_for(  # blobs in the primary before it fails: the failover copy has work
            "the first blobs in the primary bucket",
            lambda: int(_queue(site)["flushed_below_seq"]) > 0,  # type: ignore[call-overload]
            60,
        )

        # 1. S3 fails: the tier's bucket answers 503.
        proxy.set_fault("status", status=503, buckets=(PRIMARY,))
        outage = time.monotonic()
        wait_for(
            "s3-health to see it",
            lambda: site.cfs("admin", "s3-health").returncode == 1,
            30,
        )
        health = site.cfs("admin", "s3-health").stdout
        assert f"S3 unreachable (s3://{PRIMARY}/data), last successful write" in health, health
        assert "error class: service" in health, health
        during = len(writer.acked)
        wait_for(
            "writes acknowledged during the outage", lambda: len(writer.acked) >= during + 15, 60
        )
        queued = _queue(site)
        assert queued["queue_entries"] > 0 and queued["level"] == "NORMAL", queued
        status = site.cfs("admin", "s3-queue-status").stdout
        assert "Queue depth:" in status and "S3 UNREACHABLE" in status, status

        # 2. Fail over to the backup bucket: the queue drains there.
        failover_ms = time.time() * 1000
        out = site.ok("admin", "s3-failover", "--target", f"s3://{BACKUP}/data")
        assert f"Data tier now writes to s3://{BACKUP}/data" in out, out
        drained_s = wait_for(  # the writer goes on: what was queued before is flushed
            "the queue drained to the backup bucket",
            lambda: (_queue(site)["oldest_queued_ms"] or failover_ms + 1) > failover_ms,
            60,
        )
        assert site.cfs("admin", "s3-health").returncode == 0
        wait_for(  # blobs only in the failing primary: their copy waits for it
            "the failover copy waiting on the primary",
            lambda: (q := _queue(site))["stray_blobs"] > 0 and bool(q["copy_error"]),
            30,
        )

        # 3. The primary is back: the copy completes, then fail back.
        proxy.set_fault("pass")
        wait_for(
            "the failover copy done",
            lambda: _queue(site)["complete_url"] == f"s3://{BACKUP}/data",
            60,
        )
        out = site.ok("admin", "s3-failover", "--back")
        assert f"Data tier now writes to s3://{PRIMARY}/data" in out, out
        wait_for(
            "every blob back in the primary",
            lambda: (
                (q := _queue(site))["complete_url"] == f"s3://{PRIMARY}/data"
                and q["copied_blobs"] > 0
            ),
            60,
        )
        writer.stop.set()
        writer.join(30)
        wait_for("the last writes flushed", lambda: _queue(site)["queue_entries"] == 0, 60)
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.failures == [], writer.failures[:5]
    # RPO 0: every acknowledged file reads back through the mount (from flash) ...
    lost = [n for n, digest in writer.acked.items() if not _reads_back(writer.root / n, digest)]
    # ... and its chunks are in the primary bucket again.
    chunks = asyncio.run(_verify(site, s3_port, PRIMARY, writer.acked))
    report(
        "scenario 7",
        longest_write_s=writer.longest_s,
        lost_files=len(lost),
        acked=len(writer.acked),
        failed_writes=len(writer.failures),
        outage_s=time.monotonic() - outage,
        drained_after_failover_s=drained_s,
        chunks_verified=chunks,
    )
