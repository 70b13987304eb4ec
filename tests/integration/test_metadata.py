"""metadata-raft on a 3-server NATS site with three service processes (no mocks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats.errors
import pytest

from cfs.bus import BusError
from cfs.supervisor import NatsCluster
from cfs_contracts.events.metadata import LeaderFenced, MetaCommitted
from cfs_contracts.fs.check import ScanReplicas
from cfs_metadata.admin import force_election, shard_status
from cfs_metadata.check import check_replay, check_tree
from cfs_metadata.fsck import ask_node
from cfs_metadata.state import MemoryShard, apply_entries
from tests.integration.metadata_harness import MetaSite, Workload, replay_journal


@pytest.fixture
async def site(tmp_path: Path, nats_cluster3: NatsCluster) -> AsyncIterator[MetaSite]:
    """A site of its own, for a test that kills or pauses a process or a server."""
    meta = MetaSite(tmp_path / "meta", nats_cluster3)
    await meta.provision()
    meta.start_all()
    try:
        await meta.wait_ready()
        yield meta
    finally:
        meta.stop_all()


@pytest.fixture(scope="module")
def shared_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetaSite]:
    """One site for the tests that only move the lease and write their own names (the
    last ones of the module, so it never runs beside another test's site)."""
    base = tmp_path_factory.mktemp("meta-shared")
    with NatsCluster(3, base / "nats-cluster") as cluster:
        meta = MetaSite(base / "meta", cluster)
        asyncio.run(meta.provision())
        meta.start_all()
        try:
            asyncio.run(meta.wait_ready())
            yield meta
        finally:
            meta.stop_all()


async def _run_load_through(
    site: MetaSite, fault, clients: int = 4
) -> tuple[list[Workload], float]:
    """Start load, apply `fault` mid-way, return the workloads and seconds until writes resumed."""
    bus, client = await site.client(deadline_s=60)
    try:
        dirs = [await client.mkdir(1, f"client{k}") for k in range(clients)]
        loads = [Workload(client, d.ino) for d in dirs]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(w.run(stop)) for w in loads]
        await asyncio.sleep(2.0)
        fault_at = time.monotonic()
        await fault()
        deadline = fault_at + 45
        while time.monotonic() < deadline:
            after = [t for w in loads for t in w.ack_times if t > fault_at + 0.05]
            if len(after) >= 50:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        resumed = min(t for w in loads for t in w.ack_times if t > fault_at + 0.05) - fault_at
        for load in loads:
            names = {e.name async for e in client.readdir(load.directory)}
            certain = names - load.uncertain
            assert certain == load.expected - load.uncertain, "acknowledged operations lost"
            assert not load.failures, load.failures[:3]
        return loads, resumed
    finally:
        await bus.close()


async def _verify_replicas(site: MetaSite) -> None:
    """Each replica equals a replay of the journal up to its position; trees consistent."""
    site.stop_all()
    journal = await replay_journal(site)
    for node in site.nodes:
        projection = site.projection(node)
        try:
            applied = projection.applied_seq
            memory = projection.to_memory()
        finally:
            projection.close()
        replayed = MemoryShard(1)
        for seq, payload in journal:
            if seq > applied:
                break
            if isinstance(payload, MetaCommitted):
                apply_entries(replayed, payload.entries)
        assert check_replay(memory, replayed) == [], f"replica {node} differs from the journal"
        assert check_tree(memory, memory.inodes) == [], f"replica {node} tree inconsistent"
        assert applied >= journal[-1][0] - 3, f"replica {node} far behind the journal"


async def test_kill9_of_the_writer_process_loses_no_acknowledged_operation(
    site: MetaSite,
) -> None:
    writer = await site.writer()

    async def kill_writer() -> None:
        site.nodes[writer].kill9()

    loads, resumed = await _run_load_through(site, kill_writer)
    new_writer = await site.writer()
    assert new_writer != writer
    print(
        f"\nwriter kill -9: writes resumed after {resumed:.2f}s "
        f"({sum(len(w.ack_times) for w in loads)} ops acked)"
    )
    restarted = site.nodes[writer]
    restarted.start()

    def caught_up() -> bool:  # since this start: the log holds every run's lines
        this_run = restarted.log_tail(200).rsplit("--- cfs.supervisor: start", 1)[-1]
        return '"follower.caught_up"' in this_run

    # _verify_replicas expects every replica current with the journal
    await asyncio.to_thread(restarted.wait_until, caught_up, 60, "the restarted replica")
    await _verify_replicas(site)


@pytest.mark.expected_logs(
    "nats.disconnected",
    "nats.error",
    "lease.*",
    "leader.lost",
    "leader.append_retry",
    "follower.retry",
    "retry.*",
)
async def test_kill9_of_the_nats_server_leading_the_shard_stream(site: MetaSite) -> None:
    async def kill_stream_leader() -> None:
        bus, _ = await site.client()
        try:
            leader = (await bus.js.stream_info("META_001")).cluster.leader
        finally:
            await bus.close()
        site.cluster.server(leader).kill9()
        kill_stream_leader.victim = leader  # type: ignore[attr-defined]

    loads, resumed = await _run_load_through(site, kill_stream_leader)
    print(
        f"\nNATS stream-leader kill -9: writes resumed after {resumed:.2f}s "
        f"({sum(len(w.ack_times) for w in loads)} ops acked)"
    )
    site.cluster.server(kill_stream_leader.victim).restart()  # type: ignore[attr-defined]
    site.cluster.wait_healthy()
    # JetStream's API can answer slowly for a few seconds after a server rejoins (consumer
    # creation times out), so followers take longer to re-tail than after a process kill.
    await _until_replicas_applied(site, timeout=60.0)
    await _verify_replicas(site)


