"""Client data path: file contents as erasure-coded chunks on chunk-store nodes (DESIGN.md §5).

Write: bytes collect in per-chunk buffers (bounded); a chunk that fills up is
coded and stored in the background (and queued for S3 when a data tier is
configured, `cfs.client.tier`); `flush` stores the rest and then commits
the chunk map to the metadata shard. A write is durable, and may be
acknowledged to an application's fsync/close, only after both.

Read: the data fragments when they are all there (systematic code, no
decode), otherwise any k fragments are decoded and the missing or corrupt
ones are reported as `FragmentDamaged` for repair. A decoded chunk is checked
against its SHA-256 (the chunk id) end to end.

One `OpenFile` per inode is shared by every handle of this client, so all of
them see its buffered writes; other clients see them after `flush`
(close-to-open consistency, as NFS).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

from cfs.bus import Bus, BusError
from cfs.client.chunks import ChunkStoreClient, FragmentError, Unrecoverable, straggling_s
from cfs.client.metadata import MetadataClient
from cfs.client.nodes import NodeView
from cfs.client.tier import TierGate
from cfs.erasure import Scheme, choose_scheme, decode, encode
from cfs.ids import new_id
from cfs.placement import rank
from cfs.rebuild import gather
from cfs.retry import Backoff, RetryPolicy
from cfs_contracts.data import fragment_key
from cfs_contracts.events.data import FragmentDamaged
from cfs_contracts.fs import rpc
from cfs_contracts.fs.records import ChunkRef, Inode, Kind
from cfs_contracts.fs.rpc import FsError

log = logging.getLogger(__name__)

MiB = 1024 * 1024


class FileStore:
    def __init__(
        self,
        bus: Bus,
        meta: MetadataClient,
        *,
        client_id: str,
        write_buffer_bytes: int = 64 * MiB,
        cache_bytes: int = 64 * MiB,
        parallel_chunks: int = 4,
        readahead_chunks: int = 4,
        fragment_timeout_s: float = 10.0,
        placement_wait_s: float = 30.0,
    ) -> None:
        self.bus = bus
        self.meta = meta
        self.client_id = client_id
        self.write_buffer_bytes = write_buffer_bytes
        self.readahead_chunks = readahead_chunks
        self.chunks = ChunkStoreClient(bus, timeout_s=fragment_timeout_s)
        self._placement_policy = RetryPolicy(
            "fragment placement",
            temporary=lambda _: True,
            deadline_s=placement_wait_s,
            max_delay_s=1.0,
        )
        self.nodes = NodeView(bus)
        self.tier = TierGate(bus, self.nodes, self.spawn)
        self._cache = _ChunkCache(cache_bytes)
        self._fetching: dict[str, asyncio.Future[bytes]] = {}
        self._storing = asyncio.Semaphore(parallel_chunks)
        self._open: dict[int, OpenFile] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reported: dict[str, float] = {}
        self._retired: str | None = None

    def retire(self, why: str) -> None:
        """From now on a chunk write that would wait for chunk-stores fails with EIO: a
        mount that moved to the other site stops waiting for this one's (they may be
        gone: the wait would hold the application up to `placement_wait_s`), while a
        write the old site still takes (a flush on close) goes through."""
        self._retired = why

    async def start(self) -> None:
        await self.nodes.start()

    async def close(self) -> None:
        try:
            for handle in list(self._open.values()):
                await handle.flush()
        finally:
            self._open.clear()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.nodes.stop()

    # -- files -----------------------------------------------------------------------
    async def open(
        self, ino: int, *, truncate: bool = False, fresh: Inode | None = None
    ) -> OpenFile:
        """`fresh`: the inode as the shard just answered it (a create), not read again."""
        handle = self._open.get(ino)
        if handle is None:
            handle = OpenFile(self, _regular(fresh or await self.meta.getattr(ino)))
            self._open[ino] = handle
        elif not handle.has_local_changes:  # close-to-open
            handle.set_inode(_regular(fresh or await self.meta.getattr(ino)))
        handle.refs += 1
        if truncate:
            try:
                await handle.truncate(0)
            except FsError:
                await self.release(handle)
                raise
        return handle

    async def release(self, handle: OpenFile) -> None:
        try:
            await handle.flush()
        finally:
            handle.refs -= 1
            if handle.refs <= 0 and self._open.get(handle.ino) is handle:
                del self._open[handle.ino]

    async def read_all(self, ino: int) -> bytes:
        handle = await self.open(ino)
        try:
            return await handle.read(0, handle.size)
        finally:
            await self.release(handle)

    async def write_all(self, ino: int, data: bytes) -> Inode:
        handle = await self.open(ino, truncate=True)
        try:
            await handle.write(0, data)
            return await handle.flush()
        finally:
            await self.release(handle)

    # -- chunks ----------------------------------------------------------------------
    async def store_chunk(self, ino: int, index: int, data: bytes) -> ChunkRef:
        """Code and store one chunk; every fragment is durable on its node on return.

        A node that fails is replaced by the next in rendezvous order; when none
        is left, the chunk is coded again for the nodes still answering (4+2 on
        six nodes becomes 2+1 on five), so losing a node never stops writes.
        While no node answers at all (a NATS server restarting, interest moving
        between servers), the write waits up to `placement_wait_s` and then fails
        with EIO; ENOSPC means every node that is up is really full.
        """
        async with self._storing:
            self.tier.check_room()
            chunk_id = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
            backoff = Backoff(self._placement_policy, extra={"ino": ino, "chunk": chunk_id})
            avoiding = True
            while True:
                candidates = self.nodes.eligible(len(data), avoiding=avoiding)
                if not candidates:
                    if self.nodes.out_of_room(len(data)):
                        raise FsError(errno.ENOSPC, "every chunk-store node that is up is full")
                    if avoiding and self.nodes.eligible(len(data), avoiding=False):
                        avoiding = False  # only nodes that just failed: try them again
                        continue
                    await self._wait_to_place(backoff, FsError(errno.EIO, self.nodes.unavailable()))
                    avoiding = True
                    continue
                scheme = choose_scheme(len(candidates), self.nodes.ec_default)
                fragments = await asyncio.to_thread(_encode_with_crcs, scheme, data)
                order = [c.node for c in rank(chunk_id, candidates)]
                try:
                    placed = await self._put_fragments(chunk_id, scheme, fragments, order)
                except _OutOfNodes as exc:
                    if exc.errno == errno.ENOSPC and not self.nodes.eligible(len(data)):
                        raise FsError(exc.errno, exc.message) from None  # every node said full
                    log.warning(
                        "data.recode", extra={"ino": ino, "chunk": chunk_id, "error": exc.message}
                    )
                    if not avoiding:  # the nodes that had failed failed again: wait
                        await self._wait_to_place(backoff, FsError(errno.EIO, exc.message))
                    avoiding = True
                    continue  # fewer nodes now: choose the scheme again
                ref = ChunkRef(
                    index=index,
                    chunk_id=chunk_id,
                    length=len(data),
                    scheme=scheme.name,
                    fragments=tuple(placed),
                )
                await self.tier.queued(ref, ino)
                return ref

    async def _wait_to_place(self, backoff: Backoff, why: FsError) -> None:
        """Wait before placing again, unless this store was retired (EIO at once)."""
        if self._retired is not None:
            raise FsError(errno.EIO, self._retired)
        await backoff.wait(why)

    async def _put_fragments(
        self, chunk_id: str, scheme: Scheme, fragments: list[tuple[bytes, int]], order: list[str]
    ) -> list[str]:
        """Every fragment on its node in `order` (else on a spare); returns the holders.

        A put still unanswered well after all its siblings were (`straggling_s`) has
        a node that stopped answering without failing (a process stopped, a server
        gone quiet): waiting out the request timeout would stall the writer for it.
        Its node is avoided and the fragment goes to the next spare, or, with none
        left, `_OutOfNodes` has the chunk coded again for the nodes that answer. (A
        put given up may still land later: an orphan for the fragment GC.)"""
        spare = order[scheme.total :]
        targets = dict(enumerate(order[: scheme.total]))

        def put(index: int) -> asyncio.Future[str]:
            return asyncio.ensure_future(
                self._put_fragment(chunk_id, scheme, index, fragments[index], spare, targets)
            )

        running = {put(i): i for i in range(scheme.total)}
        placed: dict[int, str] = {}
        started = last_done = time.monotonic()
        try:
            while running:
                grace = None
                if placed:  # siblings answered: the rest may take a while longer, not forever
                    grace = last_done + straggling_s(last_done - started) - time.monotonic()
                done, _ = await asyncio.wait(
                    running, timeout=grace, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    placed[running.pop(task)] = task.result()  # _OutOfNodes propagates
                    last_done = time.monotonic()
                if done:
                    continue
                for task, index in list(running.items()):  # the grace is over: stragglers
                    task.cancel()
                    del running[task]
                    node = targets[index]
                    self.nodes.avoid(node)
                    log.warning(
                        "data.put_straggling",
                        extra={"node": node, "chunk": chunk_id, "index": index,
                               "after_s": round(time.monotonic() - started, 2)},
                    )  # fmt: skip
                    if not spare:
                        raise _OutOfNodes(
                            errno.EIO,
                            f"fragment {index} of {chunk_id}: {node} did not answer "
                            f"{time.monotonic() - last_done:.1f}s after the others",
                        )
                    targets[index] = spare.pop(0)
                    running[put(index)] = index
                last_done = time.monotonic()  # the window restarts for the puts sent again
        finally:
            for task in running:
                task.cancel()
        return [placed[i] for i in range(scheme.total)]

    async def _put_fragment(
        self,
        chunk_id: str,
        scheme: Scheme,
        index: int,
        fragment: tuple[bytes, int],
        spare: list[str],
        targets: dict[int, str],
    ) -> str:
        """Store fragment `index` on `targets[index]`, else on the next spare node
        (recorded in `targets`); returns the holder."""
        key = fragment_key(chunk_id, scheme.name, index)
        data, crc = fragment
        errors: list[str] = []
        node = targets[index]
        while True:
            try:
                await self.chunks.put(node, key, data, crc=crc)
                return node
            except FragmentError as exc:
                if not exc.unreachable and exc.errno not in (errno.ENOSPC, errno.EIO):
                    raise
                errors.append(str(exc))
                self.nodes.avoid(node)
                log.warning("data.put_failed", extra={"node": node, "key": key, "error": str(exc)})
            if not spare:
                code = errno.ENOSPC if all("full" in e for e in errors) else errno.EIO
                raise _OutOfNodes(code, f"cannot place fragment {key}: {'; '.join(errors)}")
            node = targets[index] = spare.pop(0)

    async def fetch_chunk(self, ino: int, ref: ChunkRef) -> memoryview:
        """The chunk's bytes (`ref.length` of them, not copied); shared by concurrent readers."""
        cached = self._cache.get(ref.chunk_id)
        if cached is not None:
            return memoryview(cached)[: ref.length]
        running = self._fetching.get(ref.chunk_id)
        if running is None:
            running = asyncio.ensure_future(self._fetch(ino, ref))
            self._fetching[ref.chunk_id] = running
            running.add_done_callback(lambda _: self._fetching.pop(ref.chunk_id, None))
        return memoryview(await asyncio.shield(running))[: ref.length]

    def prefetch(self, ino: int, ref: ChunkRef) -> None:
        if self._cache.get(ref.chunk_id) is None and ref.chunk_id not in self._fetching:
            self.spawn(self._prefetch(ino, ref))

    async def _prefetch(self, ino: int, ref: ChunkRef) -> None:
        try:
            await self.fetch_chunk(ino, ref)
        except FsError as exc:  # the real read reports it to the application
            log.info("data.prefetch_failed", extra={"ino": ino, "error": str(exc)})

    async def _fetch(self, ino: int, ref: ChunkRef) -> bytes:
        scheme = Scheme.parse(ref.scheme)
        if len(ref.fragments) != scheme.total:
            raise FsError(errno.EIO, f"inode {ino} chunk {ref.index}: chunk map is malformed")
        failures: list[FragmentError] = []
        holders = dict(enumerate(ref.fragments))
        try:
            got = await gather(self.chunks, ref.chunk_id, scheme, holders, on_error=failures.append)
        except Unrecoverable as exc:
            try:
                got = await self._recalled(ino, ref, scheme, holders, exc)
            except FsError:
                for failure in failures:
                    self._report(ino, failure)
                raise
            failures.clear()  # the recall put back what was missing: nothing to repair
        data = await asyncio.to_thread(decode_checked, scheme, got, ref)
        for failure in failures:
            self._report(ino, failure)
        if failures:
            log.warning(
                "data.degraded_read",
                extra={"ino": ino, "chunk": ref.chunk_id, "failures": [str(f) for f in failures]},
            )
        self._cache.put(ref.chunk_id, data)
        return data

    async def _recalled(
        self, ino: int, ref: ChunkRef, scheme: Scheme, holders: dict[int, str], exc: Exception
    ) -> dict[int, bytes]:
        """Fewer than k fragments on flash (evicted, or lost with every node): the data
        tier puts the chunk back from S3 and it is read again; EIO says why not."""
        why = None
        if self.nodes.tier_config is not None:
            why = await self.tier.recall(ref, ino)
            if why is None:
                try:
                    return await gather(self.chunks, ref.chunk_id, scheme, holders)
                except Unrecoverable as again:
                    exc, why = again, "recalled, still unreadable"
        raise FsError(
            errno.EIO,
            f"inode {ino} chunk {ref.index} ({ref.chunk_id[:12]}) is unreadable: {exc}"
            + (f"; from S3: {why}" if why else ""),
        ) from None

    def _report(self, ino: int, exc: FragmentError) -> None:
        """Tell repair about a fragment we had to read around (once a minute per key)."""
        now = time.monotonic()
        if now - self._reported.get(exc.key, -1e9) < 60.0:
            return
        self._reported[exc.key] = now
        reason: Any = (
            "unreachable"
            if exc.unreachable
            else "missing"
            if exc.errno == errno.ENOENT
            else "corrupt"
        )
        event = FragmentDamaged(
            node_id=exc.node,
            key=exc.key,
            reason=reason,
            detail=exc.message,
            reported_by=self.client_id,
            ino=ino,
        )
        self.spawn(self._publish_damage(event))

    async def _publish_damage(self, event: FragmentDamaged) -> None:
        try:
            await self.bus.publish(self.bus.event(event), timeout=5.0)
        except BusError as exc:
            log.error("data.damage_report_failed", extra={"key": event.key, "error": str(exc)})

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _OutOfNodes(FsError):
    """Every candidate node failed for one fragment."""


