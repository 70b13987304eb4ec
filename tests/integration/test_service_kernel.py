"""The service kernel on real processes: a failing background task never goes unnoticed,
a killed singleton holder is replaced within a lease time and its work resumed, and
every service's NATS permissions are exactly what its spec declares."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats.js.errors
import pytest

from cfs.bus import Bus, ensure_buckets, ensure_streams
from cfs.kernel import registry
from cfs.lease import Lease
from cfs.security import (
    Identity,
    Role,
    common_publish,
    permissions,
    render_auth_conf,
    roles,
    spec_subjects,
    subject_matches,
)
from cfs.supervisor import ManagedProcess, NatsCluster, NatsServer
from cfs_contracts.members import ServiceHealth, health_key
from cfs_contracts.streams import CLUSTER, HEALTH, SITE_BUCKETS, service_lease_key
from tests.integration.metadata_harness import MetaSite
from tests.integration.procs.counter_service import CURSOR
from tests.integration.test_metadata import _run_load_through, _verify_replicas

ROOT = Path(__file__).resolve().parents[2]
SITE = "t"
LEASE_S, RENEW_S = 2.0, 0.4  # the counter spec's


# -- a metadata writer's commit loop fails ------------------------------------------------
@pytest.fixture
async def meta(tmp_path: Path, nats_cluster3: NatsCluster) -> AsyncIterator[MetaSite]:
    site = MetaSite(tmp_path / "meta", nats_cluster3)
    await site.provision()
    site.start_all()
    try:
        await site.wait_ready()
        yield site
    finally:
        site.stop_all()


@pytest.mark.expected_logs(
    "fault.raise", "service.task_crashed", "metadata-raft.failed", "leader.lost"
)
async def test_a_commit_loop_failure_ends_the_writer_and_another_replica_serves(
    meta: MetaSite,
) -> None:
    writer = await meta.writer()
    crashed = meta.nodes[writer]
    crashed_at = 0.0

    async def fault() -> None:
        nonlocal crashed_at
        meta.crash_file.write_text("commit_loop")  # the writer's next batch raises
        await _until("the writer's exit", lambda: _exited(crashed), timeout=10)
        crashed_at = time.monotonic()

    loads, _ = await _run_load_through(meta, fault)
    resumed = min(t for w in loads for t in w.ack_times if t > crashed_at) - crashed_at
    print(f"writes resumed {resumed:.2f}s after the writer's commit loop failed")
    assert crashed.returncode == 1, "the process exits with an error, not silently"
    log = crashed.log_tail(200)
    assert "service.task_crashed" in log and "InjectedFault" in log, crashed.log_tail(20)
    assert await meta.writer() != writer
    # At most one lease time (0.8 s) for the lease to lapse (a crash that unwinds
    # releases it at once), plus the new writer's catch-up and fence and the client's
    # retry backoff.
    assert resumed < 0.8 + 1.0, f"writes resumed only after {resumed:.2f}s"
    restarted_at = crashed.log_path.stat().st_size
    assert meta.restart_dead() == [writer]  # what systemd or Nomad does
    await meta.wait_ready()
    await _until("the restarted replica caught up", lambda: _caught_up(crashed, restarted_at))
    await _verify_replicas(meta)  # nothing acknowledged lost; every replica = the journal


async def _exited(proc: ManagedProcess) -> bool:
    return not proc.running


async def _caught_up(proc: ManagedProcess, offset: int) -> bool:
    with proc.log_path.open("rb") as log:
        log.seek(offset)
        return b"follower.caught_up" in log.read()


# -- a site singleton's holder is killed ----------------------------------------------------
@pytest.fixture
def counters(tmp_path: Path, nats_server: NatsServer) -> Iterator[dict[str, ManagedProcess]]:
    procs = {
        node: ManagedProcess(
            f"counter@{node}",
            [sys.executable, "-m", "tests.integration.procs.counter_service"],
            log_path=tmp_path / f"{node}.log",
            env={
                "CFS_NODE": node,
                "CFS_SITE": SITE,
                "CFS_NATS_URLS": json.dumps([nats_server.url]),
                "CFS_FAIL_FILE": str(tmp_path / "fail-now"),
                "PYTHONPATH": str(ROOT),
            },
            cwd=ROOT,
        )
        for node in ("n1", "n2", "n3")
    }
    try:
        yield procs
    finally:
        _stop(procs)


def _stop(procs: dict[str, ManagedProcess]) -> None:
    """Before reading what they counted: the stream ends only when counting does."""
    for proc in procs.values():
        if proc.running:
            proc.stop(timeout=10)


async def _provision(url: str) -> Bus:
    bus = await Bus.connect([url], site=SITE, node="test")
    await ensure_streams(bus.js, [CLUSTER], site=SITE, replicas=1)
    await ensure_buckets(bus.js, SITE_BUCKETS, replicas=1)
    return bus


async def _cursor(bus: Bus) -> int:
    kv = await bus.key_value("nodes")
    try:
        return int(json.loads((await kv.get(CURSOR)).value or b"{}")["next"])
    except nats.js.errors.KeyNotFoundError:
        return 1


async def _until(what: str, check, timeout: float = 30.0) -> float:
    """Seconds until `await check()` is true; fails after `timeout`."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _holder(bus: Bus) -> str:
    status = await Lease.read_status(bus, service_lease_key("counter"))
    return status.holder if status is not None else ""


