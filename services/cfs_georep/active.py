"""Which site is active: the record both sites keep (`geo.active`), and automatic
failover (DESIGN.md §8).

Each site's geo-replicator, once a second (`ActiveWatch`):

    this site's record, the peer's (over the link), how long the peer is silent
        ▼
    decide_active: adopt the peer's record if it supersedes ours; take over if the
    active site is the peer and it has been unreachable for `failover_after_s`
        ▼
    put the record in this site's `nodes` bucket (compare-and-set on its revision)

The decision is pure (tested over a simulated pair of sites). Two sites cannot tell a
dead peer from a cut link, so a partition longer than `failover_after_s` moves the
active site to the standby; when the link is back the old active site adopts the
newer record. Nothing ever moves the active site back on its own: that is
`cfs admin failback`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from enum import Enum

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from cfs.bus import Bus
from cfs.geo import UNREACHABLE, peer_reachable, read_active
from cfs.hlc import system_wall_ms
from cfs_contracts.geo import GEO_ACTIVE_KEY, ActiveSite
from cfs_contracts.streams import NODES

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 2.0


class Action(Enum):
    WAIT = "wait"
    ADOPT = "adopt"  # the peer's record supersedes ours: copy it here
    PROMOTE = "promote"  # the active peer is gone: this site becomes active


@dataclass(frozen=True)
class ActiveFacts:
    me: str
    peer: str
    local: ActiveSite | None
    remote: ActiveSite | None  # the peer's record (None: none, or unreachable)
    reachable: bool
    silent_s: float  # how long the peer has not answered (0 while it answers)
    failover_after_s: float  # 0: no automatic failover


@dataclass(frozen=True)
class ActiveDecision:
    action: Action
    reason: str
    record: ActiveSite | None = None


def decide_active(f: ActiveFacts, now_ms: int, actor: str) -> ActiveDecision:
    """One decision per round; `reason` becomes the log line."""
    if f.reachable and f.remote is not None and f.remote.supersedes(f.local):
        why = f"site {f.peer} has a newer record (epoch {f.remote.epoch}): active {f.remote.site}"
        return ActiveDecision(Action.ADOPT, why, f.remote)
    if f.local is None:
        return ActiveDecision(Action.WAIT, "no active site recorded")
    if f.local.site != f.peer:
        return ActiveDecision(Action.WAIT, f"site {f.local.site} is active")
    if f.reachable:
        return ActiveDecision(Action.WAIT, f"active site {f.peer} answers")
    if f.failover_after_s <= 0:
        return ActiveDecision(Action.WAIT, f"active site {f.peer} silent; automatic failover off")
    if f.silent_s < f.failover_after_s:
        return ActiveDecision(
            Action.WAIT,
            f"active site {f.peer} silent for {f.silent_s:.0f}s "
            f"(failover after {f.failover_after_s:g}s)",
        )
    why = f"automatic failover: site {f.peer} unreachable for {f.silent_s:.0f}s"
    record = ActiveSite(
        site=f.me, epoch=f.local.epoch + 1, changed_ms=now_ms, changed_by=actor, reason=why
    )
    return ActiveDecision(Action.PROMOTE, why, record)


class ActiveWatch:
    """The I/O around `decide_active`, run by the leading geo-replicator."""

    def __init__(self, bus: Bus, peer: str, failover_after_s: float, every_s: float) -> None:
        self.bus = bus
        self.peer = peer
        self.failover_after_s = failover_after_s
        self.every_s = every_s
        self._heard = time.monotonic()  # a new leader gives the peer a full period
        self._last_reason = ""

    async def run(self) -> None:
        kv = await self.bus.key_value(NODES.bucket)
        while True:
            try:
                await self.round(kv)
            except (nats.errors.Error, TimeoutError) as exc:  # this site's bucket: next round
                log.info("geo.active_unavailable", extra={"error": str(exc) or repr(exc)})
            await asyncio.sleep(self.every_s)

    async def round(self, kv: KeyValue) -> ActiveDecision:
        local, revision = await read_active(kv)
        reachable = await peer_reachable(self.bus.nc, self.peer, PEER_TIMEOUT_S)
        remote = await self._remote() if reachable else None
        now = time.monotonic()
        if reachable:
            self._heard = now
        facts = ActiveFacts(
            me=self.bus.site,
            peer=self.peer,
            local=local,
            remote=remote,
            reachable=reachable,
            silent_s=now - self._heard,
            failover_after_s=self.failover_after_s,
        )
        decision = decide_active(facts, system_wall_ms(), f"geo-replicator@{self.bus.node}")
        if decision.record is not None:
            data = decision.record.model_dump_json().encode()
            try:
                if revision:
                    await kv.update(GEO_ACTIVE_KEY, data, last=revision)
                else:
                    await kv.create(GEO_ACTIVE_KEY, data)
            except nats.js.errors.KeyWrongLastSequenceError:
                return ActiveDecision(Action.WAIT, "record changed meanwhile; next round")
            level = logging.WARNING if decision.action is Action.PROMOTE else logging.INFO
            log.log(
                level,
                "geo.active_changed",
                extra={
                    "action": decision.action.value,
                    "active": decision.record.site,
                    "epoch": decision.record.epoch,
                    "reason": decision.reason,
                },
            )
        elif decision.reason != self._last_reason:
            log.info("geo.active", extra={"reason": decision.reason})
        self._last_reason = decision.reason
        return decision

    async def _remote(self) -> ActiveSite | None:
        try:
            remote = self.bus.nc.jetstream(domain=self.peer, timeout=PEER_TIMEOUT_S)
            kv = await remote.key_value(NODES.bucket)
            record, _ = await read_active(kv)
        except UNREACHABLE:
            return None
        return record
