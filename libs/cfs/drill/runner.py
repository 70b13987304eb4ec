"""The drill's runner: executes `plan.decide`'s steps against the live site and a
temporary local site, and always tears down what it started.

The temporary site is what `cfs dev up` runs (`DevCluster`: its own NATS server, S3
server and credentials, every service of the live site's node names, so the chunk
placements the snapshot records name its nodes) in a fresh directory. Its services
get its own settings, never the live site's; the drill reaches the live site only
with the operator's admin credentials and only reads from it (the snapshots it asks
for are the backup service's and the tierer's usual work, written to the live S3).

Interruption (Ctrl-C, SIGTERM) cancels the running step; the rest are skipped,
teardown runs, and the report is still produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cfs.admin.client import record_action
from cfs.backup.snapshot_file import Snapshot, SnapshotInvalid, read_snapshot
from cfs.bus import Bus, BusError
from cfs.cli.errors import CliError
from cfs.client.files import FileStore
from cfs.client.metadata import MetadataClient
from cfs.drill.plan import SPECS, DrillReport, Status, Step, StepResult, build_report, decide
from cfs.drill.sample import FileFacts, SampleTally, Verdict, choose, classify
from cfs.drill.smoke import SmokeFailure, posix_smoke
from cfs.faults import InjectedFault, fault_point
from cfs.fuse.config import ClientSettings, is_fuse_mount
from cfs.objstore import S3Settings, S3Url, open_store, s3_settings
from cfs.security import Role
from cfs.supervisor.devcluster import DevCluster
from cfs.supervisor.process import ManagedProcess, live_processes, log_event
from cfs.supervisor.topology import NodeSpec, Topology
from cfs_contracts.fs.records import ROOT_INO, Inode, Kind
from cfs_contracts.fs.rpc import FsError
from cfs_contracts.tier import TierSnapshot, blob_object_key

log = logging.getLogger(__name__)
T = TypeVar("T")

DRILL_TIER_URL = "s3://cfs-drill-tier/data"  # in the temporary site's own S3 server
READ_BYTES = 4 * 1024 * 1024
MOUNT_WAIT_S = 60.0


async def _blocking(fn: Callable[..., T], *args: Any) -> T:
    """`fn` in a thread, always to its end: a Ctrl-C while it starts processes waits
    for it, so the teardown that follows sees (and stops) everything it started."""
    running = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await running
        raise


class StepFailed(Exception):
    """A step's checks found a problem: its one-line reason."""


@dataclass
class DrillOptions:
    sample: int = 100
    seed: int = 0
    s3_output: str | None = None  # where s3-snapshot writes its manifest (live S3)
    work_dir: Path | None = None  # parent of the drill's temporary directory
    site_timeout_s: float = 180.0
    flush_timeout_s: float = 600.0


@dataclass
class _Outcome:
    details: str
    figures: dict[str, Any] = field(default_factory=dict)


