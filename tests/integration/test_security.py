"""Per-role NATS credentials are enforced by real nats-server processes.

A site started like `cfs dev up` (`LocalSite`, secure by default) runs every service
under its own key. Here a client and a chunk-store key try what their role must not
do, and the server refuses; the operator CLI maps that to exit code 4. Everything
else in the integration suites runs under the same enforcement, and the autouse
check in tests/conftest.py fails any test during which a server refused a
permission, so a service missing one it needs cannot pass unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest

from cfs.bus import Bus, BusUnavailable
from cfs.client import MetadataClient
from cfs.security import (
    AUTH_CONF,
    RECOVERY_AUTH_CONF,
    Role,
    credentials_path,
    ensure_credentials,
    load_credentials,
    public_key,
    write_auth_conf,
)
from cfs.supervisor import LocalSite, ManagedProcess, NatsServer
from cfs.supervisor.nats import LeafListen, LeafRemote, nats_server_binary
from cfs.supervisor.ports import free_port
from cfs.supervisor.site import child_pythonpath
from cfs.tls import ensure_ca, ensure_server_cert, server_tls
from cfs_contracts.data import store_record_key
from cfs_contracts.fs.records import ROOT_INO
from cfs_contracts.streams import NODES

SITE = "sec"
CFS = str(Path(sys.executable).parent / "cfs")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.permission_violations


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    """One site for the module: its tests only try what must be refused, and read."""
    running = LocalSite(tmp_path_factory.mktemp("security") / "site", nodes=1, site=SITE)
    try:
        asyncio.run(running.start())
        asyncio.run(running.wait_ready())
        yield running
    finally:
        running.stop()


async def _refused(bus: Bus, action: Callable[[], Awaitable[object]]) -> str:
    """Run `action`; return the permission error the server sent for it."""
    before = bus.nc.last_error
    # A refused request gets no answer; the refusal itself is the -ERR.
    with contextlib.suppress(TimeoutError, nats.errors.Error):
        await asyncio.wait_for(action(), 2.0)
    await bus.nc.flush()
    for _ in range(40):
        if bus.nc.last_error is not before:
            break
        await asyncio.sleep(0.05)
    error = str(bus.nc.last_error or "")
    assert bus.nc.last_error is not before and "permissions violation" in error.lower(), error
    return error


async def test_roles_are_held_to_their_permissions(site: LocalSite) -> None:
    with pytest.raises(BusUnavailable, match="Authorization Violation"):
        await Bus.connect(site.urls, site=SITE, node="anonymous", tls_ca=site.ca, connect_timeout=3)

    async with await site.client("app", role=Role.CLIENT) as client:
        meta = MetadataClient(client, deadline_s=10)
        created = await meta.create(ROOT_INO, "allowed")  # what a client is for
        assert (await meta.lookup(ROOT_INO, "allowed")).ino == created.ino

        journal = f"cfs.{SITE}.meta.001.forged"
        error = await _refused(client, lambda: client.js.publish(journal, b"{}"))
        assert journal in error
        await _refused(client, lambda: client.nc.publish(f"cfs.{SITE}.cmd.membership.x", b""))
        await _refused(client, lambda: client.nc.publish("$KV.leases.meta.001", b"stolen"))
        await _refused(
            client, lambda: client.nc.request("$JS.API.STREAM.DELETE.META_001", b"", timeout=1)
        )
        # Another role's replies (the metadata leader's journal acks) cannot be read.
        error = await _refused(client, lambda: client.nc.subscribe("_INBOX.metadata.>"))
        assert "subscription" in error.lower()

    async with await site.client("cs", role="chunkstore", node="storage-1") as chunkstore:
        await _refused(chunkstore, lambda: chunkstore.nc.publish(journal, b"{}"))
        await _refused(
            chunkstore, lambda: chunkstore.nc.publish("$KV.nodes.member.storage-1", b"{}")
        )

    async with await site.client("check") as admin:
        info = await admin.js.stream_info("META_001")
        assert info.state.messages > 0  # the delete was refused
        async with await site.client("app2", role=Role.CLIENT) as client:
            meta = MetadataClient(client, deadline_s=10)
            names = [entry.name async for entry in meta.readdir(ROOT_INO)]
    assert names == ["allowed"]  # no forged journal entry was applied


def _plain_text_connect(url: str, credentials: Path) -> tuple[dict[str, object], bytes]:
    """A client that does not speak TLS: the server's INFO, then what it answers to a
    CONNECT sent in the clear with valid credentials."""
    host, port = url.removeprefix("nats://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        reader = sock.makefile("rb")
        info = json.loads(reader.readline().removeprefix(b"INFO "))
        nkey = public_key(load_credentials(credentials).seed)
        sock.sendall(f"CONNECT {json.dumps({'nkey': nkey, 'verbose': False})}\r\nPING\r\n".encode())
        try:
            answer = reader.readline()
        except OSError as exc:  # reset
            answer = str(exc).encode()
    return info, answer


async def test_a_client_without_tls_is_refused(site: LocalSite) -> None:
    """The servers require TLS: a plain-text client is refused before it can log in,
    and a TLS client that does not trust the site CA fails its verification."""
    info, answer = await asyncio.to_thread(
        _plain_text_connect, site.urls[0], site.credentials(Role.ADMIN)
    )
    assert info["tls_required"] is True
    assert b"PONG" not in answer
    assert b"TLS Required" in answer or not answer, answer
    with pytest.raises(BusUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await Bus.connect(site.urls, site=SITE, node="no-ca", connect_timeout=3)
    # ... while with the CA beside the credentials, as every process has it, all is well
    assert site.ca is not None and site.ca.parent.parent == site.credentials_dir
    async with await Bus.connect(
        site.urls, site=SITE, node="tls", credentials=site.credentials(Role.ADMIN)
    ) as bus:
        assert bus.nc.connected_server_version.major >= 2
        writer = bus.nc._transport._io_writer  # type: ignore[union-attr]
        assert writer.get_extra_info("ssl_object") is not None


@pytest.mark.expected_logs("nats.permission_denied")
async def test_a_node_writes_only_its_own_records(site: LocalSite, tmp_path: Path) -> None:
    """Per-node keys: a chunk-store process started as storage-2 with storage-1's key
    (a compromised storage-1 posing as another node) can neither record storage-2's
    capacity nor answer its fragment requests; the refusal is in its log and the
    server's. storage-1's own record goes on being written under the same key."""
    own = site.credentials("chunkstore", "storage-1")
    assert own is not None and own.name == "chunkstore@storage-1.nk"
    async with await site.client("cs1", role="chunkstore", node="storage-1") as stolen:
        kv = await stolen.key_value(NODES.bucket)
        error = await _refused(stolen, lambda: kv.put(store_record_key("storage-2"), b"{}"))
        assert "$kv.nodes.store.storage-2" in error.lower()
        error = await _refused(stolen, lambda: stolen.nc.subscribe(f"cfs.{SITE}.rpc.chunk.*.get"))
        assert "subscription" in error.lower()
        await kv.put(store_record_key("storage-1"), (await kv.get("store.storage-1")).value)
    impostor = await _refused_chunkstore(site, tmp_path, own, "storage-2")
    assert "storage-2" in impostor.log_tail(200)
    server_log = site.nats_servers[0].log_path.read_text()
    assert 'Publish Violation - Subject "$KV.nodes.store.storage-2"' in server_log
    async with await site.client("check") as admin:
        kv = await admin.key_value(NODES.bucket)
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get(store_record_key("storage-2"))


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`cfs ARGS` as a script runs it: no CFS_* from this environment, only `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CFS_")}
    return subprocess.run(
        [CFS, *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def _cli(site: LocalSite, credentials: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"CFS_NATS_URLS": json.dumps(site.urls), "CFS_SITE": SITE, "CFS_NATS_CA": str(site.ca)}
    if credentials is not None:
        env["CFS_NATS_CREDENTIALS"] = str(credentials)
    return _run(*args, **env)


async def _refused_chunkstore(
    site: LocalSite, tmp_path: Path, credentials: Path | None, node: str
) -> ManagedProcess:
    """A chunk-store process for `node` under `credentials`, killed once its log names
    the server's refusal."""
    env = {
        "CFS_NATS_URLS": json.dumps(site.urls),
        "CFS_SITE": SITE,
        "CFS_NATS_CREDENTIALS": str(credentials),
        "PYTHONPATH": child_pythonpath(),
    }
    impostor = ManagedProcess(
        "impostor",
        [sys.executable, "-m", "cfs_chunkstore", "--node", node,
         "--data-dir", str(tmp_path / node)],
        log_path=tmp_path / "impostor.log",
        env=env,
    )  # fmt: skip
    impostor.start()
    try:
        await asyncio.to_thread(
            impostor.wait_until,
            lambda: "nats.permission_denied" in impostor.log_tail(200),
            30,
            "the refusal in the impostor's log",
        )
    finally:
        impostor.kill9()
    return impostor


