"""Durable pull consumers with one declared ack policy (STYLE.md #4).

A handler that returns has succeeded (ack). One that raises `Retry` (or any
unexpected exception) is redelivered after a delay; on its last allowed
delivery, and for a `Reject` or a message that cannot be decoded, the original
bytes go to the dead-letter subject with the reason, then the message is
terminated. Unknown event types are skipped with a warning and a counter.
The settle logic lives in `_settle`, nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

# A module import: cfs.retry imports cfs.bus.errors, which imports this package first.
import cfs.retry as retrying
from cfs.bus.connection import Bus
from cfs.bus.errors import BusError, ProvisionError
from cfs.telemetry import consumer_span
from cfs_contracts import DecodedEvent, UnknownEventType
from cfs_contracts.registry import ContractError
from cfs_contracts.streams import dead_letter_subject

log = logging.getLogger(__name__)

HDR_DLQ_REASON = "Cfs-Dlq-Reason"
HDR_DLQ_STREAM = "Cfs-Dlq-Stream"
HDR_DLQ_SEQ = "Cfs-Dlq-Seq"
HDR_DLQ_SUBJECT = "Cfs-Dlq-Subject"
HDR_DLQ_CONSUMER = "Cfs-Dlq-Consumer"


class Retry(Exception):
    """Raise from a handler to have the message redelivered after `delay` seconds."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class Reject(Exception):
    """Raise from a handler for a message that can never be processed (poison)."""


@dataclass(frozen=True)
class Delivery:
    stream: str
    stream_seq: int
    consumer_seq: int
    num_delivered: int
    subject: str


Handler = Callable[[DecodedEvent, Delivery], Awaitable[None]]


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subject: str | None = None
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    retry_delay_s: float = 1.0
    batch: int = 64


