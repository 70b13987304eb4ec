"""Carry out chunk plans: have each target rebuild its fragment, then repoint the map.

The coordinator moves no fragment data: it asks each target chunk-store to
re-create the fragment it is to hold (`rebuild`: the target copies it from a
draining holder or decodes it from k survivors, checks the chunk's SHA-256,
stores it durably). That keeps the coordinator off the data path, which on a
4+2 rebuild carries five times the bytes re-created.

Order matters for durability: the new fragment is durable on its target
before the chunk map names it (`MoveFragments`, compare-and-set per fragment),
and a draining node's copy is deleted only after that. A crash anywhere leaves
at worst an unreferenced fragment, never a chunk map that names a missing one.
Moves are committed per file in batches (`commit`), one journal entry for many
chunks rather than one each.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cfs.client.chunks import ChunkStoreClient, FragmentError, Unrecoverable
from cfs.client.metadata import MetadataClient
from cfs.erasure import Scheme
from cfs.ids import new_id
from cfs.ratelimit import TokenBucket
from cfs_contracts.data import ListRequest, RebuildRequest, parse_fragment_key
from cfs_contracts.fs import rpc
from cfs_contracts.fs.records import ROOT_INO, shard_of
from cfs_contracts.fs.rpc import FragmentMove, FsError
from cfs_repair.plan import ChunkPlan

log = logging.getLogger(__name__)


class NoTarget(Exception):
    """No eligible node can take a fragment right now (retry later)."""


@dataclass(frozen=True)
class Placed:
    """A fragment durable on its new node, not yet named by the chunk map."""

    move: FragmentMove
    key: str
    size: int


class Rebuilder:
    def __init__(
        self, meta: MetadataClient, chunks: ChunkStoreClient, throttle: TokenBucket
    ) -> None:
        self.meta = meta
        self.chunks = chunks
        self.throttle = throttle

    async def place(self, plan: ChunkPlan, leaving: str) -> list[Placed]:
        """Every missing fragment of the plan re-created on its target.

        Targets work in parallel, each reading the sources itself: two fragments
        lost from one chunk cost two reads of k fragments, the price of keeping
        fragment data off the coordinator.
        """
        if len(plan.targets) < len(plan.missing):
            raise NoTarget(f"no eligible node for chunk {plan.ref.chunk_id[:12]}")
        request = RebuildRequest(
            sources={i: plan.ref.fragments[i] for i in plan.sources},
            copy_from=leaving if plan.copyable else "",
            length=plan.ref.stored_length,
        )
        size = plan.scheme.fragment_size(plan.ref.stored_length)

        async def one(index: int, node: str) -> Placed:
            await self._pace(size)
            info = await self.chunks.rebuild(node, plan.key(index), request, plan.scheme.k)
            move = rpc.FragmentMove(
                index=plan.ref.index,
                chunk_id=plan.ref.chunk_id,
                fragment=index,
                old_node=leaving,
                new_node=node,
            )
            return Placed(move, plan.key(index), info.size)

        return list(await asyncio.gather(*(one(i, n) for i, n in plan.targets.items())))

    async def commit(self, ino: int, placed: Sequence[Placed]) -> list[Placed]:
        """Name the new holders in the chunk map; the ones it now names.

        A move that no longer fits (the file was rewritten or deleted meanwhile)
        is skipped by the metadata service; its fragment is left for scrub.
        """
        if not placed:
            return []
        moves = tuple(p.move for p in placed)
        try:
            reply = await self.meta.call(rpc.MoveFragments(op_id=new_id(), ino=ino, moves=moves))
        except FsError as exc:
            if exc.errno not in (errno.ESTALE, errno.ENOENT):
                raise
            log.info("repair.map_changed", extra={"ino": ino, "error": exc.message})
            return []
        chunks = {c.index: c for c in reply.inode.chunks} if reply.inode else {}
        named = [
            p
            for p in placed
            if (chunk := chunks.get(p.move.index)) is not None
            and chunk.chunk_id == p.move.chunk_id
            and p.move.fragment < len(chunk.fragments)
            and chunk.fragments[p.move.fragment] == p.move.new_node
        ]
        if len(named) < len(placed):
            log.info("repair.map_changed", extra={"ino": ino, "skipped": len(placed) - len(named)})
        return named

    async def release(self, leaving: str, moved: Sequence[Placed]) -> None:
        """Delete the draining node's copies the chunk map no longer names."""
        for placed in moved:
            try:
                await self.chunks.delete(leaving, placed.key)
            except FragmentError as exc:  # garbage for scrub, not a failed move
                log.info("repair.old_copy_kept", extra={"key": exc.key, "error": str(exc)})

    async def rebuild_in_place(self, node: str, key: str, stores: Sequence[str]) -> int:
        """Re-create one damaged fragment on the node that should hold it; bytes written.

        The chunk map is not needed: every store is asked which fragments of the
        chunk it holds (scrub reports carry no inode, so no length to check the
        decoded chunk against; each source fragment passes its CRC).
        """
        chunk_id, scheme_name, index = parse_fragment_key(key)
        scheme = Scheme.parse(scheme_name)
        holders: dict[int, str] = {}

        async def ask(store: str) -> None:
            try:
                reply = await self.chunks.list(store, ListRequest(chunk_id=chunk_id, limit=64))
            except FragmentError as exc:
                log.info("repair.list_failed", extra={"node": store, "error": str(exc)})
                return
            for fragment in reply.fragments:
                _, other_scheme, other = parse_fragment_key(fragment.key)
                if other_scheme == scheme_name and not (store == node and other == index):
                    holders.setdefault(other, store)

        await asyncio.gather(*(ask(store) for store in stores))
        if len(holders) < scheme.k:
            raise Unrecoverable(len(holders), scheme.k, "too few holders answered a list")
        info = await self.chunks.rebuild(node, key, RebuildRequest(sources=holders), scheme.k)
        await self._pace(info.size)
        return info.size

    async def _pace(self, size: int) -> None:
        delay = self.throttle.take(size, time.monotonic())
        if delay > 0:
            await asyncio.sleep(delay)


async def path_of(meta: MetadataClient, ino: int) -> str:
    """A path naming `ino`, for lost-data reports ('' if none is found)."""
    parts: list[str] = []
    current = ino
    for _ in range(4096):
        if current == ROOT_INO:
            return "/" + "/".join(reversed(parts))
        try:
            inode = await meta.getattr(current)
            shard = shard_of(inode.parent) if inode.is_dir else shard_of(current)
            reply = await meta.call(rpc.FindNames(shard=shard, ino=current))
        except FsError:
            return ""
        entry = next((r.dentry for r in reply.records if r.dentry is not None), None)
        if entry is None:
            return ""
        parts.append(entry.name)
        current = entry.parent
    return ""
