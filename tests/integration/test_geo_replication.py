"""Two real sites, each with its own geo-replicator (issue 16): what is written on one
site is readable on the other, data included (copied before the chunk map is applied,
so it reads with the link cut); a replicator killed between an apply and its
acknowledgement applies nothing twice; changes made on both sides of a partition
converge, field by field, with each conflict recorded once on each site; the annual
failover test's commands move the active site and back; a standby cut off from the
active site takes over and keeps it after the link is back; a mount follows the active
site."""

from __future__ import annotations

import asyncio
import errno
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cfs.client import FileStore, MetadataClient
from cfs.client.shard_admin import shard_admin
from cfs.conflicts import conflict_events
from cfs.fuse.config import is_fuse_mount
from cfs.ids import new_id
from cfs.supervisor import LocalSite
from cfs.supervisor.sites import SitePair
from cfs_contracts import REGISTRY
from cfs_contracts.events.geo import ConflictDetected
from cfs_contracts.events.metadata import JournalEntry, MetaCommitted, PutInode
from cfs_contracts.fs.records import ROOT_INO, Inode, Stamp
from cfs_contracts.fs.rpc import FsError, Reply
from cfs_contracts.fs.shard_admin import ApplyRemote, RemoteMessage
from tests.integration.test_replication_link import admin

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.expected_logs(
        "fault.crash",
        "lease.*",
        "geo.conflict",
        "singleton.*",
        "geo.active_changed",  # an automatic failover
        "client.site_switched",  # a mount following the active site
    ),
]

SERVICES = ("membership", "metadata-raft", "chunk-store", "geo-replicator", "conflict-resolver")
FAILOVER_AFTER_S = 4.0  # the active site unreachable this long: the other takes over


@pytest.fixture(scope="module")
def crash_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("geo-crash") / "crash"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, crash_file: Path) -> Iterator[SitePair]:
    sites = SitePair(
        tmp_path_factory.mktemp("geo"),
        nodes=1,
        services=SERVICES,
        env={"CFS_CRASH_FILE": str(crash_file), "CFS_FAILOVER_AFTER_S": str(FAILOVER_AFTER_S)},
    )
    asyncio.run(sites.start())
    try:
        asyncio.run(sites.wait_ready())
        for here, there in ((sites.a, sites.b), (sites.b, sites.a)):
            linked = admin(here, "replication-link", "--peer", there.site)
            assert linked.returncode == 0, linked.stderr
        yield sites
    finally:
        sites.stop()


def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.3)


async def _write(site: LocalSite, files: dict[str, bytes]) -> dict[str, int]:
    async with await site.client() as bus:
        meta = MetadataClient(bus, deadline_s=30)
        store = FileStore(bus, meta, client_id=f"test@{site.site}")
        await store.start()
        try:
            made = {}
            for name, data in files.items():
                try:
                    ino = (await meta.create(ROOT_INO, name)).ino
                except FsError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                    ino = (await meta.lookup(ROOT_INO, name)).ino
                await store.write_all(ino, data)
                made[name] = ino
            return made
        finally:
            await store.close()


async def _read(site: LocalSite, name: str) -> bytes | None:
    async with await site.client() as bus:
        meta = MetadataClient(bus, deadline_s=10)
        store = FileStore(bus, meta, client_id=f"test@{site.site}", fragment_timeout_s=3.0)
        await store.start()
        try:
            try:
                ino = (await meta.lookup(ROOT_INO, name)).ino
            except FsError as exc:
                if exc.errno == errno.ENOENT:
                    return None
                raise
            return await store.read_all(ino)
        finally:
            await store.close()


def read(site: LocalSite, name: str) -> bytes | None:
    return asyncio.run(_read(site, name))


async def _stat(site: LocalSite, name: str) -> Inode | None:
    async with await site.client() as bus:
        meta = MetadataClient(bus, deadline_s=10)
        try:
            return await meta.lookup(ROOT_INO, name)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise


