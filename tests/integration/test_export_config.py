"""`cfs admin export-config` as an operator runs it, against a real (one-node) site and
a real S3 server, with nothing but the cluster config file to find either: the JSON
holds the cluster config, members and settings, and no secret."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cfs.objstore import S3ObjectStore, S3Settings, S3Url
from cfs.supervisor import LocalSite, S3Server
from cfs.supervisor.devcluster import DevCluster
from cfs.supervisor.devcontrol import CLUSTER_FILE
from cfs.supervisor.topology import Topology
from tests.integration.keymaterial import KEY_MATERIAL, key_material_in_logs

CFS = str(Path(sys.executable).parent / "cfs")
SITE = "exp"
BUCKET = "cfs-exports"
# A seed is a token of its own: inside a longer base32 run (a server ID "N...SA...") "SA"
# followed by 50 characters is a public ID by chance, not key material.
SEED = re.compile(r"(?<![A-Z2-7])S[UA][A-Z2-7]{50,}")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    running = LocalSite(
        tmp_path_factory.mktemp("export") / "site",
        nodes=1,
        site=SITE,
        # wait_ready() needs metadata-raft to finish; repair is not needed here
        services=("membership", "chunk-store", "metadata-raft"),
        labels={"storage-1": {"rack": "r1"}},
    )
    try:
        asyncio.run(running.start())
        asyncio.run(running.wait_ready())
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def workdir(site: LocalSite, s3_server: S3Server) -> Path:
    """A directory with `.cfs-dev/cluster.json` as `cfs dev up` writes it: the commands
    run there find NATS, the admin key and S3 (endpoint and credentials file) from it."""
    state = site.base_dir / ".cfs-dev"
    credentials = s3_server.write_credentials(state / "credentials" / "s3.ini")
    (state / CLUSTER_FILE).write_text(
        json.dumps(
            {
                "site": SITE,
                "nats_urls": site.urls,
                "shards": 1,
                "credentials_dir": str(site.credentials_dir),
                "s3_endpoint": s3_server.endpoint_url,
                "s3_region": s3_server.REGION,
                "s3_credentials_file": str(credentials),
            }
        )
    )
    return site.base_dir


def cfs(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`cfs admin ARGS` in `workdir`, with no CFS_* or AWS_* variable to help it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CFS_", "AWS_"))}
    return subprocess.run(
        [CFS, "admin", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=workdir,
        timeout=60,
        check=False,
    )


def secrets_of(site: LocalSite) -> list[str]:
    """Every key seed the site's credentials files hold."""
    found: list[str] = []
    for path in site.credentials_dir.glob("*.nk"):
        found += SEED.findall(path.read_text())
    assert found, "the site has no NATS credentials to leak"
    return found


def assert_no_secret(text: str, site: LocalSite) -> None:
    for seed in secrets_of(site):
        assert seed not in text
    assert SEED.search(text) is None
    assert S3Server.SECRET_ACCESS_KEY not in text  # "testing": moto's secret
    assert site._cluster_token not in text  # the membership HMAC key


def test_export_to_stdout_has_the_config_and_no_secret(workdir: Path, site: LocalSite) -> None:
    result = cfs(workdir, "export-config")
    assert result.returncode == 0, result.stderr
    assert_no_secret(result.stdout, site)
    doc: dict[str, Any] = json.loads(result.stdout)
    assert doc["format"] == "cfs-config-export/1"
    assert doc["cfs_version"]
    assert doc["cluster"]["site"] == SITE and doc["cluster"]["shards"] == 1
    assert doc["topology"]["shards"] == 1 and doc["topology"]["ec"] == "auto"
    (member,) = doc["topology"]["members"]
    assert member["node"] == "storage-1" and member["state"] == "alive"
    assert member["labels"] == {"rack": "r1"}
    assert member["capacity_bytes"] > 0
    assert set(doc["services"]) >= {"membership", "metadata-raft", "chunk-store", "repair"}
    assert doc["services"]["membership"]["cluster_token"] == "<secret: not exported>"
    assert doc["services"]["metadata-raft"]["lease_s"] > 0
    assert doc["client"]["nats_urls"] == site.urls
    s3 = doc["s3"]
    assert s3["endpoint_url"].startswith("http://127.0.0.1:")
    assert s3["credentials_file"].endswith("credentials/s3.ini")
    assert s3["credentials"] == "file"