async def _items(bus: Bus) -> list[tuple[int, str]]:
    """Every counted item as (n, node), in stream order."""
    found = []
    sub = await bus.js.subscribe(f"cfs.{SITE}.cluster.counter", ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)  # the wait of an empty stream
            except TimeoutError:
                return found
            body = json.loads(msg.data)
            found.append((body["n"], body["by"]))
            if msg.metadata.num_pending == 0:  # the last item there is
                return found
    finally:
        await sub.unsubscribe()


async def _health(bus: Bus, node: str) -> ServiceHealth | None:
    kv = await bus.key_value(HEALTH.bucket)
    try:
        entry = await kv.get(health_key(node, "counter"))
    except nats.js.errors.KeyNotFoundError:
        return None
    return ServiceHealth.model_validate_json(entry.value or b"")


@pytest.mark.expected_logs("retry.*")
async def test_a_killed_singleton_holder_is_replaced_within_lease_plus_renew_and_resumed(
    nats_server: NatsServer, counters: dict[str, ManagedProcess]
) -> None:
    async with await _provision(nats_server.url) as bus:
        for proc in counters.values():
            proc.start()
        await _until("counting", lambda: _bigger(bus, 20))
        holder = await _holder(bus)
        health = {node: await _health(bus, node) for node in counters}
        assert [h.singleton for h in health.values() if h].count("holding") == 1, health
        assert health[holder] is not None and health[holder].singleton == "holding"

        counters[holder].kill9()
        killed_at = await _cursor(bus)
        took = await _until("a new holder", lambda: _other_holder(bus, holder))
        print(f"singleton taken over {took:.2f}s after the holder's kill -9")
        assert took <= LEASE_S + RENEW_S + 0.5, f"hand-over took {took:.2f}s"
        await _until("counting again", lambda: _bigger(bus, killed_at + 20))
        _stop(counters)
        items = await _items(bus)
    numbers = [n for n, _ in items]
    assert numbers == list(range(1, len(numbers) + 1)), "every item exactly once, in order"
    by = [node for _, node in items]
    assert holder in by and len(set(by)) >= 2


async def _bigger(bus: Bus, n: int) -> bool:
    return await _cursor(bus) > n


async def _other_holder(bus: Bus, old: str) -> bool:
    return (await _holder(bus)) not in ("", old)


