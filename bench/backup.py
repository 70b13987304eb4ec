"""Backup benchmark on a local 3-node site (R3, 2 shards) archiving its journals to S3.

    python bench/backup.py [--quick] [--json PATH] [--inodes N] [--rate N]

One run, one tree. The tree (1,000,000 inodes; 100,000 with --quick: directories
of 1,000 files, spread over both shards) is built through the metadata client
with many creates in flight, and its build rate printed. The site ships its
journals to a real S3 server (moto) all along (`CFS_ARCHIVE_URL`), as a
production site would, with its backup status record written every 0.25 s.

Figures, in the order they are taken:

- `archive_catchup_s`: after the build, until every shard journal is in S3.
- `archive_lag_p50_s/p99_s/max_s`: the `backup.status` record's lag (the oldest
  journal message not yet in S3, the worst stream) sampled every 0.25 s while files
  are created at a steady rate (`--rate`, default half the build rate) for 20 s
  (60 s in the full run). Goal p99 <= 5 s.
- `raw_tar_gz_mb_s`: the baseline. One metadata-raft node's projection directories
  (`<data dir>/metadata/shard-NNN`, copied aside first: RocksDB changes files under
  a reader) written as one tar.gz with the snapshot writer's compression level (1)
  and fsync'd; MB/s of projection files read.
- `snapshot_inodes_per_s`: `cfs admin snapshot-metadata --output F --json`, inodes
  over the `seconds` the backup service measured (cut, bring its shadow projections
  to the cut from the journal, encode, write, verify); the command's wall time is
  `snapshot_command_s`. The backup service's first snapshot on this tree: its
  shadow projections followed the journals during the build (as in production), so
  the cut applies only the last moments. `snapshot_mb_s` is the file's size over the
  service's seconds. `snapshot_vs_raw` is the two rates for the same tree, inodes
  per second of the snapshot over those of the raw tar.gz (= raw seconds over
  snapshot seconds); goal >= 0.5. Then a second snapshot of the same tree
  (`snapshot_again_*`): nothing left to apply, the rest of a snapshot's cost.
- `restore_inodes_per_s`: `cfs admin restore-metadata --from-snapshot F --force`
  then `cfs admin replay-journal --none`, end to end (the restored inode count is
  checked against the manifest in between, untimed), less the snapshot of the
  replaced state that `--force` takes first (`restore_pre_snapshot_s`, reported by
  the command; a restore into a fresh cluster takes none). `restore_command_s` is
  the whole command.
- `check_inodes_per_s`: `cfs admin metadata-consistency-check --json` on the
  restored tree, end to end; null with a note when this release has no such command.

Where the time goes, measured in the same run: the snapshot's phases from the
service's progress messages (to the cut, write, verify; the command before and
after the service's part), what starting any `cfs admin` command costs
(`cli_startup_s`), and for snapshot, restore and check the CPU seconds of the
backup, metadata-raft and NATS processes and of the command, less what those
processes burn idle (measured for 5 s first, `idle_cpu_s_per_s_*`) over the
phase's wall time (`*_cpu_s_*`, and `*_inodes_per_cpu_s`): on a shared machine
wall times follow its load (the load average is recorded), CPU seconds do not.

Goals for 1,000,000 inodes: snapshot and restore each <= 60 s (>= 16,667 inodes/s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from cpu_accounting import cpu_seconds, own_cpu_seconds
from report import print_goals, write_json

from cfs.client import LeaderUnavailable, MetadataClient
from cfs.client.shard_admin import shard_admin
from cfs.logs import setup_logging
from cfs.supervisor import LocalSite, S3Server
from cfs_contracts.backup import BACKUP_STATUS_KEY, BackupStatus, progress_subject
from cfs_contracts.fs.records import ROOT_INO
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.fs.shard_admin import ShardPosition
from cfs_contracts.streams import NODES, meta_stream, shard_name

CFS = str(Path(sys.executable).parent / "cfs")
SITE = "bk"
NODES_N = 3
SHARDS = 2
ARCHIVE = "s3://cfs-bench/archive"
FILES_PER_DIR = 1000
IN_FLIGHT = 64
SAMPLE_S = 0.25
IDLE_S = 5.0  # how long the site's idle CPU is measured for
COMPRESSLEVEL = 1  # as cfs.backup.snapshot_file.write_snapshot
MB = 1024 * 1024
GOAL_INODES = 1_000_000
GOAL_S = 60.0
GOAL_LAG_P99_S = 5.0
GOAL_VS_RAW = 0.5


def admin(
    site: LocalSite, env: dict[str, str], *args: str, timeout: float = 3600.0
) -> subprocess.CompletedProcess[str]:
    """`cfs admin ARGS` as a script runs it (stdin not a terminal), S3 configured."""
    return subprocess.run(
        [CFS, "admin", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=site.cli_env(**env),
        cwd=site.base_dir,  # what a command writes to `.` (a pre-restore copy) stays there
        timeout=timeout,
        check=False,
    )


def admin_ok(site: LocalSite, env: dict[str, str], *args: str) -> str:
    done = admin(site, env, *args)
    if done.returncode != 0:
        raise RuntimeError(f"cfs admin {' '.join(args)}: exit {done.returncode}: {done.stderr}")
    return done.stdout


async def build_tree(site: LocalSite, n: int) -> dict[str, float]:
    """Root, n // FILES_PER_DIR directories and files in them: n inodes in all.

    Files are handed out round robin over the directories, so both shards work
    all the time; IN_FLIGHT creates are outstanding at once. A create that finds
    no writer within the client's deadline is counted (`build_stalls`) and sent
    again; EEXIST then means the first one was applied after all."""
    dirs = max(1, n // (FILES_PER_DIR + 1))
    files = n - 1 - dirs
    stalls = 0
    async with await site.client("bench-build") as bus:
        meta = MetadataClient(bus)
        start = time.perf_counter()
        parents = [(await meta.mkdir(ROOT_INO, f"d{d:05d}")).ino for d in range(dirs)]
        work = iter(range(files))
        tenth = max(1, files // 10)

        async def create(parent: int, name: str) -> None:
            nonlocal stalls
            for attempt in range(3):
                try:
                    await meta.create(parent, name)
                    return
                except LeaderUnavailable:
                    stalls += 1
                except FsError as exc:
                    if exc.errno == errno.EEXIST and attempt > 0:
                        return
                    raise
            raise RuntimeError(f"create {name}: no writer after three client deadlines")

        async def worker() -> None:
            for i in work:
                await create(parents[i % dirs], f"f{i // dirs}")
                if i and i % tenth == 0:
                    rate = i / (time.perf_counter() - start)
                    print(f"  build: {i} files ({rate:.0f}/s)", flush=True)

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        elapsed = time.perf_counter() - start
    return {
        "build_s": elapsed,
        "build_inodes_per_s": (dirs + files) / elapsed,
        "build_stalls": stalls,
    }


def site_cpu(site: LocalSite) -> dict[str, float]:
    """CPU seconds so far: the site's backup, metadata-raft and NATS processes, and the
    `cfs` commands this process ran (waited-for children)."""
    roles = {
        "backup": [site.service(node, "backup").pid for node in site.node_names],
        "metadata": [site.metadata(node).pid for node in site.node_names],
        "nats": [server.pid for server in site.nats_servers],
    }
    out = {role: sum(cpu_seconds(p) for p in pids if p is not None) for role, pids in roles.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["cli"] = children.ru_utime + children.ru_stime
    return out


class CpuMeter:
    """CPU per role over a phase, less what the site burns idle (heartbeats, leases,
    status records) over the phase's wall time: the phase's own work, in CPU seconds.

    `calibrate` measures the idle rate while nothing runs; `spent` reports since the
    previous `spent` (or `calibrate`) and starts the next phase."""

    def __init__(self, site: LocalSite) -> None:
        self.site = site
        self.idle: dict[str, float] = {}
        self._mark()

    def _mark(self) -> None:
        self.at = time.perf_counter()
        self.cpu = site_cpu(self.site)

    def calibrate(self, seconds: float) -> dict[str, float]:
        self._mark()
        time.sleep(seconds)
        now, cpu = time.perf_counter(), site_cpu(self.site)
        self.idle = {role: (cpu[role] - self.cpu[role]) / (now - self.at) for role in cpu}
        self.at, self.cpu = now, cpu
        return {f"idle_cpu_s_per_s_{role}": rate for role, rate in self.idle.items()}

    def spent(self, phase: str, inodes: int) -> dict[str, float]:
        before, wall = self.cpu, time.perf_counter() - self.at
        self._mark()
        out = {
            f"{phase}_cpu_s_{role}": max(
                0.0, self.cpu[role] - before[role] - self.idle.get(role, 0.0) * wall
            )
            for role in before
        }
        total = sum(out.values())
        return {**out, f"{phase}_cpu_s": total, f"{phase}_inodes_per_cpu_s": inodes / total}


async def archive_catchup(site: LocalSite, timeout: float) -> float | None:
    """Seconds until every shard journal message so far is archived (None: not in time)."""
    start = time.monotonic()
    async with await site.client("bench-catchup") as bus:
        lasts = {}
        for i in range(1, SHARDS + 1):
            name = meta_stream(shard_name(i)).name
            lasts[name] = int((await bus.js.stream_info(name)).state.last_seq)
        kv = await bus.js.key_value(NODES.bucket)
        while time.monotonic() - start < timeout:
            try:
                entry = await kv.get(BACKUP_STATUS_KEY)
            except Exception:  # not written yet
                entry = None
            if entry is not None and entry.value:
                status = BackupStatus.model_validate_json(entry.value)
                done = {a.stream: a.archived_seq for a in status.archive}
                if all(done.get(s, 0) >= last for s, last in lasts.items()):
                    return time.monotonic() - start
            await asyncio.sleep(SAMPLE_S)
    return None


async def archive_lag(site: LocalSite, rate: float, duration: float) -> dict[str, Any]:
    """Creates at `rate` per second for `duration` s; the status record sampled meanwhile.

    Each distinct record (by `updated_ms`) is one sample: the worst stream's lag."""
    lags: list[float] = []
    errors: set[str] = set()
    async with await site.client("bench-load") as bus:
        meta = MetadataClient(bus)
        parents = [(await meta.mkdir(ROOT_INO, f"load{d}")).ino for d in range(8)]
        kv = await bus.js.key_value(NODES.bucket)
        stop = asyncio.Event()

        async def sample() -> None:
            seen = 0
            while not stop.is_set():
                try:
                    entry = await kv.get(BACKUP_STATUS_KEY)
                except Exception:  # a NATS hiccup: the next sample will do
                    entry = None
                if entry is not None and entry.value:
                    status = BackupStatus.model_validate_json(entry.value)
                    if status.updated_ms != seen and status.archive:
                        seen = status.updated_ms
                        lags.append(max(a.lag_s for a in status.archive))
                        errors.update(a.error for a in status.archive if a.error)
                await asyncio.sleep(SAMPLE_S)

        sampler = asyncio.create_task(sample())
        pending: set[asyncio.Task[object]] = set()
        failed: list[str] = []

        def settled(task: asyncio.Task[object]) -> None:
            pending.discard(task)
            if not task.cancelled() and (exc := task.exception()) is not None:
                failed.append(str(exc))

        sent = 0
        start = time.monotonic()
        while (now := time.monotonic()) - start < duration:
            due = int((now - start) * rate)
            for i in range(sent, due):
                task = asyncio.create_task(meta.create(parents[i % len(parents)], f"a{i}"))
                pending.add(task)
                task.add_done_callback(settled)
            sent = max(sent, due)
            await asyncio.sleep(0.01)
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.monotonic() - start
        stop.set()
        await sampler
    if not lags:
        raise RuntimeError("no backup.status record with archive figures was written")
    lags.sort()
    return {
        "archive_load_creates_per_s": sent / elapsed,
        "archive_samples": len(lags),
        "archive_lag_p50_s": statistics.median(lags),
        "archive_lag_p99_s": lags[max(0, int(len(lags) * 0.99) - 1)],
        "archive_lag_max_s": lags[-1],
        "archive_errors": sorted(errors),
        "archive_load_failed": len(failed),
        "archive_load_first_failure": failed[0] if failed else None,
    }