def stat(site: LocalSite, name: str) -> Inode | None:
    return asyncio.run(_stat(site, name))


async def _names(site: LocalSite) -> set[str]:
    async with await site.client() as bus:
        meta = MetadataClient(bus, deadline_s=10)
        return {e.name async for e in meta.readdir(ROOT_INO)}


def names(site: LocalSite) -> set[str]:
    return asyncio.run(_names(site))


async def _chown(site: LocalSite, name: str, uid: int) -> None:
    async with await site.client() as bus:
        meta = MetadataClient(bus, deadline_s=10)
        ino = (await meta.lookup(ROOT_INO, name)).ino
        await meta.setattr(ino, owner=uid, group=uid)


async def _remote_op_ids(site: LocalSite) -> list[str]:
    """Op ids of every entry the geo-replicator had journaled on `site`, in order."""
    async with await site.client() as bus:
        last = (await bus.js.stream_info("META_001")).state.last_seq
        ids: list[str] = []
        for seq in range(1, last + 1):
            msg = await bus.js.get_msg("META_001", seq, direct=True)
            if not msg.subject.endswith(".journal.remote"):
                continue
            payload = REGISTRY.decode(msg.data or b"").payload
            assert isinstance(payload, MetaCommitted)
            ids += [entry.op_id for entry in payload.entries]
        return ids


async def _conflicts(site: LocalSite) -> list[ConflictDetected]:
    async with await site.client() as bus:
        events, _ = await conflict_events(bus)
        return [e for e in events if isinstance(e, ConflictDetected)]


def conflicts(site: LocalSite) -> list[ConflictDetected]:
    return asyncio.run(_conflicts(site))


def test_files_written_on_each_site_are_read_on_the_other_with_the_link_cut(
    pair: SitePair,
) -> None:
    on_a = {"a-small": b"from a" * 10, "a-big": bytes(range(256)) * 40_000}  # 10 MB, 3 chunks
    on_b = {"b-file": b"from b" * 1000}
    asyncio.run(_write(pair.a, on_a))
    asyncio.run(_write(pair.b, on_b))
    for name, data in on_a.items():
        until(lambda n=name, d=data: read(pair.b, n) == d, 60, f"{name} on {pair.b.site}")
    for name, data in on_b.items():
        until(lambda n=name, d=data: read(pair.a, n) == d, 60, f"{name} on {pair.a.site}")
    pair.partition()
    try:
        # The data is on each site's own chunk-stores: nothing is read over the link.
        assert read(pair.b, "a-big") == on_a["a-big"]
        assert read(pair.a, "b-file") == on_b["b-file"]
    finally:
        pair.heal()


def test_a_replicator_killed_after_applying_applies_nothing_twice(
    pair: SitePair, crash_file: Path
) -> None:
    crash_file.write_text("geo.applied")
    asyncio.run(_write(pair.a, {f"after-crash-{i}": f"n{i}".encode() for i in range(5)}))
    until(lambda: not crash_file.exists(), 60, "a replicator reached the crash point")

    def arrived(name: str, data: bytes) -> bool:
        pair.b.restart_exited()  # as an init system would: the killed one comes back
        return read(pair.b, name) == data

    for i in range(5):
        name, data = f"after-crash-{i}", f"n{i}".encode()
        until(lambda n=name, d=data: arrived(n, d), 90, name)
    for site in pair.sites:
        ids = asyncio.run(_remote_op_ids(site))
        assert ids and len(ids) == len(set(ids)), f"{site.site} applied an entry twice"


