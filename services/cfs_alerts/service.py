"""alerts: the guide's "Prevention" alerts, and more, as rules over what the services
publish (issue 17).

The active instance, every `every_s`:

    the nodes bucket (members, tier, replication, backup, conflicts)  +  ALERTS events
        ▼
    figures (pure)  ->  Evaluator.round (pure: pending, firing, repeated, resolved)
        ▼
    each notification: AlertRaised / AlertResolved on ALERTS, and every hook (webhook,
    command, log), delivered in tasks of their own (`hooks.Dispatcher`)
        ▼
    `alerts.state` in the nodes bucket: rules, what fires, how the hooks fare
    (`cfs admin alerts list`); a new leader starts from it, so nothing fires twice

`cfs admin alerts test RULE` (admin verb `test`, any instance) sends a test
notification of RULE through every hook and answers with what each did.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from pydantic import Field

from cfs.admin.decide import Verdict
from cfs.admin.snapshot import read_record
from cfs.bus import Bus, BusError
from cfs.bus.kv import bucket_keys
from cfs.hlc import system_wall_ms
from cfs.kernel.runtime import Context, until_jetstream_answers
from cfs.kernel.spec import CommandHandler
from cfs.lease import Lease
from cfs.service_main import ServiceSettings, run_spec
from cfs_alerts.figures import Published, TermHistory, figures
from cfs_alerts.hooks import Dispatcher, build, document
from cfs_alerts.rules import (
    DEFAULT_RULES,
    AlertState,
    Evaluator,
    Kind,
    Notification,
    Phase,
    Rule,
    RulesFile,
    load_config,
)
from cfs_contracts import ContractError
from cfs_contracts.alerts import ALERTS_STATE_KEY, AlertsState, FiringAlert, HookInfo, RuleInfo
from cfs_contracts.events.admin import AdminCommandIssued
from cfs_contracts.events.ops import AlertRaised, AlertResolved
from cfs_contracts.streams import ALERTS, LEASES, NODES, SHARD_LEASE_PREFIX

log = logging.getLogger(__name__)

TEST_WAIT_S = 30.0  # how long `alerts test` waits for the hooks


class AlertSettings(ServiceSettings):
    rules_file: Path | None = Field(
        default=None, description="rules and hooks (YAML); default: the shipped rules, no hooks"
    )
    every_s: float = Field(default=2.0, gt=0, description="evaluation period")


def configuration(settings: AlertSettings) -> RulesFile:
    return load_config(settings.rules_file or DEFAULT_RULES)


async def lead(ctx: Context) -> None:
    bus, settings = ctx.bus, ctx.settings
    config = configuration(settings)
    dispatcher = Dispatcher([build(spec) for spec in config.hooks])
    nodes = await ctx.nodes()
    kv = await until_jetstream_answers(
        f"{NODES.bucket} bucket", lambda: bus.key_value(NODES.bucket)
    )
    before = await read_record(bus, ALERTS_STATE_KEY, AlertsState)
    evaluator = Evaluator(config.rules, seeded(before, config.rules))
    events = EventWatch(bus, {r.event for r in config.rules if r.event is not None})
    await events.start()
    terms = TermHistory()
    log.info("alerts.leading", extra={"rules": len(config.rules), "hooks": len(config.hooks)})
    try:
        while True:
            now = time.time()
            terms.observe(await shard_terms(bus), now)
            published = Published(  # what the nodes view follows, and the writer terms
                site=bus.site,
                members=dict(nodes.members),
                tier=nodes.tier.get("state"),
                geo=nodes.geo.get("applied"),
                backup=nodes.backup.get("status"),
                schedule=nodes.backup.get("schedule"),
                conflicts=nodes.conflicts.get("open"),
                cluster=nodes.cluster.get("config"),
                check=nodes.checks.get("last"),
                repairs=dict(nodes.repairs),
                leader_changes=terms.counts(now),
            )
            for note in evaluator.round(figures(published, int(now * 1000)), events.take(), now):
                await _announce(bus, dispatcher, note)
            record = state_record(bus.node, config, evaluator, dispatcher)
            await kv.put(ALERTS_STATE_KEY, record.model_dump_json().encode())
            _report_hooks(ctx, dispatcher)
            await asyncio.sleep(settings.every_s)
    finally:
        await events.stop()
        await dispatcher.close()


async def shard_terms(bus: Bus) -> dict[str, int]:
    """Each metadata shard's writer term now (`meta.<shard>` in the leases bucket); a
    shard that cannot be read this round is left out (its history stays)."""
    terms = {}
    try:
        keys = await bucket_keys(bus, LEASES.bucket, SHARD_LEASE_PREFIX)
        for key in keys:
            status = await Lease.read_status(bus, key)
            if status is not None:
                terms[key.removeprefix(SHARD_LEASE_PREFIX)] = status.term
    except BusError as exc:  # the next round reads them again
        log.info("alerts.terms_unread", extra={"error": str(exc)})
    return terms


async def _announce(bus: Bus, dispatcher: Dispatcher, note: Notification) -> None:
    rule, key = note.rule, note.key
    extra = {"rule": rule.name, "key": key, "summary": note.summary, "kind": note.kind.value}
    log.info("alert.notified", extra=extra)
    dispatcher.notify(document(note, bus.site))
    payload: AlertRaised | AlertResolved
    if note.kind is Kind.RESOLVED:
        payload = AlertResolved(
            rule=rule.name,
            severity=rule.severity,
            summary=note.summary,
            dedupe_key=note.dedupe_key,
            fired_ms=int(note.since * 1000),
        )
    else:
        payload = AlertRaised(
            rule=rule.name, severity=rule.severity, summary=note.summary, dedupe_key=note.dedupe_key
        )
    await bus.publish(bus.event(payload))


def _report_hooks(ctx: Context, dispatcher: Dispatcher) -> None:
    """A hook whose last delivery failed shows in `cfs admin status` (degraded)."""
    failing = {n: e for n, e in dispatcher.last_error.items() if dispatcher.failed[n]}
    if failing:
        ctx.health.degrade("hooks", "; ".join(f"{n}: {e}" for n, e in sorted(failing.items())))
    else:
        ctx.health.recover("hooks")


def seeded(before: AlertsState | None, rules: list[Rule]) -> dict[tuple[str, str], AlertState]:
    """The firing alerts a previous leader published, so they are not sent again."""
    known = {r.name for r in rules}
    if before is None:
        return {}
    return {
        (a.rule, a.key): AlertState(
            a.rule,
            a.key,
            Phase.FIRING,
            since=a.since_ms / 1000,
            last_seen=time.time(),
            notified=a.notified_ms / 1000,
            value=a.value,
        )
        for a in before.firing
        if a.rule in known
    }


def state_record(
    node: str, config: RulesFile, evaluator: Evaluator, dispatcher: Dispatcher
) -> AlertsState:
    by_name = {r.name: r for r in config.rules}
    firing = [
        FiringAlert(
            rule=s.rule,
            key=s.key,
            severity=by_name[s.rule].severity.value,
            summary=by_name[s.rule].describe(s.key, s.value),
            since_ms=int(s.since * 1000),
            notified_ms=int(s.notified * 1000),
            value=s.value,
        )
        for s in sorted(evaluator.firing(), key=lambda s: (s.since, s.rule, s.key))
    ]
    return AlertsState(
        node=node,
        updated_ms=system_wall_ms(),
        rules=tuple(
            RuleInfo(name=r.name, severity=r.severity.value, watches=watches(r))
            for r in config.rules
        ),
        firing=tuple(firing),
        hooks=tuple(
            HookInfo(
                name=h.name,
                kind=h.kind,
                delivered=dispatcher.delivered[h.name],
                failed=dispatcher.failed[h.name],
                last_error=dispatcher.last_error.get(h.name),
            )
            for h in config.hooks
        ),
    )


def watches(rule: Rule) -> str:
    held = f"for {rule.for_s:g}s" if rule.for_s else "at once"
    if rule.event is not None:
        return f"event {rule.event} (clears after {rule.clear_s:g}s quiet)"
    test = f"> {rule.above:g}" if rule.above is not None else f"< {rule.below:g}"
    return f"{rule.figure} {test} {held}"


class EventWatch:
    """The ALERTS events the event rules watch, from now on (an ordered consumer):
    `take()` gives the keys seen since the last call, per event type."""

    def __init__(self, bus: Bus, wanted: set[str]) -> None:
        self.bus = bus
        self.wanted = wanted
        self._seen: dict[str, set[str]] = {}
        self._sub: Any = None

    async def start(self) -> None:
        if self.wanted:
            self._sub = await self.bus.js.subscribe(
                f"cfs.{self.bus.site}.alerts.>",
                stream=ALERTS.name,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
                cb=self._on_event,
            )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_event(self, msg: Msg) -> None:
        try:
            decoded = self.bus.registry.decode(msg.data or b"")
        except ContractError:
            return
        kind = type(decoded.payload).__name__
        if kind in self.wanted:
            key = str(getattr(decoded.payload, "object_id", "") or decoded.envelope.node)
            self._seen.setdefault(kind, set()).add(key)

    def take(self) -> dict[str, set[str]]:
        seen, self._seen = self._seen, {}
        return seen


def test_verb(ctx: Context) -> CommandHandler:
    return test_handler(ctx.bus, configuration(ctx.settings))


def test_handler(bus: Bus, config: RulesFile) -> CommandHandler:
    """`cfs admin alerts test RULE`: one test notification through every hook."""
    rules = {r.name: r for r in config.rules}

    async def handle(cmd: AdminCommandIssued) -> Verdict:
        rule = rules.get(cmd.target)
        if rule is None:
            return Verdict("usage", f"no rule {cmd.target!r} (rules: {', '.join(sorted(rules))})")
        if not config.hooks:
            return Verdict("ok", "no hooks configured: alerts go to the ALERTS stream only")
        summary = f"TEST: {rule.describe('test', None)}"
        note = Notification(Kind.FIRED, rule, "test", None, summary, time.time())
        dispatcher = Dispatcher([build(spec) for spec in config.hooks])
        dispatcher.notify({**document(note, bus.site), "test": True, "by": cmd.actor})
        await dispatcher.close(timeout_s=TEST_WAIT_S)
        outcomes = [
            f"{h.name} failed: {dispatcher.last_error[h.name]}"
            if dispatcher.failed[h.name]
            else f"{h.name} delivered"
            if dispatcher.delivered[h.name]
            else f"{h.name} timed out"
            for h in config.hooks
        ]
        ok = all(dispatcher.delivered[h.name] for h in config.hooks)
        return Verdict("ok" if ok else "failed", f"test of {rule.name}: " + "; ".join(outcomes))

    return handle


def main(argv: list[str] | None = None) -> None:
    from cfs_alerts.spec import SPEC

    run_spec(SPEC, argv)