class Outcome(Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    SKIP = "skip"


@dataclass
class ConsumerStats:
    acked: int = 0
    retried: int = 0
    dead_lettered: int = 0
    skipped_unknown: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class DurableConsumer:
    """Consume a stream through a durable pull consumer until `stop()`."""

    def __init__(self, bus: Bus, spec: ConsumerSpec, handler: Handler) -> None:
        self.bus = bus
        self.spec = spec
        self.handler = handler
        self.stats = ConsumerStats()
        self.dead_letter_subject = dead_letter_subject(bus.site, spec.stream, spec.durable)
        self._stopping = asyncio.Event()

    async def ensure(self) -> None:
        """Create or update the durable consumer (idempotent)."""
        config = ConsumerConfig(
            durable_name=self.spec.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.spec.ack_wait_s,
            max_deliver=self.spec.max_deliver,
            filter_subject=self.spec.filter_subject,
            max_ack_pending=max(1000, self.spec.batch * 4),
        )
        try:
            await self.bus.js.add_consumer(self.spec.stream, config)
        except nats.js.errors.NotFoundError:
            raise ProvisionError(
                f"stream {self.spec.stream} does not exist; run `cfs cluster init`"
            ) from None
        except nats.js.errors.APIError as exc:
            raise ProvisionError(
                f"cannot create consumer {self.spec.durable} on {self.spec.stream}: "
                f"{exc.description}"
            ) from None

    async def run(self) -> None:
        """Fetch and handle until stopped; survives reconnects and leader changes."""
        await self.ensure()
        sub = await self.bus.js.pull_subscribe_bind(self.spec.durable, stream=self.spec.stream)
        # Fetching outlives any bus failure (no deadline); quiet while a leader moves.
        backoff = retrying.Backoff(
            retrying.RetryPolicy(
                f"fetch from {self.spec.durable}",
                temporary=retrying.any_bus_error,
                deadline_s=None,
                first_delay_s=0.5,
                max_delay_s=5.0,
            ),
            extra={"stream": self.spec.stream, "consumer": self.spec.durable},
            logger=log,
        )
        try:
            while not self._stopping.is_set():
                try:
                    msgs = await sub.fetch(self.spec.batch, timeout=1.0)
                    for msg in msgs:
                        await self._process(msg)
                    # One round trip confirms every ack of the batch reached the server.
                    await self.bus.nc.flush(timeout=max(1, int(self.spec.ack_wait_s)))
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except nats.errors.Error as exc:  # includes JetStream API errors
                    if self._stopping.is_set() or self.bus.nc.is_closed:
                        return
                    await backoff.wait(exc)
                    continue
                if backoff.attempts:
                    backoff.reset()
        finally:
            if not self.bus.nc.is_closed:
                await sub.unsubscribe()

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    async def _process(self, msg: Msg) -> None:
        meta = msg.metadata
        delivery = Delivery(
            stream=meta.stream,
            stream_seq=meta.sequence.stream,
            consumer_seq=meta.sequence.consumer,
            num_delivered=meta.num_delivered,
            subject=msg.subject,
        )
        outcome, reason, delay = await self._handle(msg, delivery)
        await self._settle(msg, delivery, outcome, reason, delay)

    async def _handle(self, msg: Msg, delivery: Delivery) -> tuple[Outcome, str, float]:
        try:
            event = self.bus.registry.decode(msg.data)
        except UnknownEventType as exc:
            return Outcome.SKIP, str(exc), 0.0
        except ContractError as exc:
            return Outcome.DEAD_LETTER, f"undecodable: {exc}", 0.0
        with consumer_span(f"consume {event.envelope.type}", msg.headers):
            try:
                await self.handler(event, delivery)
            except Reject as exc:
                return Outcome.DEAD_LETTER, f"rejected: {exc}", 0.0
            except Retry as exc:
                return self._retry_or_give_up(delivery, str(exc), exc.delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a handler bug must not stop the stream
                log.exception("consumer.handler_failed", extra=self._ids(delivery, event))
                return self._retry_or_give_up(delivery, f"{type(exc).__name__}: {exc}", None)
        return Outcome.ACK, "", 0.0

    def _retry_or_give_up(
        self, delivery: Delivery, reason: str, delay: float | None
    ) -> tuple[Outcome, str, float]:
        if delivery.num_delivered >= self.spec.max_deliver:
            return (
                Outcome.DEAD_LETTER,
                f"gave up after {delivery.num_delivered} deliveries: {reason}",
                0.0,
            )
        return Outcome.RETRY, reason, self.spec.retry_delay_s if delay is None else delay

    async def _settle(
        self, msg: Msg, delivery: Delivery, outcome: Outcome, reason: str, delay: float
    ) -> None:
        ids = self._ids(delivery)
        if outcome is Outcome.ACK:
            await msg.ack()
            self.stats.acked += 1
        elif outcome is Outcome.SKIP:
            log.warning("consumer.unknown_event_skipped", extra={**ids, "reason": reason})
            await msg.ack()
            self.stats.skipped_unknown += 1
        elif outcome is Outcome.RETRY:
            log.info("consumer.retry", extra={**ids, "reason": reason, "delay_s": delay})
            await msg.nak(delay=delay)
            self.stats.retried += 1
        else:
            try:
                await self._dead_letter(msg, delivery, reason)
            except BusError as exc:
                log.warning("consumer.dead_letter_failed", extra={**ids, "error": str(exc)})
                await msg.nak(delay=self.spec.retry_delay_s)
                return
            log.warning(
                "consumer.dead_lettered",
                extra={**ids, "reason": reason, "dlq": self.dead_letter_subject},
            )
            await msg.term()
            self.stats.dead_lettered += 1
            key = reason.split(":", 1)[0]
            self.stats.by_reason[key] = self.stats.by_reason.get(key, 0) + 1

    async def _dead_letter(self, msg: Msg, delivery: Delivery, reason: str) -> None:
        """Keep the original bytes and headers; add why and where it came from."""
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        headers.update(
            {
                "Nats-Msg-Id": f"dlq:{delivery.stream}:{delivery.stream_seq}:{self.spec.durable}",
                HDR_DLQ_REASON: reason[:1024],
                HDR_DLQ_STREAM: delivery.stream,
                HDR_DLQ_SEQ: str(delivery.stream_seq),
                HDR_DLQ_SUBJECT: delivery.subject,
                HDR_DLQ_CONSUMER: self.spec.durable,
            }
        )
        try:
            await self.bus.js.publish(self.dead_letter_subject, msg.data, headers=headers)
        except Exception as exc:
            raise BusError(
                f"dead-letter publish to {self.dead_letter_subject} failed: "
                f"{exc or type(exc).__name__}"
            ) from None

    def _ids(self, delivery: Delivery, event: DecodedEvent | None = None) -> dict[str, object]:
        ids: dict[str, object] = {
            "stream": delivery.stream,
            "seq": delivery.stream_seq,
            "subject": delivery.subject,
            "consumer": self.spec.durable,
            "delivered": delivery.num_delivered,
        }
        if event is not None:
            ids["event_id"] = event.envelope.id
            ids["event_type"] = event.envelope.type
        return ids