def test_changes_on_both_sides_of_a_partition_converge_with_conflicts_recorded(
    pair: SitePair,
) -> None:
    asyncio.run(_write(pair.a, {"shared": b"v1", "renamed-on-a": b"r"}))
    until(lambda: read(pair.b, "shared") == b"v1", 60, "shared on site-b")
    until(lambda: stat(pair.b, "renamed-on-a") is not None, 60, "renamed-on-a on site-b")
    before = {c.conflict_id for c in conflicts(pair.a) + conflicts(pair.b)}

    pair.partition()
    try:
        asyncio.run(_chown(pair.a, "shared", 1000))  # owner changed on both: a conflict
        asyncio.run(_write(pair.b, {"both": b"made on b"}))  # one name, two files
        asyncio.run(_write(pair.a, {"both": b"made on a"}))
        asyncio.run(_chown(pair.b, "shared", 2000))  # later: site-b's value wins
        asyncio.run(_chown(pair.b, "renamed-on-a", 3000))  # only on b: no conflict
        asyncio.run(_rename(pair.a, "renamed-on-a", "now-named-on-a"))  # only on a
    finally:
        pair.heal()

    listed: list[set[str]] = []

    def converged() -> bool:  # the state both must reach (each site's own is there at once)
        listed[:] = [names(site) for site in pair.sites]
        if listed[0] != listed[1] or "now-named-on-a" not in listed[0]:
            return False
        if not any(name.startswith("both.conflict-") for name in listed[0]):
            return False
        owners = [stat(site, "shared") for site in pair.sites]
        return all(inode is not None and inode.uid == 2000 for inode in owners)

    try:
        until(converged, 90, "both sites list the same names")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {listed}") from None
    for site in pair.sites:
        shared = stat(site, "shared")
        assert shared is not None and (shared.uid, shared.gid) == (2000, 2000), site.site
        moved = stat(site, "now-named-on-a")
        assert moved is not None and moved.uid == 3000, "rename and owner both survive"
        assert stat(site, "renamed-on-a") is None
    listed = names(pair.a)
    kept = [n for n in listed if n.startswith("both.conflict-")]
    assert len(kept) == 1, listed
    contents = {read(pair.a, "both"), read(pair.a, kept[0])}
    assert contents == {b"made on a", b"made on b"}, "both files kept"
    assert read(pair.b, "both") == read(pair.a, "both")

    def recorded() -> dict[str, set[str]] | None:
        found = {
            site.site: {c.conflict_id for c in conflicts(site)} - before for site in pair.sites
        }
        return found if all(len(ids) >= 2 for ids in found.values()) else None

    found = until(recorded, 30, "conflicts recorded on both sites")
    assert found[pair.a.site] == found[pair.b.site], "the same conflicts, the same ids"
    new = [c for c in conflicts(pair.b) if c.conflict_id in found[pair.b.site]]
    owner = [c for c in new if c.conflict.group == "owner"]
    seen = [(c.conflict.kind, c.conflict.group, c.conflict.ino) for c in new]
    assert len(owner) == 1 and owner[0].conflict.winner == pair.b.site, seen
    assert json.loads(owner[0].conflict.model_dump_json())["local"] == {"uid": 2000, "gid": 2000}


async def _rename(site: LocalSite, old: str, new: str) -> None:
    async with await site.client() as bus:
        meta = MetadataClient(bus, deadline_s=10)
        await meta.rename(ROOT_INO, old, ROOT_INO, new)