@pytest.mark.expected_logs("service.task_crashed", "counter.failed")
async def test_failing_singleton_work_ends_the_process_and_the_work_moves(
    tmp_path: Path, nats_server: NatsServer, counters: dict[str, ManagedProcess]
) -> None:
    async with await _provision(nats_server.url) as bus:
        for proc in counters.values():
            proc.start()
        await _until("counting", lambda: _bigger(bus, 10))
        holder = await _holder(bus)
        (tmp_path / "fail-now").write_text("")  # the holder's next step raises
        assert counters[holder].wait(timeout=10) == 1
        log = counters[holder].log_tail(100)
        assert "service.task_crashed" in log and "injected failure" in log, log
        failed_at = await _cursor(bus)
        await _until("counting again", lambda: _bigger(bus, failed_at + 10))
        assert await _holder(bus) != holder
        _stop(counters)
        items = await _items(bus)
    numbers = [n for n, _ in items]
    assert numbers == list(range(1, len(numbers) + 1))


# -- declarations and what is derived from them ---------------------------------------------
def test_every_service_package_is_announced_and_every_list_is_derived() -> None:
    specs = registry.specs()
    packages = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "spec.py").exists())
    assert sorted(s.package for s in specs) == packages, "a services/ package has no entry point"
    assert roles() == [Role.ADMIN, Role.CLIENT, *(s.role for s in specs)]
    from typer.testing import CliRunner

    from cfs.cli.main import app

    listed = CliRunner().invoke(app, ["service", "list"]).output.split("\n")
    assert [line.split("\t")[0] for line in listed if line] == [s.name for s in specs]
    from cfs.supervisor.site import LocalSite

    site = LocalSite(ROOT / ".never-started", nodes=1)
    single = sorted(s.name for s in specs if not s.needs_peer)
    assert sorted(site.node_processes("storage-1")) == single
    linked = LocalSite(ROOT / ".never-started", nodes=1, leaf_auth=("u", "p"))
    assert sorted(linked.node_processes("storage-1")) == sorted(s.name for s in specs)


def test_deployment_files_name_only_known_services() -> None:
    known = set(registry.service_names())
    for path in [*(ROOT / "deploy").rglob("*.yaml"), *(ROOT / "deploy").rglob("*.hcl")]:
        named = set(re.findall(r"service\W+run\W+([a-z][a-z0-9-]*)", path.read_text()))
        assert named <= known, f"{path} runs unknown services {named - known}"


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: s.name)
def test_a_services_permissions_are_exactly_its_declared_subjects(spec) -> None:
    shards = 3
    node = "n1" if spec.per_node else None  # a per-node service's key is one node's
    conf = render_auth_conf([(Identity(spec.role, node), "UKEY")], SITE, shards)
    allowed = json.loads(re.search(r"publish: \{ allow: (\[.*\]) \}", conf).group(1))
    subscribe = json.loads(re.search(r"subscribe: \{ allow: (\[.*\]) \}", conf).group(1))
    declared_pub, declared_sub = spec_subjects(spec, SITE, shards, node)
    everyone = set(common_publish(SITE))
    assert set(allowed) == everyone | set(declared_pub), "nothing more, nothing less"
    inbox = f"_INBOX.{spec.role}.n1.>" if spec.per_node else f"_INBOX.{spec.role}.>"
    assert set(subscribe) == {inbox, *declared_sub}
    assert not any("{" in subject for subject in [*allowed, *subscribe]), "all bound"
    if spec.per_node:  # nothing of another node's: its health record, its subjects
        assert f"$KV.health.n1.{spec.name}" in allowed
        other_node = {s.replace(".n1.", ".n2.").replace(".n1", ".n2") for s in allowed}
        assert not any(subject_matches(p, x) for p in allowed for x in other_node - set(allowed))
    mine = permissions(spec.role, SITE, shards, node)
    for other in registry.specs():
        theirs, _ = spec_subjects(other, SITE, shards, "n2" if other.per_node else None)
        for subject in set(theirs) - set(declared_pub) - everyone:
            concrete = subject.replace("*", "x").replace(">", "x")
            if not any(_covers(pattern, concrete) for pattern in declared_pub):
                assert not mine.may_publish(concrete), f"{spec.role} may publish {concrete}"


