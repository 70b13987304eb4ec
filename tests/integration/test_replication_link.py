"""Two real sites (metadata-raft on each) linked with `cfs admin replication-link`:
each one's shard journals are copied into the other as they are written, the copy
stops while the link is cut (both sites keep writing) and resumes after the heal
with every message once and in order; `replication-status` tells each state."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cfs.client import MetadataClient
from cfs.supervisor import LocalSite
from cfs.supervisor.sites import SitePair
from cfs_contracts.fs.records import ROOT_INO, site_of

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SitePair]:
    sites = SitePair(tmp_path_factory.mktemp("pair"), nodes=1, services=("metadata-raft",))
    asyncio.run(sites.start())
    try:
        asyncio.run(sites.wait_ready())
        yield sites
    finally:
        sites.stop()


def admin(site: LocalSite, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cfs.cli", "admin", *args],
        env=site.cli_env(),
        cwd=site.base_dir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def status(site: LocalSite) -> tuple[int, dict[str, Any]]:
    done = admin(site, "replication-status", "--json")
    return done.returncode, json.loads(done.stdout)


def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}")


async def create(site: LocalSite, prefix: str, count: int) -> None:
    async with await site.client() as bus:
        meta = MetadataClient(bus)
        for i in range(count):
            await meta.create(ROOT_INO, f"{prefix}-{i}")


async def journal(site: LocalSite, stream: str, subject: str | None = None) -> list[bytes]:
    """The stream's messages (on `subject` only, if given), in order."""
    async with await site.client() as bus:
        last = (await bus.js.stream_info(stream)).state.last_seq
        found = [await bus.js.get_msg(stream, seq, direct=True) for seq in range(1, last + 1)]
    return [m.data or b"" for m in found if subject is None or m.subject == subject]


def in_step(pair: SitePair) -> bool:
    """Each site holds exactly the other's own journal messages, in order."""
    for here, there in ((pair.b, pair.a), (pair.a, pair.b)):
        own = asyncio.run(journal(there, "META_001", f"cfs.{there.site}.meta.001.journal"))
        if asyncio.run(journal(here, "GEO_IN")) != own:
            return False
    return True


def test_bad_peers_are_one_clear_line(pair: SitePair) -> None:
    itself = admin(pair.a, "replication-link", "--peer", pair.a.site)
    assert itself.returncode == 2 and "is this site" in itself.stderr, itself.stderr
    nowhere = admin(pair.a, "replication-link", "--peer", "site-x")
    assert nowhere.returncode == 3, nowhere.stderr
    assert "does not answer over the site link" in nowhere.stderr
    assert len(nowhere.stderr.strip().splitlines()) == 1
    unlinked = admin(pair.b, "replication-status")
    assert unlinked.returncode == 1 and "replication-link" in unlinked.stderr


def test_journals_cross_both_ways_stop_at_a_partition_and_resume_after(pair: SitePair) -> None:
    for here, there in ((pair.a, pair.b), (pair.b, pair.a)):
        linked = admin(here, "replication-link", "--peer", there.site)
        assert linked.returncode == 0, linked.stderr
        again = admin(here, "replication-link", "--peer", there.site, "--json")
        assert json.loads(again.stdout)["created"] is False
    asyncio.run(create(pair.a, "a", 20))
    asyncio.run(create(pair.b, "b", 5))
    until(lambda: in_step(pair), 30, "each site's journal copied to the other")
    code, linked = status(pair.b)
    assert code == 0 and linked["reachable"], linked
    assert [d["state"] for d in linked["directions"]] == ["connected", "connected"]
    assert [d["lag_events"] for d in linked["directions"]] == [0, 0]

    pair.partition()
    until(lambda: status(pair.b)[0] == 3, 20, "status on B sees the partition")
    code, cut = status(pair.b)
    assert [d["state"] for d in cut["directions"]] == ["unreachable (partition detected)"] * 2
    human = admin(pair.b, "replication-status").stdout
    assert "unreachable (partition detected)" in human
    asyncio.run(create(pair.a, "a-cut", 15))  # both sites keep working
    asyncio.run(create(pair.b, "b-cut", 5))
    time.sleep(2.0)
    assert not in_step(pair), "journals crossed a cut link"

    pair.heal()
    until(lambda: in_step(pair), 60, "the copies caught up after the heal")
    until(lambda: status(pair.b)[0] == 0, 20, "status on B connected again")
    code, healed = status(pair.a)
    assert code == 0 and [d["lag_events"] for d in healed["directions"]] == [0, 0], healed


def test_each_site_numbers_its_new_inodes_from_its_own_range(pair: SitePair) -> None:
    """Files created on both sites (as during a partition) never share a number."""

    async def made(site: LocalSite) -> list[int]:
        async with await site.client() as bus:
            meta = MetadataClient(bus)
            return [(await meta.create(ROOT_INO, f"numbered-{i}")).ino for i in range(3)]

    on_a, on_b = asyncio.run(made(pair.a)), asyncio.run(made(pair.b))
    assert {site_of(ino) for ino in on_a} == {0} and {site_of(ino) for ino in on_b} == {1}
    assert not set(on_a) & set(on_b)