class Drill:
    """The steps' real implementations, and what they share. Nothing happens in the
    constructor; `teardown` undoes whatever the steps started, whatever state they
    left."""

    def __init__(self, live: ClientSettings, s3: S3Settings, options: DrillOptions) -> None:
        self.live_settings = live
        self.live_s3 = s3
        self.options = options
        self.work: Path | None = None
        self.live: Bus | None = None
        self.snapshot: Snapshot | None = None
        self.tier_snapshot: TierSnapshot | None = None
        self.dev: DevCluster | None = None
        self.temp: Bus | None = None
        self.mount: ManagedProcess | None = None
        self.mountpoint: Path | None = None
        self.restore_started: float | None = None
        self.served_at: float | None = None

    @property
    def site(self) -> str:
        return self.live_settings.site

    async def run(self, step: Step) -> _Outcome:
        handlers: dict[Step, Callable[[], Awaitable[_Outcome]]] = {
            Step.SNAPSHOT_METADATA: self.snapshot_metadata,
            Step.S3_SNAPSHOT: self.s3_snapshot,
            Step.START_SITE: self.start_site,
            Step.RESTORE_METADATA: self.restore_metadata,
            Step.RESTORE_DATA: self.restore_data,
            Step.CONSISTENCY_CHECK: self.consistency_check,
            Step.COMPARE_SAMPLE: self.compare_sample,
            Step.MOUNT: self.mount_site,
            Step.SMOKE_TEST: self.smoke_test,
        }
        return await handlers[step]()

    # -- the live site -------------------------------------------------------------------
    async def _live(self) -> Bus:
        if self.live is None:
            self.live = await self.live_settings.connect(
                Role.ADMIN, f"dr-drill-{os.getpid()}", name="cfs-dr-drill", connect_timeout=5.0
            )
        return self.live

    def _work(self) -> Path:
        if self.work is None:
            base = self.options.work_dir
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            self.work = Path(tempfile.mkdtemp(prefix="cfs-drill-", dir=base))
        return self.work

    async def snapshot_metadata(self) -> _Outcome:
        from cfs.cli.backup import take_snapshot

        path = self._work() / "metadata.tar.gz"
        reply = await take_snapshot(await self._live(), path)
        try:
            self.snapshot = await _blocking(read_snapshot, path)
        except SnapshotInvalid as exc:
            raise StepFailed(f"the snapshot does not verify: {exc}") from None
        manifest = self.snapshot.manifest
        return _Outcome(
            f"snapshot {manifest.snapshot_id}: {manifest.inodes} inodes in "
            f"{manifest.shard_count} shards, {reply.bytes} bytes, verified",
            {"snapshot_id": manifest.snapshot_id, "inodes": manifest.inodes, "bytes": reply.bytes},
        )

    async def s3_snapshot(self) -> _Outcome:
        from cfs.cli.tier import read_tier, take_tier_snapshot

        bus = await self._live()
        output = self.options.s3_output
        if output is None:
            config, _ = await read_tier(bus)
            if config is None or config.url is None:
                raise StepFailed(
                    "the live site has no data tier (`cfs admin tier-config`): without it "
                    "no copy of the data exists to restore from"
                )
            output = f"s3://{S3Url.parse(config.url).bucket}/dr-drill"
        snapshot, where = await take_tier_snapshot(
            bus, output, self.options.flush_timeout_s, self.live_s3
        )
        self.tier_snapshot = snapshot
        return _Outcome(
            f"{where}: {len(snapshot.blobs)} blobs, {snapshot.chunks} chunks, "
            f"{snapshot.bytes} bytes",
            {"url": where, "blobs": len(snapshot.blobs), "bytes": snapshot.bytes},
        )

    # -- the temporary site --------------------------------------------------------------
    async def start_site(self) -> _Outcome:
        from cfs.admin.snapshot import read_node_facts

        assert self.snapshot is not None
        facts = await read_node_facts(await self._live(), timeout=5.0)
        nodes = sorted(facts.stores) or facts.known()
        if not nodes:
            raise StepFailed("the live site reports no node: nothing to mirror")
        topology = Topology(
            site=self.site,
            shards=self.snapshot.manifest.shard_count,
            nats_servers=1,  # the guide's "small" DR cluster: one server, R1 streams
            nodes=[NodeSpec(name=n) for n in nodes],
        )
        self.restore_started = time.monotonic()
        with _without_operator_env():  # its processes are made here
            self.dev = dev = DevCluster(self._work() / "site", topology)
            assert dev.s3 is not None
            await _blocking(dev.s3.write_credentials, dev.s3_credentials)
            await _blocking(dev.s3.start)
            await dev.site.start()
        await dev.site.wait_ready(self.options.site_timeout_s)
        dev.write_cluster_files()
        self.temp = await dev.site.client("dr-drill", Role.ADMIN)
        return _Outcome(
            f"{len(nodes)} nodes ({', '.join(nodes)}), 1 NATS server, S3 at "
            f"{dev.s3.endpoint_url}, in {dev.state_dir}",
            {"nodes": nodes, "dir": str(dev.state_dir)},
        )

    async def restore_metadata(self) -> _Outcome:
        from cfs.cli.backup import restore_snapshot

        assert self.snapshot is not None and self.temp is not None
        lines = await restore_snapshot(
            self.temp, self.snapshot, self._work() / "pre-restore.tar.gz"
        )
        manifest = self.snapshot.manifest
        return _Outcome(
            f"{manifest.inodes} inodes in {manifest.shard_count} shards restored and opened "
            f"({'; '.join(line.strip() for line in lines)})",
            {"inodes": manifest.inodes},
        )

    def _temp_s3(self) -> S3Settings:
        assert self.dev is not None and self.dev.s3 is not None
        return s3_settings(self.dev.s3.endpoint_url, self.dev.s3_credentials, self.dev.s3.REGION)

    async def restore_data(self) -> _Outcome:
        """The blobs the data snapshot lists, copied from the live bucket into the
        temporary site's own S3 (the drill never lets a restored site write to the
        live bucket), then `restore-data --from-s3` from there."""
        from cfs.cli.tier import restore_data_from_s3

        assert self.tier_snapshot is not None and self.temp is not None
        staging = self._work() / "blob.tmp"
        copied = 0
        async with open_store(DRILL_TIER_URL, self._temp_s3()) as target:
            await target.ensure_bucket()
            for blob in self.tier_snapshot.blobs:
                key = blob_object_key(blob.blob_id)
                async with open_store(blob.url, self.live_s3) as source:
                    await source.get_file(key, staging)
                if _fault("drill.corrupt-blob-copy"):  # tests: a restore from a bad copy
                    _flip_byte(staging, blob.bytes // 2)
                await target.put_file(key, staging)
                copied += blob.bytes
        staging.unlink(missing_ok=True)
        result = await restore_data_from_s3(self.temp, DRILL_TIER_URL, progress=False)
        failed = result["failed"]
        assert isinstance(failed, list)
        figures = {k: result[k] for k in ("files", "chunks", "restored_fragments")}
        details = (
            f"{len(self.tier_snapshot.blobs)} blobs ({copied} bytes) copied; "
            f"{result['files']} files, {result['chunks']} chunks, "
            f"{result['restored_fragments']} fragments restored"
        )
        if failed:
            raise StepFailed(f"{details}; {len(failed)} chunks failed: {'; '.join(failed[:3])}")
        return _Outcome(details, figures)

    async def consistency_check(self) -> _Outcome:
        from cfs.cli.check import report_lines
        from cfs_metadata.fsck import CheckFailed, MetadataChecker

        assert self.snapshot is not None and self.temp is not None
        shards = range(1, self.snapshot.manifest.shard_count + 1)
        checker = MetadataChecker(self.temp, list(shards), fragments=True)
        try:
            await checker.run()
        except CheckFailed as exc:
            raise StepFailed(f"could not check: {exc}") from None
        finally:
            checker.close()
        report = checker.report
        lines = report_lines(report, verbose=False)
        figures = {"inodes": report.inodes, "problems": len(report.findings)}
        if report.exit_code != 0:
            raise StepFailed("; ".join(lines[:5]) + (" ..." if len(lines) > 5 else ""))
        return _Outcome(lines[-1], figures)

    async def compare_sample(self) -> _Outcome:
        """See `cfs.drill.sample`: drawn from the restored tree, compared with the live
        file at the same path when that provably did not change since the cut."""
        assert self.snapshot is not None and self.temp is not None
        cut_ns = self.snapshot.manifest.cut.wall_ms * 1_000_000
        restored_meta = MetadataClient(self.temp)
        files: dict[str, Inode] = {}
        async for path, inode in _walk(restored_meta):
            files[path] = inode
        chosen = choose(files, self.options.sample, self.options.seed)
        tally = SampleTally(sampled=len(chosen))
        live_bus = await self._live()
        live_meta = MetadataClient(live_bus)
        async with (
            _file_store(self.temp, restored_meta) as restored_files,
            _file_store(live_bus, live_meta) as live_files,
        ):
            for path in chosen:
                restored = files[path]
                live = await _resolve(live_meta, path)
                facts = _facts(path, restored)
                assert facts is not None
                verdict = classify(facts, _facts(path, live), cut_ns)
                want = ""
                if verdict is Verdict.COMPARE:
                    assert live is not None
                    # Judged again on the inode the read saw: the live file may have
                    # changed between the lookup and the read.
                    want, read = await _sha256(live_files, live.ino)
                    verdict = classify(facts, _facts(path, read), cut_ns)
                if verdict is Verdict.CHANGED:
                    tally.changed += 1
                elif verdict is Verdict.GONE:
                    tally.gone += 1
                elif verdict is Verdict.DIFFERENT:
                    tally.fail(f"{path}: {verdict.value}")
                else:
                    tally.compared += 1
                    got, _ = await _sha256(restored_files, restored.ino)
                    if want == got:
                        tally.matched += 1
                        tally.bytes += restored.size
                    else:
                        tally.fail(f"{path}: SHA-256 live {want[:12]}, restored {got[:12]}")
        figures = {
            "sampled": tally.sampled,
            "compared": tally.compared,
            "matched": tally.matched,
            "changed": tally.changed,
            "gone": tally.gone,
            "files_in_snapshot": len(files),
        }
        if not tally.ok:
            raise StepFailed(tally.describe())
        return _Outcome(tally.describe(), figures)

    async def mount_site(self) -> _Outcome:
        assert self.dev is not None
        self.mountpoint = self._work() / "mnt"
        self.mountpoint.mkdir(exist_ok=True)
        self.mount = self.dev.site.mount_process(
            self.mountpoint,
            log_path=self._work() / "mount.log",
            env={"CFS_CONFIG": str(self.dev.cluster_file())},
        )
        mount, mountpoint = self.mount, self.mountpoint
        with _without_operator_env():
            await _blocking(mount.start)
        await _blocking(
            mount.wait_until, lambda: is_fuse_mount(mountpoint), MOUNT_WAIT_S, "the FUSE mount"
        )
        return _Outcome(f"mounted at {mountpoint}")

    async def smoke_test(self) -> _Outcome:
        assert self.mountpoint is not None

        def served() -> None:
            if self.served_at is None:
                self.served_at = time.monotonic()

        try:
            passed = await _blocking(posix_smoke, self.mountpoint, served)
        except SmokeFailure as exc:
            raise StepFailed(str(exc)) from None
        except OSError as exc:
            raise StepFailed(f"unexpected {exc!r}") from None
        return _Outcome(f"{len(passed)} checks passed: {', '.join(passed)}", {"checks": passed})

    @property
    def rto_s(self) -> float | None:
        if self.restore_started is None or self.served_at is None:
            return None
        return self.served_at - self.restore_started

    # -- teardown ------------------------------------------------------------------------
    async def teardown(self, not_ok: list[str]) -> _Outcome:
        """Unmount, stop the temporary site, record the drill in the live site's AUDIT,
        close connections; then check that no process the drill started is left. Each
        part runs whatever the one before did. `not_ok`: the steps that failed or were
        skipped (the drill's files are kept for them)."""
        problems: list[str] = []
        stopped: list[str] = []
        keep_work = bool(not_ok)
        if self.mount is not None or self.mountpoint is not None:
            try:
                await _blocking(_unmount, self.mount, self.mountpoint)
                stopped.append("mount")
            except Exception as exc:  # the rest of the teardown still runs
                problems.append(f"unmount: {exc!r}")
        audit = ""
        if self.live is not None:
            arguments = {"sample": str(self.options.sample), "not_ok": ",".join(not_ok)}
            try:
                outcome = "failed" if not_ok else "succeeded"
                await record_action(self.live, "dr-drill", arguments, outcome)
            except BusError as exc:  # the drill's own result stands; say so
                audit = f"; audit record not written: {exc}"
        for bus in (self.temp, self.live):
            if bus is not None:
                with contextlib.suppress(Exception):
                    await bus.close()
        self.temp = self.live = None
        if self.dev is not None:
            try:
                await _blocking(self.dev._stop_all)
                stopped.append("temporary site")
            except Exception as exc:
                problems.append(f"stopping the temporary site: {exc!r}")
        left = live_processes()
        if left:
            for proc in left:
                proc.kill9()
            problems.append(f"killed processes left running: {', '.join(p.name for p in left)}")
        work = self.work
        if work is not None and not keep_work and not problems:
            shutil.rmtree(work, ignore_errors=True)
        kept = f"; files kept in {work}" if work is not None and (keep_work or problems) else ""
        if problems:
            raise StepFailed("; ".join(problems) + kept)
        return _Outcome(f"stopped: {', '.join(stopped) or 'nothing was started'}{kept}{audit}")


def _fault(point: str) -> bool:
    try:
        fault_point(point)
    except InjectedFault:
        return True
    return False


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]) if byte else b"")