def _copy_tolerant(src: str, dst: str) -> None:
    # A file compacted away meanwhile is no longer part of the store.
    with contextlib.suppress(FileNotFoundError):
        shutil.copy2(src, dst)


def raw_tar_gz(data_dir: Path, scratch: Path) -> dict[str, float]:
    """tar.gz (level 1, fsync'd) of the projection directories, as the snapshot writer."""
    copy = scratch / "projections"
    for shard in sorted((data_dir / "metadata").glob("shard-*")):
        shutil.copytree(shard, copy / shard.name, copy_function=_copy_tolerant)
    size = sum(p.stat().st_size for p in copy.rglob("*") if p.is_file())
    out = scratch / "raw.tar.gz"
    cpu = own_cpu_seconds()
    start = time.perf_counter()
    with out.open("wb") as raw:
        with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=COMPRESSLEVEL) as tar:
            for shard in sorted(copy.iterdir()):
                tar.add(shard, arcname=shard.name)
        raw.flush()
        os.fsync(raw.fileno())
    elapsed = time.perf_counter() - start
    cpu = own_cpu_seconds() - cpu
    out_size = out.stat().st_size
    out.unlink()
    shutil.rmtree(copy)
    return {
        "raw_tar_gz_s": elapsed,
        "raw_projection_mb": size / MB,
        "raw_tar_gz_file_mb": out_size / MB,
        "raw_tar_gz_mb_s": size / MB / elapsed,
        "raw_tar_gz_cpu_s": cpu,
    }


