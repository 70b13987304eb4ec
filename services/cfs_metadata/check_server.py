"""Per-node replica checks: `cfs.<site>.rpc.metacheck.<node>` (`cfs_contracts.fs.check`).

The checker asks every metadata node, not only the writers: a record damaged on
one follower is found there. Each scan works on a checkpoint of the projection
(hard links, taken between two journal applies), so its records, digests and
applied sequence belong to one exact position while the replica keeps applying.
The scan itself runs in a thread; the checkpoint is removed afterwards.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from cfs.bus import Bus
from cfs.ids import new_id
from cfs_contracts.fs.check import (
    CheckReply,
    CheckRequest,
    ListRecords,
    RebuildReplica,
    RecordDigest,
    ReplicaShard,
    ScanReplicas,
    meta_check_subject,
)
from cfs_metadata.digest import bucket_records, scan_pairs, site_neutral
from cfs_metadata.projection import Projection
from cfs_metadata.replica import ShardReplica

log = logging.getLogger(__name__)

MAX_LISTED = 20_000  # records per `records` reply (a bucket holds 1/256 of a shard)


class ReplicaChecks:
    """Answers scan, records and rebuild requests for this node's replicas."""

    def __init__(self, bus: Bus, replicas: Mapping[int, ShardReplica], scratch: Path) -> None:
        self.bus = bus
        self.replicas = replicas
        self.scratch = scratch
        self._sub: Subscription | None = None
        self._lock = asyncio.Lock()  # one scan at a time: checks must not starve the node

    async def start(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)  # checkpoints a crash left behind
        self.scratch.mkdir(parents=True, exist_ok=True)
        subject = meta_check_subject(self.bus.site, self.bus.node)
        self._sub = await self.bus.serve(subject, self._handle)

    async def stop(self) -> None:
        if self._sub is not None and not self.bus.nc.is_closed:
            await self._sub.unsubscribe()
        self._sub = None

    async def _handle(self, msg: Msg) -> bytes:
        try:
            op = CheckRequest.model_validate_json(msg.data).body
        except ValidationError as exc:
            reply = self._reply(
                errno=errno.EINVAL, message=f"bad request: {exc.errors()[0]['msg']}"
            )
            return reply.model_dump_json().encode()
        if isinstance(op, ScanReplicas):
            reply = await self._scan(op)
        elif isinstance(op, ListRecords):
            reply = await self._records(op)
        else:
            reply = await self._rebuild(op)
        return reply.model_dump_json().encode()

    def _reply(self, **fields: object) -> CheckReply:
        return CheckReply.model_validate({"node": self.bus.node, **fields})

    async def _scan(self, op: ScanReplicas) -> CheckReply:
        wanted = op.shards or tuple(sorted(self.replicas))
        unknown = [s for s in wanted if s not in self.replicas]
        if unknown:
            return self._reply(errno=errno.ENOENT, message=f"no replica of shards {unknown}")
        results = []
        async with self._lock:
            for index in wanted:
                replica = self.replicas[index]
                with self._checkpoint(replica) as path:
                    role, caught_up = replica.role.value, replica.caught_up
                    scanned = await asyncio.to_thread(
                        _scan_checkpoint, path, index, op.site_neutral
                    )
                    results.append(scanned)
                results[-1] = results[-1].model_copy(update={"role": role, "caught_up": caught_up})
        log.info(
            "check.scanned",
            extra={
                "shards": [r.shard for r in results],
                "records": sum(r.records for r in results),
                "corrupt": sum(len(r.corrupt) for r in results),
            },
        )
        return self._reply(shards=tuple(results))

    async def _records(self, op: ListRecords) -> CheckReply:
        replica = self.replicas.get(op.shard)
        if replica is None:
            return self._reply(errno=errno.ENOENT, message=f"no replica of shard {op.shard}")
        async with self._lock:
            with self._checkpoint(replica) as path:
                seq, records = await asyncio.to_thread(_list_checkpoint, path, op)
        if len(records) > MAX_LISTED:
            return self._reply(
                errno=errno.E2BIG,
                message=f"{len(records)} records in {len(op.buckets)} buckets; ask fewer",
            )
        return self._reply(applied_seq=seq, records=tuple(records))

    async def _rebuild(self, op: RebuildReplica) -> CheckReply:
        replica = self.replicas.get(op.shard)
        if replica is None:
            return self._reply(errno=errno.ENOENT, message=f"no replica of shard {op.shard}")
        await replica.rebuild(op.reason)
        return self._reply(message=f"shard {op.shard:03d} is being rebuilt from its journal")

    @contextmanager
    def _checkpoint(self, replica: ShardReplica) -> Iterator[Path]:
        """A consistent copy of the projection now (in the event loop: between applies)."""
        path = self.scratch / f"shard-{replica.shard_index:03d}-{new_id()}"
        replica.projection.checkpoint(path)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def _scan_checkpoint(path: Path, shard: int, neutral: bool = False) -> ReplicaShard:
    projection = Projection(path, shard)
    try:
        pairs = projection.image_pairs()
        scanned = scan_pairs(site_neutral(pairs), verify=False) if neutral else scan_pairs(pairs)
        return ReplicaShard(
            shard=shard,
            applied_seq=projection.applied_seq,
            role="",
            caught_up=False,
            records=scanned.records,
            buckets=tuple(scanned.buckets),
            corrupt=tuple(scanned.corrupt),
            seconds=round(scanned.seconds, 3),
        )
    finally:
        projection.close()


def _list_checkpoint(path: Path, op: ListRecords) -> tuple[int, list[RecordDigest]]:
    projection = Projection(path, op.shard)
    try:
        records: list[RecordDigest] = []
        pairs = projection.image_pairs()
        for record in bucket_records(site_neutral(pairs) if op.site_neutral else pairs, op.buckets):
            records.append(record)
            if len(records) > MAX_LISTED:
                break
        return projection.applied_seq, records
    finally:
        projection.close()
