"""The membership service process: SWIM over UDP, verdicts to CLUSTER and the nodes KV.

    cfs service run membership --node storage-1 [--config FILE]
    python -m cfs_membership --node storage-1

Settings come from flags, then `CFS_*` environment variables (`CFS_SWIM_HOST`,
`CFS_SWIM_PORT`, `CFS_SEEDS='["10.0.0.2:7946"]'`, `CFS_CLUSTER_TOKEN`,
`CFS_LABELS`, `CFS_PROBE_INTERVAL_S`, ...), then a config file.

One asyncio loop drives the pure `Swim` state from a timer (armed at
`Swim.next_deadline()`) and from the UDP socket. Every membership change goes to
a `RecordWriter` queue, so NATS never stalls the protocol; the writer merges it
into `member.<node>` with compare-and-set and publishes `NodeJoined`,
`NodeSuspect`, `NodeDown`, `NodeAlive` or `NodeLeft` when its write won. The
node's own record is written at start (its incarnation continues from the stored
one), after every refutation, and every `record_refresh_s` (`last_seen_ms`). On
SIGTERM the node leaves gracefully (`NodeLeft`) unless `leave_on_terminate` is off.

Each member answers `cfs.<site>.rpc.membership.<node>.view` with its current view
(`MembershipView`): what `cfs admin status` and the tests read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from cfs.bus import Bus
from cfs.kernel.runtime import Context, until_jetstream_answers
from cfs.service_main import ServiceSettings, run_spec
from cfs.telemetry import gauge
from cfs_contracts.members import Liveness, MemberRecord
from cfs_contracts.streams import NODES, site_subject
from cfs_membership.codec import Codec, CodecError
from cfs_membership.records import proposal
from cfs_membership.swim import Action, Addr, Changed, Message, Send, Swim, SwimConfig
from cfs_membership.transport import FaultyTransport, Transport, UdpTransport
from cfs_membership.writer import RecordWriter

log = logging.getLogger(__name__)

SWIM_MEMBERS = gauge(
    "swim_members", "members in this node's SWIM view by state, itself included", ("state",)
)
LOCAL_HEALTH = gauge("swim_local_health", "this node's SWIM local health multiplier (0: healthy)")

_BAD_DATAGRAM_LOG_EVERY_S = 60.0


class MembershipSettings(ServiceSettings):
    swim_host: str = Field(default="127.0.0.1", description="UDP address to bind")
    swim_port: int = Field(default=7946, ge=0, le=65535)
    advertise_host: str | None = Field(default=None, description="default: swim_host")
    seeds: list[str] = Field(default_factory=list, description="host:port of members to join")
    labels: dict[str, str] = Field(default_factory=dict, description="failure domains")
    cluster_token: SecretStr = Field(
        default=SecretStr(""), description="shared secret: HMAC key of every datagram"
    )
    probe_interval_s: float = Field(default=0.2, gt=0)
    probe_timeout_s: float = Field(default=0.08, gt=0)
    indirect_k: int = Field(default=3, ge=0)
    suspicion_min_s: float = Field(default=1.0, gt=0)
    suspicion_max_s: float = Field(default=3.0, gt=0)
    suspicion_k: int = Field(default=3, ge=0, description="confirmations that shorten to min")
    gossip_interval_s: float = Field(default=0.2, gt=0)
    gossip_fanout: int = Field(default=3, ge=1)
    gossip_lambda: int = Field(default=4, ge=1, description="retransmits = lambda*log10(n+1)")
    sync_interval_s: float = Field(default=10.0, gt=0)
    record_refresh_s: float = Field(default=5.0, gt=0, description="own last_seen_ms refresh")
    leave_on_terminate: bool = True
    leave_timeout_s: float = Field(default=2.0, ge=0)
    netem_file: Path | None = Field(default=None, description="fault-injection rules (tests)")

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, seeds: list[str]) -> list[str]:
        for seed in seeds:
            parse_addr(seed)
        return seeds

    @model_validator(mode="after")
    def _check_timing(self) -> MembershipSettings:
        self.swim_config()  # probe timeout below the interval, suspicion min <= max
        if self.swim_host in ("0.0.0.0", "::", "") and not self.advertise_host:
            raise ValueError(f"swim_host {self.swim_host!r} needs advertise_host (peers dial it)")
        return self

    def swim_config(self) -> SwimConfig:
        return SwimConfig(
            probe_interval_s=self.probe_interval_s,
            probe_timeout_s=self.probe_timeout_s,
            indirect_k=self.indirect_k,
            suspicion_min_s=self.suspicion_min_s,
            suspicion_max_s=self.suspicion_max_s,
            suspicion_k=self.suspicion_k,
            gossip_interval_s=self.gossip_interval_s,
            gossip_fanout=self.gossip_fanout,
            gossip_lambda=self.gossip_lambda,
            sync_interval_s=self.sync_interval_s,
        )


def parse_addr(text: str) -> Addr:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return (host.strip("[]"), int(port))


def view_subject(site: str, node: str) -> str:
    return site_subject(site, "rpc", "membership", node, "view")


class MemberView(BaseModel):
    node: str
    state: Liveness
    incarnation: int
    host: str
    port: int
    labels: dict[str, str] = Field(default_factory=dict)


class MembershipView(BaseModel):
    """One member's current view, as answered on `view_subject`."""

    node: str
    incarnation: int
    local_health: int = Field(description="Lifeguard multiplier; 0 = healthy")
    joined: bool
    members: list[MemberView]
    stats: dict[str, int]

    def state_of(self, node: str) -> Liveness | None:
        return next((m.state for m in self.members if m.node == node), None)