async def snapshot(site: LocalSite, env: dict[str, str], path: Path) -> dict[str, Any]:
    """The command, timed, and the service's phases from its progress messages."""
    seen: dict[str, float] = {}  # first sight of each phase (and shard done)

    async def on_progress(msg: Msg) -> None:
        update = json.loads(msg.data)
        seen.setdefault(f"{update['phase']}:{update['done']}", time.perf_counter())

    async with await site.client("bench-progress") as bus:
        sub = await bus.nc.subscribe(progress_subject(site.site, "*"), cb=on_progress)
        start = time.perf_counter()
        out = await asyncio.to_thread(
            admin_ok, site, env, "snapshot-metadata", "--output", str(path), "--json"
        )
        wall = time.perf_counter() - start
        await sub.unsubscribe()
    report = json.loads(out)
    inodes = sum(s["inodes"] for s in report["manifest"]["shards"])
    seconds = float(report["seconds"])
    results = {
        "n_inodes": inodes,
        "snapshot_s": seconds,
        "snapshot_command_s": wall,
        "snapshot_inodes_per_s": inodes / seconds,
        "snapshot_command_inodes_per_s": inodes / wall,
        "snapshot_file_mb": report["bytes"] / MB,
        "snapshot_mb_s": report["bytes"] / MB / seconds,
    }
    # marking -> every shard at the cut (journal into the shadow projection, encoded)
    # -> verifying (KV dump, tar.gz written): the rest of `seconds` is the verification.
    marked, verifying = seen.get("marking:0"), seen.get("verifying:0")
    shards_done = seen.get(f"shards:{SHARDS}")
    if marked is not None and shards_done is not None and verifying is not None:
        # the command before its request reached the service, and after the reply
        # (fetching the file in pieces and reading it back)
        results["snapshot_command_before_s"] = marked - start
        results["snapshot_command_after_s"] = wall - (marked - start) - seconds
        results["snapshot_to_cut_s"] = shards_done - marked
        results["snapshot_write_s"] = verifying - shards_done
        results["snapshot_verify_s"] = seconds - (verifying - marked)
    return results


