"""A mixed workload, through a mount or the client library, with a model of everything
it had acknowledged.

Writes with fsync, overwrites, renames across directories, unlinks, mkdir and rmdir,
drawn from a seed. An operation that returned is acknowledged and goes into the model
(the tree as it must be); one that failed leaves the names it touched uncertain (it
may or may not have happened), and the workload never touches them again. After the
faults are healed `verify` holds the mount to the model: every acknowledged file
with its bytes (SHA-256), every directory, no name an acknowledged unlink or rename
removed, link counts.

Each workload runs in a process of its own, as an application does. It must not run
in the harness's: a fork of a process that holds a file of the mount open flushes that
file when the child closes its copy (at exec), and while a fault stalls the mount that
flush waits on the very cluster the fault cut. The heal the harness was forking (`nft`,
`cfs dev start`) then waited for the stall (found: a 3 s partition healed after 58 s).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

SIZES = (0, 1, 4096, 65536, 200_000)  # bytes: empty, tiny, a block, a chunk's worth
# Longer than any wait the client allows itself (30 s metadata or placement, retried
# flushes): an operation still unanswered then is stuck, and counts as failed.
OP_LIMIT_S = 180.0
Via = Literal["mount", "library"]
T = TypeVar("T")


@dataclass
class Failure:
    op: str
    path: str
    errno: int | None
    message: str
    at: float  # monotonic


@dataclass
class Verdict:
    acknowledged: int
    lost: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # names that should be gone

    @property
    def clean(self) -> bool:
        return not (self.lost or self.corrupt or self.unexpected)


class Operations(Protocol):
    """What the workload does, each call acknowledged when it returns; an OSError (its
    errno None for what is not a POSIX error) when it failed. Paths are relative to the
    workload's own directory."""

    def prepare(self) -> None: ...
    def write(self, path: str, data: bytes, *, fresh: bool) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def mkdir(self, path: str) -> None: ...
    def rmdir(self, path: str) -> None: ...
    def close(self) -> None: ...


class MountOperations:
    """Plain system calls on the mount, a write fsync'd before it counts."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self) -> None:
        self.root.mkdir(exist_ok=True)

    def write(self, path: str, data: bytes, *, fresh: bool) -> None:
        with open(self.root / path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def rename(self, src: str, dst: str) -> None:
        os.rename(self.root / src, self.root / dst)

    def unlink(self, path: str) -> None:
        os.unlink(self.root / path)

    def mkdir(self, path: str) -> None:
        os.mkdir(self.root / path)

    def rmdir(self, path: str) -> None:
        os.rmdir(self.root / path)

    def close(self) -> None:
        pass


class LibraryOperations:
    """The client library (`cfs.client`) as an application linking it uses it: its own
    NATS connection from the cluster config, a write acknowledged once `write_all` has
    stored and committed it. Its event loop runs in a thread of its own."""

    def __init__(self, root: str, config: Path) -> None:
        self.root = root  # a directory under the file system's root
        self.config = config
        self.dirs: dict[str, int] = {}  # the workload's directories -> inode
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._connect())

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        from cfs_contracts.fs.rpc import FsError

        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result(timeout=OP_LIMIT_S)
        except FsError as exc:
            raise OSError(exc.errno, str(exc)) from exc
        except TimeoutError:
            future.cancel()
            raise OSError(f"no answer in {OP_LIMIT_S:.0f}s") from None
        except Exception as exc:  # not a POSIX error: what an application would see
            raise OSError(f"{type(exc).__name__}: {exc}") from exc

    async def _connect(self) -> None:
        from cfs.client import FileStore, MetadataClient
        from cfs.fuse.config import ClientSettings
        from cfs.security import Role

        os.environ["CFS_CONFIG"] = str(self.config)
        self.bus = await ClientSettings().connect(Role.CLIENT, f"chaos-lib-{os.getpid()}")
        self.meta = MetadataClient(self.bus)
        self.files = FileStore(self.bus, self.meta, client_id=self.bus.node)
        await self.files.start()

    def _where(self, path: str) -> tuple[int, str]:
        parent, name = os.path.split(path)
        return self.dirs[parent], name

    def prepare(self) -> None:
        from cfs_contracts.fs.records import ROOT_INO
        from cfs_contracts.fs.rpc import FsError

        async def root() -> int:
            try:
                return (await self.meta.mkdir(ROOT_INO, self.root)).ino
            except FsError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                return (await self.meta.lookup(ROOT_INO, self.root)).ino

        self.dirs[""] = self._call(root())

    def write(self, path: str, data: bytes, *, fresh: bool) -> None:
        parent, name = self._where(path)

        async def write() -> None:
            if fresh:
                inode = await self.meta.create(parent, name)
            else:
                inode = await self.meta.lookup(parent, name)
            await self.files.write_all(inode.ino, data)

        self._call(write())

    def rename(self, src: str, dst: str) -> None:
        self._call(self.meta.rename(*self._where(src), *self._where(dst)))

    def unlink(self, path: str) -> None:
        self._call(self.meta.unlink(*self._where(path)))

    def mkdir(self, path: str) -> None:
        self.dirs[path] = self._call(self.meta.mkdir(*self._where(path))).ino

    def rmdir(self, path: str) -> None:
        self._call(self.meta.rmdir(*self._where(path)))
        del self.dirs[path]

    def close(self) -> None:
        async def close() -> None:
            try:
                await self.files.close()
            finally:
                await self.bus.close()

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


@dataclass
class Ledger:
    """What a workload acknowledged and what failed: the model `verify` checks, sent
    back from the workload's process."""

    files: dict[str, str] = field(default_factory=dict)  # relative path -> SHA-256
    dirs: set[str] = field(default_factory=lambda: {""})
    uncertain: set[str] = field(default_factory=set)
    failures: list[Failure] = field(default_factory=list)
    acknowledged: int = 0
    longest_s: float = 0.0
    longest_op: str = ""
    crash: str | None = None  # a bug of the workload itself, not of the file system