def test_no_key_material_in_logs_or_the_export(workdir: Path, site: LocalSite) -> None:
    """After a workload (files written and read, admin commands, a refused key) the
    site's logs and the export hold no seed (`SU...`) and no PEM block: nor the TLS keys
    beside the seeds."""
    from cfs.client import FileStore, MetadataClient
    from cfs.security import Role
    from cfs_contracts.fs.records import ROOT_INO

    async def workload() -> None:
        async with await site.client("app", role=Role.CLIENT) as bus:
            meta = MetadataClient(bus, deadline_s=10)
            files = FileStore(bus, meta, client_id="app")
            await files.start()
            for i in range(3):
                inode = await meta.create(ROOT_INO, f"secret-test-{i}")
                await files.write_all(inode.ino, os.urandom(100_000))
                assert len(await files.read_all(inode.ino)) == 100_000
            await files.close()

    asyncio.run(workload())
    for args in (("status",), ("raft-status",)):
        assert cfs(workdir, *args).returncode == 0
    exported = cfs(workdir, "export-config")
    assert exported.returncode == 0, exported.stderr
    assert KEY_MATERIAL.search(exported.stdout) is None
    assert_no_secret(exported.stdout, site)
    logs = "\n".join(p.read_text(errors="replace") for p in site.base_dir.rglob("*.log"))
    assert "nats.started" in logs or "storage-1" in logs, "the logs were read"
    assert key_material_in_logs(site.base_dir) == []
    assert_no_secret(logs, site)
    tls = site.credentials_dir / "tls"
    keys = [tls / "ca.key", *tls.glob("server-*.key")]
    assert keys and all(key.stat().st_mode & 0o777 == 0o600 for key in keys)
    for key in keys:
        body = [line for line in key.read_text().splitlines() if not line.startswith("-----")]
        assert body and not any(line in logs for line in body), key


def test_export_to_s3(workdir: Path, site: LocalSite, s3_server: S3Server) -> None:
    missing = cfs(workdir, "export-config", "--output", "s3://cfs-no-such-bucket/x.json")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "error: PUT s3://cfs-no-such-bucket/x.json: bucket 'cfs-no-such-bucket' does not "
        f"exist at {s3_server.endpoint_url}"
    )
    bad = cfs(workdir, "export-config", "--output", "s3://Bad_Bucket/x")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: bad S3 URL 's3://Bad_Bucket/x'")

    settings = S3Settings(
        endpoint_url=s3_server.endpoint_url,
        credentials_file=s3_server.write_credentials(workdir / "reader.ini"),
    )

    async def read_back() -> tuple[list[str], bytes, str | None]:
        async with S3ObjectStore(S3Url(BUCKET), settings) as store:
            await store.ensure_bucket()
            result = cfs(workdir, "export-config", "--output", f"s3://{BUCKET}/exports/", "--json")
            assert result.returncode == 0, result.stderr
            written = json.loads(result.stdout)
            keys = [info.key async for info in store.list("exports/")]
            assert written["output"] == f"s3://{BUCKET}/{keys[0]}"
            info = await store.head(keys[0])
            assert info is not None and info.metadata == {
                "cfs-format": "config-export",
                "cfs-site": SITE,
            }
            return keys, await store.get(keys[0]), info.encryption

    keys, data, encryption = asyncio.run(read_back())
    assert len(keys) == 1 and re.fullmatch(
        rf"exports/cfs-config-{SITE}-\d{{8}}T\d{{6}}Z\.json", keys[0]
    )
    assert encryption == "AES256"
    assert_no_secret(data.decode(), site)
    assert json.loads(data)["cluster"]["site"] == SITE


def test_dev_cluster_points_clients_and_services_at_its_s3(tmp_path: Path) -> None:
    """What `cfs dev up` writes (checked without starting it): cluster.json names the S3
    endpoint and credentials file, never the secret; services get CFS_S3_* variables."""
    dev = DevCluster(tmp_path / "dev", Topology.default(1))
    assert dev.s3 is not None
    dev.s3.write_credentials(dev.s3_credentials)
    dev.write_cluster_files()
    text = (dev.state_dir / CLUSTER_FILE).read_text()
    config = json.loads(text)
    assert config["s3_endpoint"] == dev.s3.endpoint_url
    assert config["s3_credentials_file"] == str(dev.s3_credentials)
    assert S3Server.SECRET_ACCESS_KEY not in text
    assert dev.s3_credentials.stat().st_mode & 0o777 == 0o600
    for proc in dev.site.processes():
        assert proc.env["CFS_S3_ENDPOINT_URL"] == dev.s3.endpoint_url
        assert proc.env["CFS_S3_CREDENTIALS_FILE"] == str(dev.s3_credentials)
