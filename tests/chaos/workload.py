"""A mixed workload through a mount, with a model of everything it had acknowledged.

Writes with fsync, overwrites, renames across directories, unlinks, mkdir and rmdir,
drawn from a seed. An operation that returned is acknowledged and goes into the model
(the tree as it must be); one that failed leaves the names it touched uncertain (it
may or may not have happened), and the workload never touches them again. After the
faults are healed `verify` holds the mount to the model: every acknowledged file with
its bytes (SHA-256), every directory, no name an acknowledged unlink or rename
removed, link counts.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SIZES = (0, 1, 4096, 65536, 200_000)  # bytes: empty, tiny, a block, a chunk's worth


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


class Workload(threading.Thread):
    """Runs operations one after another until `stop` is set."""

    def __init__(self, root: Path, seed: int) -> None:
        super().__init__(daemon=True, name=f"workload-{seed}")
        self.root = root
        self.rng = random.Random(seed)
        self.files: dict[str, str] = {}  # relative path -> SHA-256 of its bytes
        self.dirs: set[str] = {""}
        self.uncertain: set[str] = set()
        self.failures: list[Failure] = []
        self.acknowledged = 0
        self.longest_s = 0.0
        self.longest_op = ""
        self.stop = threading.Event()
        self.crash: BaseException | None = None
        self._serial = 0

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug of the workload, not of the file system
            self.crash = exc
            raise

    def _loop(self) -> None:
        self.root.mkdir(exist_ok=True)
        while not self.stop.is_set():
            op, paths, action = self._draw()
            started = time.monotonic()
            try:
                action()
            except OSError as exc:
                self.failures.append(Failure(op, paths[0], exc.errno, str(exc), time.monotonic()))
                self.uncertain.update(paths)
                for path in paths:
                    self.files.pop(path, None)
                    self.dirs.discard(path)
                time.sleep(0.05)
                continue
            finally:
                took = time.monotonic() - started
                if took > self.longest_s:
                    self.longest_s, self.longest_op = took, f"{op} {paths[0]}"
            self.acknowledged += 1

    def _fresh(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}{self._serial:05d}"

    def _free_dirs(self) -> list[str]:
        """Directories the workload may still use (none below an uncertain name)."""
        return sorted(d for d in self.dirs if not any(d.startswith(u) for u in self.uncertain))

    def _draw(self) -> tuple[str, list[str], Callable[[], None]]:
        rng = self.rng
        files = sorted(self.files)
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
            return op, [path], lambda: self._write(path, data)
        if op == "overwrite":
            path = rng.choice(files)
            data = rng.randbytes(rng.choice(SIZES))
            return op, [path], lambda: self._write(path, data)
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
        used = {os.path.dirname(p) for p in (*self.files, *self.dirs, *self.uncertain) if p}
        return sorted(d for d in self._free_dirs() if d and d not in used)

    # -- the operations (each acknowledged when it returns) -----------------------------
    def _write(self, path: str, data: bytes) -> None:
        with open(self.root / path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.files[path] = hashlib.sha256(data).hexdigest()

    def _rename(self, src: str, dst: str) -> None:
        os.rename(self.root / src, self.root / dst)
        self.files[dst] = self.files.pop(src)

    def _unlink(self, path: str) -> None:
        os.unlink(self.root / path)
        del self.files[path]

    def _mkdir(self, path: str) -> None:
        os.mkdir(self.root / path)
        self.dirs.add(path)

    def _rmdir(self, path: str) -> None:
        os.rmdir(self.root / path)
        self.dirs.discard(path)

    # -- after the run ------------------------------------------------------------------
    def verify(self) -> Verdict:
        """The mount against the model (call once the thread has stopped)."""
        verdict = Verdict(acknowledged=self.acknowledged)
        for path, digest in sorted(self.files.items()):
            try:
                data = (self.root / path).read_bytes()
            except FileNotFoundError:
                verdict.lost.append(path)
                continue
            if hashlib.sha256(data).hexdigest() != digest:
                verdict.corrupt.append(path)
            elif (self.root / path).stat().st_nlink != 1:
                verdict.corrupt.append(f"{path} (link count)")
        for d in sorted(self.dirs - {""}):
            if not (self.root / d).is_dir():
                verdict.lost.append(d + "/")
        for here, subdirs, names in os.walk(self.root):
            rel = os.path.relpath(here, self.root)
            rel = "" if rel == "." else rel
            if any(rel.startswith(u) for u in self.uncertain if u):
                continue
            for name in names + subdirs:
                path = os.path.join(rel, name)
                if path not in self.files and path not in self.dirs and path not in self.uncertain:
                    verdict.unexpected.append(path)
            expected_links = 2 + len(subdirs)
            if (self.root / rel).stat().st_nlink != expected_links:
                verdict.corrupt.append(f"{rel or '/'} (directory link count)")
        return verdict