class Workload:
    """Runs operations one after another until `stop` is set."""

    def __init__(self, ops: Operations, seed: int, stop: Event) -> None:
        self.ops = ops
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.stop = stop
        self._serial = 0

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> Ledger:
        try:
            self._loop()
        except Exception as exc:
            self.ledger.crash = repr(exc)
        return self.ledger

    def _loop(self) -> None:
        ledger = self.ledger
        self.ops.prepare()
        while not self.stop.is_set():
            op, paths, action = self._draw()
            started = time.monotonic()
            try:
                action()
            except OSError as exc:
                ledger.failures.append(Failure(op, paths[0], exc.errno, str(exc), time.monotonic()))
                ledger.uncertain.update(paths)
                for path in paths:
                    ledger.files.pop(path, None)
                    ledger.dirs.discard(path)
                time.sleep(0.05)
                continue
            finally:
                took = time.monotonic() - started
                if took > ledger.longest_s:
                    ledger.longest_s, ledger.longest_op = took, f"{op} {paths[0]}"
            ledger.acknowledged += 1

    def _fresh(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}{self._serial:05d}"

    def _free_dirs(self) -> list[str]:
        """Directories the workload may still use (none below an uncertain name)."""
        uncertain = self.ledger.uncertain
        return sorted(d for d in self.ledger.dirs if not any(d.startswith(u) for u in uncertain))

    def _draw(self) -> tuple[str, list[str], Callable[[], None]]:
        rng = self.rng
        files = sorted(self.ledger.files)
        dirs = self._free_dirs()
        weights = {
            "create": 35,
            "overwrite": 20 if files else 0,
            "rename": 15 if files and len(dirs) > 1 else 0,
            "unlink": 10 if files else 0,
            "mkdir": 10 if len(dirs) < 12 else 0,
            "rmdir": 5 if self._empty_dirs() else 0,
        }
        op = rng.choices(list(weights), weights=list(weights.values()))[0]
        if op == "create":
            path = os.path.join(rng.choice(dirs), self._fresh("f"))
            data = rng.randbytes(rng.choice(SIZES))
            return op, [path], lambda: self._write(path, data, fresh=True)
        if op == "overwrite":
            path = rng.choice(files)
            data = rng.randbytes(rng.choice(SIZES))
            return op, [path], lambda: self._write(path, data, fresh=False)
        if op == "rename":
            src = rng.choice(files)
            target_dir = rng.choice([d for d in dirs if d != os.path.dirname(src)])
            dst = os.path.join(target_dir, self._fresh("r"))
            return op, [src, dst], lambda: self._rename(src, dst)
        if op == "unlink":
            path = rng.choice(files)
            return op, [path], lambda: self._unlink(path)
        if op == "mkdir":
            parent = rng.choice([d for d in dirs if d.count("/") < 1])
            path = os.path.join(parent, self._fresh("d"))
            return op, [path], lambda: self._mkdir(path)
        path = rng.choice(self._empty_dirs())
        return op, [path], lambda: self._rmdir(path)

    def _empty_dirs(self) -> list[str]:
        ledger = self.ledger
        used = {os.path.dirname(p) for p in (*ledger.files, *ledger.dirs, *ledger.uncertain) if p}
        return sorted(d for d in self._free_dirs() if d and d not in used)

    # -- the operations (each acknowledged when it returns) -----------------------------
    def _write(self, path: str, data: bytes, *, fresh: bool) -> None:
        self.ops.write(path, data, fresh=fresh)
        self.ledger.files[path] = hashlib.sha256(data).hexdigest()

    def _rename(self, src: str, dst: str) -> None:
        self.ops.rename(src, dst)
        self.ledger.files[dst] = self.ledger.files.pop(src)

    def _unlink(self, path: str) -> None:
        self.ops.unlink(path)
        del self.ledger.files[path]

    def _mkdir(self, path: str) -> None:
        self.ops.mkdir(path)
        self.ledger.dirs.add(path)

    def _rmdir(self, path: str) -> None:
        self.ops.rmdir(path)
        self.ledger.dirs.discard(path)


