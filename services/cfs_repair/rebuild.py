"""Carry out chunk plans: read what survives, write the missing fragments, repoint the map.

Order matters for durability: the new fragment is durable on its target
before the chunk map names it (`MoveFragments`, compare-and-set), and a
draining node's copy is deleted only after that. A crash anywhere leaves at
worst an unreferenced fragment, never a chunk map that names a missing one.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import time
from collections.abc import Sequence

from cfs.client.chunks import ChunkStoreClient, FragmentError
from cfs.client.metadata import MetadataClient
from cfs.erasure import Scheme, decode, encode_some
from cfs.ids import new_id
from cfs_contracts.data import ListRequest, fragment_key, parse_fragment_key
from cfs_contracts.fs import rpc
from cfs_contracts.fs.records import ROOT_INO, shard_of
from cfs_contracts.fs.rpc import FsError
from cfs_repair.plan import ChunkPlan, TokenBucket

log = logging.getLogger(__name__)


class Unrecoverable(Exception):
    """Fewer than k healthy fragments: the chunk cannot be rebuilt."""

    def __init__(self, available: int, needed: int, detail: str) -> None:
        super().__init__(f"{available} of {needed} fragments needed are readable ({detail})")
        self.available = available
        self.needed = needed


class NoTarget(Exception):
    """No eligible node can take a fragment right now (retry later)."""


class Rebuilder:
    def __init__(
        self, meta: MetadataClient, chunks: ChunkStoreClient, throttle: TokenBucket
    ) -> None:
        self.meta = meta
        self.chunks = chunks
        self.throttle = throttle

    async def rebuild(self, plan: ChunkPlan, leaving: str) -> tuple[int, int]:
        """(fragments, bytes) written; 0 when the file changed meanwhile (nothing to do)."""
        if len(plan.targets) < len(plan.missing):
            raise NoTarget(f"no eligible node for chunk {plan.ref.chunk_id[:12]}")
        fragments = await self._missing_fragments(plan, leaving)
        written = 0
        for index, node in plan.targets.items():
            data = fragments[index]
            await self._pace(len(data))
            await self.chunks.put(node, plan.key(index), data)
            written += len(data)
        moves = tuple(
            rpc.FragmentMove(
                index=plan.ref.index,
                chunk_id=plan.ref.chunk_id,
                fragment=index,
                old_node=leaving,
                new_node=node,
            )
            for index, node in plan.targets.items()
        )
        try:
            await self.meta.call(rpc.MoveFragments(op_id=new_id(), ino=plan.ino, moves=moves))
        except FsError as exc:
            if exc.errno not in (errno.ESTALE, errno.ENOENT):
                raise
            # Rewritten, deleted, or moved by an earlier attempt whose reply was lost.
            log.info("repair.map_changed", extra={"ino": plan.ino, "error": exc.message})
            return 0, 0
        if plan.copyable:
            for index in plan.missing:
                try:
                    await self.chunks.delete(leaving, plan.key(index))
                except FragmentError as exc:  # garbage for scrub, not a failed move
                    log.info("repair.old_copy_kept", extra={"key": exc.key, "error": str(exc)})
        return len(plan.targets), written

    async def _missing_fragments(self, plan: ChunkPlan, leaving: str) -> dict[int, bytes]:
        if plan.copyable:
            try:
                return {i: await self.chunks.get(leaving, plan.key(i)) for i in plan.missing}
            except FragmentError as exc:
                log.info("repair.copy_failed_decoding", extra={"key": exc.key, "error": str(exc)})
        holders = {i: plan.ref.fragments[i] for i in plan.sources}
        got = await self._gather(plan.ref.chunk_id, plan.ref.scheme, plan.scheme, holders)
        data = await asyncio.to_thread(_decode_verified, plan, got)
        return await asyncio.to_thread(encode_some, plan.scheme, data, plan.missing)

    async def _gather(
        self, chunk_id: str, scheme_name: str, scheme: Scheme, holders: dict[int, str]
    ) -> dict[int, bytes]:
        """k healthy fragments, data fragments first, asking more holders as some fail."""
        got: dict[int, bytes] = {}
        failures: list[str] = []
        pending = sorted(holders)

        async def one(i: int) -> None:
            key = fragment_key(chunk_id, scheme_name, i)
            try:
                got[i] = await self.chunks.get(holders[i], key)
            except FragmentError as exc:
                failures.append(str(exc))

        while len(got) < scheme.k and pending:
            wanted, pending = pending[: scheme.k - len(got)], pending[scheme.k - len(got) :]
            await asyncio.gather(*(one(i) for i in wanted))
        if len(got) < scheme.k:
            raise Unrecoverable(len(got), scheme.k, "; ".join(failures) or "no other holder")
        return got

    async def rebuild_in_place(self, node: str, key: str, stores: Sequence[str]) -> int:
        """Re-create one damaged fragment on the node that should hold it; bytes written.

        The chunk map is not needed: every store is asked which fragments of the
        chunk it holds (scrub reports carry no inode).
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
        got = await self._gather(chunk_id, scheme_name, scheme, holders)
        if scheme.k == 1:
            data = next(iter(got.values()))
        else:
            size = len(next(iter(got.values())))
            padded = await asyncio.to_thread(decode, scheme, got, size * scheme.k)
            data = (await asyncio.to_thread(encode_some, scheme, padded, [index]))[index]
        await self._pace(len(data))
        await self.chunks.put(node, key, data)
        return len(data)

    async def _pace(self, size: int) -> None:
        delay = self.throttle.delay(size, time.monotonic())
        if delay > 0:
            await asyncio.sleep(delay)


def _decode_verified(plan: ChunkPlan, got: dict[int, bytes]) -> bytes:
    data = decode(plan.scheme, got, plan.ref.stored_length)
    if hashlib.sha256(data).hexdigest() != plan.ref.chunk_id:
        raise Unrecoverable(len(got), plan.scheme.k, "decoded chunk fails its SHA-256")
    return data


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
