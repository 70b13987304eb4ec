"""Metadata client: route each operation to its shard's writer, retry safely.

A mutation gets one operation id for its whole life, so a retry after a
timeout or a leader change is answered from the journal, never applied twice.
Leader changes look like "no responders", a timeout, or EAGAIN from a replica
that is no longer the writer; all are retried until the deadline, then
reported as `Leader not available`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import cast, get_args

from pydantic import BaseModel

from cfs.bus import Bus, BusError
from cfs.hlc import observe
from cfs.ids import new_id
from cfs.retry import RetryPolicy, retry
from cfs.telemetry import LabelCache, counter, histogram
from cfs_contracts.fs import rpc
from cfs_contracts.fs.records import Inode, Kind, shard_of
from cfs_contracts.fs.rpc import DirEntry, FsError, Reply, Request
from cfs_contracts.streams import meta_rpc_subject, shard_name

log = logging.getLogger(__name__)

OP_SECONDS = histogram(
    "client_metadata_op_duration_seconds",
    "a metadata call as the client sees it, retries included, by op",
    ("op",),
)
CREATES = counter("client_creates", "files created through this client (answered creates)")
_op_seconds = LabelCache(OP_SECONDS)

_RETRY_ERRNOS = {errno.EAGAIN}


class LeaderUnavailable(FsError):
    def __init__(self, shard: str, waited: float, last: str) -> None:
        super().__init__(
            errno.EIO, f"Leader not available for shard {shard} after {waited:.1f}s ({last})"
        )
        self.shard = shard


class _NotServing(Exception):
    """A reply that asks to be sent again: from a replica that is not (or no longer)
    the writer, or EAGAIN for records locked by a cross-shard transaction."""


def _worth_retrying(exc: BaseException) -> bool:
    # Every bus failure on a request (no responders, no reply, reconnecting) is a
    # writer that is moving or not elected yet.
    return isinstance(exc, _NotServing | BusError)


class MetadataClient:
    def __init__(
        self, bus: Bus, *, deadline_s: float = 30.0, attempt_timeout_s: float = 0.5
    ) -> None:
        """`attempt_timeout_s` is short on purpose: a request that reached a writer that
        then died gets no reply, and a retry (same op id, so never applied twice) finds
        the new writer. Operations normally answer within milliseconds."""
        self.bus = bus
        self.attempt_timeout_s = attempt_timeout_s
        self._retired: str | None = None
        # Told of every change sent (its reply, None if it failed): a cache of records
        # (the mount's) drops or refreshes what the change touched.
        self.changed: Callable[[rpc.MutationOp | rpc.TxOp, Reply | None], None] | None = None
        self._policy = RetryPolicy(
            "metadata request",
            temporary=_worth_retrying,
            deadline_s=deadline_s,
            # A new writer is usually serving within a lease time: keep retries frequent.
            first_delay_s=0.02,
            max_delay_s=0.1,
        )

    def retire(self, why: str) -> None:
        """Fail every call from now on, those retrying included, with EIO: a client that
        moved to the other site stops waiting for this one (its writer may be gone)."""
        self._retired = why

    @property
    def deadline_s(self) -> float:
        return self._policy.deadline_s or 0.0

    @deadline_s.setter
    def deadline_s(self, value: float) -> None:
        self._policy = dataclasses.replace(self._policy, deadline_s=value)

    async def call(
        self,
        op: rpc.ReadOp | rpc.MutationOp | rpc.TxOp,
        *,
        shard: int | None = None,
        retry_conflicts: bool = True,
    ) -> Reply:
        """Send `op` to its shard's writer; FsError on a POSIX error.

        A writer change is always retried. EAGAIN for a conflict (records locked by
        a cross-shard transaction) is retried too unless `retry_conflicts` is False.
        """
        if self.changed is None or isinstance(op, _READS):
            return await self._call(op, shard, retry_conflicts)
        reply: Reply | None = None
        try:
            reply = await self._call(op, shard, retry_conflicts)
            return reply
        finally:
            self.changed(cast("rpc.MutationOp | rpc.TxOp", op), reply)

    async def _call(
        self, op: rpc.ReadOp | rpc.MutationOp | rpc.TxOp, shard: int | None, retry_conflicts: bool
    ) -> Reply:
        if shard is None:
            shard = _shard_of_op(op)
        name = shard_name(shard)
        subject = meta_rpc_subject(self.bus.site, name)
        data = Request(body=op, hlc=self.bus.clock.now()).model_dump_json().encode()
        started = time.monotonic()
        try:
            try:  # the hot path: one attempt, nothing else
                return await self._attempt(subject, data, retry_conflicts)
            except (_NotServing, BusError) as exc:
                failed = exc
            try:
                return await retry(
                    lambda: self._attempt(subject, data, retry_conflicts),
                    self._policy,
                    extra={"shard": name},
                    failed=failed,
                    started=started,
                )
            except (_NotServing, BusError) as exc:
                raise LeaderUnavailable(name, time.monotonic() - started, str(exc)) from None
        finally:  # answered or not: what the caller waited
            _op_seconds(type(op).__name__).observe(time.monotonic() - started)

    async def _attempt(self, subject: str, data: bytes, retry_conflicts: bool) -> Reply:
        if self._retired is not None:
            raise FsError(errno.EIO, self._retired)
        msg = await self.bus.request(subject, data, timeout=self.attempt_timeout_s)
        reply = Reply.model_validate_json(msg.data)
        if reply.hlc is not None:
            observe(self.bus.clock, reply.hlc)
        if reply.not_leader or (retry_conflicts and reply.errno in _RETRY_ERRNOS):
            raise _NotServing(reply.message)
        if reply.errno:
            raise FsError(reply.errno, reply.message)
        return reply

    # -- conveniences ----------------------------------------------------------------
    async def lookup(self, parent: int, name: str) -> Inode:
        reply = await self.call(rpc.Lookup(parent=parent, name=name))
        if reply.inode is None and reply.entries:  # the inode lives in another shard
            return await self.getattr(reply.entries[0].ino)
        return _inode(reply)

    async def getattr(self, ino: int) -> Inode:
        return _inode(await self.call(rpc.GetAttr(ino=ino)))

    async def mkdir(
        self, parent: int, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0
    ) -> Inode:
        op = rpc.MkDir(op_id=new_id(), parent=parent, name=name, mode=mode, uid=uid, gid=gid)
        return _inode(await self.call(op))

    async def create(
        self,
        parent: int,
        name: str,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        exclusive: bool = True,
    ) -> Inode:
        op = rpc.Create(
            op_id=new_id(),
            parent=parent,
            name=name,
            mode=mode,
            uid=uid,
            gid=gid,
            exclusive=exclusive,
        )
        created = _inode(await self.call(op))
        CREATES.inc()
        return created

    async def mknod(
        self,
        parent: int,
        name: str,
        kind: Kind,
        mode: int = 0o644,
        rdev: int = 0,
        uid: int = 0,
        gid: int = 0,
    ) -> Inode:
        op = rpc.MkNod(
            op_id=new_id(),
            parent=parent,
            name=name,
            kind=kind,
            mode=mode,
            rdev=rdev,
            uid=uid,
            gid=gid,
        )
        return _inode(await self.call(op))

    async def symlink(
        self, parent: int, name: str, target: str, uid: int = 0, gid: int = 0
    ) -> Inode:
        op = rpc.Symlink(op_id=new_id(), parent=parent, name=name, target=target, uid=uid, gid=gid)
        return _inode(await self.call(op))

    async def link(self, ino: int, new_parent: int, new_name: str) -> Inode:
        op = rpc.Link(op_id=new_id(), ino=ino, new_parent=new_parent, new_name=new_name)
        return _inode(await self.call(op))

    async def unlink(self, parent: int, name: str) -> None:
        await self.call(rpc.Unlink(op_id=new_id(), parent=parent, name=name))

    async def rmdir(self, parent: int, name: str) -> None:
        await self.call(rpc.RmDir(op_id=new_id(), parent=parent, name=name))

    async def rename(
        self, parent: int, name: str, new_parent: int, new_name: str, flags: int = 0
    ) -> None:
        await self.call(
            rpc.Rename(
                op_id=new_id(),
                parent=parent,
                name=name,
                new_parent=new_parent,
                new_name=new_name,
                flags=flags,
            )
        )

    async def setattr(self, ino: int, **changes: object) -> Inode:
        op = rpc.SetAttr.model_validate({"op_id": new_id(), "ino": ino, **changes})
        return _inode(await self.call(op))

    async def statfs(self, shard_count: int) -> dict[str, int]:
        """File-system totals: every shard's counts added up."""
        totals: dict[str, int] = {"inodes": 0}
        for shard in range(1, shard_count + 1):
            reply = await self.call(rpc.StatFs(), shard=shard)
            totals["inodes"] += reply.stats.get("inodes", 0)
        return totals

    async def readlink(self, ino: int) -> str:
        return (await self.call(rpc.ReadLink(ino=ino))).target or ""

    async def readdir(self, ino: int, page: int = 1000) -> AsyncIterator[DirEntry]:
        cookie = 0
        while True:
            reply = await self.call(rpc.ReadDir(ino=ino, cookie=cookie, limit=page))
            for entry in reply.entries:
                yield entry
            if not reply.more or not reply.entries:
                return
            cookie = reply.entries[-1].cookie

    async def scan_chunk_maps(
        self, shards: int, page: int = 100
    ) -> AsyncIterator[tuple[Inode, ...]]:
        """Every file with a chunk map, shard by shard in inode order, a page at a time
        (the tierer's passes over the whole tree)."""
        for shard in range(1, shards + 1):
            after = 0
            while True:
                reply = await self.call(
                    rpc.ScanChunks(shard=shard, after_ino=after, node="", limit=page)
                )
                yield reply.inodes
                after = reply.cursor
                if not after:
                    break


_READS: tuple[type[BaseModel], ...] = get_args(rpc.ReadOp)


def _shard_of_op(op: rpc.ReadOp | rpc.MutationOp | rpc.TxOp) -> int:
    """The shard that coordinates the operation: named, or that of its directory/inode."""
    field = _routing_field(type(op))
    if field is None:
        return 1  # statfs: the root's shard
    value = getattr(op, field)
    return value if field == "shard" else shard_of(value)


@functools.cache
def _routing_field(op_type: type[BaseModel]) -> str | None:
    """Looked up once per op type: a missing attribute on a pydantic model is costly."""
    return next(
        (f for f in ("shard", "new_parent", "parent", "ino") if f in op_type.model_fields), None
    )


def _inode(reply: Reply) -> Inode:
    if reply.inode is None:
        raise FsError(errno.EIO, "reply carries no inode")
    return reply.inode