async def _until_replicas_applied(site: MetaSite, timeout: float) -> None:
    """Until every node's replica has applied the journal's last entry, as its replica
    checks report it (what _verify_replicas then checks with the processes stopped)."""
    deadline = time.monotonic() + timeout
    applied: dict[str, int] = {}
    async with await site.local.client("probe") as bus:
        while True:
            try:
                last = (await bus.js.stream_info("META_001")).state.last_seq
                for node in site.nodes:
                    reply = await ask_node(bus, node, ScanReplicas(shards=(1,)), 5.0)
                    applied[node] = reply.shards[0].applied_seq if reply.shards else -1
            except (BusError, TimeoutError, nats.errors.Error):
                last = -1  # a server still rejoining, or a replica not answering yet
            if last >= 0 and all(applied.get(n, -1) >= last for n in site.nodes):
                return
            assert time.monotonic() < deadline, f"replicas behind seq {last}: {applied}"
            await asyncio.sleep(0.5)


# A renewal sent just before SIGSTOP times out when the writer wakes: lease.write_failed.
@pytest.mark.expected_logs("lease.lost", "leader.lost", "lease.write_failed")
async def test_a_paused_then_resumed_writer_cannot_append(site: MetaSite) -> None:
    writer = await site.writer()
    bus, client = await site.client(deadline_s=60)
    try:
        directory = await client.mkdir(1, "paused")
        load = Workload(client, directory.ino)
        stop = asyncio.Event()
        task = asyncio.create_task(load.run(stop))
        await asyncio.sleep(1.0)
        site.nodes[writer].pause()  # SIGSTOP: the writer keeps its connection and its lease record
        deadline = time.monotonic() + 20
        while (new_writer := await site.writer()) == writer:
            assert time.monotonic() < deadline, "no new writer while the old one was paused"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        site.nodes[writer].resume()
        await asyncio.sleep(3.0)  # the old writer wakes up with requests queued for it
        stop.set()
        await task
        assert await site.writer() == new_writer
        names = {e.name async for e in client.readdir(directory.ino)}
        assert names - load.uncertain == load.expected - load.uncertain
    finally:
        await bus.close()
    journal = await replay_journal(site)
    fences = [(seq, p.term) for seq, p in journal if isinstance(p, LeaderFenced)]
    last_fence_seq, last_term = fences[-1]
    stale = [
        seq
        for seq, p in journal
        if isinstance(p, MetaCommitted) and seq > last_fence_seq and p.term < last_term
    ]
    assert not stale, f"appends by a deposed writer after the fence: {stale}"
    terms = [p.term for _, p in journal if isinstance(p, MetaCommitted)]
    assert terms == sorted(terms), "journal terms never go backwards"
    assert "leader.step_down" in site.nodes[writer].log_tail(400) or not site.nodes[writer].running
    await _verify_replicas(site)


async def test_raft_status_shows_both_layers_and_force_election_moves_them(
    shared_site: MetaSite,
) -> None:
    site = shared_site
    bus, client = await site.client()
    try:
        folder = await client.mkdir(1, "force-election")  # the shared root holds other names
        await client.mkdir(folder.ino, "before")
        deadline = time.monotonic() + 10
        while True:  # a follower may be one append behind for a moment
            before = await shard_status(bus, "001")
            if all(r.current for r in before.replicas) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert before.problems == ()
        assert before.stream_leader in {s.name for s in site.cluster.servers}
        assert len(before.replicas) == 2 and all(r.current for r in before.replicas)
        assert before.writer in site.nodes and before.term >= 1
        assert before.lease_age_s is not None and before.lease_age_s < 2.0
        await force_election(bus, "001")
        deadline = time.monotonic() + 15
        while True:
            after = await shard_status(bus, "001")
            if after.writer and after.term > before.term and after.stream_leader:
                break
            assert time.monotonic() < deadline, f"no new election: {after}"
            await asyncio.sleep(0.2)
        await client.mkdir(folder.ino, "after")  # the new writer serves
        assert after.stream_leader != before.stream_leader
        assert {e.name async for e in client.readdir(folder.ino)} == {"before", "after"}
    finally:
        await bus.close()


async def test_every_attribute_change_is_stamped_for_the_other_sites_merge(
    shared_site: MetaSite,
) -> None:
    """A chmod records the site and the stamp it replaced; a second one builds on the
    first (DESIGN.md §8); the creation itself carries no stamp."""
    from tests.integration.metadata_harness import SITE

    bus, client = await shared_site.client()
    try:
        created = await client.create(1, "stamped", mode=0o644)
        assert created.stamps == {}
        first = (await client.setattr(created.ino, mode=0o600)).stamps["mode"]
        assert (first.site, first.base) == (SITE, None)
        second = (await client.setattr(created.ino, mode=0o640)).stamps["mode"]
        assert second.base == first.key() and second.key() > first.key()
        owner = await client.setattr(created.ino, owner=7)
        assert set(owner.stamps) == {"mode", "owner"}, "a group not changed was stamped"
    finally:
        await bus.close()