class MembershipService:
    """Runs one member: the protocol loop, the record writer, the view responder."""

    def __init__(self, settings: MembershipSettings, bus: Bus, kv: KeyValue) -> None:
        self.settings = settings
        self.node = settings.node
        self.bus = bus
        self.writer = RecordWriter(bus, kv, on_accused=self._on_accused)
        self.codec = Codec(settings.cluster_token.get_secret_value().encode())
        self.swim: Swim | None = None
        self.transport: Transport | None = None
        self.crashed = asyncio.Event()
        self.failure: BaseException | None = None
        self.dropped: dict[str, int] = {"bad_mac": 0, "malformed": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Subscription | None = None
        self._last_bad_log = -_BAD_DATAGRAM_LOG_EVERY_S

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        loop = self._loop = asyncio.get_running_loop()
        stored, _revision = await until_jetstream_answers(
            "own member record", lambda: self.writer.read(self.node)
        )
        incarnation = stored.incarnation + 1 if stored is not None else 0
        udp = await UdpTransport.open(s.swim_host, s.swim_port, self._on_datagram)
        host = s.advertise_host or udp.local_addr[0]
        swim = self.swim = Swim(
            s.swim_config(),
            node=self.node,
            host=host,
            port=udp.local_addr[1],
            labels=s.labels,
            incarnation=incarnation,
            rng=random.Random(),
            now=loop.time(),
        )
        self.transport = udp
        if s.netem_file is not None:
            self.transport = FaultyTransport(
                udp, s.netem_file, node=self.node, name_of=self._name_of
            )
        self._sub = await self.bus.nc.subscribe(
            view_subject(self.bus.site, self.node), cb=self._answer_view
        )
        self._spawn(self.writer.run(), "member-writer")
        self._submit_own()  # written last-seen after start: what "ready" means
        self._execute(swim.join([parse_addr(seed) for seed in s.seeds], loop.time()))
        self._count_states()
        self._arm()
        self._spawn(self._refresh(), "member-refresh")
        log.info(
            "membership.started",
            extra={
                "node": self.node,
                "site": self.bus.site,
                "swim": f"{host}:{udp.local_addr[1]}",
                "incarnation": incarnation,
                "seeds": s.seeds,
                "netem_file": str(s.netem_file) if s.netem_file else None,
                "token_set": bool(s.cluster_token.get_secret_value()),
            },
        )
        if not s.cluster_token.get_secret_value():
            log.warning("membership.no_cluster_token", extra={"node": self.node})

    async def stop(self, *, leave: bool) -> None:
        swim, loop = self.swim, self._loop
        if leave and swim is not None and loop is not None and self.failure is None:
            self._execute(swim.leave(loop.time()))
            self._arm()
            drained = await self.writer.drain(self.settings.leave_timeout_s)
            if not drained:
                log.warning("membership.leave_unrecorded", extra={"node": self.node})
        if self._sub is not None:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await self._sub.unsubscribe()
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()

    def view(self) -> MembershipView:
        swim = self.swim
        if swim is None:
            raise RuntimeError("membership not started")
        stats = dict(swim.stats)
        stats.update(self.dropped)
        stats["writes"] = self.writer.written
        stats["events"] = self.writer.events
        stats["backlog"] = self.writer.backlog
        if isinstance(self.transport, FaultyTransport):
            stats["netem_dropped"] = self.transport.dropped
        return MembershipView(
            node=self.node,
            incarnation=swim.incarnation,
            local_health=swim.lhm,
            joined=swim.joined,
            members=[
                MemberView(
                    node=m.node,
                    state=m.state,
                    incarnation=m.incarnation,
                    host=m.host,
                    port=m.port,
                    labels=m.labels,
                )
                for m in swim.view()
            ],
            stats=stats,
        )

    # -- the protocol loop -------------------------------------------------------------
    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        if self.swim is None or self._loop is None:
            return
        try:
            message = self.codec.decode(data)
        except CodecError as exc:
            self._count_bad(exc, addr)
            return
        self._step(lambda now: self._receive(message, addr, now))

    def _on_accused(self, stored: MemberRecord) -> None:
        swim = self.swim
        if swim is not None and not swim.leaving:
            self._step(lambda _now: swim.accused(stored.state, stored.incarnation,
                                                 stored.detected_by))  # fmt: skip

    def _receive(self, message: Message, addr: Addr, now: float) -> list[Action]:
        assert self.swim is not None
        return self.swim.receive(message, addr, now)

    def _on_timer(self) -> None:
        self._timer = None
        swim = self.swim
        if swim is not None:
            self._step(swim.tick)

    def _step(self, run: Callable[[float], list[Action]]) -> None:
        """Run one protocol step; a bug here stops the service instead of hiding."""
        assert self._loop is not None
        try:
            self._execute(run(self._loop.time()))
            self._arm()
        except Exception as exc:
            log.exception("membership.loop_failed", extra={"node": self.node})
            self._crash(exc)

    def _execute(self, actions: list[Action]) -> None:
        transport = self.transport
        for action in actions:
            if isinstance(action, Send):
                if transport is not None:
                    transport.send(self.codec.encode(action.message), action.addr)
            elif isinstance(action, Changed):
                self._on_change(action)

    def _arm(self) -> None:
        if self.swim is None or self._loop is None or self.crashed.is_set():
            return
        at = self.swim.next_deadline()
        if self._timer is not None:
            if self._timer_at == at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_change(self, change: Changed) -> None:
        own = change.node == self.node
        now_ms = _wall_ms()
        record = proposal(change, now_ms)
        if own and change.new is Liveness.ALIVE:
            record = record.model_copy(update={"last_seen_ms": now_ms})
        level = logging.DEBUG if change.new is Liveness.ALIVE and not own else logging.INFO
        what = "member.changed"
        if own:
            what = "member.leaving" if change.new is Liveness.LEFT else "member.refuted"
        log.log(
            level,
            what,
            extra={
                "node": self.node,
                "node_id": change.node,
                "from": change.old.value if change.old else None,
                "to": change.new.value,
                "incarnation": change.incarnation,
                "by": change.by,
            },
        )
        self.writer.submit(record, own=own)
        self._count_states()

    def _count_states(self) -> None:
        """The SWIM state gauges: set on every change (the view only moves then)."""
        swim = self.swim
        if swim is None:
            return
        counts = state_counts(member.state for member in swim.members.values())
        counts[Liveness.LEFT if swim.leaving else Liveness.ALIVE] += 1  # ourselves
        for state, count in counts.items():
            SWIM_MEMBERS.labels(state.value).set(count)
        LOCAL_HEALTH.set(swim.lhm)

    def _submit_own(self) -> None:
        swim = self.swim
        if swim is None or swim.leaving:
            return
        now_ms = _wall_ms()
        self.writer.submit(
            MemberRecord(
                node=self.node,
                state=Liveness.ALIVE,
                incarnation=swim.incarnation,
                host=swim.host,
                port=swim.port,
                labels=swim.labels,
                since_ms=now_ms,
                detected_by=self.node,
                last_seen_ms=now_ms,
            ),
            own=True,
        )

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.settings.record_refresh_s)
            if self.writer.backlog == 0:  # behind already: the next refresh will do
                self._submit_own()

    # -- helpers -------------------------------------------------------------------------
    async def _answer_view(self, msg: Msg) -> None:
        if msg.reply:
            with contextlib.suppress(Exception):  # the requester is gone
                await self.bus.nc.publish(msg.reply, self.view().model_dump_json().encode())

    def _name_of(self, addr: Addr) -> str | None:
        swim = self.swim
        if swim is None:
            return None
        return next((m.node for m in swim.members.values() if m.addr == addr), None)

    def _count_bad(self, exc: CodecError, addr: Addr) -> None:
        self.dropped[exc.reason] = self.dropped.get(exc.reason, 0) + 1
        now = time.monotonic()
        if now - self._last_bad_log >= _BAD_DATAGRAM_LOG_EVERY_S:
            self._last_bad_log = now
            log.warning(
                "swim.datagram_dropped",
                extra={
                    "node": self.node,
                    "from": f"{addr[0]}:{addr[1]}",
                    "reason": exc.reason,
                    "error": str(exc),
                    "dropped": dict(self.dropped),
                },
            )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=f"{name}-{self.node}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "membership.task_failed",
                extra={"node": self.node, "task": task.get_name(), "error": repr(exc)},
            )
            self._crash(exc)

    def _crash(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self.crashed.set()


def state_counts(states: Iterable[Liveness]) -> dict[Liveness, int]:
    """How many members are in each SWIM state (every state present, zeros included)."""
    counts = dict.fromkeys(Liveness, 0)
    for state in states:
        counts[state] += 1
    return counts


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def start(ctx: Context) -> None:
    """The SWIM member; a failed protocol task ends the process (`crashed`)."""
    settings: MembershipSettings = ctx.settings
    kv = await until_jetstream_answers("nodes bucket", lambda: ctx.bus.key_value(NODES.bucket))
    service = MembershipService(settings, ctx.bus, kv)
    await service.start()
    ctx.on_stop(lambda: service.stop(leave=settings.leave_on_terminate))
    ctx.spawn(_until_crashed(service), "swim")


async def _until_crashed(service: MembershipService) -> None:
    await service.crashed.wait()
    if service.failure is not None:
        raise service.failure


def main(argv: list[str] | None = None) -> None:
    from cfs_membership.spec import SPEC

    run_spec(SPEC, argv)
