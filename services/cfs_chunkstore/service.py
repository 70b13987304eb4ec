"""The chunk-store service process: this node's fragments, served over NATS request/reply.

    cfs service run chunk-store --node storage-1 [--data-dir PATH] [--config FILE]
    python -m cfs_chunkstore --node storage-1 --data-dir /var/lib/claudefs

Settings come from flags, then `CFS_*` environment variables, then a config file.
The wire contract is `cfs_contracts.data`: one subject per verb
(`cfs.<site>.rpc.chunk.<node>.<verb>`), fragment bytes as raw message bodies,
`StoreReply` JSON for everything but a successful `get`.

Every change is a `DATA` event, published before the reply: `FragmentStored` once
the fragment is durable (if that publish fails the put is answered EIO, and a
repeated put stores and publishes again); `FragmentDeleted` just before the
fragment is removed (so a failed publish leaves the fragment and the stream
agreeing, and a crash in between leaves only a fragment nobody wants). A fragment
that fails its checksum (or is missing) on `get` or `verify` is answered EIO and
reported as `FragmentDamaged`.

`rebuild` (from the repair coordinator) re-creates a fragment this node is to
hold from the fragments that survive on other nodes (`cfs.rebuild`), reading
them itself, then stores it exactly as `put` does. Rebuilds have their own
slots (`max_rebuilds`): one that waits on a peer's `get` must never hold up the
`get`s this node serves to peers rebuilding in turn.

A background `Scrubber` (`scrub.py`) re-reads every fragment at up to
`scrub_mb_s` MiB/s (0 disables it), resting `scrub_pass_interval_s` between full
passes, and reports what it finds damaged the same way, with `reported_by="<node>/scrub"`.
It starts once the service is serving and stops (saving its place) first on shutdown.

`store.<node>` in the `nodes` KV bucket (`StoreRecord`) is rewritten every
`heartbeat_s`; the first write happens once every verb is being served, so a
fresh record means "ready".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue
from pydantic import Field, ValidationError

from cfs.bus import Bus, BusError
from cfs.client.chunks import ChunkStoreClient, FragmentError, Unrecoverable
from cfs.erasure import Scheme
from cfs.hlc import system_wall_ms
from cfs.kernel.runtime import (
    Context,
    OnFailure,
    Spawn,
    cancel_and_wait,
    started,
    unsupervised,
    until_jetstream_answers,
)
from cfs.rebuild import rebuild_fragments
from cfs.service_main import ServiceSettings, run_spec
from cfs.telemetry import LabelCache, counter, histogram, serving
from cfs_chunkstore.access import AccessLog
from cfs_chunkstore.scrub import Scrubber
from cfs_chunkstore.store import (
    FileFragmentStore,
    FragmentChanged,
    FragmentCorrupt,
    FragmentNotFound,
    FragmentStore,
    InvalidKey,
    StoreError,
    store_root,
)
from cfs_contracts.data import (
    HEADER_CRC,
    HEADER_ERRNO,
    HEADER_ERROR,
    HEADER_KEY,
    HEADER_STORED_MS,
    VERBS,
    FragmentInfo,
    ListRequest,
    RebuildRequest,
    StoreRecord,
    StoreReply,
    TouchedRequest,
    Verb,
    chunk_rpc_subject,
    fragment_key,
    parse_fragment_key,
    store_record_key,
)
from cfs_contracts.events.data import FragmentDamaged, FragmentDeleted, FragmentStored
from cfs_contracts.streams import NODES

log = logging.getLogger(__name__)

REQUEST_SECONDS = histogram(
    "chunkstore_request_duration_seconds",
    "a chunk-store request (fragment put, get, delete, ...) from arrival to reply, by verb",
    ("verb",),
)
PUT_BYTES = counter("chunkstore_put_bytes", "fragment bytes received by put requests")
_request_seconds = LabelCache(REQUEST_SECONDS)
_SPAN_NAMES = {verb: f"chunk-store {verb}" for verb in VERBS}

_MAX_ERROR_HEADER = 512


class ChunkStoreSettings(ServiceSettings):
    data_dir: Path = Path("/var/lib/claudefs")
    labels: dict[str, str] = Field(default_factory=dict, description="failure domains")
    reserve_bytes: int | None = Field(
        default=None, ge=0, description="space kept free; default 1% of the disk, >= 64 MiB"
    )
    heartbeat_s: float = Field(default=2.0, gt=0)
    max_inflight: int = Field(default=16, ge=1, description="requests handled concurrently")
    max_rebuilds: int = Field(default=4, ge=1, description="rebuilds run concurrently")
    scrub_mb_s: float = Field(
        default=20.0, ge=0, description="background scrub read rate, MiB/s; 0 disables it"
    )
    scrub_pass_interval_s: float = Field(
        default=24 * 3600.0, gt=0, description="rest between two full scrub passes"
    )


class ChunkStoreService:
    """The async runner around a `FragmentStore`: subscriptions, events, heartbeat."""

    def __init__(
        self,
        bus: Bus,
        store: FragmentStore,
        kv: KeyValue,
        *,
        labels: dict[str, str] | None = None,
        heartbeat_s: float = 2.0,
        max_inflight: int = 16,
        max_rebuilds: int = 4,
        scrub_mb_s: float = 0.0,
        scrub_pass_interval_s: float = 24 * 3600.0,
        scrub_cursor: Path | None = None,
        spawn: Spawn = unsupervised,
        spawn_degradable: Spawn = unsupervised,
    ) -> None:
        """`spawn` starts the heartbeat (its failure ends the process); the scrub runs
        under `spawn_degradable` (its failure degrades the service, the store serves on)."""
        self.bus = bus
        self._spawn, self._spawn_degradable = spawn, spawn_degradable
        self.store = store
        self.kv = kv
        self.node = store.node
        self.labels = dict(labels or {})
        self.heartbeat_s = heartbeat_s
        self.started_ms = time.time_ns() // 1_000_000
        self.access = AccessLog(self.started_ms)
        self._slots = asyncio.Semaphore(max_inflight)
        self._rebuild_slots = asyncio.Semaphore(max_rebuilds)
        self._peers = ChunkStoreClient(bus)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []
        self._heartbeat: asyncio.Task[Any] | None = None
        self.scrubber = Scrubber(
            store,
            self._publish_damage,
            cursor_path=scrub_cursor,
            mb_s=scrub_mb_s,
            pass_interval_s=scrub_pass_interval_s,
        )

    async def start(self) -> None:
        for verb in VERBS:
            subject = chunk_rpc_subject(self.bus.site, self.node, verb)
            sub = await self.bus.nc.subscribe(subject, cb=self._receiver(verb))
            self._subs.append(sub)
        # Raises if the bucket is missing (not initialised); waits while it elects.
        await until_jetstream_answers("store record", self.publish_record)
        self._heartbeat = self._spawn(self._beat(), f"heartbeat-{self.node}")
        self.scrubber.start(self._spawn_degradable)

    async def stop(self) -> None:
        await self.scrubber.stop()  # first: it reads the store and publishes
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10.0)
        await cancel_and_wait(self._heartbeat)

    # -- the node record ---------------------------------------------------------------
    async def publish_record(self) -> StoreRecord:
        status = await asyncio.to_thread(self.store.stat)
        record = StoreRecord(
            node=self.node,
            labels=self.labels,
            capacity_bytes=status.capacity_bytes,
            free_bytes=status.free_bytes,
            used_bytes=status.used_bytes,
            fragments=status.fragments,
            updated_ms=time.time_ns() // 1_000_000,
            started_ms=self.started_ms,
        )
        await self.kv.put(store_record_key(self.node), record.model_dump_json().encode())
        return record

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.publish_record()
            except Exception as exc:  # keep beating through NATS outages
                log.warning(
                    "store.heartbeat_failed",
                    extra={"node": self.node, "error": str(exc) or type(exc).__name__},
                )

    # -- requests ------------------------------------------------------------------------
    def _receiver(self, verb: Verb) -> Callable[[Msg], Awaitable[None]]:
        slots = self._rebuild_slots if verb == "rebuild" else self._slots

        def finished(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            slots.release()

        async def receive(msg: Msg) -> None:
            # Waiting for a slot here holds up this subscription's delivery: backpressure.
            await slots.acquire()
            task = asyncio.create_task(self._handle(verb, msg))
            self._tasks.add(task)
            task.add_done_callback(finished)

        return receive

    async def _handle(self, verb: Verb, msg: Msg) -> None:
        started = time.perf_counter()
        with serving(_SPAN_NAMES[verb], msg.headers):
            await self._answer(verb, msg)
        _request_seconds(verb).observe(time.perf_counter() - started)
        if verb == "put":
            PUT_BYTES.inc(len(msg.data))

    async def _answer(self, verb: Verb, msg: Msg) -> None:
        if verb == "get":
            await self._get(msg)
            return
        try:
            reply = await self._dispatch(verb, msg)
        except StoreError as exc:
            reply = StoreReply(errno=exc.errno, message=exc.message)
        except Exception as exc:  # a bug or a disk error: answered, never swallowed
            log.exception("rpc.failed", extra={"node": self.node, "verb": verb})
            reply = StoreReply(
                errno=errno.EIO, message=f"chunk-store {self.node}: {verb} failed: {exc}"
            )
        await self._respond(msg, reply.model_dump_json().encode())

    async def _dispatch(self, verb: Verb, msg: Msg) -> StoreReply:
        if verb == "put":
            return await self._put(msg)
        if verb == "delete":
            return await self._delete(msg)
        if verb == "rebuild":
            return await self._rebuild(msg)
        if verb == "verify":
            return StoreReply(fragment=await self._verify(_key(msg)))
        if verb == "list":
            try:
                request = ListRequest.model_validate_json(msg.data or b"{}")
            except ValidationError as exc:
                raise InvalidKey(f"bad list request: {exc.errors()[0]['msg']}") from None
            found, more = await asyncio.to_thread(
                self.store.list, request.after, request.limit, request.chunk_id
            )
            return StoreReply(fragments=tuple(found), more=more)
        if verb == "stat":
            return StoreReply(status=await asyncio.to_thread(self.store.stat))
        if verb == "touched":
            try:
                asked = TouchedRequest.model_validate_json(msg.data or b"{}")
            except ValidationError as exc:
                raise InvalidKey(f"bad touched request: {exc.errors()[0]['msg']}") from None
            return StoreReply(
                touched=tuple(self.access.touched(asked.chunk_ids, asked.since_ms)),
                history_from_ms=self.access.history_from_ms,
            )
        raise InvalidKey(f"unknown verb {verb!r}")

    async def _put(self, msg: Msg) -> StoreReply:
        key = _key(msg)
        crc_text = (msg.headers or {}).get(HEADER_CRC, "")
        try:
            crc = int(crc_text, 16)
        except ValueError:
            raise InvalidKey(f"put of {key}: header {HEADER_CRC} {crc_text!r} is not hex") from None
        return await self._store(key, msg.data, crc)

    async def _rebuild(self, msg: Msg) -> StoreReply:
        key = _key(msg)
        try:
            request = RebuildRequest.model_validate_json(msg.data or b"{}")
            chunk_id, scheme_name, index = parse_fragment_key(key)
        except (ValidationError, ValueError) as exc:
            raise InvalidKey(f"bad rebuild request for {key}: {exc}") from None
        data = await self._copy(key, request.copy_from) if request.copy_from else None
        if data is None:
            scheme = Scheme.parse(scheme_name)
            mine = [i for i, n in request.sources.items() if n == self.node and i != index]
            try:
                made = await rebuild_fragments(
                    self._peers,
                    chunk_id,
                    scheme,
                    [index],
                    {i: n for i, n in request.sources.items() if n != self.node},
                    length=request.length,
                    have=await self._local_sources(chunk_id, scheme, mine),
                )
            except Unrecoverable as exc:
                return StoreReply(errno=errno.ENODATA, message=str(exc), readable=exc.available)
            data = made[index]
        return await self._store(key, data, None)

    async def _local_sources(
        self, chunk_id: str, scheme: Scheme, indices: list[int]
    ) -> dict[int, bytes]:
        """Source fragments this node holds itself, read from disk rather than over NATS
        (on a site with no more nodes than fragments, every target holds one)."""
        have: dict[int, bytes] = {}
        for i in sorted(indices)[: scheme.k]:
            try:
                _, have[i] = await asyncio.to_thread(
                    self.store.get, fragment_key(chunk_id, scheme.name, i)
                )
            except FragmentCorrupt as exc:
                await self._report(exc)
            except StoreError as exc:
                log.info("fragment.source_unreadable", extra={"node": self.node, "error": str(exc)})
        return have

    async def _copy(self, key: str, holder: str) -> bytes | None:
        """The fragment from the node that still holds it (a drain), or None to decode."""
        try:
            return await self._peers.get(holder, key)
        except FragmentError as exc:
            log.info(
                "fragment.copy_failed", extra={"node": self.node, "key": key, "error": str(exc)}
            )
            return None

    async def _store(self, key: str, data: bytes, crc: int | None) -> StoreReply:
        """Durable here, then announced; what `put` and `rebuild` both end with."""
        info = await asyncio.to_thread(self.store.put, key, data, crc)
        self.access.touch_key(key, system_wall_ms())
        event = self.bus.event(
            FragmentStored(node_id=self.node, key=key, size=info.size, crc32=info.crc32)
        )
        try:
            await self.bus.publish(event)
        except BusError as exc:
            log.error(
                "fragment.event_failed",
                extra={"node": self.node, "key": key, "event_id": event.id, "error": str(exc)},
            )
            return StoreReply(
                errno=errno.EIO,
                message=f"fragment {key} is stored on node {self.node} but its FragmentStored "
                f"event was not published ({exc}); put it again",
            )
        log.info(
            "fragment.stored",
            extra={
                "node": self.node,
                "key": key,
                "size": info.size,
                "crc32": f"{info.crc32:08x}",
                "event_id": event.id,
            },
        )
        return StoreReply(fragment=info)

    async def _delete(self, msg: Msg) -> StoreReply:
        key = _key(msg)
        stored_ms = _stored_ms(msg)
        held = await asyncio.to_thread(self.store.info, key)
        if held is None:
            raise FragmentNotFound(self.node, key)
        if stored_ms is not None and held.stored_ms != stored_ms:
            raise FragmentChanged(self.node, key, stored_ms, held.stored_ms)
        event = self.bus.event(FragmentDeleted(node_id=self.node, key=key))
        try:
            await self.bus.publish(event)
        except BusError as exc:
            return StoreReply(
                errno=errno.EIO,
                message=f"fragment {key} not deleted from node {self.node}: its FragmentDeleted "
                f"event was not published ({exc}); retry the delete",
            )
        try:
            info = await asyncio.to_thread(self.store.delete, key, stored_ms)
        except FragmentChanged:
            # Stored again between the check and the delete: announce it again, so the
            # DATA stream does not end on the FragmentDeleted published above.
            again = await asyncio.to_thread(self.store.info, key)
            if again is not None:
                await self.bus.publish(
                    self.bus.event(
                        FragmentStored(
                            node_id=self.node, key=key, size=again.size, crc32=again.crc32
                        )
                    )
                )
            raise
        log.info(
            "fragment.deleted",
            extra={"node": self.node, "key": key, "size": info.size, "event_id": event.id},
        )
        return StoreReply(fragment=info)

    async def _get(self, msg: Msg) -> None:
        try:
            key = _key(msg)
            info, data = await asyncio.to_thread(self.store.get, key)
        except FragmentCorrupt as exc:
            await self._report(exc)  # reported first, then answered
            await self._respond(msg, b"", _error_headers(exc.errno, exc.message))
            return
        except StoreError as exc:
            await self._respond(msg, b"", _error_headers(exc.errno, exc.message))
            return
        except Exception as exc:
            log.exception("rpc.failed", extra={"node": self.node, "verb": "get"})
            message = f"chunk-store {self.node}: get failed: {exc}"
            await self._respond(msg, b"", _error_headers(errno.EIO, message))
            return
        self.access.touch_key(key, system_wall_ms())
        log.debug("fragment.read", extra={"node": self.node, "key": key, "size": info.size})
        await self._respond(msg, data, {HEADER_CRC: f"{info.crc32:08x}"})

    async def _verify(self, key: str) -> FragmentInfo:
        try:
            return await asyncio.to_thread(self.store.verify, key)
        except FragmentCorrupt as exc:
            await self._report(exc)
            raise

    async def _report(self, damage: FragmentCorrupt) -> None:
        event = self.bus.event(
            FragmentDamaged(
                node_id=self.node,
                key=damage.key,
                reason=damage.reason,
                detail=damage.detail[:1024],
                reported_by=self.node,
            )
        )
        log.warning(
            "fragment.damaged",
            extra={
                "node": self.node,
                "key": damage.key,
                "reason": damage.reason,
                "detail": damage.detail,
                "event_id": event.id,
            },
        )
        try:
            await self.bus.publish(event)
        except BusError as exc:
            log.error(
                "fragment.damage_unreported",
                extra={"node": self.node, "key": damage.key, "error": str(exc)},
            )

    async def _publish_damage(self, damage: FragmentDamaged) -> None:
        """The scrubber's report: raises BusError if the event was not published."""
        await self.bus.publish(self.bus.event(damage))

    async def _respond(self, msg: Msg, data: bytes, headers: dict[str, str] | None = None) -> None:
        if not msg.reply:
            return
        try:
            await self.bus.nc.publish(msg.reply, data, headers=headers)
        except Exception as exc:  # the requester is gone or NATS is down: nothing to answer
            log.warning("rpc.reply_failed", extra={"node": self.node, "error": str(exc)})


