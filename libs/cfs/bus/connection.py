"""The bus: one NATS connection, event publishing, request/reply.

Publishing is at-least-once on the wire and exactly-once in the stream: every
event carries its ULID as `Nats-Msg-Id`, so a publish retried after a timeout
or a leader change is stored once. Optional expected-last-sequence turns an
append into a compare-and-set (the metadata writers' fencing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from asyncio import constants as asyncio_constants
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.aio.client
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

# A module import: cfs.retry imports cfs.bus.errors, which imports this package first.
import cfs.retry as retrying
from cfs.bus.errors import (
    BusError,
    BusUnavailable,
    NoResponders,
    PayloadTooLarge,
    PublishFailed,
    PublishTimeout,
    RequestTimeout,
    SequenceConflict,
    is_permission_error,
)
from cfs.bus.pipeline import Ack, AckPipeline
from cfs.hlc import HybridClock
from cfs.ids import new_id
from cfs.security import CredentialsError, connect_options, load_credentials
from cfs.telemetry import inject_headers, publish_span
from cfs_contracts import REGISTRY, Envelope, EventPayload, Registry
from cfs_contracts.registry import ContractError, encode_envelope
from cfs_contracts.streams import JOURNAL_MAX_MSG_BYTES

log = logging.getLogger(__name__)
# Errors of the first connection attempts, kept to say why connecting failed.
CONNECT_ERRORS_KEPT = 16
# A server that went silent (its host partitioned away, or frozen) leaves the TCP
# connection open: only unanswered pings tell. nats-py's default (120 s, 2 pings) kept
# a client on such a server for minutes, past every deadline (a metadata call waits
# 30 s); this moves it to another within 2-3 PING_INTERVAL_S (6-9 s), for a PING a
# client every 3 s. A live server answers a PING within milliseconds, also when busy.
PING_INTERVAL_S = 3.0
MAX_OUTSTANDING_PINGS = 2
# Closing a TLS connection waits for the peer's close_notify, up to asyncio's
# SSL_SHUTDOWN_TIMEOUT (30 s); nats-py closes the old connection before it reconnects,
# so a client left a frozen or partitioned server 30 s after it noticed. The wait is
# process-wide and has no per-connection option nats-py passes on, hence the module
# setting (read when a connection is made); test_bus.py checks the whole move.
TLS_CLOSE_WAIT_S = 1.0
asyncio_constants.SSL_SHUTDOWN_TIMEOUT = min(
    asyncio_constants.SSL_SHUTDOWN_TIMEOUT, TLS_CLOSE_WAIT_S
)

# nats-py reads the socket DEFAULT_BUFFER_SIZE (32 KiB) bytes per event-loop turn and
# uses it as the stream reader's limit. File fragments travel as 1 MiB messages, so
# that is 32+ loop turns per fragment; nats-py has no option for it, hence the module
# setting (read when a connection is made). bench/datapath.py measures the effect.
READ_BUFFER_BYTES = 1024 * 1024
nats.aio.client.DEFAULT_BUFFER_SIZE = max(nats.aio.client.DEFAULT_BUFFER_SIZE, READ_BUFFER_BYTES)


class _StartTlsEof(logging.Filter):
    """Drop asyncio's "returning true from eof_received() has no effect when using ssl".

    nats-py reads the server's INFO in plain text, then upgrades the same stream with
    `loop.start_tls`; asyncio's stream protocol decided it was not over SSL when the
    connection was made, so every EOF of a TLS connection (a server closing it, a
    reconnect) logs that warning. It is harmless: the connection is closed either way.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("returning true from eof_received()")


logging.getLogger("asyncio").addFilter(_StartTlsEof())


