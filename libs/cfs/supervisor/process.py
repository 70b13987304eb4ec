"""A supervised child process: start, stop, kill -9, pause, with its output on disk.

Children run in their own session, so signals go to the whole process group and a
Ctrl-C in the terminal reaches only the supervisor. By default they also get
PR_SET_PDEATHSIG=SIGKILL, so they cannot outlive a supervisor that crashes or is
killed; a registry plus an `atexit` hook handles ordinary interpreter exits.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cfs.supervisor.errors import SupervisorError
from cfs.supervisor.forkserver import ForkedChild, ForkServer

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_TAIL_BYTES = 64 * 1024

_registry_lock = threading.Lock()
_registry: set[ManagedProcess] = set()
_created: list[ManagedProcess] = []  # every instance, alive or not: their logs outlive them
_spawner: ThreadPoolExecutor | None = None


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log `event k=v ...` as text and the same fields as `extra` for JSON formatters."""
    if not logger.isEnabledFor(level):
        return
    text = " ".join([event, *(f"{key}={value}" for key, value in fields.items())])
    logger.log(level, "%s", text, extra=fields)


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _load_prctl()


def _preexec_die_with_parent(parent_pid: int) -> Callable[[], None]:
    """Build the post-fork hook that ties the child's life to this process."""
    prctl = _PRCTL

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        # The parent may have died between fork() and prctl(); then no signal will come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _spawn(popen: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Run `popen` on a thread that lives as long as the supervisor.

    PDEATHSIG fires when the *thread* that forked the child exits, not the process. A
    child forked from a short-lived worker (e.g. `asyncio.to_thread`) would be killed
    when that worker retires, so non-main threads hand the fork to a dedicated one.
    """
    global _spawner
    if threading.current_thread() is threading.main_thread():
        return popen()
    with _registry_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfs-supervisor-spawn")
        spawner = _spawner
    return spawner.submit(popen).result()


class ManagedProcess:
    """One child process with a fixed command line, restartable any number of times."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = True,
        cwd: Path | None = None,
        die_with_parent: bool = True,
        forkserver: ForkServer | None = None,
    ) -> None:
        """`env` is laid over `os.environ` unless `inherit_env` is False.

        Output (stdout and stderr) is appended to `log_path`, so restarts keep history.
        Pass `die_with_parent=False` for daemons that must outlive the supervisor.
        With a `forkserver`, `argv` is `python -m PACKAGE ARGS...` and the child is
        forked from it (the same process, started without importing anything).
        """
        if not argv:
            raise ValueError("argv must not be empty")
        if forkserver is not None and (list(argv[:2]) != [sys.executable, "-m"] or len(argv) < 3):
            raise ValueError(f"a forked child runs `python -m PACKAGE ...`, not {argv}")
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.inherit_env = inherit_env
        self.cwd = cwd
        self.die_with_parent = die_with_parent
        self.forkserver = forkserver
        self._proc: subprocess.Popen[bytes] | ForkedChild | None = None
        self._paused = False
        self._wanted = False  # started and not stopped or killed on purpose since
        self._lock = threading.RLock()
        with _registry_lock:
            _created.append(self)

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited rc={self.returncode}"
        return f"<ManagedProcess {self.name} pid={self.pid} {state}>"

    @property
    def pid(self) -> int | None:
        """Pid of the most recent child (kept after it exits, for diagnostics)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status of the most recent child; None while it runs or if never started.

        Negative values mean "killed by that signal", as in `subprocess`.
        """
        return self._proc.poll() if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the child exists (a paused child counts as running)."""
        if self._proc is None or self._proc.poll() is not None:
            _unregister(self)
            return False
        return True

    @property
    def exited_unasked(self) -> bool:
        """It ended by itself (a crash, a fatal error), not by `stop` or `kill9`: what a
        supervisor with a restart policy restarts."""
        return self._wanted and self._proc is not None and self._proc.poll() is not None

    @property
    def paused(self) -> bool:
        return self._paused and self.running

    def start(self) -> None:
        """Launch the child; raise SupervisorError if it is already running or cannot exec."""
        with self._lock:
            if self.running:
                raise SupervisorError(f"{self.name} is already running (pid {self.pid})")
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, **self.env} if self.inherit_env else dict(self.env)
            preexec = _preexec_die_with_parent(os.getpid()) if self.die_with_parent else None
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            with self.log_path.open("ab") as logf:
                header = (
                    f"--- cfs.supervisor: start {self.name} at {stamp}: {shlex.join(self.argv)}"
                )
                logf.write(header.encode() + b"\n")
                logf.flush()

                def popen() -> subprocess.Popen[bytes]:
                    return subprocess.Popen(
                        self.argv,
                        stdin=subprocess.DEVNULL,
                        stdout=logf,
                        stderr=subprocess.STDOUT,
                        cwd=self.cwd,
                        env=env,
                        start_new_session=True,
                        preexec_fn=preexec,
                    )

                try:
                    if self.forkserver is not None:
                        proc: subprocess.Popen[bytes] | ForkedChild = self.forkserver.spawn(
                            self.argv[2],
                            self.argv[3:],
                            env=env,
                            cwd=self.cwd,
                            log_path=self.log_path,
                        )
                    else:
                        proc = _spawn(popen)
                except OSError as exc:
                    raise SupervisorError(f"cannot start {self.name}: {exc}") from exc
            self._proc = proc
            self._paused = False
            self._wanted = True
            _register(self)
            log_event(
                log,
                logging.INFO,
                "process.started",
                proc=self.name,
                pid=proc.pid,
                log=str(self.log_path),
            )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout` s; return the exit status."""
        with self._lock:
            self._wanted = False
            proc = self._proc
            if proc is None or proc.poll() is not None:
                _unregister(self)
                return self.returncode
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)  # a paused child only acts on SIGTERM once continued
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log_event(
                    log,
                    logging.WARNING,
                    "process.stop_timeout",
                    proc=self.name,
                    pid=proc.pid,
                    timeout=timeout,
                )
                self._signal(signal.SIGKILL)
                rc = proc.wait()
            self._finish(proc)
            log_event(log, logging.INFO, "process.stopped", proc=self.name, pid=proc.pid, rc=rc)
            return rc

    def kill9(self) -> int | None:
        """SIGKILL the process group and reap the child: a simulated crash."""
        with self._lock:
            self._wanted = False
            proc = self._proc
            if proc is None or proc.poll() is not None:
                _unregister(self)
                return self.returncode
            self._signal(signal.SIGKILL)
            rc = proc.wait()
            self._finish(proc)
            log_event(log, logging.INFO, "process.killed", proc=self.name, pid=proc.pid, rc=rc)
            return rc

    def send_signal(self, sig: signal.Signals) -> None:
        """Deliver `sig` to the process group (e.g. SIGHUP: reload a config)."""
        with self._lock:
            self._require_running(f"signal {sig.name} to")
            self._signal(sig)

    def pause(self) -> None:
        """SIGSTOP the process group: it keeps its sockets but answers nothing."""
        with self._lock:
            self._require_running("pause")
            self._signal(signal.SIGSTOP)
            self._paused = True
            _wait_stopped(self.pid)
            log_event(log, logging.INFO, "process.paused", proc=self.name, pid=self.pid)

    def resume(self) -> None:
        """SIGCONT the process group after `pause()`."""
        with self._lock:
            self._require_running("resume")
            self._signal(signal.SIGCONT)
            self._paused = False
            log_event(log, logging.INFO, "process.resumed", proc=self.name, pid=self.pid)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (if running) and start again with the same command line and log file."""
        with self._lock:
            self.stop(timeout)
            self.start()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child exits; raise SupervisorError on timeout."""
        proc = self._proc
        if proc is None:
            raise SupervisorError(f"{self.name} was never started")
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise SupervisorError(f"{self.name} still running after {timeout}s") from exc
        _unregister(self)
        return rc

    def wait_until(
        self, check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
    ) -> None:
        """Poll `check` until true; fail fast (with the log tail) if the child exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise SupervisorError(
                    f"{self.name} exited with code {self.returncode} while waiting for {what}"
                    f"{self._log_excerpt()}"
                )
            if check():
                return
            if time.monotonic() >= deadline:
                raise SupervisorError(
                    f"timed out after {timeout:.1f}s waiting for {self.name}: {what}"
                    f"{self._log_excerpt()}"
                )
            time.sleep(interval)

    def log_tail(self, n: int = 40) -> str:
        """Last `n` lines of the log file (all runs), or "" if there is none yet."""
        try:
            with self.log_path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - _TAIL_BYTES))
                data = fh.read()
        except FileNotFoundError:
            return ""
        lines = data.decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])

    def _log_excerpt(self) -> str:
        return f"\n--- last lines of {self.log_path} ---\n{self.log_tail()}"

    def _require_running(self, action: str) -> None:
        if not self.running:
            raise SupervisorError(f"cannot {action} {self.name}: not running")

    def _signal(self, sig: signal.Signals) -> None:
        """Signal the child's process group (its pgid equals its pid: new session)."""
        if self._proc is not None:
            _killpg(self._proc.pid, sig)

    def _finish(self, proc: subprocess.Popen[bytes] | ForkedChild) -> None:
        """After the leader is reaped, kill any leftovers in its group and forget it."""
        _killpg(proc.pid, signal.SIGKILL)
        self._paused = False
        _unregister(self)


