"""Reading what admin commands decide on: the nodes KV, the shard list, SWIM views.

Every read has a short deadline: `cfs admin status` must answer within seconds
even when JetStream has lost quorum, and then falls back to asking the
membership processes over core NATS (which needs no quorum).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from pydantic import BaseModel, ValidationError

from cfs.admin.decide import NodeFacts
from cfs.admin.report import Replica, ShardView
from cfs.bus import Bus, BusError
from cfs.bus.kv import bucket_keys
from cfs.lease import LeaseRecord
from cfs_contracts.backup import BACKUP_STATUS_KEY, BackupStatus
from cfs_contracts.data import StoreRecord
from cfs_contracts.members import Liveness, MemberRecord, NodeAdmin, ServiceHealth
from cfs_contracts.streams import HEALTH, LEASES, NODES, meta_stream, site_subject

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

_MODELS: dict[str, type[BaseModel]] = {
    "member": MemberRecord,
    "admin": NodeAdmin,
    "store": StoreRecord,
}
_META_STREAM = re.compile(r"^META_([0-9]{3})$")
TRANSPORT_ERRORS = (nats.errors.Error, TimeoutError, BusError, OSError)


class SnapshotUnavailable(Exception):
    """JetStream did not answer in time (quorum lost, or servers restarting)."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def read_record(bus: Bus, key: str, model: type[M], timeout: float = 2.0) -> M | None:
    """One record of the `nodes` bucket; None when there is none or it is unreadable."""
    try:
        async with asyncio.timeout(timeout):
            kv = await bus.key_value(NODES.bucket)
            entry = await kv.get(key)
    except (*TRANSPORT_ERRORS, nats.js.errors.KeyNotFoundError):
        return None
    return _parsed(key, entry.value, model) if entry.value else None


async def read_backup_status(bus: Bus, timeout: float = 2.0) -> BackupStatus | None:
    """The active backup service's last report."""
    return await read_record(bus, BACKUP_STATUS_KEY, BackupStatus, timeout)


async def read_node_facts(bus: Bus, timeout: float = 3.0) -> NodeFacts:
    """Every `member.*`, `admin.*` and `store.*` record and every service's health
    record; SnapshotUnavailable on timeout."""
    tables: dict[str, dict[str, Any]] = {kind: {} for kind in _MODELS}
    health: list[ServiceHealth] = []
    try:
        async with asyncio.timeout(timeout):
            for key, value in await _bucket_values(bus, NODES.bucket, _held_in_facts):
                kind, _, node = key.partition(".")
                record = _parsed(key, value, _MODELS[kind])
                if record is not None:
                    tables[kind][node] = record
            for key, value in await _bucket_values(bus, HEALTH.bucket):
                report = _parsed(key, value, ServiceHealth)
                if report is not None:
                    health.append(report)
    except TRANSPORT_ERRORS as exc:
        raise SnapshotUnavailable(f"nodes or health KV unreadable: {_why(exc)}") from None
    return NodeFacts(
        members=tables["member"],
        admin=tables["admin"],
        stores=tables["store"],
        now_ms=now_ms(),
        health=tuple(health),
    )


async def _bucket_values(
    bus: Bus, bucket: str, wanted: Callable[[str], bool] = lambda _: True
) -> list[tuple[str, bytes]]:
    """(key, value) of every `wanted` key of `bucket` holding a value."""
    kv = await bus.key_value(bucket)
    values = []
    for key in filter(wanted, await bucket_keys(bus, bucket)):
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue  # deleted between keys() and get()
        if entry.value:
            values.append((key, entry.value))
    return values


def _held_in_facts(key: str) -> bool:
    """Member, lifecycle and store records (not repair jobs, configs and the rest)."""
    return key.partition(".")[0] in _MODELS


def _parsed(key: str, value: bytes, model: type[M]) -> M | None:
    """The record, or None (logged) when it does not parse."""
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        log.warning("admin.bad_record", extra={"key": key, "error": str(exc)})
        return None


async def discover_shards(bus: Bus, fallback: int, timeout: float = 2.0) -> list[str]:
    """Shard names from the `META_*` streams that exist; `fallback` (001..N) if JetStream
    cannot list them (quorum lost)."""
    request = json.dumps({"subject": f"cfs.{bus.site}.meta.>"}).encode()
    try:
        msg = await bus.nc.request("$JS.API.STREAM.NAMES", request, timeout=timeout)
        body = json.loads(msg.data or b"{}")
    except (nats.errors.Error, TimeoutError, ValueError) as exc:
        log.info("admin.shards_unlisted", extra={"error": _why(exc), "fallback": fallback})
        return [f"{i:03d}" for i in range(1, fallback + 1)]
    if "error" in body:
        log.info("admin.shards_unlisted", extra={"error": str(body["error"])})
        return [f"{i:03d}" for i in range(1, fallback + 1)]
    names = body.get("streams") or []
    return sorted(m.group(1) for n in names if (m := _META_STREAM.match(str(n))))


