"""Two sites linked as DESIGN.md §8 has it, with real nats-server processes: each its
own JetStream domain, one leaf-node connection between them through a link proxy
that `cfs dev partition` cuts, and a stream on one site sourcing the other's across
domains. What the geo-replicator builds on is shown here: each site keeps working
while the link is cut, and the sourced copy resumes where it stopped, with nothing
lost or copied twice, even when its server was killed -9 during the partition."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import ExternalStream, StreamConfig, StreamSource

from cfs.supervisor import NatsServer
from cfs.supervisor.linkproxy import LinkProxy
from cfs.supervisor.nats import LeafListen, LeafRemote
from cfs.supervisor.ports import free_port

pytestmark = pytest.mark.timeout(120)


class Sites:
    def __init__(self, base: Path) -> None:
        password = secrets.token_urlsafe(16)
        leaf_port = free_port("127.0.0.1")
        self.a = NatsServer(
            "a1", base / "a", domain="a", leaf_listen=LeafListen(leaf_port, "site-b", password)
        )
        self.link = LinkProxy("link-b-a", base / "link", leaf_port)
        self.b = NatsServer(
            "b1",
            base / "b",
            domain="b",
            leaf_remotes=[LeafRemote((self.link.url,), "site-b", password)],
        )

    def leaf_up(self) -> bool:
        return bool(self.b.varz().get("leafnodes"))


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    pair = Sites(tmp_path)
    pair.a.start()
    pair.link.start()
    pair.b.start()
    try:
        yield pair
    finally:
        pair.b.stop()
        pair.link.stop()
        pair.a.stop()


def _until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


async def _copied(url: str) -> list[bytes]:
    """The sourced stream's messages on site B, in order."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        last = (await js.stream_info("FROM_A")).state.last_seq
        return [(await js.get_msg("FROM_A", seq)).data or b"" for seq in range(1, last + 1)]
    finally:
        await nc.close()


async def _publish(url: str, numbers: range) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for n in numbers:
            ack = await js.publish("cfs.a.ev.x", f"{n}".encode(), headers={"Nats-Msg-Id": f"{n}"})
            assert not ack.duplicate
    finally:
        await nc.close()


async def _count(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info("FROM_A")).state.messages
    finally:
        await nc.close()


def test_a_sourced_stream_survives_a_partition_and_a_kill9_without_loss_or_duplicates(
    sites: Sites,
) -> None:
    async def provision() -> None:
        a = await nats.connect(sites.a.url)
        b = await nats.connect(sites.b.url)
        try:
            await a.jetstream().add_stream(StreamConfig(name="EVENTS", subjects=["cfs.a.ev.>"]))
            source = StreamSource(name="EVENTS", external=ExternalStream(api="$JS.a.API"))
            await b.jetstream().add_stream(StreamConfig(name="FROM_A", sources=[source]))
            # site B's own JetStream answers as B, not as A's (domains keep them apart)
            assert (await b.jetstream().account_info()).domain == "b"
        finally:
            await a.close()
            await b.close()

    _until(sites.leaf_up, 15, "site B's leaf node connected to site A")
    asyncio.run(provision())
    asyncio.run(_publish(sites.a.url, range(1, 51)))
    _until(lambda: asyncio.run(_count(sites.b.url)) == 50, 15, "50 events copied to B")

    sites.link.cut()
    _until(lambda: not sites.leaf_up(), 10, "the leaf connection closed by the cut")
    asyncio.run(_publish(sites.a.url, range(51, 101)))  # site A keeps acknowledging
    sites.b.kill9()  # and site B's server dies during the partition
    sites.b.start()
    time.sleep(2.0)
    assert asyncio.run(_count(sites.b.url)) == 50, "nothing crossed a cut link"

    sites.link.heal()
    _until(lambda: asyncio.run(_count(sites.b.url)) == 100, 30, "B caught up after the heal")
    time.sleep(1.0)  # a duplicate would arrive now
    assert asyncio.run(_copied(sites.b.url)) == [f"{n}".encode() for n in range(1, 101)]


async def test_a_site_pair_is_two_domains_linked_through_a_link_that_cuts(tmp_path: Path) -> None:
    """The supervisor's two-site topology (secure sites: per-role NKeys, leaf user
    with its own password): linked at start, partitioned and healed on demand."""
    from cfs.supervisor.sites import SitePair

    pair = SitePair(tmp_path, nodes=1, services=())
    await pair.start()  # NATS and the link only: no service is needed here
    try:
        await asyncio.to_thread(_until, pair.linked, 15, "site b linked to site a")
        for site in pair.sites:
            async with await site.client() as bus:
                assert (await bus.js.account_info()).domain == site.site
        pair.partition()
        await asyncio.to_thread(_until, lambda: not pair.linked(), 10, "the link cut")
        await asyncio.sleep(3.0)  # leaf nodes reconnect within a second or two
        assert pair.partitioned and not pair.linked(), "a reconnect went around the cut link"
        pair.heal()
        await asyncio.to_thread(_until, pair.linked, 15, "the link back")
    finally:
        pair.stop()
    _secret_kept(tmp_path)


def _secret_kept(base: Path) -> None:
    secret = base / "link" / "leaf.secret"
    for holder in (secret, *base.rglob("nats.conf")):
        assert holder.stat().st_mode & 0o077 == 0, f"{holder} is readable by others"
    logs = [log for log in base.rglob("*.log") if secret.read_text().strip() in log.read_text()]
    assert logs == [], "the link's password is in a log"
