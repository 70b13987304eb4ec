"""Create or update streams and KV buckets from the contracts, idempotently.

Called by `cfs cluster init` and deploy tooling, never by a service at start-up
(STYLE.md #5): a service that silently rewrote shared streams could undo an
operator's change.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

# A module import: cfs.retry imports cfs.bus.errors, which imports this package first.
import cfs.retry as retrying
from cfs.bus.errors import ProvisionError
from cfs_contracts.streams import KVSpec, Retention, StreamSpec

log = logging.getLogger(__name__)

# JetStream API errors that a cluster which is still forming gives for a few seconds:
# no suitable peers (10005), JetStream temporarily unavailable (10008), not current (10074).
_FORMING = {10005, 10008, 10074}
_FORMING_WAIT_S = 20.0

T = TypeVar("T")


def _forming(exc: BaseException) -> bool:
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in _FORMING


async def _while_forming(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """Retry `call` while the cluster is still placing peers; other errors pass through."""
    policy = retrying.RetryPolicy(
        f"provision {what}",
        temporary=_forming,
        deadline_s=_FORMING_WAIT_S,
        first_delay_s=0.25,
        max_delay_s=1.0,
    )
    return await retrying.retry(call, policy)


class Change(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class Provisioned:
    name: str
    change: Change


def stream_config(spec: StreamSpec, site: str, replicas: int) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=spec.subjects_for(site),
        retention=RetentionPolicy.WORK_QUEUE
        if spec.retention is Retention.WORK_QUEUE
        else RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=spec.max_age_s,
        max_msg_size=spec.max_msg_bytes,
        duplicate_window=spec.duplicate_window_s,
        deny_delete=spec.deny_delete,
        deny_purge=spec.deny_purge,
        allow_direct=spec.allow_direct,
        discard=DiscardPolicy.OLD,
    )


# Fields we own; the server fills in many others that we must not compare.
_MANAGED = (
    "description",
    "subjects",
    "retention",
    "num_replicas",
    "max_age",
    "max_msg_size",
    "duplicate_window",
    "deny_delete",
    "deny_purge",
    "allow_direct",
)


def _differs(current: StreamConfig, wanted: StreamConfig) -> list[str]:
    diffs = []
    for name in _MANAGED:
        have, want = getattr(current, name), getattr(wanted, name)
        if isinstance(have, float) or isinstance(want, float):
            if abs(float(have or 0) - float(want or 0)) > 1e-6:
                diffs.append(name)
        elif name == "subjects":
            if sorted(have or []) != sorted(want or []):
                diffs.append(name)
        elif have != want:
            diffs.append(name)
    return diffs


async def ensure_stream(
    js: JetStreamContext, spec: StreamSpec, *, site: str, replicas: int
) -> Provisioned:
    wanted = stream_config(spec, site, replicas)
    try:
        info = await js.stream_info(spec.name)
    except nats.js.errors.NotFoundError:
        try:
            await _while_forming(spec.name, lambda: js.add_stream(wanted))
        except nats.js.errors.APIError as exc:
            raise ProvisionError(f"cannot create stream {spec.name}: {exc.description}") from None
        log.info("stream.created", extra={"stream": spec.name, "replicas": replicas})
        return Provisioned(spec.name, Change.CREATED)
    except nats.js.errors.APIError as exc:
        raise ProvisionError(f"cannot read stream {spec.name}: {exc.description}") from None
    diffs = _differs(info.config, wanted)
    if not diffs:
        return Provisioned(spec.name, Change.UNCHANGED)
    try:
        await _while_forming(spec.name, lambda: js.update_stream(wanted))
    except nats.js.errors.APIError as exc:
        raise ProvisionError(
            f"cannot update stream {spec.name} ({', '.join(diffs)}): {exc.description}"
        ) from None
    log.info("stream.updated", extra={"stream": spec.name, "fields": diffs})
    return Provisioned(spec.name, Change.UPDATED)


async def ensure_streams(
    js: JetStreamContext, specs: Iterable[StreamSpec], *, site: str, replicas: int
) -> list[Provisioned]:
    return [await ensure_stream(js, s, site=site, replicas=replicas) for s in specs]


async def ensure_bucket(js: JetStreamContext, spec: KVSpec, *, replicas: int) -> Provisioned:
    """KV buckets are streams named KV_<bucket>; same create-or-update rule."""
    config = KeyValueConfig(
        bucket=spec.bucket,
        description=spec.description,
        history=spec.history,
        ttl=spec.ttl_s or None,
        max_value_size=spec.max_value_bytes,
        storage=StorageType.FILE,
        replicas=replicas,
        direct=True,
    )
    try:
        info = await js.stream_info(f"KV_{spec.bucket}")
    except nats.js.errors.NotFoundError:
        try:
            await _while_forming(spec.bucket, lambda: js.create_key_value(config))
        except nats.js.errors.APIError as exc:
            raise ProvisionError(f"cannot create bucket {spec.bucket}: {exc.description}") from None
        log.info("bucket.created", extra={"bucket": spec.bucket, "replicas": replicas})
        return Provisioned(spec.bucket, Change.CREATED)
    current = info.config
    diffs = [
        name
        for name, have, want in (
            ("history", current.max_msgs_per_subject, spec.history),
            ("replicas", current.num_replicas, replicas),
            ("max_value_size", current.max_msg_size, spec.max_value_bytes),
            ("description", current.description, spec.description),
        )
        if have != want
    ]
    if not diffs:
        return Provisioned(spec.bucket, Change.UNCHANGED)
    current.max_msgs_per_subject = spec.history
    current.num_replicas = replicas
    current.max_msg_size = spec.max_value_bytes
    current.description = spec.description
    try:
        await _while_forming(spec.bucket, lambda: js.update_stream(current))
    except nats.js.errors.APIError as exc:
        raise ProvisionError(f"cannot update bucket {spec.bucket}: {exc.description}") from None
    log.info("bucket.updated", extra={"bucket": spec.bucket, "fields": diffs})
    return Provisioned(spec.bucket, Change.UPDATED)


async def ensure_buckets(
    js: JetStreamContext, specs: Iterable[KVSpec], *, replicas: int
) -> list[Provisioned]:
    return [await ensure_bucket(js, s, replicas=replicas) for s in specs]