def _forbidden(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 4, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: permission denied"), result.stderr
    return lines[0]


@pytest.mark.expected_logs("nats.permission_denied")
async def test_a_service_with_the_wrong_key_says_so_and_changes_nothing(
    site: LocalSite, tmp_path: Path
) -> None:
    """A chunk-store started with the client's key (a deployment mistake): the server
    refuses its subscription and its record, and its log names the refusal."""
    await _refused_chunkstore(site, tmp_path, site.credentials(Role.CLIENT), "impostor")
    async with await site.client("check") as admin:
        kv = await admin.key_value(NODES.bucket)
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get(store_record_key("impostor"))


async def test_admin_commands_need_admin_credentials(site: LocalSite) -> None:
    client = site.credentials(Role.CLIENT)
    admin = site.credentials(Role.ADMIN)
    unreadable = site.base_dir / "nope.nk"
    # Side by side: none changes anything (the drain is refused), each costs a process.
    drain, anonymous_status, anonymous_ls, listed, status, bad = await asyncio.gather(
        asyncio.to_thread(_cli, site, client, "admin", "node-drain", "storage-1"),
        asyncio.to_thread(_cli, site, None, "admin", "status"),
        asyncio.to_thread(_cli, site, None, "fs", "ls", "/"),
        asyncio.to_thread(_cli, site, client, "fs", "ls", "/"),
        asyncio.to_thread(_cli, site, admin, "admin", "status"),
        asyncio.to_thread(_cli, site, unreadable, "admin", "status"),
    )
    assert f"cfs.{SITE}.cmd" in _forbidden(drain)
    _forbidden(anonymous_status)
    assert "Authorization Violation" in _forbidden(anonymous_ls)
    assert listed.returncode == 0, listed.stderr
    assert status.returncode == 0 and "storage-1" in status.stdout, status.stderr
    assert bad.returncode == 1 and "cannot read NATS credentials" in bad.stderr, bad.stderr


async def _connects(url: str, credentials: Path | None, ca: Path | None = None) -> bool:
    try:
        bus = await Bus.connect(url, site=SITE, node="t", credentials=credentials, tls_ca=ca)
    except BusUnavailable as exc:
        assert "Authorization Violation" in str(exc), exc
        return False
    await bus.close()
    return True


def test_cluster_init_warns_about_an_open_server(tmp_path: Path) -> None:
    with NatsServer.standalone(tmp_path / "open") as server:
        result = _run(
            "cluster", "init", "--cluster", server.url, "--site", SITE,
            "--bootstrap-node", "n1", "--cluster-name", "c1",
            "--config-dir", str(tmp_path / "cfg"), "--json",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["nats_auth_enforced"] is False
    assert "NATS accepts clients without credentials" in result.stderr
    config = json.loads((tmp_path / "cfg" / "cluster.json").read_text())
    assert config["credentials_dir"] == summary["credentials_dir"]
    for role in Role:
        path = credentials_path(Path(summary["credentials_dir"]), role)
        assert path.stat().st_mode & 0o777 == 0o600


def test_cluster_init_sets_the_data_tier(tmp_path: Path, s3_env: dict[str, str]) -> None:
    """`--tier cache --tier-url`: the bucket is made and the tier recorded at init; a
    half-given tier is refused before anything happens."""
    with NatsServer.standalone(tmp_path / "open") as server:
        common = ("cluster", "init", "--cluster", server.url, "--site", SITE,
                  "--bootstrap-node", "n1", "--cluster-name", "c1",
                  "--config-dir", str(tmp_path / "cfg"), "--json")  # fmt: skip
        half = _run(*common, "--tier", "cache", **s3_env)
        assert half.returncode == 2 and "--tier-url" in half.stderr, half.stderr
        done = _run(*common, "--tier", "cache", "--tier-url", "s3://cfs-init-tier/d", **s3_env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["tier"] == "cache"
        shown = _run("admin", "--cluster", server.url, "--site", SITE, "tier-config",
                     "--json", **s3_env)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["url"] == "s3://cfs-init-tier/d"


def test_credentials_first_then_a_secured_init_then_rotation(tmp_path: Path) -> None:
    """The production order: keys offline, servers started with them, init; then a
    leaked client key is rotated out."""
    cfg = tmp_path / "cfg"
    made = _run("cluster", "credentials", "--site", SITE, "--shards", "2",
                "--config-dir", str(cfg), "--tls-server", "n1=127.0.0.1,localhost",
                "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    credentials = Path(summary["credentials_dir"])
    assert summary["tls_certificates"] == ["n1"]
    for key in ("ca.key", "server-n1.key"):
        assert (credentials / "tls" / key).stat().st_mode & 0o777 == 0o600
    server = NatsServer.standalone(
        tmp_path / "nats",
        auth_file=credentials / AUTH_CONF,
        tls=lambda name: server_tls(credentials, name),
    )
    with server:
        init = _run(
            "cluster", "init", "--cluster", server.url, "--site", SITE,
            "--bootstrap-node", "n1", "--cluster-name", "c1", "--shards", "2",
            "--config-dir", str(cfg), "--json",
        )  # fmt: skip
        assert init.returncode == 0, init.stderr
        assert json.loads(init.stdout)["nats_auth_enforced"] is True
        assert json.loads(init.stdout)["nats_tls"] is True
        assert init.stderr == ""

        client = credentials_path(credentials, Role.CLIENT)
        leaked = tmp_path / "leaked.nk"
        leaked.write_text(client.read_text())
        ca = credentials / "tls" / "ca.pem"
        assert asyncio.run(_connects(server.url, leaked, ca))
        bad = _run("cluster", "credentials", "--config-dir", str(cfg), "--rotate", "nobody")
        assert bad.returncode == 2 and "unknown role 'nobody'" in bad.stderr, bad.stderr
        rotated = _run("cluster", "credentials", "--site", SITE, "--shards", "2",
                       "--config-dir", str(cfg), "--rotate", "client")  # fmt: skip
        assert rotated.returncode == 0, rotated.stderr
        assert client.read_text() != leaked.read_text()
        server.restart()  # the servers take the new public keys
        assert not asyncio.run(_connects(server.url, leaked, ca))
        assert asyncio.run(_connects(server.url, client))
        assert not asyncio.run(_connects(server.url, None, ca))

        # Online, outside cfs dev: the old key stays admitted until --finish.
        config = {"CFS_CONFIG": str(cfg / "cluster.json")}
        before = tmp_path / "before.nk"
        before.write_text(client.read_text())
        begun = _run("cluster", "rotate-credentials", "--role", "client", "--json", **config)
        assert begun.returncode == 0, begun.stderr
        assert json.loads(begun.stdout)["rotated"] == ["client"]
        assert client.read_text() != before.read_text()
        server.reload()
        assert asyncio.run(_connects(server.url, before, ca)), "old key still admitted"
        assert asyncio.run(_connects(server.url, client)), "new key admitted"
        done = _run("cluster", "rotate-credentials", "--role", "client", "--finish", **config)
        assert done.returncode == 0 and "old keys dropped: client" in done.stdout, done.stderr
        server.reload()
        assert not asyncio.run(_connects(server.url, before, ca))
        assert asyncio.run(_connects(server.url, client))


def test_a_reseeded_server_admits_the_admin_only_until_opened(tmp_path: Path) -> None:
    """Quorum recovery's admission: while the import runs, no service key connects
    (none can write into a half-imported stream); opening needs no restart."""
    credentials = tmp_path / "credentials"
    auth = ensure_credentials(credentials, SITE, 1)
    admission = write_auth_conf(credentials, SITE, 1, only=[Role.ADMIN], name=RECOVERY_AUTH_CONF)
    server = NatsServer.standalone(tmp_path / "nats", auth_file=auth)
    server.admission = admission
    service = credentials_path(credentials, "metadata")
    with server:
        assert asyncio.run(_connects(server.url, credentials_path(credentials, Role.ADMIN)))
        assert not asyncio.run(_connects(server.url, service))
        pid = server.pid
        server.open_to_clients()
        assert server.pid == pid and server.admission is None
        assert asyncio.run(_connects(server.url, service))
        assert not asyncio.run(_connects(server.url, None))


# deploy/compose/nats/*.conf with the generated authorization and TLS files: checked by
# `nats-server -t` in tests/unit/test_deploy_files.py.


def test_every_link_of_a_server_is_tls_and_nats_server_takes_the_config(tmp_path: Path) -> None:
    """Client port, cluster routes (verified both ways), the leaf-node listener and a
    leaf remote to the other site (verified with that site's CA): what `LocalSite` and
    `SitePair` give each server, checked by `nats-server -t`."""
    credentials = tmp_path / "credentials"
    peer_ca = ensure_ca(tmp_path / "peer-credentials", "other")
    server = NatsServer(
        "n1",
        tmp_path / "n1",
        cluster_name="c",
        routes=["nats://127.0.0.1:1"],
        leaf_listen=LeafListen(free_port(), "link", "pw"),
        leaf_remotes=[LeafRemote(("127.0.0.1:2",), "link", "pw", ca_file=peer_ca)],
        tls=lambda name: ensure_server_cert(credentials, SITE, name),
    )
    assert server.issue_certificate() == server_tls(credentials, "n1")
    conf = server.render_config()
    assert conf.count("cert_file:") == 3  # client port, cluster, leaf listener
    assert "verify: true" in conf.split("cluster {")[1]
    assert f"tls: {{ ca_file: {json.dumps(str(peer_ca))} }}" in conf
    (tmp_path / "nats.conf").write_text(conf)
    check = subprocess.run(
        [nats_server_binary(), "-c", str(tmp_path / "nats.conf"), "-t"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