async def restored_inodes(site: LocalSite) -> int:
    async with await site.client("bench-position") as bus:
        replies = [await shard_admin(bus, i, ShardPosition()) for i in range(1, SHARDS + 1)]
    return sum(r.inodes for r in replies)


def restore(site: LocalSite, env: dict[str, str], path: Path, inodes: int) -> dict[str, float]:
    start = time.perf_counter()
    out = admin_ok(site, env, "restore-metadata", "--from-snapshot", str(path), "--force", "--json")
    command_s = time.perf_counter() - start
    # --force on a cluster that holds data snapshots it first (the guide's procedure):
    # a snapshot, measured above; a restore into a fresh cluster has none.
    pre_s = float(json.loads(out)["pre_restore_snapshot_s"])
    restore_s = command_s - pre_s
    found = asyncio.run(restored_inodes(site))  # untimed
    if found != inodes:
        raise RuntimeError(f"restored {found} inodes, the snapshot holds {inodes}")
    start = time.perf_counter()
    admin_ok(site, env, "replay-journal", "--none")
    open_s = time.perf_counter() - start
    return {
        "restore_command_s": command_s,
        "restore_pre_snapshot_s": pre_s,
        "open_command_s": open_s,
        "restore_s": restore_s + open_s,
        "restore_inodes_per_s": inodes / (restore_s + open_s),
    }