def _encode_with_crcs(scheme: Scheme, data: bytes) -> list[tuple[bytes, int]]:
    """Fragments with their CRC-32, computed off the event loop (both release the GIL)."""
    return [(f, zlib.crc32(f)) for f in encode(scheme, data)]


def decode_checked(scheme: Scheme, got: dict[int, bytes], ref: ChunkRef) -> bytes:
    data = decode(scheme, got, ref.stored_length)
    actual = hashlib.sha256(data).hexdigest()
    if actual != ref.chunk_id:
        raise FsError(
            errno.EIO,
            f"chunk {ref.index} checksum mismatch after decode: "
            f"expected {ref.chunk_id[:16]}…, got {actual[:16]}…",
        )
    return data


def _regular(inode: Inode) -> Inode:
    if inode.kind is Kind.DIR:
        raise FsError(errno.EISDIR, f"inode {inode.ino} is a directory")
    if inode.kind is not Kind.FILE:
        raise FsError(errno.EINVAL, f"inode {inode.ino} is not a regular file")
    return inode


class OpenFile:
    """One file's contents as this client sees them: committed chunks plus buffers."""

    def __init__(self, store: FileStore, inode: Inode) -> None:
        self.store = store
        self.ino = inode.ino
        self.refs = 0
        self._lock = asyncio.Lock()
        # index -> bytes from the chunk's start (shorter than a chunk = zeros follow)
        self._dirty: dict[int, bytearray] = {}
        # index -> (snapshot, task storing it); committed by the next flush
        self._storing: dict[int, tuple[bytes, asyncio.Task[ChunkRef]]] = {}
        self._mtime_ns: int | None = None
        self.size = inode.size
        self.set_inode(inode)

    def set_inode(self, inode: Inode) -> None:
        self._inode = inode
        self._committed = {c.index: c for c in inode.chunks}
        self.size = max(inode.size, self.size if self.has_local_changes else 0)

    @property
    def inode(self) -> Inode:
        if not self.has_local_changes:
            return self._inode
        update: dict[str, Any] = {"size": self.size}
        if self._mtime_ns is not None:
            update["mtime_ns"] = self._mtime_ns
        return self._inode.model_copy(update=update)

    @property
    def has_local_changes(self) -> bool:
        return bool(self._dirty or self._storing)

    @property
    def chunk_size(self) -> int:
        return self._inode.chunk_size

    @property
    def buffered_bytes(self) -> int:
        return sum(len(b) for b in self._dirty.values()) + sum(
            len(s) for s, _ in self._storing.values()
        )

    # -- reads -----------------------------------------------------------------------
    async def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise FsError(errno.EINVAL, "negative offset or size")
        end = min(offset + size, self.size)
        parts: list[bytes] = []
        pos = offset
        if end > offset:
            self._read_ahead((end - 1) // self.chunk_size)  # fetched while these are
        while pos < end:
            index, within = divmod(pos, self.chunk_size)
            take = min(self.chunk_size - within, end - pos)
            piece = bytes(memoryview(await self._chunk_bytes(index))[within : within + take])
            parts.append(piece if len(piece) == take else piece.ljust(take, b"\0"))
            pos += take
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_ahead(self, index: int) -> None:
        """Start fetching the next chunks so a sequential reader finds them ready."""
        for ahead in range(index + 1, index + 1 + self.store.readahead_chunks):
            ref = self._committed.get(ahead)
            if ref is None or ahead in self._dirty or ahead in self._storing:
                return
            self.store.prefetch(self.ino, ref)

    async def _chunk_bytes(self, index: int) -> bytes | bytearray | memoryview:
        if index in self._dirty:
            return self._dirty[index]
        if index in self._storing:
            return self._storing[index][0]
        ref = self._committed.get(index)
        if ref is None:
            return b""  # a hole
        return await self.store.fetch_chunk(self.ino, ref)

    # -- writes ----------------------------------------------------------------------
    async def write(self, offset: int, data: bytes) -> int:
        if offset < 0:
            raise FsError(errno.EINVAL, "negative offset")
        view = memoryview(data)
        async with self._lock:
            pos = 0
            while pos < len(data):
                index, within = divmod(offset + pos, self.chunk_size)
                take = min(self.chunk_size - within, len(data) - pos)
                buffer = await self._buffer(index)
                if len(buffer) < within:
                    buffer.extend(bytes(within - len(buffer)))
                buffer[within : within + take] = view[pos : pos + take]
                pos += take
                if within + take == self.chunk_size:
                    self._store_in_background(index)  # full: start storing it now
            self.size = max(self.size, offset + len(data))
            self._mtime_ns = time.time_ns()
            if self.buffered_bytes > self.store.write_buffer_bytes:
                await self._flush_locked()
        return len(data)

    async def _buffer(self, index: int) -> bytearray:
        if index in self._dirty:
            return self._dirty[index]
        if index in self._storing:
            snapshot, task = self._storing.pop(index)
            task.cancel()  # superseded; its fragments become garbage for scrub
            buffer = bytearray(snapshot)
        elif index in self._committed and index * self.chunk_size < self.size:
            data = await self.store.fetch_chunk(self.ino, self._committed[index])
            buffer = bytearray(data[: max(0, self.size - index * self.chunk_size)])
        else:
            buffer = bytearray()
        self._dirty[index] = buffer
        return buffer

    def _store_in_background(self, index: int) -> None:
        snapshot = bytes(self._dirty.pop(index))
        task = asyncio.create_task(self.store.store_chunk(self.ino, index, snapshot))
        task.add_done_callback(_consume_result)
        self._storing[index] = (snapshot, task)

    async def flush(self) -> Inode:
        """Store every buffered chunk, then commit the chunk map; durable on return."""
        async with self._lock:
            return await self._flush_locked()

    async def _flush_locked(self) -> Inode:
        for index in list(self._dirty):
            self._store_in_background(index)
        if not self._storing:
            return self.inode
        stored = dict(self._storing)
        results = await asyncio.gather(*(t for _, t in stored.values()), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            # Keep the data buffered so a later flush (or fsync retry) can store it.
            for index, (snapshot, _) in stored.items():
                if index not in self._dirty:
                    self._dirty[index] = bytearray(snapshot)
            self._storing.clear()
            error = failed[0]
            if isinstance(error, FsError):
                raise error
            raise FsError(errno.EIO, f"storing inode {self.ino} failed: {error!r}")
        refs = tuple(r for r in results if isinstance(r, ChunkRef))
        reply = await self.store.meta.call(
            rpc.CommitChunks(
                op_id=new_id(), ino=self.ino, chunks=refs, size=self.size, mtime_ns=self._mtime_ns
            )
        )
        for index in stored:
            self._storing.pop(index, None)
        if reply.inode is not None:
            self._mtime_ns = None
            self.set_inode(reply.inode)
        return self.inode

    async def truncate(self, size: int) -> Inode:
        if size < 0:
            raise FsError(errno.EINVAL, "negative size")
        async with self._lock:
            await self._flush_locked()
            inode = await self.store.meta.setattr(self.ino, size=size)
            self.set_inode(inode)
            return inode


def _consume_result(task: asyncio.Task[ChunkRef]) -> None:
    """Failures are raised by the flush that awaits the task; only mark them seen here."""
    if not task.cancelled():
        task.exception()


class _ChunkCache:
    """Decoded chunks by id (content-addressed, so an entry is never stale)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, chunk_id: str) -> bytes | None:
        data = self._items.get(chunk_id)
        if data is not None:
            self._items.move_to_end(chunk_id)
        return data

    def put(self, chunk_id: str, data: bytes) -> None:
        if chunk_id in self._items or len(data) > self.capacity:
            return
        self._items[chunk_id] = data
        self.used += len(data)
        while self.used > self.capacity:
            _, old = self._items.popitem(last=False)
            self.used -= len(old)
