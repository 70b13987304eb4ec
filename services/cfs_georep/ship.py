"""The data a peer's chunk maps need, copied to this site first (DESIGN.md §8).

A chunk map names the peer's nodes. Before the shard writer may apply it, each chunk
must be here: one the file already has here (same chunk id: same bytes) is kept;
any other is read from the peer's chunk-stores over the site link (k fragments,
decoded, checked against its SHA-256), then coded and stored on this site's
chunk-stores as a client's write would be (queued for S3 too). The map is then
rewritten to name the local copies. A chunk the peer cannot serve now (a node down
over there, the link cut) fails the whole batch: it is retried, never applied half.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
from collections.abc import Sequence

from cfs.client import FileStore
from cfs.client.chunks import ChunkStoreClient, Unrecoverable
from cfs.client.files import decode_checked
from cfs.erasure import Scheme
from cfs.rebuild import gather
from cfs_contracts.events.metadata import JournalEntry, PutInode
from cfs_contracts.fs.records import ChunkRef, Inode
from cfs_contracts.fs.rpc import FsError

log = logging.getLogger(__name__)


class ChunkUnavailable(Exception):
    """A chunk of the peer's could not be read from the peer now."""


class Localizer:
    def __init__(
        self,
        peer_chunks: ChunkStoreClient,
        store: FileStore,
        *,
        parallel: int = 4,
        remembered: int = 16_384,
    ) -> None:
        self.peer_chunks = peer_chunks
        self.store = store
        self._parallel = asyncio.Semaphore(parallel)
        # chunk id -> this site's copy; a hint only (a file's own map is asked first)
        self._copies: collections.OrderedDict[str, ChunkRef] = collections.OrderedDict()
        self._remembered = remembered

    async def localize(self, entries: Sequence[JournalEntry]) -> list[JournalEntry]:
        """`entries` with every chunk map naming this site's copies."""
        out: list[JournalEntry] = []
        for entry in entries:
            changes = list(entry.changes)
            for i, change in enumerate(changes):
                if isinstance(change, PutInode) and change.inode.chunks:
                    changes[i] = PutInode(inode=await self._localize(change.inode))
            out.append(entry.model_copy(update={"changes": tuple(changes)}))
        return out

    async def _localize(self, inode: Inode) -> Inode:
        if any(ref.chunk_id not in self._copies for ref in inode.chunks):
            await self._learn_local(inode.ino)
        refs = await asyncio.gather(*(self._local_ref(inode.ino, ref) for ref in inode.chunks))
        return inode.model_copy(update={"chunks": tuple(refs)})

    async def _learn_local(self, ino: int) -> None:
        """The chunks this site's version of the file has (none if it has no version)."""
        try:
            local = await self.store.meta.getattr(ino)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return
        for ref in local.chunks:
            self._remember(ref)

    async def _local_ref(self, ino: int, ref: ChunkRef) -> ChunkRef:
        copy = self._copies.get(ref.chunk_id)
        if copy is None:
            copy = await self._copy(ino, ref)
        self._copies.move_to_end(ref.chunk_id)
        return copy.model_copy(
            update={"index": ref.index, "length": ref.length, "coded_length": ref.coded_length}
        )

    async def _copy(self, ino: int, ref: ChunkRef) -> ChunkRef:
        scheme = Scheme.parse(ref.scheme)
        async with self._parallel:
            try:
                got = await gather(
                    self.peer_chunks, ref.chunk_id, scheme, dict(enumerate(ref.fragments))
                )
            except Unrecoverable as exc:
                raise ChunkUnavailable(
                    f"chunk {ref.chunk_id[:12]} of inode {ino}: {exc} on {self.peer_chunks.site}"
                ) from None
            data = await asyncio.to_thread(decode_checked, scheme, got, ref)
            stored = await self.store.store_chunk(ino, ref.index, data)
        self._remember(stored)
        log.debug(
            "geo.chunk_copied", extra={"ino": ino, "chunk": ref.chunk_id[:12], "bytes": len(data)}
        )
        return stored

    def _remember(self, ref: ChunkRef) -> None:
        self._copies[ref.chunk_id] = ref
        self._copies.move_to_end(ref.chunk_id)
        while len(self._copies) > self._remembered:
            self._copies.popitem(last=False)
