"""`cfs admin metadata-repair`: carry out a repair plan (`repair_plan`), audited.

Order matters. Replicas that differ from their journal are rebuilt first (one at a
time per shard, followers before the writer, so a healthy replica is there to take
the writer lease), and each must have caught up and scan clean before the next.
Then records are fixed through each shard's writer (`RepairRecords`, journaled, so
every replica applies it and a replica rebuilt later sees it too), orphans go to
`/lost+found`, and damaged fragments are rebuilt by their chunk-store. Every action
is recorded in AUDIT before it runs and with its outcome after.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from cfs.admin.client import actor
from cfs.bus import Bus, BusError
from cfs.client.chunks import ChunkStoreClient, FragmentError, Unrecoverable
from cfs.client.metadata import MetadataClient
from cfs.client.shard_admin import ShardAdminRefused, shard_admin
from cfs.ids import new_id
from cfs.lease import Lease
from cfs_contracts.data import RebuildRequest
from cfs_contracts.events.ops import AdminActionRecorded
from cfs_contracts.fs.check import RebuildReplica as RebuildRequestOp
from cfs_contracts.fs.check import ScanReplicas
from cfs_contracts.fs.records import ROOT_INO, Inode
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.fs.shard_admin import RepairRecords
from cfs_contracts.streams import shard_lease_key
from cfs_metadata.fsck import ask_node
from cfs_metadata.repair_plan import (
    LOST_FOUND,
    Action,
    AdoptOrphan,
    FixRecord,
    RebuildFragment,
    RebuildReplica,
    RecordView,
    adoption,
)

log = logging.getLogger(__name__)

COMMAND = "metadata-repair"
REBUILD_TIMEOUT_S = 120.0
AUDIT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Outcome:
    action: Action
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'repaired' if self.ok else 'FAILED'}: {self.action.describe()} ({self.message})"


class RepairRun:
    def __init__(
        self,
        bus: Bus,
        view: RecordView,
        *,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.bus = bus
        self.view = view
        self.meta = MetadataClient(bus, deadline_s=30.0)
        self.chunks = ChunkStoreClient(bus, timeout_s=30.0, rebuild_timeout_s=120.0)
        self.on_outcome = on_outcome or (lambda _: None)
        self.outcomes: list[Outcome] = []
        self._lost_found: int | None = None  # its inode number, once known

    async def execute(self, actions: list[Action]) -> list[Outcome]:
        rebuilds = [a for a in actions if isinstance(a, RebuildReplica)]
        for shard in sorted({a.shard for a in rebuilds}):
            writer = await self._writer(shard)
            mine = [a for a in rebuilds if a.shard == shard]
            for rebuild in sorted(mine, key=lambda a: a.node == writer):  # the writer last
                await self._do(rebuild, self._rebuild_replica(rebuild))
        for action in actions:  # before orphans: /lost+found changes the root's record
            if isinstance(action, FixRecord):
                await self._do(action, self._fix(action))
        for orphan in actions:
            if isinstance(orphan, AdoptOrphan):
                await self._do(orphan, self._adopt(orphan))
        for fragment in actions:
            if isinstance(fragment, RebuildFragment):
                await self._do(fragment, self._fragment(fragment))
        return self.outcomes

    async def _do(self, action: Action, work: Awaitable[str]) -> None:
        """Audit, run, audit the outcome; a failure is reported, the run goes on."""
        arguments = {
            "action": type(action).__name__,
            "what": action.describe()[:512],
            "findings": "; ".join(f.line for f in action.findings)[:1024],
        }
        await self._audit(arguments, "requested")
        try:
            message = await work
            outcome = Outcome(action, True, message)
        except (BusError, FsError, FragmentError, ShardAdminRefused, RepairError) as exc:
            outcome = Outcome(action, False, str(exc))
        await self._audit(arguments, "succeeded" if outcome.ok else f"failed: {outcome.message}")
        log.info(
            "repair.action",
            extra={"what": action.describe(), "ok": outcome.ok, "message": outcome.message},
        )
        self.outcomes.append(outcome)
        self.on_outcome(outcome)

    async def _audit(self, arguments: dict[str, str], outcome: str) -> None:
        record = AdminActionRecorded(
            actor=actor(), command=COMMAND, arguments=arguments, outcome=outcome
        )
        await self.bus.publish(self.bus.event(record), timeout=AUDIT_TIMEOUT_S)

    # -- replicas ------------------------------------------------------------------------
    async def _writer(self, shard: int) -> str | None:
        status = await Lease.read_status(self.bus, shard_lease_key(f"{shard:03d}"))
        return status.holder if status is not None else None

    async def _rebuild_replica(self, action: RebuildReplica) -> str:
        reason = "; ".join(f.line for f in action.findings[:3])
        # The journal records the repair too (its history shows why the replica changed).
        marker = RepairRecords(
            repair_id=new_id(), problem="replica", finding=action.describe() + f": {reason}"
        )
        seq = (await shard_admin(self.bus, action.shard, marker)).seq
        reply = await ask_node(
            self.bus, action.node, RebuildRequestOp(shard=action.shard, reason=reason), 30.0
        )
        if reply.errno:
            raise RepairError(reply.message)
        started = time.monotonic()
        while time.monotonic() - started < REBUILD_TIMEOUT_S:
            await asyncio.sleep(0.5)
            try:
                scan = await ask_node(
                    self.bus, action.node, ScanReplicas(shards=(action.shard,)), 30.0
                )
            except BusError:
                continue  # the node is busy replaying: ask again
            if scan.errno or not scan.shards:
                continue
            state = scan.shards[0]
            if state.caught_up and state.applied_seq >= seq:
                if state.corrupt:
                    raise RepairError(
                        f"rebuilt, but {len(state.corrupt)} records fail their checksum "
                        "again: the node's storage is failing"
                    )
                return f"replayed {state.applied_seq} journal messages"
        raise RepairError(f"not caught up within {REBUILD_TIMEOUT_S:g}s (still replaying)")

    # -- records -------------------------------------------------------------------------
    async def _fix(self, action: FixRecord) -> str:
        op = RepairRecords(
            repair_id=new_id(),
            problem=action.problem,
            finding="; ".join(f.line for f in action.findings)[:1024],
            expected=action.expected,
            changes=action.changes,
        )
        reply = await shard_admin(self.bus, action.shard, op)
        return f"journaled at seq {reply.seq} of shard {action.shard:03d}"

    async def _adopt(self, action: AdoptOrphan) -> str:
        """Name it in /lost+found (that directory's shard), then point it there (its own)."""
        orphan = self.view.inode(action.ino)
        if orphan is None:
            raise RepairError("the inode is gone")
        lost = await self._lost_found_dir()
        for step in adoption(orphan, lost, action.name):
            if step is not None:
                await self._fix(replace(step, findings=action.findings))
        return f"now /{LOST_FOUND}/{action.name}"

    async def _lost_found_dir(self) -> Inode:
        """/lost+found as its writer holds it now (made on first use, mode 0700)."""
        if self._lost_found is not None:
            return await self.meta.getattr(self._lost_found)
        try:
            found = await self.meta.lookup(ROOT_INO, LOST_FOUND)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            found = await self.meta.mkdir(ROOT_INO, LOST_FOUND, mode=0o700)
            await self._audit({"action": "mkdir", "what": f"/{LOST_FOUND}"}, "succeeded")
        if not found.is_dir:
            raise RepairError(f"/{LOST_FOUND} exists and is not a directory")
        self._lost_found = found.ino
        return found

    # -- fragments -----------------------------------------------------------------------
    async def _fragment(self, action: RebuildFragment) -> str:
        try:
            await self.chunks.verify(action.node, action.key)
            return "healthy again already (the repair service rebuilt it)"
        except FragmentError as exc:
            if exc.unreachable:
                raise
        request = RebuildRequest(sources=action.sources, length=action.length)
        try:
            info = await self.chunks.rebuild(action.node, action.key, request, action.needed)
        except Unrecoverable as exc:
            raise RepairError(str(exc)) from None
        return f"{info.size} bytes written, crc32 {info.crc32:08x}"


class RepairError(Exception):
    pass
