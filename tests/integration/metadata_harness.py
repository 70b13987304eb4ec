"""A metadata site on real processes: a NATS cluster plus metadata-raft service processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

from cfs.bus import Bus
from cfs.client import MetadataClient
from cfs.lease import Lease
from cfs.supervisor import ManagedProcess, NatsCluster
from cfs.supervisor.site import LocalSite
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.streams import shard_lease_key
from cfs_metadata.journal import Journal
from cfs_metadata.projection import Projection

SITE = "t"


class MetaSite:
    """A metadata-only `LocalSite` (the one site family of the tests) on a NATS cluster
    the test started: a metadata-raft process per node, no auth, a crash file for
    `cfs.faults`, short leases."""

    def __init__(
        self,
        base: Path,
        cluster: NatsCluster,
        nodes: tuple[str, ...] = ("a", "b", "c"),
        shards: int = 1,
        lease_s: float = 0.8,
        renew_s: float = 0.2,
    ) -> None:
        self.base = base
        self.cluster = cluster
        self.shards = shards
        self.local = LocalSite(
            base,
            nodes,
            shards=shards,
            site=SITE,
            secure=False,
            services=("metadata-raft",),
            nats=cluster,
            env={
                "CFS_LEASE_S": str(lease_s),
                "CFS_RENEW_S": str(renew_s),
                "CFS_CRASH_FILE": str(base / "crash-at"),
            },
        )
        self.nodes: dict[str, ManagedProcess] = {n: self.local.metadata(n) for n in nodes}

    async def provision(self) -> None:
        await self.local.provision()

    def start_all(self) -> None:
        for node in self.nodes:
            self.local.start_node(node)

    @property
    def crash_file(self) -> Path:
        """Write a fault point's name here (services/cfs_metadata/faults.py)."""
        return self.base / "crash-at"

    def restart_dead(self) -> list[str]:
        """What systemd would do: start every node whose process has exited."""
        restarted = [name for name, proc in self.nodes.items() if not proc.running]
        for name in restarted:
            self.nodes[name].start()
        return restarted

    def stop_all(self) -> None:
        self.local.stop()

    async def client(self, deadline_s: float = 30.0) -> tuple[Bus, MetadataClient]:
        bus = await self.local.client(f"client-{time.time_ns()}")
        return bus, MetadataClient(bus, deadline_s=deadline_s)

    async def writer(self, shard: str = "001") -> str:
        async with await self.local.client("probe") as bus:
            status = await Lease.read_status(bus, shard_lease_key(shard))
        if status is None or not status.holder:
            raise AssertionError(f"shard {shard} has no writer")
        return status.holder

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await self.local.wait_ready(timeout)

    def projection(self, node: str, shard: int = 1) -> Projection:
        path = self.local.data_dir(node) / "metadata" / f"shard-{shard:03d}"
        return Projection(path, shard)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.log_tail(30)}" for n, p in self.nodes.items())


@dataclass
class Workload:
    """Clients creating, renaming and unlinking; remembers exactly what was acknowledged."""

    client: MetadataClient
    directory: int
    expected: set[str] = field(default_factory=set)
    uncertain: set[str] = field(default_factory=set)
    ack_times: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            name = f"f{i}"
            await self._do(self.client.create(self.directory, name), add={name})
            if i % 3 == 2:
                old, new = f"f{i - 1}", f"r{i - 1}"
                if old in self.expected:
                    await self._do(
                        self.client.rename(self.directory, old, self.directory, new),
                        add={new},
                        remove={old},
                    )
            if i % 5 == 4:
                victim = f"r{i - 3}"
                if victim in self.expected:
                    await self._do(self.client.unlink(self.directory, victim), remove={victim})
            i += 1

    async def _do(
        self,
        action: Awaitable[object],
        add: set[str] = frozenset(),  # type: ignore[assignment]
        remove: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        try:
            await action
        except FsError as exc:
            self.failures.append(str(exc))
            self.uncertain |= add | remove
            return
        self.expected |= add
        self.expected -= remove
        self.ack_times.append(time.monotonic())


async def replay_journal(site: MetaSite | LocalSite, shard: int = 1) -> list[tuple[int, object]]:
    """Every (sequence, payload) of a shard's journal, read back from the stream."""
    local = site.local if isinstance(site, MetaSite) else site
    async with await local.client("replay") as bus:
        journal = Journal(bus, shard)
        last = await journal.last_seq()
        return [(r.seq, r.event.payload) async for r in journal.read_range(1, last)]