class Client(NATS):
    """nats-py's client with one fix: a PONG that answers a flush its caller stopped
    waiting for (a timeout or a cancelled task) is consumed, not answered.

    nats-py 2.16 sets the result of the oldest PING's future when a PONG arrives, even
    when that future was cancelled. The InvalidStateError ends the read loop, so the
    connection goes deaf (no messages, no replies) until pings mark it stale minutes
    later. nats.py#624 is the same bug in the flusher, fixed upstream; this one is not.
    """

    async def _process_pong(self) -> None:
        if self._pongs and self._pongs[0].done():
            self._pongs.pop(0)  # the PONG of that PING: the ones after it stay matched
            self._pongs_received += 1
            self._pings_outstanding = 0
            return
        await super()._process_pong()

    # Our credentials file, read again at every (re)connect: `cfs cluster
    # rotate-credentials` replaces it, and the server then drops the old key.
    credentials_file: Path | None = None

    def _setup_nkeys_seed_connect(self) -> None:
        super()._setup_nkeys_seed_connect()
        path = self.credentials_file
        if path is None:
            return
        import base64

        import nkeys

        def sig_cb(nonce: str) -> bytes:
            try:
                seed = load_credentials(path).seed
            except CredentialsError:  # mid-replace or gone: the key we started with
                seed = str(self._nkeys_seed_str)
            pair = nkeys.from_seed(bytearray(seed.encode()))
            try:
                # read right after this callback, for the same CONNECT
                self._public_nkey = pair.public_key.decode()
                return base64.b64encode(pair.sign(nonce.encode()))
            finally:
                pair.wipe()

        self._signature_cb = sig_cb


# JetStream API error codes (nats-server errors.json) that we give a type.
_WRONG_LAST_SEQUENCE = 10071
_WRONG_LAST_MSG_ID = 10070
_NO_STREAM_MATCH = 10060
_MESSAGE_TOO_LARGE = 10054
# A resend that arrives while the first copy (same Nats-Msg-Id) is still in the stream's
# Raft proposal: not a refusal, the answer is the duplicate's ack once it is stored.
_DUPLICATE_IN_PROCESS = 10158

HDR_MSG_ID = "Nats-Msg-Id"
HDR_EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"
HDR_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"


@dataclass(frozen=True)
class Outgoing:
    """An encoded event ready for the wire (encode once, retry many times)."""

    envelope: Envelope
    subject: str
    data: bytes
    headers: dict[str, str]


T = TypeVar("T")


class Link:
    """The connection's reconnects: a reply the old connection took with it (or a
    request it never delivered) is lost, so a request waiting when the connection
    comes back is sent again at once rather than waiting out its timeout.

    The waiting requests' tasks are interrupted (cancelled, and the cancellation
    taken back by `ask`, which tells it from any other by `kicked`): no task or
    future per request on the hot path, which a request/reply costs in CPU."""

    def __init__(self) -> None:
        self.epoch = 0
        self.waiting: set[asyncio.Task[Any]] = set()
        self.kicked: set[asyncio.Task[Any]] = set()

    async def ask(
        self, attempt: Callable[[float], Awaitable[T]], deadline: float, what: str = ""
    ) -> T:
        """`attempt(seconds_left)` until it returns, sent again each time the
        connection comes back while it waits; TimeoutError once `deadline` (monotonic)
        passed during a wait that was cut short."""
        task = asyncio.current_task()
        while True:
            if task is not None:
                self.waiting.add(task)
            try:
                result = await attempt(max(deadline - time.monotonic(), 0.001))
            except asyncio.CancelledError:
                if not self.take_back(task):
                    raise  # not the link's, or someone else's as well
                if time.monotonic() >= deadline:
                    raise TimeoutError from None
                log.info("request.resent", extra={"subject": what, "reason": "reconnected"})
            else:
                # A kick that arrived with the reply: wait_for returned the reply and
                # swallowed the cancellation; take it back all the same.
                self.take_back(task)
                return result
            finally:
                if task is not None:
                    self.waiting.discard(task)

    def take_back(self, task: asyncio.Task[Any] | None) -> bool:
        """Take back this link's cancellation of `task`, if it made one; True when
        no other cancellation of it is pending."""
        if task is None or task not in self.kicked:
            return False
        self.kicked.discard(task)
        return task.uncancel() == 0

    def reconnected(self) -> None:
        self.epoch += 1
        for task in self.waiting:
            self.kicked.add(task)
            task.cancel("cfs: reconnected, asking again")
        self.waiting.clear()


