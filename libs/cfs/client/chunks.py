"""Requests to chunk-store nodes (wire format in cfs_contracts.data).

Every failure becomes `FragmentError`, an FsError with the node and key, so the
data path can tell "this node does not answer" (try another node or decode
around it) from "this node says no" (ENOSPC, ENOENT, EIO).
"""

from __future__ import annotations

import errno
import time
import zlib

from nats.aio.msg import Msg

from cfs.bus import Bus, BusError, NoResponders, RequestTimeout, decode_error_reply
from cfs.telemetry import histogram
from cfs_contracts.data import (
    HEADER_CRC,
    HEADER_ERRNO,
    HEADER_ERROR,
    HEADER_KEY,
    HEADER_STORED_MS,
    FragmentInfo,
    ListRequest,
    RebuildRequest,
    StoreReply,
    StoreStatus,
    TouchedRequest,
    Verb,
    chunk_rpc_subject,
)
from cfs_contracts.fs.rpc import FsError

FRAGMENT_SECONDS = histogram(
    "client_fragment_duration_seconds",
    "a fragment put or get as the client sees it (request to reply, answered ones), by verb",
    ("verb",),
)
_PUT_SECONDS = FRAGMENT_SECONDS.labels("put")
_GET_SECONDS = FRAGMENT_SECONDS.labels("get")


# A fragment request may take this long past its siblings' last answer, or this many
# times as long as they took, whichever is more, before its node counts as stalled.
STRAGGLER_MIN_S = 1.0
STRAGGLER_FACTOR = 4.0


def straggling_s(siblings_took_s: float) -> float:
    """How long after its siblings' last answer a fragment request is given up (a
    put placed elsewhere, a get asked of another holder): relative to the siblings,
    so a machine slow for everyone gives up on no one."""
    return max(STRAGGLER_MIN_S, STRAGGLER_FACTOR * siblings_took_s)


class FragmentError(FsError):
    def __init__(self, node: str, key: str, code: int, message: str, *, unreachable: bool = False):
        super().__init__(code, f"fragment {key} on {node}: {message}")
        self.node = node
        self.key = key
        self.unreachable = unreachable


class Unrecoverable(Exception):
    """Fewer than k healthy fragments: the chunk cannot be rebuilt."""

    def __init__(self, available: int, needed: int, detail: str) -> None:
        super().__init__(f"{available} of {needed} fragments needed are readable ({detail})")
        self.available = available
        self.needed = needed