def _wait_stopped(pid: int | None, timeout: float = 2.0) -> None:
    """Return once every thread of `pid` has stopped: the signal is only queued when
    killpg returns, and a running thread can still answer a request meanwhile."""
    deadline = time.monotonic() + timeout
    while pid is not None and time.monotonic() < deadline:
        try:
            states = [
                (Path(task) / "stat").read_text().rsplit(")", 1)[1].split()[0]
                for task in Path(f"/proc/{pid}/task").iterdir()
            ]
        except OSError:  # gone, or a thread exited while we looked
            return
        if all(state in "tT" for state in states):
            return
        time.sleep(0.005)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(pgid, sig)


def _register(proc: ManagedProcess) -> None:
    with _registry_lock:
        _registry.add(proc)


def _unregister(proc: ManagedProcess) -> None:
    with _registry_lock:
        _registry.discard(proc)


def live_processes() -> list[ManagedProcess]:
    """Every supervised child of this process that is still alive."""
    with _registry_lock:
        candidates = list(_registry)
    return [proc for proc in candidates if proc.running]


def all_processes() -> list[ManagedProcess]:
    """Every ManagedProcess created in this interpreter, running, exited or never started
    (tests read the `log_path` of each for warnings)."""
    with _registry_lock:
        return list(_created)


def kill_all() -> list[ManagedProcess]:
    """SIGKILL every live supervised child; return the ones that were still alive."""
    alive = live_processes()
    for proc in alive:
        proc.kill9()
    return alive


@atexit.register
def _kill_all_at_exit() -> None:
    for proc in kill_all():
        log_event(log, logging.WARNING, "process.killed_at_exit", proc=proc.name, pid=proc.pid)