class Bus:
    """A site-scoped connection; construct with `Bus.connect` (constructors do no I/O)."""

    def __init__(
        self,
        nc: NATS,
        *,
        site: str,
        node: str,
        registry: Registry = REGISTRY,
        clock: HybridClock | None = None,
        publish_timeout: float = 5.0,
        publish_window: int = 1024,
        link: Link | None = None,
    ) -> None:
        self.nc = nc
        self.link = link or Link()
        self.js: JetStreamContext = nc.jetstream(timeout=publish_timeout)
        self._pipeline = AckPipeline(nc, publish_window)
        self.site = site
        self.node = node
        self.registry = registry
        self.clock = clock or HybridClock(node)
        self.publish_timeout = publish_timeout

    # -- connection ------------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        urls: str | Sequence[str],
        *,
        site: str,
        node: str,
        name: str | None = None,
        credentials: Path | None = None,
        tls_ca: Path | None = None,
        connect_timeout: float = 5.0,
        publish_timeout: float = 5.0,
        publish_window: int = 1024,
        registry: Registry = REGISTRY,
        ping_interval_s: float = PING_INTERVAL_S,
    ) -> Bus:
        """Connect to any of `urls`; reconnects forever once connected, also away from
        a server that stopped answering pings (`ping_interval_s`, see PING_INTERVAL_S).

        TLS, verified against `tls_ca` or else the site CA beside `credentials`
        (`cfs.tls.ca_for`), whenever the site has one; plain otherwise."""
        servers = [urls] if isinstance(urls, str) else list(urls)
        if not servers:
            raise BusUnavailable("no NATS server URL given")
        last_error: list[BaseException] = []
        refused = asyncio.Event()  # the server refused our credentials: no use retrying

        async def on_error(exc: Exception) -> None:
            # Before the first connection the caller gets one BusUnavailable instead.
            if len(last_error) < CONNECT_ERRORS_KEPT:
                last_error.append(exc)
            denied = is_permission_error(str(exc))
            if denied and not nc.is_connected:
                refused.set()
            if denied and nc.is_connected and 'publish to "_inbox.' in str(exc).lower():
                # A reply to a request delivered before a reconnect (or a server reload):
                # the server allows replies only to what it delivered on this connection
                # (`allow_responses`); the requester times out and asks again.
                log.info(
                    "nats.reply_refused", extra={"error": _describe(exc), "client": name or node}
                )
                return
            if denied and nc.is_connected:
                # A permission this role lacks: the request it was for just times out,
                # so say so loudly (cfs.security has the table).
                log.error(
                    "nats.permission_denied",
                    extra={"error": _describe(exc), "client": name or node},
                )
                return
            # A timeout nats-py reports on its own (a ping or flush on a loaded machine)
            # is news only if it turns into a disconnect, which is logged as such.
            quiet = isinstance(exc, TimeoutError | nats.errors.TimeoutError)
            loud = (nc.is_connected or nc.is_reconnecting) and not quiet
            level = logging.WARNING if loud else logging.INFO if quiet else logging.DEBUG
            log.log(level, "nats.error", extra={"error": _describe(exc), "client": name or node})

        async def on_disconnect() -> None:
            if not nc.is_closed and not nc.is_draining:
                log.warning("nats.disconnected", extra={"client": name or node})

        link = Link()

        async def on_reconnect() -> None:
            log.info("nats.reconnected", extra={"client": name or node})
            link.reconnected()

        auth = connect_options(credentials, tls_ca)
        nc = Client()
        if "nkeys_seed_str" in auth:
            nc.credentials_file = credentials
        try:
            await _unless_refused(
                nc.connect(
                    servers=servers,
                    name=name or f"cfs-{node}",
                    connect_timeout=max(1, min(2, int(connect_timeout))),
                    reconnect_time_wait=0.25,  # type: ignore[arg-type]  # float is fine
                    ping_interval=ping_interval_s,  # type: ignore[arg-type]  # likewise
                    max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                    max_reconnect_attempts=-1,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    **auth,
                    pending_size=8 * 1024 * 1024,
                ),
                refused,
                connect_timeout,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            await _quiet_close(nc)
            # A refused connection can look like a reset too: the refusal says more.
            seen = [*last_error, exc]
            denied = next((e for e in seen if is_permission_error(str(e))), None)
            if denied is not None:
                raise BusUnavailable(
                    f"NATS at {', '.join(servers)} refused the connection: {_describe(denied)} "
                    f"(credentials: {credentials or 'none'})"
                ) from None
            cause = _describe(seen[0])
            raise BusUnavailable(
                f"cannot reach NATS at {', '.join(servers)} within {connect_timeout:g}s: {cause}"
            ) from None
        return cls(
            nc,
            site=site,
            node=node,
            registry=registry,
            publish_timeout=publish_timeout,
            publish_window=publish_window,
            link=link,
        )

    def for_site(self, site: str) -> Bus:
        """This connection addressing `site`'s services (the peer's, over the site link:
        requests and events by subject). JetStream calls still go to this site's domain.
        Nothing to close: the connection stays this bus's."""
        return Bus(
            self.nc,
            site=site,
            node=self.node,
            registry=self.registry,
            clock=self.clock,
            publish_timeout=self.publish_timeout,
            link=self.link,
        )

    async def close(self, *, drain: bool = True) -> None:
        """Drain (our subscriptions' queued messages are handled, then pending publishes
        flushed) and close. `drain=False` for a process whose components have all
        stopped: nothing queued is wanted any more, and a subscription left with a
        blocked callback would hold the drain for its whole timeout."""
        await _quiet_close(self.nc, drain=drain)

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- events ----------------------------------------------------------------------
    def event(
        self,
        payload: EventPayload,
        *,
        correlation_id: str | None = None,
        caused_by: Envelope | None = None,
        event_id: str | None = None,
    ) -> Envelope:
        """A new envelope stamped by this node's clock; `caused_by` links the chain.
        `event_id`: a fixed id (`cfs.ids.stable_id`) for a fact that may be published
        again, so the stream's duplicate window keeps one."""
        if caused_by is not None:
            correlation_id = correlation_id or caused_by.correlation_id or caused_by.id
        return self.registry.envelope(
            payload,
            event_id=event_id or new_id(),
            site=self.site,
            node=self.node,
            hlc=self.clock.now(),
            correlation_id=correlation_id,
            causation_id=caused_by.id if caused_by is not None else None,
        )

    def prepare(self, envelope: Envelope, *, subject: str | None = None, **keys: str) -> Outgoing:
        """Validate and encode; subject placeholders default to payload fields."""
        spec = self.registry.spec(envelope.type, envelope.v)
        if subject is None:
            payload = envelope.payload
            for name in spec.placeholders:
                if name in keys:
                    continue
                if isinstance(payload, EventPayload):
                    value = getattr(payload, name, None)
                else:
                    value = payload.get(name)
                if value is not None:
                    keys[name] = str(value)
            subject = spec.subject(self.site, **keys)
        data = encode_envelope(envelope)
        limit = min(self.nc.max_payload or JOURNAL_MAX_MSG_BYTES, JOURNAL_MAX_MSG_BYTES)
        if len(data) > limit:
            raise PayloadTooLarge(
                f"{envelope.type} event {envelope.id} is {len(data)} bytes; "
                f"the limit for events is {limit} bytes (file data goes to chunk-stores)"
            )
        headers = {HDR_MSG_ID: envelope.id}
        inject_headers(headers)
        return Outgoing(envelope, subject, data, headers)

    async def publish(
        self,
        envelope: Envelope,
        *,
        subject: str | None = None,
        expected_last_seq: int | None = None,
        expected_last_subject_seq: int | None = None,
        timeout: float | None = None,
        **keys: str,
    ) -> Ack:
        """Append one event; retried with the same id until acked or `timeout`.

        Raises SequenceConflict when an expected sequence does not match.
        """
        out = self.prepare(envelope, subject=subject, **keys)
        headers = dict(out.headers)
        if expected_last_seq is not None:
            headers[HDR_EXPECTED_LAST_SEQ] = str(expected_last_seq)
        if expected_last_subject_seq is not None:
            headers[HDR_EXPECTED_LAST_SUBJECT_SEQ] = str(expected_last_subject_seq)
        expected = expected_last_seq if expected_last_seq is not None else expected_last_subject_seq
        with publish_span(f"publish {envelope.type}"):
            inject_headers(headers)
            try:
                return await self._with_retry(
                    lambda remaining: self._publish_once(
                        out.subject, out.data, headers, remaining, expected
                    ),
                    what=f"publish {envelope.type} {envelope.id} to {out.subject}",
                    subject=out.subject,
                    timeout=timeout,
                )
            except SequenceConflict as conflict:
                # The server checks the expected sequence before the dedupe id, so an
                # attempt whose ack was lost looks like a conflict on retry: look first.
                stored = await self._find_stored(out, expected_last_seq, conflict)
                if stored is None:
                    raise
                return stored

    async def publish_many(
        self, envelopes: Iterable[Envelope], *, timeout: float | None = None
    ) -> list[Ack]:
        """Pipelined publish (no sequence expectations); acks in input order.

        Events are encoded as they are sent, so encoding overlaps with the
        server's work; at most `publish_window` are in flight. Failed or
        unacknowledged ones are resent with the same id until `timeout`.
        """
        budget = timeout or self.publish_timeout
        deadline = time.monotonic() + budget
        outgoing: list[Outgoing] = []
        futures: list[asyncio.Future[Ack]] = []
        try:
            # One deadline for the whole batch: per-send timeouts would cost a task each.
            async with asyncio.timeout(budget):
                for envelope in envelopes:
                    out = self.prepare(envelope)
                    outgoing.append(out)
                    futures.append(await self._send(out))
        except TimeoutError:
            self._abandon(futures)
            raise PublishTimeout(
                f"publish window stalled: {len(outgoing)} events sent, not acknowledged "
                f"within {budget:g}s"
            ) from None
        acks: list[Ack | None] = [None] * len(outgoing)
        pending = list(range(len(outgoing)))
        while pending:
            await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
            self._abandon(futures)
            failed: list[int] = []
            for i, future in zip(pending, futures, strict=True):
                if future.cancelled():
                    failed.append(i)
                elif (exc := future.exception()) is not None:
                    err = _translate(exc, outgoing[i].subject, None)
                    if not err.temporary:
                        raise err
                    failed.append(i)
                else:
                    acks[i] = future.result()
            if not failed:
                break
            if time.monotonic() >= deadline:
                raise PublishTimeout(
                    f"{len(failed)} of {len(outgoing)} events not acknowledged within {budget:g}s"
                )
            log.info("publish.resend", extra={"events": len(failed)})
            await asyncio.sleep(0.1)
            pending = failed
            futures = [await self._send(outgoing[i]) for i in pending]
        return [a for a in acks if a is not None]

    async def _send(self, out: Outgoing) -> asyncio.Future[Ack]:
        try:
            return await self._pipeline.send(out.subject, out.data, out.headers)
        except nats.errors.Error as exc:  # translated by the caller, then resent
            future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
            return future

    def _abandon(self, futures: list[asyncio.Future[Ack]]) -> None:
        """Cancel what is still unacknowledged and free its window slots."""
        for future in futures:
            future.cancel()
        self._pipeline.forget_done()

    async def _find_stored(
        self, out: Outgoing, expected_last_seq: int | None, conflict: SequenceConflict
    ) -> Ack | None:
        """Our event's Ack if an earlier attempt stored it, else None (a real conflict).
        The refusal names the stream; looking it up by subject instead takes
        `$JS.API.STREAM.NAMES`, which no service role may publish to."""
        try:
            stream = conflict.stream
            if stream in ("", "?"):
                stream = conflict.stream = await self.js.find_stream_name_by_subject(out.subject)
            if expected_last_seq is not None:
                stored = await self.js.get_msg(stream, seq=expected_last_seq + 1, direct=True)
            else:
                stored = await self.js.get_msg(stream, subject=out.subject, direct=True)
        except (nats.errors.Error, TimeoutError):
            return None
        if stored.headers and stored.headers.get(HDR_MSG_ID) == out.envelope.id:
            return Ack(stream, stored.seq or 0, duplicate=True)
        return None

    async def _publish_once(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        timeout: float,
        expected: int | None,
    ) -> Ack:
        future: asyncio.Future[Ack] | None = None
        try:
            async with asyncio.timeout(timeout):
                future = await self._pipeline.send(subject, data, headers)
                return await future
        except Exception as exc:  # translated at the boundary
            if future is not None:
                self._abandon([future])
            raise _translate(exc, subject, expected) from None

    # -- request/reply ---------------------------------------------------------------
    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        """One request, one reply; typed errors name the subject and the timeout.

        Sent again whenever the connection comes back while waiting (`Link`), as
        callers already ask again after a timeout: the data path's responders are
        idempotent (operation ids, content-addressed fragments); an admin request
        repeated (a snapshot, a step-down) is done twice, never wrongly."""
        hdrs = dict(headers or {})
        inject_headers(hdrs)
        try:
            return await self.link.ask(
                lambda left: self.nc.request(subject, data, timeout=left, headers=hdrs or None),
                time.monotonic() + timeout,
                subject,
            )
        except nats.errors.NoRespondersError:
            raise NoResponders(subject) from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise RequestTimeout(subject, timeout) from None
        except nats.errors.ConnectionClosedError:
            raise BusUnavailable(f"connection closed while requesting {subject}") from None

    async def serve(
        self,
        subject: str,
        handler: Callable[[Msg], Awaitable[bytes]],
        *,
        queue: str = "",
    ) -> Subscription:
        """Answer requests on `subject`; a handler exception becomes an error reply."""

        async def respond(msg: Msg) -> None:
            try:
                reply = await handler(msg)
            except (ValidationError, ContractError) as exc:  # the caller's mistake, not ours
                log.info("rpc.bad_request", extra={"subject": msg.subject, "error": _first(exc)})
                if msg.reply:
                    await self.nc.publish(
                        msg.reply,
                        b"",
                        headers={
                            "Cfs-Error": "BadRequest",
                            "Cfs-Error-Message": f"bad request: {_first(exc)}"[:512],
                        },
                    )
                return
            except Exception as exc:  # reported to the caller, not swallowed
                if not isinstance(exc, BusError):
                    log.exception("rpc.handler_failed", extra={"subject": msg.subject})
                if msg.reply:
                    await self.nc.publish(msg.reply, b"", headers=_error_headers(exc))
                return
            if msg.reply:
                await msg.respond(reply)

        return await self.nc.subscribe(subject, queue=queue, cb=respond)

    async def key_value(self, bucket: str) -> KeyValue:
        try:
            return await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            raise PublishFailed(
                f"KV bucket {bucket!r} does not exist; run `cfs cluster init` to provision it"
            ) from None

    def _refused(self, subject: str) -> str | None:
        """The server's permission error for publishing to `subject`, if it sent one (a
        refused publish is dropped, so the request just times out)."""
        text = _describe(self.nc.last_error) if self.nc.last_error is not None else ""
        return text if is_permission_error(text) and f'"{subject}"' in text else None

    # -- retry -------------------------------------------------------------------------
    async def _with_retry(
        self,
        attempt: Callable[[float], Awaitable[Ack]],
        *,
        what: str,
        subject: str,
        timeout: float | None,
    ) -> Ack:
        """Jittered backoff on temporary errors until a hard deadline (STYLE.md #3);
        a publish the server refused for lack of permission is not retried."""
        budget = timeout or self.publish_timeout
        started = time.monotonic()
        deadline = started + budget
        tries = 1
        try:  # the hot path: one attempt, nothing else
            return await attempt(max(0.05, min(budget, 2.0)))
        except BusError as exc:
            failed = self._unless_refused(exc, subject, what)

        async def again() -> Ack:
            nonlocal tries
            tries += 1
            try:
                return await attempt(max(0.05, min(deadline - time.monotonic(), 2.0)))
            except BusError as exc:
                refused = self._unless_refused(exc, subject, what)
                if refused is exc:
                    raise
                raise refused from None

        try:
            # Only a failed first attempt gets here, so the policy is built on demand.
            policy = retrying.RetryPolicy(
                what, deadline_s=budget, first_delay_s=0.05, max_delay_s=0.5
            )
            return await retrying.retry(
                again, policy, extra={"subject": subject}, failed=failed, started=started
            )
        except BusError as exc:
            if not exc.temporary:
                raise
            raise PublishTimeout(
                f"{what}: not acknowledged within {budget:g}s ({tries} attempts; last: {exc})"
            ) from None

    def _unless_refused(self, exc: BusError, subject: str, what: str) -> BusError:
        """`exc`, or PublishFailed when the server refused the publish for lack of a
        permission: it drops the message, so that looks like a (temporary) timeout."""
        if exc.temporary and (denied := self._refused(subject)):
            return PublishFailed(f"{what}: {denied}")
        return exc


def _first(exc: ValidationError | ContractError) -> str:
    """One line naming what is wrong with a request (never the values it held)."""
    if isinstance(exc, ValidationError):
        err = exc.errors(include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "request"
        return f"{where}: {' '.join(err['msg'].split())}"
    return " ".join(str(exc).split())


def _error_headers(exc: BaseException) -> dict[str, str]:
    return {"Cfs-Error": type(exc).__name__, "Cfs-Error-Message": str(exc)[:512]}


def _translate(exc: BaseException, subject: str, expected: int | None) -> BusError:
    """nats-py exception -> our typed error (the one place this mapping lives)."""
    if isinstance(exc, BusError):
        return exc
    if isinstance(exc, nats.js.errors.APIError) and not isinstance(
        exc, nats.js.errors.ServiceUnavailableError
    ):
        stream = exc.stream or "?"
        if exc.err_code == _WRONG_LAST_SEQUENCE or (
            exc.err_code is not None and exc.err_code in (10164, _WRONG_LAST_MSG_ID)
        ):
            return SequenceConflict(stream, subject, expected or 0, exc.description or "")
        if exc.err_code == _MESSAGE_TOO_LARGE:
            return PayloadTooLarge(f"stream {stream} refused {subject}: {exc.description}")
        if exc.err_code == _DUPLICATE_IN_PROCESS:
            return BusUnavailable(f"{subject}: the first copy is still being stored; ask again")
        if exc.err_code == _NO_STREAM_MATCH:
            return PublishFailed(f"no stream captures {subject}; is the cluster initialised?")
        return PublishFailed(
            f"publish to {subject} refused: {exc.description} (code {exc.err_code})"
        )
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        err = BusUnavailable(f"no stream answered for {subject} (leader election or no stream)")
        return err
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return BusUnavailable(f"JetStream unavailable for {subject}")
    if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
        return PublishTimeout(f"no acknowledgement for {subject}")
    if isinstance(
        exc,
        nats.errors.ConnectionClosedError
        | nats.errors.ConnectionReconnectingError
        | nats.errors.StaleConnectionError
        | OSError,
    ):
        return BusUnavailable(f"connection lost while publishing to {subject}: {_describe(exc)}")
    if isinstance(exc, nats.errors.MaxPayloadError):
        return PayloadTooLarge(f"message to {subject} exceeds the server's max_payload")
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    return PublishFailed(f"publish to {subject} failed: {_describe(exc)}")


async def _unless_refused(connect: Awaitable[None], refused: asyncio.Event, timeout: float) -> None:
    """Await `connect` for up to `timeout`; stop at once when credentials are refused."""
    attempt = asyncio.ensure_future(connect)
    refusal = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait({attempt, refusal}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        refusal.cancel()
    if attempt.done():
        attempt.result()  # connected, or its error
        return
    attempt.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await attempt
    raise TimeoutError("credentials refused" if refused.is_set() else "connect timed out")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.removeprefix("nats: ")


async def _quiet_close(nc: NATS, *, drain: bool = True) -> None:
    if nc.is_closed:
        return
    try:
        closing = nc.drain() if drain and nc.is_connected else nc.close()
        await asyncio.wait_for(closing, timeout=5)
    except (TimeoutError, nats.errors.Error, OSError):
        await nc.close()


def decode_error_reply(msg: Msg) -> tuple[str, str] | None:
    """(error type, message) if a reply is an error reply, else None."""
    if msg.headers and "Cfs-Error" in msg.headers:
        return msg.headers["Cfs-Error"], msg.headers.get("Cfs-Error-Message", "")
    return None
