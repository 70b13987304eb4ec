"""A metadata site on real processes: a NATS cluster plus metadata-raft service processes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

from cfs.bus import Bus, ensure_buckets, ensure_streams
from cfs.client import MetadataClient
from cfs.kernel.runtime import until_jetstream_answers
from cfs.lease import Lease
from cfs.supervisor import ManagedProcess, NatsCluster
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.streams import SITE_BUCKETS, site_streams
from cfs_metadata.journal import Journal
from cfs_metadata.projection import Projection

ROOT = Path(__file__).resolve().parents[2]
SITE = "t"


class MetaSite:
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
        self.nodes: dict[str, ManagedProcess] = {}
        pythonpath = os.pathsep.join(
            [str(ROOT / "libs"), str(ROOT / "contracts"), str(ROOT / "services"), *sys.path]
        )
        for node in nodes:
            env = {
                "CFS_NODE": node,
                "CFS_SITE": SITE,
                "CFS_NATS_URLS": json.dumps(cluster.urls),
                "CFS_DATA_DIR": str(base / node),
                "CFS_SHARDS": str(shards),
                "CFS_LEASE_S": str(lease_s),
                "CFS_RENEW_S": str(renew_s),
                "PYTHONPATH": pythonpath,
                "CFS_CRASH_FILE": str(base / "crash-at"),
            }
            self.nodes[node] = ManagedProcess(
                f"metadata-{node}",
                [sys.executable, "-m", "cfs_metadata"],
                log_path=base / f"{node}.log",
                env=env,
            )

    async def provision(self) -> None:
        replicas = min(3, len(self.cluster.servers))
        async with await Bus.connect(self.cluster.urls, site=SITE, node="init") as bus:
            # A just-started cluster answers JetStream only once it has elected a meta leader.
            await until_jetstream_answers(
                "site streams",
                lambda: ensure_streams(
                    bus.js, site_streams(self.shards), site=SITE, replicas=replicas
                ),
            )
            await until_jetstream_answers(
                "site buckets", lambda: ensure_buckets(bus.js, SITE_BUCKETS, replicas=replicas)
            )

    def start_all(self) -> None:
        for proc in self.nodes.values():
            proc.start()

    @property
    def crash_file(self) -> Path:
        """Write a crash point's name here (services/cfs_metadata/faults.py)."""
        return self.base / "crash-at"

    def restart_dead(self) -> list[str]:
        """What systemd would do: start every node whose process has exited."""
        restarted = [name for name, proc in self.nodes.items() if not proc.running]
        for name in restarted:
            self.nodes[name].start()
        return restarted

    def stop_all(self) -> None:
        for proc in self.nodes.values():
            if proc.running:
                proc.stop(timeout=15)

    async def client(self, deadline_s: float = 30.0) -> tuple[Bus, MetadataClient]:
        bus = await Bus.connect(self.cluster.urls, site=SITE, node=f"client-{time.time_ns()}")
        return bus, MetadataClient(bus, deadline_s=deadline_s)

    async def writer(self, shard: str = "001") -> str:
        async with await Bus.connect(self.cluster.urls, site=SITE, node="probe") as bus:
            status = await Lease.read_status(bus, f"meta.{shard}")
        if status is None or not status.holder:
            raise AssertionError(f"shard {shard} has no writer")
        return status.holder

    async def wait_ready(self, timeout: float = 30.0) -> None:
        bus, client = await self.client(deadline_s=timeout)
        try:
            await client.getattr(1)
        finally:
            await bus.close()

    def projection(self, node: str, shard: int = 1) -> Projection:
        return Projection(self.base / node / "metadata" / f"shard-{shard:03d}", shard)

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


async def replay_journal(site: MetaSite, shard: int = 1) -> list[tuple[int, object]]:
    """Every (sequence, payload) of a shard's journal, read back from the stream."""
    async with await Bus.connect(site.cluster.urls, site=SITE, node="replay") as bus:
        journal = Journal(bus, shard)
        last = await journal.last_seq()
        return [(r.seq, r.event.payload) async for r in journal.read_range(1, last)]