def cli_startup(site: LocalSite, env: dict[str, str]) -> dict[str, float]:
    """What any `cfs admin` command costs before it does anything: start, import, parse."""
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    admin_ok(site, env, "snapshot-metadata", "--help")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    return {"cli_startup_s": wall, "cli_startup_cpu_s": used}


def check(site: LocalSite, env: dict[str, str], inodes: int, notes: list[str]) -> dict[str, Any]:
    """`metadata-consistency-check --json` end to end, when this release has it."""
    if admin(site, env, "metadata-consistency-check", "--help").returncode != 0:
        notes.append(
            "check_inodes_per_s: `cfs admin metadata-consistency-check` does not exist in "
            "this release; not measured"
        )
        return {"check_s": None, "check_inodes_per_s": None}
    start = time.perf_counter()
    done = admin(site, env, "metadata-consistency-check", "--json")
    elapsed = time.perf_counter() - start
    results: dict[str, Any] = {"check_exit": done.returncode}
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {}
    findings = report.get("findings") if isinstance(report, dict) else None
    if isinstance(findings, list):
        results["check_findings"] = len(findings)
    if done.returncode not in (0, 1):  # could not check: no figure
        notes.append(
            f"metadata-consistency-check exited {done.returncode}: "
            f"{done.stderr.strip()[-300:] or done.stdout.strip()[-300:]}"
        )
        return {**results, "check_s": None, "check_inodes_per_s": None}
    if done.returncode == 1:
        first = findings[0].get("line") if findings and isinstance(findings[0], dict) else None
        notes.append(f"metadata-consistency-check found problems in the restored tree: {first}")
    return {**results, "check_s": elapsed, "check_inodes_per_s": inodes / elapsed}


def keep_logs(site: LocalSite) -> None:
    """A copy of the site's logs outside the run's temporary directory, to read later."""
    kept = Path(tempfile.mkdtemp(prefix="cfs-bench-backup-logs-"))
    shutil.copytree(site.base_dir / "logs", kept, dirs_exist_ok=True)
    print(f"site logs kept in {kept}", file=sys.stderr, flush=True)


async def start_site(site: LocalSite) -> None:
    await site.start()
    await site.wait_ready()


def run(quick: bool, inodes: int | None, rate: float | None) -> dict[str, Any]:
    n = inodes or (100_000 if quick else GOAL_INODES)
    load_s = 20.0 if quick else 60.0
    notes: list[str] = []
    results: dict[str, Any] = {"shards": SHARDS, "nodes": NODES_N}
    began = time.perf_counter()
    results["loadavg_start"] = os.getloadavg()[0]  # other work on the machine slows all this
    with tempfile.TemporaryDirectory(prefix="cfs-bench-backup-") as tmp:
        base = Path(tmp)
        s3 = S3Server(base / "s3")
        site: LocalSite | None = None
        try:
            s3.start()
            env = s3.settings_env(s3.write_credentials(base / "s3.ini"))
            site = LocalSite(
                base / "site",
                nodes=NODES_N,
                shards=SHARDS,
                site=SITE,
                env={**env, "CFS_ARCHIVE_URL": ARCHIVE, "CFS_STATUS_S": str(SAMPLE_S)},
            )
            asyncio.run(start_site(site))
            results.update(asyncio.run(build_tree(site, n)))
            print(
                f"built {n} inodes in {results['build_s']:.1f} s "
                f"({results['build_inodes_per_s']:.0f} inodes/s)",
                flush=True,
            )
            catchup = asyncio.run(archive_catchup(site, timeout=600.0))
            results["archive_catchup_s"] = catchup
            if catchup is None:
                notes.append("the archive had not caught up with the build after 600 s")
            if results["build_stalls"]:
                notes.append(
                    f"{results['build_stalls']} creates of the build found no writer within "
                    "the client's deadline (30 s) and were sent again"
                )
            load = rate or results["build_inodes_per_s"] / 2
            results.update(asyncio.run(archive_lag(site, load, load_s)))
            if results["archive_load_failed"]:
                notes.append(
                    f"{results['archive_load_failed']} creates of the archive load failed: "
                    f"{results['archive_load_first_failure']}"
                )
            results.update(raw_tar_gz(site.data_dir(site.node_names[0]), base))
            path = base / "metadata.tar.gz"
            results.update(cli_startup(site, env))
            meter = CpuMeter(site)
            results.update(meter.calibrate(IDLE_S))
            results.update(asyncio.run(snapshot(site, env, path)))
            inodes = results["n_inodes"]
            results.update(meter.spent("snapshot", inodes))
            results["snapshot_vs_raw"] = results["raw_tar_gz_s"] / results["snapshot_s"]
            results["snapshot_vs_raw_cpu"] = results["raw_tar_gz_cpu_s"] / results["snapshot_cpu_s"]
            # Again on the same tree, nothing written in between: the cost of a snapshot
            # without the journal to apply.
            try:
                again = asyncio.run(snapshot(site, env, base / "again.tar.gz"))
            except RuntimeError as exc:  # the figure is missing; the run goes on
                notes.append(f"the second snapshot failed: {exc}")
                keep_logs(site)
                again = {}
            for key in ("s", "inodes_per_s", "to_cut_s", "write_s", "verify_s"):
                results[f"snapshot_again_{key}"] = again.get(f"snapshot_{key}")
            results.update(meter.spent("snapshot_again", inodes))
            results.update(restore(site, env, path, inodes))
            results.update(meter.spent("restore", inodes))
            results.update(check(site, env, inodes, notes))
            if results["check_s"] is not None:
                results.update(meter.spent("check", inodes))
        except BaseException:
            if site is not None:
                keep_logs(site)
            raise
        finally:
            if site is not None:
                site.stop()
            s3.stop()
    results["wall_s"] = time.perf_counter() - began
    results["loadavg_end"] = os.getloadavg()[0]
    results["notes"] = notes
    return results