def _covers(pattern: str, subject: str) -> bool:
    return subject_matches(pattern, subject)


# -- a degradable task fails: the service goes on, visibly ----------------------------------
@pytest.mark.expected_logs("task.failed", "service.degraded")
async def test_a_failed_degradable_task_shows_in_admin_status(nats_server: NatsServer) -> None:
    from cfs.admin.report import service_lines
    from cfs.admin.snapshot import read_node_facts
    from cfs.kernel.runtime import Context, OnFailure, run
    from cfs.kernel.spec import ServiceSpec
    from cfs.service_main import ServiceSettings

    async def broken_scrub() -> None:
        raise OSError("disk read failed")

    async def start(ctx: Context) -> None:
        ctx.spawn(broken_scrub(), "scrub", on_failure=OnFailure.DEGRADE)

    spec = ServiceSpec(
        name="toy",
        role="toy",
        package="tests",
        description="a service whose scrub fails",
        settings=lambda: ServiceSettings,
        start=start,
    )
    settings = ServiceSettings(node="n1", site=SITE, nats_urls=[nats_server.url])
    stop = asyncio.Event()
    async with await _provision(nats_server.url) as bus:
        service = asyncio.create_task(run(spec, settings, stop))

        async def degraded() -> bool:
            assert not service.done(), service
            lines = service_lines(await read_node_facts(bus))
            return any("DEGRADED (scrub: OSError: disk read failed)" in line for line in lines)

        await _until("the degraded service in status", degraded, timeout=15)
        stop.set()
        await asyncio.wait_for(service, 10)  # stops cleanly: degraded is not crashed
        assert (await read_node_facts(bus)).health == (), "a clean stop removes the record"


# -- singleton work that loses the bus is started again, not crashed ------------------------
@pytest.mark.expected_logs("service.degraded", "retry.*")
async def test_singleton_work_failing_on_the_bus_restarts_visibly_and_recovers(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node loss times out a request of the site singleton (CI saw the backup service
    crash on one in scenario 2); the work is started again, degraded meanwhile."""
    from cfs.admin.report import service_lines
    from cfs.admin.snapshot import read_node_facts
    from cfs.kernel import runtime
    from cfs.kernel.runtime import Context, run
    from cfs.kernel.spec import ServiceSpec, Singleton
    from cfs.service_main import ServiceSettings

    monkeypatch.setattr(runtime, "WORK_STABLE_S", 1.5)
    attempts: list[float] = []

    async def work(ctx: Context) -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            async with asyncio.TaskGroup() as tasks:  # fails as a group, as `lead` does
                tasks.create_task(asyncio.sleep(3600))
                raise nats.errors.TimeoutError
        await asyncio.sleep(3600)

    async def start(ctx: Context) -> None:
        return None

    spec = ServiceSpec(
        name="toy",
        role="toy",
        package="tests",
        description="a singleton whose first request times out",
        settings=lambda: ServiceSettings,
        start=start,
        singleton=Singleton(work=work, eligible=lambda ctx: True),
    )
    settings = ServiceSettings(node="n1", site=SITE, nats_urls=[nats_server.url])
    stop = asyncio.Event()
    async with await _provision(nats_server.url) as bus:
        service = asyncio.create_task(run(spec, settings, stop))

        async def lines() -> list[str]:
            assert not service.done(), service
            return service_lines(await read_node_facts(bus))

        async def degraded() -> bool:
            return any("restarting after TimeoutError" in line for line in await lines())

        async def recovered() -> bool:
            return len(attempts) == 2 and not any("DEGRADED" in x for x in await lines())

        await _until("the restarting work in status", degraded, timeout=15)
        await _until("the work healthy again", recovered, timeout=15)
        assert len(attempts) == 2, "started once more, not in a loop"
        stop.set()
        await asyncio.wait_for(service, 10)
