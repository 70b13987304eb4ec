"""Guide scenario 3, option 2: bring a site back on its one surviving node.

JetStream has no "force new cluster", so `cfs admin raft-force-leader --shard *
--leader NODE` (for shards whose journal has no Raft leader) does it from public
APIs only, following a plan (`cfs.recovery.plan`: every step with its reason):

1. export every stream of the site (metadata journals, CLUSTER, DATA, ..., the
   `leases` and `nodes` buckets) from the survivor's copy by direct get, which
   the survivor still answers without a quorum, into a recovery directory;
2. reform the survivor's NATS server as the seed of a fresh cluster: its old
   store is moved aside (never deleted), the server restarts empty on its port,
   admitting the recovery's admin user only. Who restarts it is the runner's
   business (`cfs.recovery.runners`): the `cfs dev` supervisor, the Nomad API, or
   the operator reading the printed steps while this command waits;
3. import the export in order, so every journal keeps its sequence numbers and
   every event its id (the metadata projections on the survivor stay valid; one
   that applied more than the survivor held rebuilds itself from the journal);
   only then does the server admit the site's services again: none of them ever
   sees a half-imported stream (a lease written into an empty `KV_leases` would
   make the import refuse the bucket; a writer would lead a partial journal);
4. hand every shard's writer lease to the survivor and wait until it writes.

Operations that a quorum acknowledged but the survivor never received are lost:
that is the price the command warns about. `cfs node add` then brings new nodes
and raises the streams back to R3.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS

from cfs.bus import Bus, BusError
from cfs.fuse.config import ClientSettings
from cfs.lease import Lease, LeaseError
from cfs.recovery.plan import SYSTEM_USER, Actor, RecoveryPlan, Step, StepKind
from cfs.recovery.runners import Runner
from cfs.recovery.streams import RecoveryError, export_streams, import_streams
from cfs.security import Role, connect_options
from cfs_contracts.streams import SITE_BUCKETS, site_streams

log = logging.getLogger(__name__)

LEASE_TIMEOUT_S = 60.0
PROGRESS_EVERY_S = 5.0
_NOT_A_MEMBER = 10044  # JetStream's "server is not a member of the cluster"

Say = Callable[[str], None]


class QuorumRecoveryError(RecoveryError):
    """Recovery could not go on; the message says what to do."""


def site_stream_names(shards: int) -> list[str]:
    """Every stream a site has, buckets included (`KV_<bucket>`)."""
    return [spec.name for spec in site_streams(shards)] + [
        f"KV_{bucket.bucket}" for bucket in SITE_BUCKETS
    ]


def write_plan_files(plan: RecoveryPlan) -> None:
    """`plan.json` and the generated server configs (owner-only: the system password)."""
    plan.files_dir.mkdir(parents=True, exist_ok=True)
    for name, text in plan.files.items():
        _write_private(plan.files_dir / name, text)
    _write_private(
        plan.facts.recovery_dir / "plan.json", json.dumps(plan.document(), indent=2) + "\n"
    )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


class Recovery:
    """Walks a plan: `cfs` steps here, operator steps through the runner."""

    def __init__(
        self,
        settings: ClientSettings,
        plan: RecoveryPlan,
        runner: Runner,
        *,
        wait_s: float,
        say: Say,
    ) -> None:
        self.settings = settings
        self.plan = plan
        self.runner = runner
        self.wait_s = wait_s
        self.say = say
        self.urls: list[str] = list(settings.nats_urls)
        self.old_store: str | None = plan.old_store
        self.credentials = settings.credentials_for(Role.ADMIN)
        self.tls_ca = settings.tls_ca()
        self.exported: dict[str, Any] = {}
        self._removal_sent = False  # a removal request went unanswered (it may have applied)

    async def run(self) -> str:
        started = time.monotonic()
        facts = self.plan.facts
        write_plan_files(self.plan)
        self.say(f"quorum recovery of site {facts.site} on {facts.survivor} ({self.runner.name}):")
        self.say(f"  recovery directory: {facts.recovery_dir} (plan.json, export/, nats/)")
        total = len(self.plan.steps)
        for number, step in enumerate(self.plan.steps, 1):
            self._announce(number, total, step)
            log.info(
                "quorum.step",
                extra={
                    "site": facts.site,
                    "survivor": facts.survivor,
                    "step": step.kind.value,
                    "actor": step.actor.value,
                    "runner": self.runner.name,
                    "number": number,
                },
            )
            if step.actor is Actor.OPERATOR:
                result = await self.runner.perform(step, self.plan)
                self.urls = list(result.get("nats_urls") or self.urls)
                self.old_store = str(result.get("old_store") or self.old_store)
            else:
                await self._do(step)
        journals = {n: e for n, e in self.exported.items() if n.startswith("META_")}
        messages = sum(e.messages for e in journals.values())
        return (
            f"{len(self.exported)} streams re-seeded from {facts.survivor} ({messages} journal "
            f"messages) in {time.monotonic() - started:.1f}s; old store kept at "
            f"{self.old_store}; export in {self.plan.export_dir}"
        )

    def _announce(self, number: int, total: int, step: Step) -> None:
        self.say(f"[{number}/{total}] {step.actor.value} {step.kind.value}: {step.action}")
        self.say(f"    why: {step.reason}")
        for command in step.commands if self.runner.prints_commands else ():
            self.say(f"    $ {command}")

    async def _do(self, step: Step) -> None:
        kind = step.kind
        if kind is StepKind.EXPORT:
            await self._export()
        elif kind is StepKind.WAIT_SEED:
            await self._wait("the seed", self._seed_answers)
        elif kind is StepKind.REMOVE_WITNESS:
            await self._wait("the witness's removal", self._remove_witness)
        elif kind is StepKind.WAIT_ALONE:
            await self._wait("the witness to stop", self._alone)
        elif kind is StepKind.IMPORT:
            await self._import()
        elif kind is StepKind.WAIT_OPEN:
            await self._wait("the site's services to be admitted", self._open)
        elif kind is StepKind.HAND_LEASES:
            await self._hand_leases()
        else:
            raise QuorumRecoveryError(f"step {kind.value} is not one this command performs")

    # -- the steps ------------------------------------------------------------------------
    async def _export(self) -> None:
        names = site_stream_names(self.settings.shards)
        # the survivor first: the lost URLs refuse at once, but need not be tried at all
        urls = [self.plan.facts.url, *(u for u in self.urls if u != self.plan.facts.url)]
        self.exported = await export_streams(
            urls, names, self.plan.export_dir, credentials=self.credentials
        )
        missing = [
            name
            for name in (f"META_{shard}" for shard in self.plan.facts.shards)
            if not (name in self.exported and self.exported[name].found)
        ]
        if missing:  # nothing destructive has happened yet: stop here
            reasons = "; ".join(
                f"{n}: {self.exported[n].reason if n in self.exported else 'not read'}"
                for n in missing
            )
            raise QuorumRecoveryError(
                f"{self.plan.facts.server} holds no copy of {', '.join(missing)} ({reasons}); "
                "nothing to re-seed from, nothing was changed (an interrupted recovery's "
                "export is in its recovery directory)"
            )
        log.warning(
            "quorum.exported",
            extra={"survivor": self.plan.facts.survivor, "dir": str(self.plan.export_dir)},
        )
        self.say(
            f"    exported {sum(1 for e in self.exported.values() if e.found)} streams, "
            f"{sum(e.messages for e in self.exported.values())} messages"
        )

    async def _import(self) -> None:
        try:
            await import_streams(
                self.urls,
                self.settings.site,
                self.settings.shards,
                self.plan.export_dir,
                replicas=1,
                credentials=self.credentials,
            )
        except RecoveryError as exc:
            raise QuorumRecoveryError(
                f"{exc}; the re-seeded server still admits the admin only (services stay "
                f"out); the export is intact in {self.plan.export_dir}, the old store in "
                f"{self.old_store}"
            ) from exc
        log.warning(
            "quorum.imported",
            extra={"survivor": self.plan.facts.survivor, "streams": len(self.exported)},
        )

    async def _hand_leases(self) -> None:
        async with await Bus.connect(
            self.urls,
            site=self.settings.site,
            node="cfs-admin-recovery",
            credentials=self.credentials,
            tls_ca=self.tls_ca,
        ) as bus:
            for shard in self.plan.facts.shards:
                await _hand_lease(bus, shard, self.plan.facts.survivor, LEASE_TIMEOUT_S, self.say)
                self.say(f"    done: shard {shard} led by {self.plan.facts.survivor}")

    async def _wait(self, what: str, check: Callable[[], Awaitable[str | None]]) -> None:
        """Until `check` returns None (done); it returns why not yet. Progress lines."""
        started = time.monotonic()
        reported = started
        while True:
            why = await check()
            if why is None:
                self.say(f"    done: {what} ({time.monotonic() - started:.1f}s)")
                return
            now = time.monotonic()
            if now - started > self.wait_s:
                raise QuorumRecoveryError(
                    f"gave up waiting for {what} after {self.wait_s:.0f}s ({why}); the export "
                    f"is intact in {self.plan.export_dir}; run the remaining steps of "
                    f"{self.plan.facts.recovery_dir / 'plan.json'} or start over"
                )
            if now - reported >= PROGRESS_EVERY_S:
                reported = now
                waited = f"{now - started:.0f}s of {self.wait_s:.0f}s"
                self.say(f"    waiting for {what}: {why} ({waited})")
            await asyncio.sleep(0.5)

    async def _system(self) -> NATS:
        """A connection to the survivor as the recovery's system user."""
        nc = NATS()

        async def quiet(exc: Exception) -> None:
            log.debug("quorum.nats_error", extra={"error": str(exc)})

        await nc.connect(
            servers=[self.plan.facts.url],
            user=SYSTEM_USER,
            password=self.plan.facts.system_password,
            connect_timeout=2,
            allow_reconnect=False,
            error_cb=quiet,
            **connect_options(None, self.tls_ca),
        )
        return nc

    async def _seed_answers(self) -> str | None:
        try:
            nc = await self._system()
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            return f"{self.plan.facts.url}: {exc or type(exc).__name__}"
        try:
            info: dict[str, Any] = getattr(nc, "_server_info", {}) or {}
            if info.get("server_name") != self.plan.facts.server:
                return f"{self.plan.facts.url} is {info.get('server_name')!r}"
            if info.get("cluster") != self.plan.new_cluster:
                return f"{self.plan.facts.server} is in cluster {info.get('cluster')!r}"
            return None
        finally:
            await _close(nc)

    async def _remove_witness(self) -> str | None:
        request = json.dumps({"peer": self.plan.witness}).encode()
        try:
            nc = await self._system()
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            return str(exc) or type(exc).__name__
        try:
            reply = json.loads((await nc.request("$JS.API.SERVER.REMOVE", request, 2.0)).data)
        except (TimeoutError, nats.errors.Error, ValueError) as exc:
            self._removal_sent = True
            return f"no answer ({exc or type(exc).__name__}); no meta leader yet?"
        finally:
            await _close(nc)
        if reply.get("success"):
            return None
        error = reply.get("error") or {}
        if error.get("err_code") == _NOT_A_MEMBER and self._removal_sent:
            return None  # an earlier attempt that went unanswered removed it
        return str(error.get("description") or error)

    async def _alone(self) -> str | None:
        """None once the survivor is the only server that answers a system PING."""
        try:
            nc = await self._system()
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            return str(exc) or type(exc).__name__
        names: set[str] = set()
        try:
            inbox = nc.new_inbox()

            async def got(msg: Any) -> None:
                with contextlib.suppress(ValueError, AttributeError):
                    names.add(str(json.loads(msg.data)["server"]["name"]))

            sub = await nc.subscribe(inbox, cb=got)
            await nc.publish("$SYS.REQ.SERVER.PING", b"", reply=inbox)
            await asyncio.sleep(0.5)
            await sub.unsubscribe()
        except (TimeoutError, nats.errors.Error) as exc:
            return str(exc) or type(exc).__name__
        finally:
            await _close(nc)
        others = sorted(names - {self.plan.facts.server})
        return f"still answering: {', '.join(others)}" if others else None

    async def _open(self) -> str | None:
        """None once a non-admin key connects (services are admitted again); sites
        without per-role keys go straight on to the lease hand-over, which waits."""
        if self.settings.credentials_dir is None:
            return None
        probe = self.settings.credentials_dir / "client.nk"
        if not probe.is_file():
            return None
        nc = NATS()

        async def quiet(exc: Exception) -> None:
            log.debug("quorum.nats_error", extra={"error": str(exc)})

        try:
            await nc.connect(
                servers=[self.plan.facts.url],
                connect_timeout=2,
                allow_reconnect=False,
                error_cb=quiet,
                **connect_options(probe, self.tls_ca),
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            return f"a client key is refused ({exc or type(exc).__name__})"
        await _close(nc)
        return None


async def recover_quorum(
    settings: ClientSettings,
    plan: RecoveryPlan,
    runner: Runner,
    *,
    wait_s: float = 600.0,
    say: Say = print,
) -> str:
    """Re-form the site on the plan's survivor; returns a one-line summary."""
    return await Recovery(settings, plan, runner, wait_s=wait_s, say=say).run()


async def _hand_lease(
    bus: Bus, shard: str, survivor: str, timeout: float, say: Say | None = None
) -> None:
    """The copied lease still names a dead holder: the survivor takes it at once."""
    lease = Lease(bus, f"meta.{shard}", node="cfs-admin")
    started = time.monotonic()
    deadline = started + timeout
    reported = started
    while True:
        status = await Lease.read_status(bus, f"meta.{shard}")
        if status is not None and status.holder == survivor:
            return
        if say is not None and time.monotonic() - reported >= PROGRESS_EVERY_S:
            reported = time.monotonic()
            holder = status.holder if status is not None else "nobody"
            say(
                f"    waiting for {survivor} to take the writer lease of shard {shard} "
                f"(held by {holder or '-'}; {reported - started:.0f}s of {timeout:.0f}s)"
            )
        # Asked once: the dead holder never releases, so the survivor takes the lease
        # after the record has been silent for a lease time. Asking again rewrites the
        # record, and every rewrite starts that silence over.
        if status is None or status.handoff_to != survivor:
            try:
                await lease.request_handoff(survivor)
            except (BusError, LeaseError, nats.errors.Error) as exc:  # bucket still electing
                log.info("quorum.handoff_retry", extra={"shard": shard, "error": str(exc)})
        if time.monotonic() > deadline:
            raise QuorumRecoveryError(
                f"shard {shard}: {survivor} did not take the writer lease within "
                f"{timeout:.0f}s after the re-seed"
            )
        await asyncio.sleep(0.5)


async def _close(nc: NATS) -> None:
    with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
        await nc.close()
