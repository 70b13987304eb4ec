"""Which chunk-store nodes may take new fragments: a live view of the nodes KV.

Placement needs alive, active (not draining or removed) nodes with room
(DESIGN.md §5): `member.<node>` (SWIM's verdict), `admin.<node>` (the
operator's lifecycle state) and `store.<node>` (capacity, refreshed by the
chunk-store) must all agree. A missing member or admin record does not
exclude a node (a site may run without membership); a stale store record
does. A node that just failed a request is avoided for a short while so one
dead node does not slow every write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import nats.errors
from nats.js.kv import KeyValue
from pydantic import ValidationError

from cfs.bus import Bus
from cfs.bus.kv import delivered_so_far
from cfs.kernel.runtime import cancel_and_wait
from cfs.liveness import NodeFacts
from cfs.placement import Candidate
from cfs.retry import Backoff, RetryPolicy, any_bus_error
from cfs_contracts.backup import BackupStatus, SnapshotSchedule
from cfs_contracts.data import StoreRecord
from cfs_contracts.fs.check import CheckStatus
from cfs_contracts.geo import ActiveSite, GeoApplied, OpenConflicts
from cfs_contracts.members import ClusterConfig, MemberRecord, NodeAdmin, RepairJob
from cfs_contracts.streams import NODES
from cfs_contracts.tier import TierConfig, TierMode, TierState

log = logging.getLogger(__name__)

RECONNECT_CHECK_S = 0.5  # how soon a reconnect restarts the watch
WATCH_CALL_S = 5.0  # starting or stopping a watch: past this the connection is dead to us


_TABLES: dict[str, tuple[str, type[Any] | dict[str, type[Any]]]] = {
    "store": ("records", StoreRecord),
    "member": ("members", MemberRecord),
    "admin": ("admin", NodeAdmin),
    "cluster": ("cluster", ClusterConfig),  # one key: cluster.config
    "tier": ("tier", {"config": TierConfig, "state": TierState}),  # tier.config, tier.state
    "geo": ("geo", {"active": ActiveSite, "applied": GeoApplied}),  # two sites
    "backup": ("backup", {"status": BackupStatus, "schedule": SnapshotSchedule}),
    "conflicts": ("conflicts", {"open": OpenConflicts}),
    "repair": ("repairs", RepairJob),  # repair.<node>
    "check": ("checks", {"last": CheckStatus}),  # check.last
}


def _model(kind: str, name: str) -> type[Any] | None:
    model = _TABLES[kind][1]
    return model.get(name) if isinstance(model, dict) else model


class NodeView:
    def __init__(
        self,
        bus: Bus,
        *,
        stale_after_s: float = 10.0,
        avoid_for_s: float = 10.0,
        domain_label: str = "rack",
    ) -> None:
        self.bus = bus
        self.stale_after_s = stale_after_s
        self.avoid_for_s = avoid_for_s
        self.domain_label = domain_label
        self.records: dict[str, StoreRecord] = {}
        self.members: dict[str, MemberRecord] = {}
        self.admin: dict[str, NodeAdmin] = {}
        self.cluster: dict[str, ClusterConfig] = {}
        self.tier: dict[str, Any] = {}  # "config": TierConfig, "state": TierState
        self.geo: dict[str, Any] = {}  # "active": ActiveSite, "applied": GeoApplied
        self.backup: dict[str, Any] = {}  # "status": BackupStatus, "schedule": ...
        self.conflicts: dict[str, Any] = {}  # "open": OpenConflicts
        self.repairs: dict[str, RepairJob] = {}
        self.checks: dict[str, Any] = {}  # "last": CheckStatus
        self._avoid_until: dict[str, float] = {}
        self.versions: dict[str, int] = dict.fromkeys(_TABLES, 0)  # changes seen, per kind
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._last_entry = time.monotonic()

    async def start(self, timeout: float = 10.0) -> None:
        self._task = asyncio.create_task(self._watch_loop())
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            log.warning("nodes.initial_view_slow", extra={"timeout_s": timeout})

    async def stop(self) -> None:
        await self._stop_watch()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch_loop(self) -> None:
        """One watch per connection. After a reconnect the bucket may be another copy
        (a quorum-loss re-seed imports the survivor's): an ordered consumer resumed
        past its end would deliver nothing until new records outnumber the lost ones,
        so the watch starts over and the view is rebuilt from every current value."""
        backoff = Backoff(RetryPolicy("nodes watch", temporary=any_bus_error, deadline_s=None))
        while True:
            reconnects = self.bus.nc.stats["reconnects"]
            try:  # bounded: a request on a connection gone quiet (a partition) waits on
                async with asyncio.timeout(WATCH_CALL_S):
                    kv = await self.bus.key_value(NODES.bucket)
                    self._watcher = await kv.watch(">")
            except Exception as exc:
                if not any_bus_error(exc):
                    raise
                await backoff.wait(exc)
                continue
            backoff.reset()
            self._last_entry = time.monotonic()
            follow = asyncio.create_task(self._follow(self._watcher))
            while (
                not follow.done()
                and self.bus.nc.stats["reconnects"] == reconnects
                and not self._silent()
            ):
                await asyncio.wait([follow], timeout=RECONNECT_CHECK_S)
            if follow.done() and not follow.cancelled() and follow.exception() is not None:
                log.info("nodes.watch_restart", extra={"error": repr(follow.exception())})
            elif self._silent():
                log.info(
                    "nodes.watch_restart", extra={"error": "silent", "after_s": self.stale_after_s}
                )
            await cancel_and_wait(follow)
            await self._stop_watch()

    def _silent(self) -> bool:
        """Stores are known, yet no record came for longer than a store takes to
        refresh its own: the watch is dead while the connection stayed up. (nats-py
        re-creates an ordered consumer that misses its heartbeats, but a re-creation
        that fails, as it does while the bucket's stream has no quorum, ends that
        check for good, silently.) Start the watch over."""
        return bool(self.records) and time.monotonic() - self._last_entry > self.stale_after_s

    async def _stop_watch(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            with contextlib.suppress(nats.errors.Error, TimeoutError):  # connection gone
                async with asyncio.timeout(WATCH_CALL_S):
                    await watcher.stop()  # type: ignore[no-untyped-call]

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        """Apply the watch's entries; the initial values go to fresh tables, swapped in
        at once when complete (records deleted while no watch ran disappear too).
        Complete is as many entries as the watch's consumer had delivered when nats-py
        marked the end (`delivered_so_far`): its marker can come before them."""
        fresh: dict[str, dict[str, Any]] | None = {kind: {} for kind in _TABLES}
        arrived, owed = 0, None
        async for entry in watcher:
            self._last_entry = time.monotonic()
            if entry is None:
                if fresh is not None:
                    owed = await delivered_so_far(watcher)
            else:
                arrived += 1
                self._apply(entry, fresh)
            if fresh is not None and owed is not None and arrived >= owed:
                for kind, (attribute, _) in _TABLES.items():
                    setattr(self, attribute, fresh[kind])
                    self.versions[kind] += 1
                fresh = None
                self._notify()
                self._ready.set()

    def _apply(self, entry: KeyValue.Entry, fresh: dict[str, dict[str, Any]] | None) -> None:
        kind, _, node = entry.key.partition(".")
        if kind not in _TABLES or (model := _model(kind, node)) is None:
            return  # e.g. the alerts service's state record
        attribute = _TABLES[kind][0]
        table: dict[str, Any] = fresh[kind] if fresh is not None else getattr(self, attribute)
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            table.pop(node, None)
        else:
            try:
                table[node] = model.model_validate_json(entry.value)
            except ValidationError as exc:
                log.error("nodes.bad_record", extra={"key": entry.key, "error": str(exc)})
                return
        if fresh is None:
            self.versions[kind] += 1
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def version(self) -> dict[str, int]:
        """A snapshot of the change counters, for `wait_changed`."""
        return dict(self.versions)

    async def wait_changed(
        self, seen: dict[str, int], *, timeout: float, kinds: tuple[str, ...] = tuple(_TABLES)
    ) -> bool:
        """Until a record of one of `kinds` changed since `seen` (True) or `timeout`
        seconds passed (False): a watch, not a poll."""
        try:
            async with asyncio.timeout(timeout):
                while all(self.versions[k] == seen.get(k, 0) for k in kinds):
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    @property
    def ec_default(self) -> str:
        """The erasure code `cfs cluster init` chose (auto when not initialized so)."""
        config = self.cluster.get("config")
        return config.ec if config is not None else "auto"

    @property
    def tier_config(self) -> TierConfig | None:
        """The data tier, when one is configured (`cfs admin tier-config`)."""
        config = self.tier.get("config")
        return config if isinstance(config, TierConfig) and config.enabled else None

    @property
    def tier_state(self) -> TierState | None:
        state = self.tier.get("state")
        return state if isinstance(state, TierState) and state.mode is not TierMode.OFF else None

    def facts(self) -> NodeFacts:
        """The view now, in the vocabulary every reader shares (`cfs.liveness`)."""
        return NodeFacts(
            members=self.members,
            admin=self.admin,
            stores=self.records,
            now_ms=int(time.time() * 1000),
            store_fresh_ms=int(self.stale_after_s * 1000),
        )

    def usable(self, node: str) -> bool:
        return self.facts().usable(node)

    def live_nodes(self) -> list[str]:
        return self.facts().live_nodes()

    def active(self, node: str) -> bool:
        return self.facts().active(node)

    def in_service(self, node: str) -> bool:
        return self.facts().in_service(node)

    def avoid(self, node: str) -> None:
        self._avoid_until[node] = time.monotonic() + self.avoid_for_s

    def eligible(self, needed_bytes: int, *, avoiding: bool = True) -> list[Candidate]:
        """Nodes that may take `needed_bytes` now; `avoiding=False` counts the nodes that
        just failed a request too (a preference, not a verdict: they may be back)."""
        facts = self.facts()
        mono = time.monotonic()
        return [
            Candidate(
                node=rec.node,
                domain=rec.labels.get(self.domain_label, rec.node),
                free_bytes=rec.free_bytes,
                labels=rec.labels,
            )
            for rec in self.records.values()
            if not rec.draining
            and facts.usable(rec.node)
            and facts.store_fresh(rec.node)
            and rec.free_bytes >= needed_bytes
            and (not avoiding or self._avoid_until.get(rec.node, 0.0) < mono)
        ]

    def out_of_room(self, needed_bytes: int) -> bool:
        """Every node that could take data is up and lacks room: the site is full (ENOSPC),
        as opposed to no node answering (a wait, then EIO)."""
        facts = self.facts()
        up = [
            rec
            for rec in self.records.values()
            if not rec.draining and facts.usable(rec.node) and facts.store_fresh(rec.node)
        ]
        return bool(up) and all(rec.free_bytes < needed_bytes for rec in up)

    def unavailable(self) -> str:
        """One line naming why no node takes data, for the EIO an application gets."""
        facts = self.facts()
        if not self.records:
            return "no chunk-store has ever reported to this site"
        states = []
        for node in sorted(self.records):
            rec = self.records[node]
            if rec.draining or not facts.active(node):
                state = "draining or removed"
            elif not facts.usable(node):
                state = "down (membership)"
            elif not facts.store_fresh(node):
                state = "not reporting"
            elif self._avoid_until.get(node, 0.0) >= time.monotonic():
                state = "not answering"
            else:
                state = "up"
            states.append(f"{node} {state}")
        return "no chunk-store node takes data: " + ", ".join(states)
