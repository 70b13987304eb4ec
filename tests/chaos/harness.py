"""One chaos run: a schedule's faults against a `cfs dev` site under the workload.

The faults are real: `kill -9`, SIGSTOP/SIGCONT and SIGTERM of the site's processes
(found by pid in `cfs dev status`), and `cfs dev kill`/`start` for a whole node. The
supervisor restarts a service that died unasked (as systemd or Nomad would); a NATS
server or node that was killed comes back with `cfs dev start` when its fault heals.
After the last fault: every node started, the site whole again (`cfs admin status`),
`metadata-consistency-check` clean, the workload's model verified, every process
running. Each run's figures go to `CFS_CHAOS_RESULTS` (when set) for `make chaos`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cfs.supervisor.s3proxy import S3FaultProxy
from cfs_membership.transport import NetemRule, write_rules
from tests.chaos.disks import NodeDisks
from tests.chaos.netcut import NetCut, Ports
from tests.chaos.schedule import NATS, Fault, Kind, Schedule, replay_command
from tests.chaos.workload import Ledger, Via, WorkloadProcess, verify
from tests.scenarios.conftest import NODE_LOSS_LOGS, DevSite, wait_for

RESULTS_ENV = "CFS_CHAOS_RESULTS"
# A workload still in one operation this long after it was told to stop is stuck
# (the library gives an operation 180 s before it calls it failed).
WORKLOAD_FINISH_S = 240.0
# The workloads: through the mount in the seed's directory, through the client library
# beside it.
VIAS: tuple[tuple[Via, str], ...] = (("mount", ""), ("library", "-lib"))

# What the site logs while the faults hit it: what it logs when a node is lost, and
# (a NATS server that led a journal SIGSTOP'd for 30 s, then resumed: it answers with
# its old last sequence before it learns it was deposed) a replica and the backup's
# shadow that find the journal shorter than what they applied and rebuild from it,
# the designed answer to a re-seed, logged loud (seen in `make chaos`, single seed 1
# on 6 nodes; nothing was lost, the checker clean). A node partitioned away from the
# others: their verdicts on it, and its own on them, written late once the cut heals,
# which the accused refute (`member.accused`).
# S3 failing: the tierer says so (and the store's retries give up; a compaction pass
# stops, the next one tries again); with a node down too, a chunk may not be readable
# for the flush until it is back (retried). A service (re)started while its NATS
# server was partitioned away waits for its first view.
# A new writer whose fence meets a journal shorter than what it applied (the stream's
# old leader, back from a partition, answering before it learns it was deposed) steps
# down and tries again (seen in `make chaos`, single seed 14 on 6 nodes: a partition,
# then a node killed; nothing lost, the checker clean).
CHAOS_LOGS = (
    *NODE_LOSS_LOGS,
    "projection.rebuilt",
    "shadow.rebuilt",
    "member.accused",
    "tier.s3_failing",
    "tier.compact_failed",
    "tier.backfill_failed",
    "tier.chunk_unreadable",
    "retry.*",
    "nodes.initial_view_slow",
    "leader.fence_failed",
)


@dataclass
class Outcome:
    schedule: str
    seed: int
    nodes: int
    faults: list[str]
    acknowledged: int
    failed_ops: list[str]
    lost: list[str]
    corrupt: list[str]
    unexpected: list[str]
    longest_stall_s: float
    longest_op: str
    checker_clean: bool
    tier_drained: bool = True  # everything queued for S3 flushed once it was back
    # chunks of acknowledged files that no client had queued for S3, found by the
    # tierer's backfill pass at the end (-1: the pass failed; then the tier is not
    # known to hold everything, and the run is not safe)
    tier_backfilled: int = 0
    stuck: list[str] = field(default_factory=list)
    replay: str = ""

    @property
    def safe(self) -> bool:
        """Nothing acknowledged lost or corrupt, the checker clean, the S3 tier caught
        up, nothing stuck."""
        return not (self.lost or self.corrupt or self.unexpected or self.stuck) and (
            self.checker_clean and self.tier_drained and self.tier_backfilled >= 0
        )

    def summary(self) -> str:
        return (
            f"{self.schedule} seed {self.seed} ({self.nodes} nodes): "
            f"{self.acknowledged} ops acknowledged, {len(self.failed_ops)} failed, "
            f"{len(self.lost)} lost, {len(self.corrupt)} corrupt, "
            f"{len(self.unexpected)} unexpected, longest stall {self.longest_stall_s:.2f}s "
            f"({self.longest_op}); checker {'clean' if self.checker_clean else 'NOT clean'}"
            + ("" if self.tier_drained else "; S3 tier NOT drained")
            + (
                f"; backfilled {self.tier_backfilled} chunks no client had queued"
                if self.tier_backfilled
                else ""
            )
            + (f"; stuck: {', '.join(self.stuck)}" if self.stuck else "")
            + f"; faults: {'; '.join(self.faults) or 'none'}; replay: {self.replay}"
        )


def _pid(site: DevSite, node: str, process: str) -> int:
    status = site.json("dev", "status")
    entry = status["nodes"][node]
    if process == NATS:
        pid = (entry.get("nats") or {}).get("pid")
    else:
        pid = entry["services"].get(process, {}).get("pid")
    if not pid:
        raise AssertionError(f"{process} on {node} is not running: {entry}")
    return int(pid)


@dataclass
class ChaosSite:
    """A dev site with what the faults need beyond its processes: every chunk-store
    on a disk of its own (`disks`), the S3 server behind a fault proxy (`s3`)."""

    site: DevSite
    nodes: list[str]
    disks: NodeDisks
    s3: S3FaultProxy


def _ports(entry: dict[str, Any]) -> Ports:
    """What a node of `cfs dev status` listens on: NATS client and route, SWIM."""
    nats = entry.get("nats") or {}
    tcp = [urlparse(url).port for url in (nats.get("url"), nats.get("route_url")) if url]
    return Ports(frozenset(p for p in tcp if p), frozenset([int(entry["swim_port"])]))


class Injector:
    """Applies and heals one fault (blocking; one thread per fault)."""

    def __init__(self, chaos: ChaosSite) -> None:
        self.chaos = chaos
        self.site = chaos.site

    def apply(self, fault: Fault) -> None:
        site, node = self.site, fault.node
        if fault.kind is Kind.KILL_NODE:
            site.ok("dev", "kill", node)
            time.sleep(fault.hold_s)
            site.ok("dev", "start", node)
        elif fault.kind is Kind.KILL_NATS:
            os.kill(_pid(site, node, NATS), signal.SIGKILL)
            time.sleep(fault.hold_s)
            site.ok("dev", "start", node)
        elif fault.kind is Kind.KILL_SERVICE:
            os.kill(_pid(site, node, fault.process), signal.SIGKILL)
            time.sleep(fault.hold_s)  # the supervisor restarts it meanwhile
        elif fault.kind is Kind.STOP_PROCESS:
            pid = _pid(site, node, fault.process)
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(fault.hold_s)
            finally:
                os.kill(pid, signal.SIGCONT)
        elif fault.kind is Kind.SWIM_CUT:
            # The dev site's membership processes follow one rules file (re-read live).
            netem = Path(site.json("dev", "status")["state_dir"]) / "netem.json"
            write_rules(netem, [NetemRule(src=node, dst="*", loss=1.0),
                                NetemRule(src="*", dst=node, loss=1.0)])  # fmt: skip
            try:
                time.sleep(fault.hold_s)
            finally:
                write_rules(netem, [])
        elif fault.kind is Kind.RESTART_NATS:
            pid = _pid(site, node, NATS)
            os.kill(pid, signal.SIGTERM)
            wait_for(f"nats of {node} to exit", lambda: not _alive(pid), timeout=60)
            time.sleep(min(fault.hold_s, 1.0))
            site.ok("dev", "start", node)
        elif fault.kind is Kind.DISK_FULL:
            self.chaos.disks.fill(node)
            try:
                time.sleep(fault.hold_s)
            finally:
                self.chaos.disks.drain(node)
        elif fault.kind is Kind.PARTITION:
            self._partition(fault)
        elif fault.kind is Kind.S3_FAIL:
            mode, _, status = fault.how.partition("-")
            s3 = self.chaos.s3
            s3.set_fault(mode, status=int(status or 503), delay_s=60.0)  # slow: past deadlines
            try:
                time.sleep(fault.hold_s)
            finally:
                s3.set_fault("pass")

    def _partition(self, fault: Fault) -> None:
        nodes = self.site.json("dev", "status")["nodes"]
        entry = nodes[fault.node]
        pids = [int(p["pid"]) for p in entry["services"].values() if p.get("pid")]
        if (entry.get("nats") or {}).get("pid"):
            pids.append(int(entry["nats"]["pid"]))
        outside = Ports()
        for name, other in nodes.items():
            if name != fault.node:
                outside = outside | _ports(other)
        cut = NetCut(fault.node)
        try:
            cut.cut(pids, _ports(entry), outside)
            print(f"[chaos] {time.strftime('%T')} partition {fault.node}: cut", flush=True)
            time.sleep(fault.hold_s)
        finally:
            cut.heal()


def _alive(pid: int) -> bool:
    """Running (a zombie the supervisor has not reaped yet has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def nats_nodes(site: DevSite) -> list[str]:
    """The nodes that run a NATS server (a dev site runs three at most)."""
    return sorted(n for n, entry in site.json("dev", "status")["nodes"].items() if entry["nats"])


def _site_whole(site: DevSite, nodes: list[str]) -> bool:
    result = site.cfs("admin", "status")
    return result.returncode == 0 and all(f'Node "{n}" is UP' in result.stdout for n in nodes)


def _stuck(site: DevSite) -> list[str]:
    """Processes of the site that are not running (or not answering `dev status`)."""
    status = site.json("dev", "status")
    down = []
    for node, entry in status["nodes"].items():
        if entry.get("nats") and not entry["nats"]["running"]:
            down.append(f"nats@{node}")
        down += [f"{name}@{node}" for name, p in entry["services"].items() if not p["running"]]
    return down


def _backfill(site: DevSite) -> int:
    """`s3-backfill`: every chunk a file names that is neither queued nor in S3 is
    queued, so the drain that follows leaves the whole tree in S3. How many it found
    (-1: the pass did not run)."""
    result = site.cfs("admin", "s3-backfill", "--json", timeout=300)
    if result.returncode != 0 or not result.stdout.strip():
        return -1
    return int(json.loads(result.stdout)["queued"])


def _tier_drained(site: DevSite) -> bool:
    """S3 reachable again and every chunk queued for it flushed."""
    result = site.cfs("admin", "s3-queue-status", "--json")
    if result.returncode not in (0, 1) or not result.stdout.strip():
        return False
    state = json.loads(result.stdout)
    return bool(state["s3"]["reachable"]) and int(state["queue_entries"]) == 0


def _start_what_stopped(site: DevSite, nodes: list[str]) -> None:
    """`cfs dev start` for each node with a process down, or all of them when `dev
    status` does not answer (a start of a node that runs whole changes nothing, and
    costs a CLI process: after most faults every node already runs again)."""
    try:
        status = site.json("dev", "status")["nodes"]
    except (AssertionError, ValueError, KeyError):
        status = {}
    for node in nodes:
        entry = status.get(node)
        whole = entry is not None and all(
            process["running"]
            for process in [
                *entry["services"].values(),
                *([entry["nats"]] if entry.get("nats") else []),
            ]
        )
        if not whole:
            site.cfs("dev", "start", node)


def _finish(workloads: list[WorkloadProcess]) -> list[Ledger]:
    """Every workload stopped (one stuck in an operation killed), then their ledgers;
    the first that could not give one fails the run, after all have stopped."""
    for workload in workloads:
        workload.stop()
    ledgers: list[Ledger] = []
    failures: list[AssertionError] = []
    for workload in workloads:
        try:
            ledgers.append(workload.finish(timeout=WORKLOAD_FINISH_S))
        except AssertionError as exc:
            failures.append(exc)
    if failures:
        raise failures[0]
    return ledgers


def run(chaos: ChaosSite, schedule: Schedule, root: Path, *, replay: str = "") -> Outcome:
    """The workloads (one through the mount in `root`, one through the client library
    beside it) under `schedule` on the site, healed and verified; `replay`: the command
    that runs it again (default: `make chaos` for this seed)."""
    site, nodes = chaos.site, chaos.nodes
    config = site.state / "cluster.json"
    logs = site.tmp / "workloads"
    logs.mkdir(exist_ok=True)
    workloads = [
        WorkloadProcess(via, root.with_name(root.name + suffix), config, schedule.seed,
                        logs / f"{via}-{schedule.name}-{schedule.seed}.log")
        for via, suffix in VIAS
    ]  # fmt: skip
    injector = Injector(chaos)
    errors: list[BaseException] = []

    def inject(fault: Fault) -> None:
        print(f"[chaos] {time.strftime('%T')} {fault.describe()}: applied", flush=True)
        try:
            injector.apply(fault)
        except BaseException as exc:  # re-raised below, after the heal
            errors.append(exc)
        print(f"[chaos] {time.strftime('%T')} {fault.kind.value}: healed", flush=True)

    for workload in workloads:
        workload.start()
    started = time.monotonic()
    threads = []
    ledgers: list[Ledger] = []
    try:
        for fault in schedule.faults:
            time.sleep(max(0.0, started + fault.at_s - time.monotonic()))
            thread = threading.Thread(target=inject, args=(fault,), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(timeout=120)
        time.sleep(2.0)  # the workloads go on a moment on the healed site
    finally:
        try:
            ledgers = _finish(workloads)
        finally:
            _start_what_stopped(site, nodes)  # whatever happened, every node runs again
    if errors:
        raise errors[0]
    for workload, ledger in zip(workloads, ledgers, strict=True):
        if ledger.crash is not None:
            raise AssertionError(f"the {workload.via} workload itself failed: {ledger.crash}")
    wait_for("every node UP again", lambda: _site_whole(site, nodes), timeout=120, every=1.0)
    backfilled = _backfill(site)
    try:
        wait_for("the S3 tier drained", lambda: _tier_drained(site), timeout=180, every=2.0)
        tier_drained = True
    except AssertionError:
        tier_drained = False
    check = None
    for _ in range(30):  # repair may still be rewriting what a fault left degraded
        check = site.cfs("admin", "metadata-consistency-check", "--json", timeout=120)
        if check.returncode == 0:
            break
        time.sleep(2.0)
    runs = [
        (w.via, ledger, verify(ledger, w.root))
        for w, ledger in zip(workloads, ledgers, strict=True)
    ]
    slowest = max(runs, key=lambda run: run[1].longest_s)
    outcome = Outcome(
        schedule=schedule.name,
        seed=schedule.seed,
        nodes=len(nodes),
        faults=[f.describe() for f in schedule.faults],
        acknowledged=sum(verdict.acknowledged for _, _, verdict in runs),
        failed_ops=[
            f"{via}: {f.op} {f.path}: {f.message}"
            for via, ledger, _ in runs
            for f in ledger.failures
        ],
        lost=[f"{via}: {p}" for via, _, verdict in runs for p in verdict.lost],
        corrupt=[f"{via}: {p}" for via, _, verdict in runs for p in verdict.corrupt],
        unexpected=[f"{via}: {p}" for via, _, verdict in runs for p in verdict.unexpected],
        longest_stall_s=slowest[1].longest_s,
        longest_op=f"{slowest[0]}: {slowest[1].longest_op}",
        checker_clean=check is not None and check.returncode == 0,
        tier_drained=tier_drained,
        tier_backfilled=backfilled,
        stuck=_stuck(site),
        replay=replay or replay_command(schedule, len(nodes)),
    )
    record(outcome)
    print("\n[chaos] " + outcome.summary())
    return outcome


def record(outcome: Outcome) -> None:
    directory = os.environ.get(RESULTS_ENV)
    if not directory:
        return
    path = Path(directory) / f"{outcome.schedule}-{outcome.nodes}n-{outcome.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = asdict(outcome)
    path.write_text(json.dumps(data))