@pytest.mark.slow  # the scenario tests (make test-slow) drive the same commands
def test_the_guides_scenario_6_through_the_cli(pair: SitePair) -> None:
    """Rename on A and owner on B of one file both survive; the owner of another set on
    both is a conflict: shown, resolved by hand for site-a, the rest as merged."""
    a, b = pair.a, pair.b
    story = asyncio.run(_write(a, {"file.txt": b"t1", "owned": b"o"}))
    until(lambda: stat(b, "owned") is not None and stat(b, "file.txt") is not None, 60, "on b")

    pair.partition()
    try:
        cut = admin(b, "replication-status")
        assert cut.returncode == 3 and "unreachable (partition detected)" in cut.stdout
        asyncio.run(_rename(a, "file.txt", "file-a.txt"))
        asyncio.run(_chown(b, "file.txt", 1002))
        asyncio.run(_chown(a, "owned", 1001))  # alice at t3
        asyncio.run(_chown(b, "owned", 1002))  # bob at t4: the later
    finally:
        pair.heal()

    def caught_up(site: LocalSite) -> bool:
        done = admin(site, "replication-status", "--json")
        if done.returncode != 0:
            return False
        directions = json.loads(done.stdout)["directions"]
        return all(d["lag_events"] == 0 and d["unapplied"] == 0 for d in directions)

    until(lambda: caught_up(a) and caught_up(b), 90, "replication-status: lag 0 both ways")
    for site in pair.sites:
        renamed = stat(site, "file-a.txt")
        assert renamed is not None and renamed.uid == 1002 and stat(site, "file.txt") is None
        owned = stat(site, "owned")
        assert owned is not None and owned.uid == 1002, site.site

    ino = story["owned"]
    shown = admin(a, "show-conflicts")
    assert f"Inode {ino}: CONFLICT - attr.owner differs; site-b won" in shown.stdout, shown
    assert f"Inode {story['file.txt']}" not in shown.stdout, "rename and owner both survive"
    verbose = admin(a, "show-conflicts", "--verbose").stdout
    assert "uid=1001" in verbose and "uid=1002" in verbose

    usage = admin(a, "resolve-conflicts", "--strategy", "manual", "--inode", str(ino))
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1
    manual = admin(
        a, "resolve-conflicts", "--strategy", "manual", "--inode", str(ino), "--winner", "site-a"
    )
    assert manual.returncode == 0 and "written again" in manual.stdout, manual.stderr
    for site in pair.sites:
        until(lambda s=site: getattr(stat(s, "owned"), "uid", None) == 1001, 60, "alice wins")
        assert f"Inode {ino}:" not in admin(site, "show-conflicts").stdout  # on both sites

    assert admin(a, "resolve-conflicts", "--strategy", "last-write-wins").returncode == 0
    for site in pair.sites:
        assert admin(site, "show-conflicts").stdout.strip() == "No conflicts."

    check = admin(a, "metadata-consistency-check", "--cross-site", "--json")
    report = json.loads(check.stdout)
    assert check.returncode == 0 and report["differences"] == [], check.stdout + check.stderr
    assert [s["equal"] for s in report["shards"]] == [True]
    # the root and this test's two files with their entries; more after the module's
    # other tests (`make test-slow` runs this one alone)
    assert report["shards"][0]["records_here"] == report["shards"][0]["records_there"] >= 5


def test_the_cross_site_check_names_what_one_site_lacks(pair: SitePair) -> None:
    replicator = pair.b.service("storage-1", "geo-replicator")
    replicator.stop()
    try:
        made = asyncio.run(_write(pair.a, {"only-on-a": b"x"}))["only-on-a"]
        check = admin(pair.a, "metadata-consistency-check", "--cross-site")
        assert check.returncode == 1, check.stdout + check.stderr
        assert f"Inode {made}: only on {pair.a.site}" in check.stdout
        assert f"Dentry 1/only-on-a: only on {pair.a.site}" in check.stdout
        assert "Shard 001: DIFFERENT" in check.stdout and "not caught up" in check.stdout
    finally:
        replicator.start()
    until(lambda: stat(pair.b, "only-on-a") is not None, 60, "replicated once it runs again")
    again = admin(pair.a, "metadata-consistency-check", "--cross-site")
    assert again.returncode == 0 and "Shard 001: equal" in again.stdout, again.stdout


def active(site: LocalSite) -> dict[str, Any] | None:
    """The active-site record `replication-status` shows from `site`."""
    shown = admin(site, "replication-status", "--json")
    assert shown.stdout, shown.stderr
    record: dict[str, Any] | None = json.loads(shown.stdout)["active"]
    return record


def other(pair: SitePair, site: LocalSite) -> LocalSite:
    return pair.b if site is pair.a else pair.a