KEPT_ENV = ("CFS_LOG_LEVEL", "CFS_CRASH_FILE")


@contextlib.contextmanager
def _without_operator_env() -> Iterator[None]:
    """While the temporary site's processes are made: none of the operator's `CFS_*`
    settings (the live site's cluster file, NATS URLs, credentials, S3), so the
    temporary site can reach only itself; its own settings are given explicitly."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("CFS_") and k not in KEPT_ENV}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def _unmount(mount: ManagedProcess | None, mountpoint: Path | None) -> None:
    try:
        if mount is not None and mount.running:
            mount.stop(timeout=15)  # SIGTERM: flush, unmount, exit
    finally:
        if mountpoint is not None:
            for argv in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
                if is_fuse_mount(mountpoint):
                    subprocess.run([*argv, str(mountpoint)], check=False, capture_output=True)
            if is_fuse_mount(mountpoint):
                raise RuntimeError(f"{mountpoint} is still mounted")


@contextlib.asynccontextmanager
async def _file_store(bus: Bus, meta: MetadataClient) -> AsyncIterator[FileStore]:
    store = FileStore(bus, meta, client_id=f"dr-drill-{bus.site}")
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def _walk(meta: MetadataClient) -> AsyncIterator[tuple[str, Inode]]:
    """Every regular file of the tree with one of its paths (hard links: once)."""
    seen: set[int] = set()
    directories: list[tuple[int, str]] = [(ROOT_INO, "")]
    while directories:
        parent, prefix = directories.pop()
        async for entry in meta.readdir(parent):
            if entry.name in (".", "..") or entry.ino in seen:
                continue
            seen.add(entry.ino)
            path = f"{prefix}/{entry.name}"
            if entry.kind is Kind.DIR:
                directories.append((entry.ino, path))
            elif entry.kind is Kind.FILE:
                yield path, await meta.getattr(entry.ino)


async def _resolve(meta: MetadataClient, path: str) -> Inode | None:
    """The live inode at `path`, or None when a component is missing."""
    ino = ROOT_INO
    inode: Inode | None = None
    for name in path.strip("/").split("/"):
        try:
            inode = await meta.lookup(ino, name)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        ino = inode.ino
    return inode if inode is not None and inode.kind is Kind.FILE else None


def _facts(path: str, inode: Inode | None) -> FileFacts | None:
    if inode is None:
        return None
    return FileFacts(path, inode.ino, inode.size, inode.mtime_ns, inode.ctime_ns)


async def _sha256(store: FileStore, ino: int) -> tuple[str, Inode]:
    """The file's SHA-256 (every chunk checked against its id on the way), and the
    inode whose contents were read."""
    digest = hashlib.sha256()
    handle = await store.open(ino)
    inode = handle.inode
    try:
        offset = 0
        while offset < handle.size:
            data = await handle.read(offset, READ_BYTES)
            if not data:
                break
            digest.update(data)
            offset += len(data)
    finally:
        await store.release(handle)
    return digest.hexdigest(), inode


async def run_drill(
    drill: Drill, on_step: Callable[[StepResult], None] | None = None
) -> DrillReport:
    """Every step `decide` asks for, then the report."""
    started_ms = int(time.time() * 1000)
    results: list[StepResult] = []
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    tearing_down = False
    requested = False  # a signal came: the flag holds even if a library swallowed the cancel

    def on_signal(sig: int) -> None:
        """Cancel the running step; during teardown (a second Ctrl-C) nothing may cut
        it short. Handlers run only while the task waits, so a cancel is delivered
        inside the step that waits."""
        nonlocal requested
        log_event(log, logging.WARNING, "drill.interrupted", signal=sig, teardown=tearing_down)
        if not tearing_down:
            requested = True
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        while (decision := decide(results, requested)).step is not None:
            step = decision.step
            spec = SPECS[step]
            if step is Step.TEARDOWN:
                tearing_down = True
                # A cancel requested as the last step ended lands here, not in the teardown.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0)
                while task.cancelling():
                    task.uncancel()
            if decision.skip_reason is not None:
                result = StepResult(
                    step=step, title=spec.title, status=Status.SKIPPED, started_ms=0,
                    duration_s=0.0, details=decision.skip_reason,
                )  # fmt: skip
            else:
                result = await _one(drill, step, results)
                while task.cancelling():  # delivered (a failed step) or swallowed
                    task.uncancel()
            results.append(result)
            log_event(
                log, logging.INFO, "drill.step", step=step.value, status=result.status.value,
                seconds=result.duration_s, details=result.details[:300],
            )  # fmt: skip
            if on_step is not None:
                on_step(result)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    finished_ms = int(time.time() * 1000)
    return build_report(drill.site, started_ms, finished_ms, results, drill.rto_s, requested)


async def _one(drill: Drill, step: Step, results: list[StepResult]) -> StepResult:
    """Run one step: its result (a cancelled step failed, "interrupted")."""
    spec = SPECS[step]
    started_ms = int(time.time() * 1000)
    started = time.monotonic()
    try:
        if step is Step.TEARDOWN:  # no fault point: nothing may skip the teardown
            not_ok = [r.step.value for r in results if r.status is not Status.OK]
            outcome = await drill.teardown(not_ok)
        else:
            fault_point(f"drill.{step.value}")  # tests: CFS_CRASH_FILE names a step to fail
            outcome = await drill.run(step)
        status, details, figures = Status.OK, outcome.details, outcome.figures
    except asyncio.CancelledError:
        status, details, figures = Status.FAILED, "interrupted", {}
    except (StepFailed, CliError) as exc:
        status, details, figures = Status.FAILED, str(exc), {}
    except Exception as exc:  # any error fails the step, not the drill
        log.exception("drill.step_error", extra={"step": step.value})
        status, details, figures = Status.FAILED, f"{type(exc).__name__}: {exc}", {}
    result = StepResult(
        step=step,
        title=spec.title,
        status=status,
        started_ms=started_ms,
        duration_s=round(time.monotonic() - started, 3),
        details=details,
        figures=figures,
    )
    return result