def fmt_s(seconds: float | None) -> str:
    return "not measured" if seconds is None else f"{seconds:.1f} s"


def main() -> None:
    # Only errors are worth a line each; the figures are printed below.
    setup_logging(os.environ.get("CFS_LOG_LEVEL", "ERROR"), service="bench")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 inodes, 20 s of load")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--inodes", type=int, help="tree size (default 1,000,000; quick 100,000)")
    parser.add_argument(
        "--rate", type=float, help="creates/s of the archive load (default: half the build rate)"
    )
    args = parser.parse_args()
    results = run(args.quick, args.inodes, args.rate)
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:32s} {value:12.3f}")
        elif isinstance(value, int):
            print(f"{key:32s} {value:12d}")
        elif value is None:
            print(f"{key:32s} {'-':>12s}")
    per_s = GOAL_INODES / GOAL_S
    goals = {
        f"snapshot_inodes_per_s >= {per_s:.0f}": results["snapshot_inodes_per_s"] >= per_s,
        f"snapshot_command_inodes_per_s >= {per_s:.0f}": (
            results["snapshot_command_inodes_per_s"] >= per_s
        ),
        f"restore_inodes_per_s >= {per_s:.0f}": results["restore_inodes_per_s"] >= per_s,
        f"archive_lag_p99_s <= {GOAL_LAG_P99_S:g}": results["archive_lag_p99_s"] <= GOAL_LAG_P99_S,
        f"snapshot_vs_raw >= {GOAL_VS_RAW:g}": results["snapshot_vs_raw"] >= GOAL_VS_RAW,
    }
    print_goals(goals)
    print(
        f"{results['n_inodes']} inodes: snapshot {results['snapshot_s']:.1f} s "
        f"({results['snapshot_command_s']:.1f} s for the command; "
        f"{fmt_s(results['snapshot_again_s'])} again), restore and open "
        f"{results['restore_s']:.1f} s, check {fmt_s(results['check_s'])}"
        + f"; raw tar.gz of {results['raw_projection_mb']:.0f} MB of projection files "
        f"{results['raw_tar_gz_s']:.1f} s"
    )
    for phase in ("snapshot", "snapshot_again", "restore", "check"):
        if f"{phase}_cpu_s" in results and results.get(f"{phase}_s") is not None:
            roles = ", ".join(
                f"{role} {results[f'{phase}_cpu_s_{role}']:.1f}"
                for role in ("backup", "metadata", "nats", "cli")
            )
            print(
                f"{phase} CPU {results[f'{phase}_cpu_s']:.1f} s ({roles}): "
                f"{results[f'{phase}_inodes_per_cpu_s']:.0f} inodes per CPU second"
            )
    print(
        f"load average {results['loadavg_start']:.1f} at the start, "
        f"{results['loadavg_end']:.1f} at the end, on {os.cpu_count()} CPUs"
    )
    for note in results["notes"]:
        print(f"note: {note}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