@pytest.mark.slow  # the scenario tests (make test-slow) drive the same commands
def test_the_annual_failover_test_through_the_cli(pair: SitePair) -> None:
    """The guide's seven commands in order: the primary stops taking writes, the
    secondary proves it could take over, takes over, and the primary comes back."""
    record = until(lambda: active(pair.a), 30, "an active site recorded")
    primary = pair.site(record["site"])
    secondary = other(pair, primary)
    p, s = primary.site, secondary.site

    prepared = admin(primary, "failover-prepare", "--source", p, "--target", s)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert f"Site {p} fenced: new writes refused" in prepared.stdout
    assert f"applied on {s}: lag 0" in prepared.stdout
    with pytest.raises(FsError) as refused:
        asyncio.run(_write(primary, {"during-the-fence": b"no"}))
    assert refused.value.errno == errno.EROFS and "failover" in str(refused.value)

    tested = admin(primary, "failover-test", "--target", s, "--json")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    checks = {c["check"]: c["ok"] for c in json.loads(tested.stdout)["checks"]}
    assert checks == {"reachable": True, "lag": True, "digests": True, "write probe": True}

    moved = admin(primary, "failover", "--from", p, "--to", s)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert f"Active site: {s}" in moved.stdout
    for site in pair.sites:
        assert until(lambda x=site: (active(x) or {}).get("site") == s, 30, "both agree")
    assert admin(secondary, "status").returncode == 0
    asyncio.run(_write(secondary, {"after-failover": b"on the secondary"}))

    back = admin(secondary, "failback", "--from", s, "--to", p)
    assert back.returncode == 0, back.stdout + back.stderr
    assert f"{p} resynced from {s}: shards equal" in back.stdout
    assert f"Active site: {p}" in back.stdout
    assert read(primary, "after-failover") == b"on the secondary"
    asyncio.run(_write(primary, {"after-failback": b"writes again"}))

    synced = admin(primary, "replication-sync", "--source", s, "--target", p)
    assert synced.returncode == 0 and "Shard 001: equal" in synced.stdout, synced.stdout
    shown = admin(primary, "replication-status")
    assert f"Active site: {p} (epoch" in shown.stdout, shown.stdout

    bad = admin(primary, "failover", "--from", p, "--to", p)
    assert bad.returncode == 2 and "name the same site" in bad.stderr
    unknown = admin(primary, "failover-test", "--target", "site-z")
    assert unknown.returncode == 2 and "no such site" in unknown.stderr


def test_a_standby_cut_off_from_the_active_site_takes_over_and_keeps_it(
    pair: SitePair,
) -> None:
    record = until(lambda: active(pair.a), 30, "an active site recorded")
    was = pair.site(record["site"])
    standby = other(pair, was)
    pair.partition()
    cut_at = time.monotonic()
    try:
        took = until(
            lambda: (active(standby) or {}).get("site") == standby.site,
            FAILOVER_AFTER_S + 20,
            f"{standby.site} active",
        )
        took_s = time.monotonic() - cut_at
        taken = active(standby)
        assert took and taken is not None and "automatic failover" in taken["reason"]
        silent = re.search(r"unreachable for (\d+)s", taken["reason"])
        assert silent and int(silent.group(1)) >= FAILOVER_AFTER_S, taken["reason"]
        assert (active(was) or {}).get("site") == was.site, "the cut-off site cannot know yet"
    finally:
        pair.heal()
    until(lambda: (active(was) or {}).get("site") == standby.site, 30, "the old site adopts it")
    time.sleep(FAILOVER_AFTER_S + 1)  # longer than a failover takes: nothing moves back
    for site in pair.sites:
        assert (active(site) or {}).get("site") == standby.site, site.site
    print(f"\n[automatic failover] {standby.site} active {took_s:.1f}s after the cut")


