"""The event bus over NATS JetStream: publish, consume, request/reply, provisioning."""

from cfs.bus.connection import Bus, decode_error_reply
from cfs.bus.consumer import ConsumerSpec, Delivery, DurableConsumer, Reject, Retry
from cfs.bus.errors import (
    BusError,
    BusUnavailable,
    NoResponders,
    PayloadTooLarge,
    ProvisionError,
    PublishFailed,
    PublishTimeout,
    RequestTimeout,
    SequenceConflict,
)
from cfs.bus.pipeline import Ack
from cfs.bus.provision import ensure_buckets, ensure_stream, ensure_streams

__all__ = [
    "Ack",
    "Bus",
    "BusError",
    "BusUnavailable",
    "ConsumerSpec",
    "Delivery",
    "DurableConsumer",
    "NoResponders",
    "PayloadTooLarge",
    "ProvisionError",
    "PublishFailed",
    "PublishTimeout",
    "Reject",
    "RequestTimeout",
    "Retry",
    "SequenceConflict",
    "decode_error_reply",
    "ensure_buckets",
    "ensure_stream",
    "ensure_streams",
]