def _key(msg: Msg) -> str:
    key = (msg.headers or {}).get(HEADER_KEY, "")
    if not key:
        raise InvalidKey(f"request on {msg.subject} has no {HEADER_KEY} header")
    return key


def _stored_ms(msg: Msg) -> int | None:
    text = (msg.headers or {}).get(HEADER_STORED_MS)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidKey(f"header {HEADER_STORED_MS} {text!r} is not a number") from None


def _error_headers(code: int, message: str) -> dict[str, str]:
    text = " ".join(message.split())[:_MAX_ERROR_HEADER]  # header values are one line
    return {HEADER_ERRNO: str(code), HEADER_ERROR: text}


async def start(ctx: Context) -> None:
    settings: ChunkStoreSettings = ctx.settings
    root = store_root(settings.data_dir)
    store = await asyncio.to_thread(
        FileFragmentStore, root, node=settings.node, reserve_bytes=settings.reserve_bytes
    )
    ctx.stack.callback(store.close)
    kv = await until_jetstream_answers("nodes bucket", lambda: ctx.bus.key_value(NODES.bucket))
    service = ChunkStoreService(
        ctx.bus,
        store,
        kv,
        labels=settings.labels,
        heartbeat_s=settings.heartbeat_s,
        max_inflight=settings.max_inflight,
        max_rebuilds=settings.max_rebuilds,
        scrub_mb_s=settings.scrub_mb_s,
        scrub_pass_interval_s=settings.scrub_pass_interval_s,
        scrub_cursor=root / "scrub.json",
        spawn=ctx.spawner(),
        spawn_degradable=ctx.spawner(OnFailure.DEGRADE),
    )
    await ctx.enter(started(service))
    status = store.stat()
    log.info(
        "chunkstore.started",
        extra={
            "node": settings.node,
            "site": settings.site,
            "root": str(root),
            "fragments": status.fragments,
            "used_bytes": status.used_bytes,
            "free_bytes": status.free_bytes,
            "reserve_bytes": store.reserve_bytes,
            "orphans_removed": store.removed_at_open,
        },
    )


def main(argv: list[str] | None = None) -> None:
    from cfs_chunkstore.spec import SPEC

    run_spec(SPEC, argv)