class ChunkStoreClient:
    def __init__(
        self,
        bus: Bus,
        *,
        timeout_s: float = 10.0,
        rebuild_timeout_s: float = 60.0,
        site: str | None = None,
    ):
        """`site`: whose chunk-stores to ask (default the bus's; the peer site's, over
        the site link, for the geo-replicator)."""
        self.bus = bus
        self.site = site or bus.site
        self.timeout_s = timeout_s
        self.rebuild_timeout_s = rebuild_timeout_s

    async def put(self, node: str, key: str, data: bytes, crc: int | None = None) -> FragmentInfo:
        """Store durably on `node`; `crc` (CRC-32 of data) if the caller has it already."""
        crc = zlib.crc32(data) if crc is None else crc
        headers = {HEADER_KEY: key, HEADER_CRC: f"{crc:08x}"}
        started = time.perf_counter()
        reply = await self._control(node, "put", key, data, headers)
        _PUT_SECONDS.observe(time.perf_counter() - started)
        if reply.fragment is None:
            raise FragmentError(node, key, errno.EIO, "put answered without a fragment record")
        return reply.fragment

    async def get(self, node: str, key: str) -> bytes:
        """The fragment's bytes, checked against the CRC the store sent."""
        started = time.perf_counter()
        msg = await self._request(node, "get", key, b"", {HEADER_KEY: key})
        _GET_SECONDS.observe(time.perf_counter() - started)
        _raise_for_errno(node, key, msg)
        headers = msg.headers or {}
        crc = headers.get(HEADER_CRC)
        if crc is None:
            raise FragmentError(node, key, errno.EIO, "reply carries no checksum")
        actual = zlib.crc32(msg.data)
        if actual != int(crc, 16):
            raise FragmentError(
                node, key, errno.EIO, f"crc32 expected 0x{crc}, got 0x{actual:08x} in transit"
            )
        return bytes(msg.data)

    async def delete(self, node: str, key: str, *, stored_ms: int | None = None) -> FragmentInfo:
        """Remove `key` from `node`; the fragment removed. `stored_ms`: only the one stored
        at that time (FragmentError ESTALE if it was stored again since; ENOENT if gone)."""
        headers = {HEADER_KEY: key}
        if stored_ms is not None:
            headers[HEADER_STORED_MS] = str(stored_ms)
        reply = await self._control(node, "delete", key, b"", headers)
        if reply.fragment is None:
            raise FragmentError(node, key, errno.EIO, "delete answered without a fragment record")
        return reply.fragment

    async def verify(self, node: str, key: str) -> FragmentInfo:
        reply = await self._control(node, "verify", key, b"", {HEADER_KEY: key})
        if reply.fragment is None:
            raise FragmentError(node, key, errno.EIO, "verify answered without a fragment record")
        return reply.fragment

    async def rebuild(
        self, node: str, key: str, request: RebuildRequest, needed: int
    ) -> FragmentInfo:
        """Have `node` re-create and store fragment `key` itself; `Unrecoverable` when
        fewer than `needed` (k) fragments could be read."""
        body, headers = request.model_dump_json().encode(), {HEADER_KEY: key}
        msg = await self._request(node, "rebuild", key, body, headers, self.rebuild_timeout_s)
        reply = _parse_reply(node, "rebuild", key, msg)
        if reply.errno == errno.ENODATA:
            raise Unrecoverable(reply.readable or 0, needed, reply.message)
        if reply.errno:
            raise FragmentError(node, key, reply.errno, reply.message)
        if reply.fragment is None:
            raise FragmentError(node, key, errno.EIO, "rebuild answered without a fragment record")
        return reply.fragment

    async def list(self, node: str, request: ListRequest) -> StoreReply:
        return await self._control(node, "list", "", request.model_dump_json().encode(), {})

    async def touched(
        self, node: str, chunk_ids: tuple[str, ...], since_ms: int
    ) -> tuple[set[str], int]:
        """Those of `chunk_ids` read or written on `node` since `since_ms`, and from when
        the node's history is known (older accesses are not)."""
        request = TouchedRequest(chunk_ids=chunk_ids, since_ms=since_ms)
        reply = await self._control(node, "touched", "", request.model_dump_json().encode(), {})
        return set(reply.touched), reply.history_from_ms or since_ms

    async def stat(self, node: str) -> StoreStatus:
        reply = await self._control(node, "stat", "", b"", {})
        if reply.status is None:
            raise FragmentError(node, "-", errno.EIO, "stat answered without a status")
        return reply.status

    async def _control(
        self, node: str, verb: Verb, key: str, data: bytes, headers: dict[str, str]
    ) -> StoreReply:
        reply = _parse_reply(node, verb, key, await self._request(node, verb, key, data, headers))
        if reply.errno:
            raise FragmentError(node, key, reply.errno, reply.message)
        return reply

    async def _request(
        self,
        node: str,
        verb: Verb,
        key: str,
        data: bytes,
        headers: dict[str, str],
        timeout: float | None = None,
    ) -> Msg:
        subject = chunk_rpc_subject(self.site, node, verb)
        timeout = self.timeout_s if timeout is None else timeout
        try:
            return await self.bus.request(subject, data, timeout=timeout, headers=headers)
        except NoResponders:
            raise FragmentError(
                node, key or "-", errno.EHOSTDOWN, "chunk-store is not running", unreachable=True
            ) from None
        except RequestTimeout:
            raise FragmentError(
                node,
                key or "-",
                errno.ETIMEDOUT,
                f"no answer within {timeout:.1f}s",
                unreachable=True,
            ) from None
        except BusError as exc:
            raise FragmentError(node, key or "-", errno.EIO, str(exc), unreachable=True) from None


def _parse_reply(node: str, verb: Verb, key: str, msg: Msg) -> StoreReply:
    """The store's `StoreReply`, its errno left to the caller."""
    _raise_for_errno(node, key, msg)
    try:
        return StoreReply.model_validate_json(msg.data)
    except ValueError as exc:
        raise FragmentError(node, key, errno.EIO, f"malformed {verb} reply: {exc}") from None


def _raise_for_errno(node: str, key: str, msg: Msg) -> None:
    headers = msg.headers or {}
    code = headers.get(HEADER_ERRNO)
    if code is not None and int(code):
        raise FragmentError(node, key, int(code), headers.get(HEADER_ERROR, "error"))
    failed = decode_error_reply(msg)
    if failed is not None:
        raise FragmentError(node, key, errno.EIO, f"{failed[0]}: {failed[1]}")