def membership_view_subject(site: str, node: str) -> str:
    """Answered by each membership process (`cfs_membership.service.view_subject`)."""
    return site_subject(site, "rpc", "membership", node, "view")


async def facts_from_membership(
    bus: Bus, candidates: Iterable[str], timeout: float = 2.0
) -> tuple[NodeFacts, list[str]]:
    """SWIM's own view over core NATS: (facts, nodes that answered). Used when the nodes
    KV is unreadable. Every member's view lists all members, so one live node is enough;
    a node's word about itself wins over others' word about it."""
    names = sorted({c for c in candidates if c})

    async def ask(node: str) -> dict[str, Any] | None:
        try:
            msg = await bus.nc.request(
                membership_view_subject(bus.site, node), b"", timeout=timeout
            )
            data = json.loads(msg.data)
        except (nats.errors.Error, TimeoutError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    answers = await asyncio.gather(*(ask(n) for n in names))
    members: dict[str, MemberRecord] = {}
    answered: list[str] = []
    for view in answers:
        if view is None:
            continue
        reporter = str(view.get("node", ""))
        answered.append(reporter)
        for m in view.get("members") or []:
            try:
                record = MemberRecord(
                    node=str(m["node"]),
                    state=Liveness(m["state"]),
                    incarnation=int(m.get("incarnation", 0)),
                    host=str(m.get("host", "")),
                    port=int(m.get("port", 1)) or 1,
                    labels=dict(m.get("labels") or {}),
                    since_ms=0,  # a view has no ages
                    detected_by=reporter,
                )
            except (KeyError, ValueError, ValidationError):
                continue
            if record.node not in members or record.node == reporter:
                members[record.node] = record
        if reporter:
            members.setdefault(
                reporter,
                MemberRecord(
                    node=reporter,
                    state=Liveness.ALIVE,
                    incarnation=0,
                    host="",
                    port=1,
                    since_ms=0,
                    detected_by=reporter,
                ),
            )
    return NodeFacts(members=members, now_ms=now_ms()), sorted(answered)


def connected_server_name(bus: Bus) -> str | None:
    """The NATS server we are connected to; a site names its servers after its nodes."""
    info: dict[str, Any] = getattr(bus.nc, "_server_info", {}) or {}
    name = info.get("server_name")
    return str(name) if name else None


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
        return "timed out (JetStream quorum lost?)"
    return str(exc) or type(exc).__name__


async def shard_view(bus: Bus, shard: str, timeout: float = 2.5) -> ShardView:
    """Both layers of one shard, each read under its own deadline (DESIGN.md §4)."""
    stream = meta_stream(shard).name
    problems: list[str] = []
    leader: str | None = None
    replicas: tuple[Replica, ...] = ()
    last_seq = 0
    try:
        async with asyncio.timeout(timeout):
            info = await bus.js.stream_info(stream)
        last_seq = int(info.state.last_seq)
        if info.cluster is not None:
            leader = info.cluster.leader
            replicas = tuple(
                Replica(r.name or "?", bool(r.current), int(r.lag or 0), float(r.active or 0) / 1e9)
                for r in info.cluster.replicas or ()
            )
    except nats.js.errors.NotFoundError:
        problems.append(f"stream {stream} does not exist")
    except TRANSPORT_ERRORS:
        problems.append(f"stream {stream}: no Raft leader answered (quorum lost?)")
    record: LeaseRecord | None = None
    try:
        async with asyncio.timeout(timeout):
            kv = await bus.key_value(LEASES.bucket)
            entry = await kv.get(f"meta.{shard}")
        record = LeaseRecord.model_validate_json(entry.value or b"")
    except nats.js.errors.KeyNotFoundError:
        problems.append("the writer lease was never taken")
    except ValidationError as exc:
        problems.append(f"unreadable lease record: {exc.errors()[0]['msg']}")
    except TRANSPORT_ERRORS:
        problems.append("lease bucket unreachable")
    if record is not None and not record.holder:
        problems.append("no writer holds the lease")
    wall = now_ms()
    return ShardView(
        shard=shard,
        writer=record.holder or None if record else None,
        term=record.term if record else 0,
        elected_ago_s=(wall - record.acquired_ms) / 1000 if record else None,
        renewed_ago_s=(wall - record.renewed_ms) / 1000 if record else None,
        lease_s=record.lease_s if record else None,
        handoff_to=record.handoff_to if record else None,
        stream=stream,
        stream_leader=leader,
        replicas=replicas,
        last_seq=last_seq,
        problems=tuple(problems),
    )
