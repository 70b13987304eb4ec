"""What this site receives from its peer site: the `GEO_IN` stream (see
`cfs_contracts.geo`), made here and read for `replication-status`.

JetStream keeps, per source, how many of the peer's messages are not copied yet
(`lag`, as of its last contact with the peer) and the last error it met. Whether the
peer is reachable now is asked of the peer itself (`peer_reachable`: its JetStream
API over the link): JetStream's own "last active" figure keeps moving while a source
retries a cut link, so it cannot tell a partition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import ExternalStream, StorageType, StreamConfig, StreamSource
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from cfs_contracts.envelope import Envelope
from cfs_contracts.geo import (
    GEO_ACTIVE_KEY,
    INBOUND_STREAM,
    ActiveSite,
    GeoPeer,
    peer_api,
    peer_journal_subject,
)
from cfs_contracts.streams import meta_stream, shard_name

log = logging.getLogger(__name__)


class GeoError(Exception):
    """The peer or its stream is not what replication needs."""


@dataclass(frozen=True)
class ShardInbound:
    shard: int
    lag: int  # the peer's journal messages not copied yet (as of the last contact)
    error: str | None  # the API error JetStream last met sourcing it


@dataclass(frozen=True)
class Inbound:
    peer: str
    copied: int  # messages of the peer's journals on this site
    newest_ms: int | None  # when the peer's writer made the newest copied message
    shards: tuple[ShardInbound, ...]

    @property
    def lag_events(self) -> int:
        return sum(shard.lag for shard in self.shards)

    @property
    def errors(self) -> list[str]:
        return [f"shard {s.shard:03d}: {s.error}" for s in self.shards if s.error]

    def lag_s(self, now_ms: int, reachable: bool) -> float | None:
        """Seconds behind the peer: 0 when nothing is pending; else the age of the
        newest copied message (a lower bound while the peer is unreachable)."""
        if reachable and self.lag_events == 0:
            return 0.0
        return None if self.newest_ms is None else max(0.0, (now_ms - self.newest_ms) / 1000)


# What a request to the peer's JetStream meets when nothing answers for its domain
UNREACHABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
)


async def peer_reachable(nc: NATS, peer: str, timeout: float) -> bool:
    """Whether the peer's JetStream answers over the link now."""
    try:
        await nc.jetstream(domain=peer, timeout=timeout).account_info()
    except UNREACHABLE:
        return False
    return True


def inbound_config(peer: GeoPeer, replicas: int) -> StreamConfig:
    return StreamConfig(
        name=INBOUND_STREAM,
        description=f"site {peer.site}'s shard journals, sourced over the site link",
        sources=[
            StreamSource(
                name=meta_stream(shard_name(shard)).name,
                filter_subject=peer_journal_subject(peer.site, shard),
                external=ExternalStream(api=peer_api(peer.site)),
            )
            for shard in range(1, peer.shards + 1)
        ],
        storage=StorageType.FILE,
        num_replicas=replicas,
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
    )


async def ensure_inbound(js: JetStreamContext, peer: GeoPeer, replicas: int) -> bool:
    """Create `GEO_IN` (True), or leave it be when it sources the same journals."""
    wanted = inbound_config(peer, replicas)
    try:
        info = await js.stream_info(wanted.name or "")
    except nats.js.errors.NotFoundError:
        await js.add_stream(wanted)
        return True
    have = sorted((s.name, s.filter_subject) for s in info.config.sources or [])
    want = sorted((s.name, s.filter_subject) for s in wanted.sources or [])
    if have != want:
        raise GeoError(
            f"stream {wanted.name} sources {have}, not the {peer.shards} journals of "
            f"{peer.site}: was the peer re-made with another shard count?"
        )
    return False


async def read_inbound(js: JetStreamContext, peer: str) -> Inbound:
    name = INBOUND_STREAM
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        raise GeoError(f"no stream {name}: this site does not replicate with {peer}") from None
    newest_ms = None
    if info.state.last_seq:
        try:
            newest = await js.get_msg(name, info.state.last_seq, direct=True)
            newest_ms = _written_ms(newest.data or b"")
        except nats.js.errors.NotFoundError:
            newest_ms = None
    shards = [
        ShardInbound(
            shard=int(source.name.removeprefix("META_")),
            lag=int(source.lag or 0),
            error=str(source.error.get("description") or source.error) if source.error else None,
        )
        for source in info.sources or []
    ]
    return Inbound(
        peer=peer,
        copied=info.state.messages,
        newest_ms=newest_ms,
        shards=tuple(sorted(shards, key=lambda s: s.shard)),
    )


def _written_ms(body: bytes) -> int | None:
    """When the peer's writer made the message (its envelope's HLC wall time)."""
    try:
        return Envelope.model_validate_json(body).hlc.wall_ms
    except ValueError:
        return None


async def last_copied(js: JetStreamContext, peer: str, shards: int) -> dict[int, int]:
    """Per shard, the `GEO_IN` sequence of the last message of the peer's journal copied
    here (0: none): what a geo-replicator at that position has applied entirely."""
    last: dict[int, int] = {}
    for shard in range(1, shards + 1):
        try:
            msg = await js.get_last_msg(
                INBOUND_STREAM, peer_journal_subject(peer, shard), direct=True
            )
        except nats.js.errors.NotFoundError:
            last[shard] = 0
            continue
        last[shard] = int(msg.seq or 0)
    return last


async def read_active(kv: KeyValue) -> tuple[ActiveSite | None, int]:
    """A site's `geo.active` record and its revision (0: never written)."""
    try:
        entry = await kv.get(GEO_ACTIVE_KEY)
    except nats.js.errors.KeyNotFoundError:
        return None, 0
    revision = entry.revision or 0
    if not entry.value:
        return None, revision
    try:
        return ActiveSite.model_validate_json(entry.value), revision
    except ValidationError as exc:
        log.warning("geo.active_unreadable", extra={"error": str(exc)})
        return None, revision