def verify(ledger: Ledger, root: Path) -> Verdict:
    """The workload's directory `root` on the mount against its model."""
    verdict = Verdict(acknowledged=ledger.acknowledged)
    for path, digest in sorted(ledger.files.items()):
        try:
            data = (root / path).read_bytes()
        except FileNotFoundError:
            verdict.lost.append(path)
            continue
        if hashlib.sha256(data).hexdigest() != digest:
            verdict.corrupt.append(path)
        elif (root / path).stat().st_nlink != 1:
            verdict.corrupt.append(f"{path} (link count)")
    for d in sorted(ledger.dirs - {""}):
        if not (root / d).is_dir():
            verdict.lost.append(d + "/")
    known = ledger.files.keys() | ledger.dirs | ledger.uncertain
    for here, subdirs, names in os.walk(root):
        rel = os.path.relpath(here, root)
        rel = "" if rel == "." else rel
        if any(rel.startswith(u) for u in ledger.uncertain if u):
            continue
        verdict.unexpected += [
            os.path.join(rel, n) for n in names + subdirs if os.path.join(rel, n) not in known
        ]
        if (root / rel).stat().st_nlink != 2 + len(subdirs):
            verdict.corrupt.append(f"{rel or '/'} (directory link count)")
    return verdict


# -- a workload in a process of its own ----------------------------------------------------
_SPAWN = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited


def _serve(
    via: Via, mount_root: Path, config: Path, seed: int, log: Path, stop: Event, out: Connection
) -> None:
    from cfs.logs import setup_logging

    ledger = Ledger()
    with open(log, "a", buffering=1) as stream:  # the library's JSON log lines
        setup_logging(stream=stream, service=f"workload-{via}")
        try:
            ledger = _work(via, mount_root, config, seed, stop)
        except Exception as exc:  # the library could not even connect
            ledger.crash = repr(exc)
    out.send(ledger)


def _work(via: Via, mount_root: Path, config: Path, seed: int, stop: Event) -> Ledger:
    ops: Operations
    if via == "mount":
        ops = MountOperations(mount_root)
    else:
        ops = LibraryOperations(mount_root.name, config)
    try:
        return Workload(ops, seed, stop).run()
    finally:
        ops.close()


class WorkloadProcess:
    """One workload (`via` the mount, or the client library connecting with the cluster
    config `config`) in its own process; its directory is `mount_root` (a directory
    right under the mount point, where `verify` reads it back); what the library logs
    goes to `log`."""

    def __init__(self, via: Via, mount_root: Path, config: Path, seed: int, log: Path) -> None:
        self.via = via
        self.root = mount_root
        self._stop = _SPAWN.Event()
        self._results, sender = _SPAWN.Pipe(duplex=False)
        self._process = _SPAWN.Process(
            target=_serve, args=(via, mount_root, config, seed, log, self._stop, sender),
            name=f"workload-{via}-{seed}", daemon=True,
        )  # fmt: skip
        self._sender = sender

    def start(self) -> None:
        self._process.start()
        self._sender.close()  # the child's now: EOF once it exits

    def stop(self) -> None:
        """Stop after the operation in progress."""
        self._stop.set()

    def finish(self, timeout: float) -> Ledger:
        """Stop after the operation in progress; what the workload acknowledged."""
        self.stop()
        try:
            if not self._results.poll(timeout):
                raise AssertionError(
                    f"{self._process.name}: still in an operation after {timeout:.0f}s"
                )
            ledger: Ledger = self._results.recv()
            return ledger
        except EOFError:
            raise AssertionError(
                f"{self._process.name} died: exit code {self._process.exitcode}"
            ) from None
        finally:
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