def test_a_mount_follows_the_active_site(pair: SitePair, tmp_path: Path) -> None:
    """A mount of site a that knows site b writes where the active record points: with
    the link cut, what it writes after each switch is on that site only."""
    start = until(lambda: active(pair.a), 30, "an active site recorded")["site"]
    if start != pair.a.site:  # an earlier test left b active
        assert admin(pair.b, "failover", "--from", start, "--to", pair.a.site).returncode == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    peer = {
        "site": pair.b.site,
        "nats_urls": pair.b.urls,
        "credentials_dir": str(pair.b.credentials_dir),
    }
    mount = pair.a.mount_process(mnt, tmp_path / "mount.log", env={"CFS_PEER": json.dumps(peer)})
    mount.start()
    try:
        mount.wait_until(lambda: is_fuse_mount(mnt), 30, "the FUSE mount")
        (mnt / "via-mount-a").write_bytes(b"first")
        until(lambda: read(pair.b, "via-mount-a") == b"first", 60, "replicated to b")

        def written_only_on(site: LocalSite, name: str) -> None:
            pair.partition()
            try:
                (mnt / name).write_bytes(name.encode())
                assert read(site, name) == name.encode()
                assert stat(other(pair, site), name) is None, f"{name} went to the other site"
            finally:
                pair.heal()
                until(pair.linked, 30, "the link back up")

        moved = admin(pair.a, "failover", "--from", pair.a.site, "--to", pair.b.site)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        until(lambda: "client.site_switched" in mount.log_tail(), 10, "the mount switched")
        written_only_on(pair.b, "mount-after-failover")
        back = admin(pair.b, "failback", "--from", pair.b.site, "--to", pair.a.site)
        assert back.returncode == 0, back.stdout + back.stderr
        until(lambda: mount.log_tail().count("client.site_switched") == 2, 10, "switched back")
        written_only_on(pair.a, "mount-after-failback")
        assert (mnt / "mount-after-failover").read_bytes() == b"mount-after-failover"
    finally:
        try:
            if mount.running:
                assert mount.stop(timeout=30) == 0, mount.log_tail()
        finally:
            if is_fuse_mount(mnt):
                subprocess.run(["umount", "-l", str(mnt)], check=False)


async def _diverge(site: LocalSite, ino: int, uid: int) -> None:
    """A change only this site's shard holds, as if a merge had gone wrong: applied as
    a third site's entry (journaled as remote, so never shipped)."""
    async with await site.client() as bus:
        inode = await MetadataClient(bus).getattr(ino)
        owner = Stamp(ns=time.time_ns(), site="site-x")
        changed = inode.model_copy(update={"uid": uid, "stamps": {**inode.stamps, "owner": owner}})
        entry = JournalEntry(
            op_id=new_id(), op="setattr", changes=(PutInode(inode=changed),), reply=Reply()
        )
        message = RemoteMessage(seq=1, entries=(entry,))
        await shard_admin(bus, 1, ApplyRemote(origin="site-x", messages=(message,)))


@pytest.mark.slow  # make test-slow (the default suite keeps under 15 min)
def test_replication_sync_ships_again_what_still_differs(pair: SitePair) -> None:
    ino = asyncio.run(_write(pair.a, {"diverged": b"d"}))["diverged"]
    until(lambda: stat(pair.b, "diverged") is not None, 60, "diverged on site-b")
    asyncio.run(_diverge(pair.b, ino, 4242))
    check = admin(pair.a, "metadata-consistency-check", "--cross-site")
    assert check.returncode == 1 and f"Inode {ino}: differs" in check.stdout, check.stdout

    a, b = pair.a.site, pair.b.site
    synced = admin(pair.a, "replication-sync", "--source", a, "--target", b)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert f"Shipped again from {a}: 1 record(s) that differed" in synced.stdout
    assert "Shard 001: equal" in synced.stdout
    on_b = stat(pair.b, "diverged")
    assert on_b is not None and on_b.uid != 4242 and read(pair.b, "diverged") == b"d"
