"""Service processes forked from one interpreter that has imported them already.

A service process spends over a second of CPU importing pydantic, nats-py, rocksdict,
OpenTelemetry and its contracts before it does anything; a 6-node site starts 24 of
them, and a test suite hundreds. The fork server (`serve()` in an interpreter of its
own, one per `LocalSite`) imports every registered service once, then forks a child per
request; the child is what `python -m <package>` would be (its own session, argv,
environment, working directory and log file, a fresh random seed) but starts in
milliseconds. Children are real processes: `kill -9`, SIGSTOP and SIGTERM reach them
as before, and they die with the fork server, which dies with its supervisor.

The fork server is single-threaded (a fork from a threaded process may copy a held
lock). Requests and replies are JSON lines on its stdin/stdout; it reaps its children
and reports each exit status (`os.waitstatus_to_exitcode`: negative for a signal, as
`subprocess` has it). `ForkedChild` is the supervisor's handle: the part of
`subprocess.Popen` that `ManagedProcess` uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cfs.supervisor.errors import SupervisorError

_SERVE = "from cfs.supervisor.forkserver import serve; serve()"
_START_TIMEOUT_S = 60.0
_REPLY_TIMEOUT_S = 30.0


class ForkedChild:
    """A child of the fork server, as much of `subprocess.Popen` as supervision needs."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self._server = server
        self.pid = pid

    def poll(self) -> int | None:
        return self._server._status(self.pid)

    def wait(self, timeout: float | None = None) -> int:
        rc = self._server._wait(self.pid, timeout)
        if rc is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        return rc


class ForkServer:
    """One fork server process and the thread reading what it says."""

    def __init__(self, log_path: Path, env: Mapping[str, str], label: str = "") -> None:
        """`label` goes on its command line (and its children's, a fork's copy): what
        a search for a site's leftover processes looks for, e.g. the site's directory."""
        self.log_path = Path(log_path)
        self.label = label
        self.env = dict(env)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._replies: dict[int, dict[str, Any]] = {}
        self._exits: dict[int, int] = {}
        self._children: set[int] = set()
        self._next_id = 0
        self._gone = False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and not self._gone

    def start(self) -> None:
        from cfs.supervisor.process import _preexec_die_with_parent, _spawn

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logf:

            def popen() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    # -c, not -m: run as __main__, this module would be imported twice
                    [sys.executable, "-c", _SERVE, self.label],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=logf,
                    env=self.env,
                    start_new_session=True,
                    preexec_fn=_preexec_die_with_parent(os.getpid()),
                )

            self._proc = _spawn(popen)
        self._gone = False
        threading.Thread(target=self._read, name="cfs-forkserver-reader", daemon=True).start()
        self._request({"op": "ping"}, _START_TIMEOUT_S)  # answered once everything is imported

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # its children get SIGKILL from the kernel (PDEATHSIG)
        proc.wait()
        self._proc = None

    def spawn(
        self,
        package: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path | None,
        log_path: Path,
    ) -> ForkedChild:
        """`python -m package args...`, forked; its output appended to `log_path`."""
        if not self.running:
            self.start()
        reply = self._request(
            {
                "op": "spawn",
                "package": package,
                "args": list(args),
                "env": dict(env),
                "cwd": str(cwd) if cwd else None,
                "log": str(log_path),
            },
            _REPLY_TIMEOUT_S,
        )
        if "error" in reply:
            raise SupervisorError(f"cannot start {package}: {reply['error']}")
        pid = int(reply["pid"])
        with self._lock:
            self._children.add(pid)
        return ForkedChild(self, pid)

    # -- the supervisor's side of the pipe ------------------------------------------------
    def _request(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        with self._lock:
            self._next_id += 1
            number = self._next_id
            try:
                proc.stdin.write(json.dumps({**request, "id": number}).encode() + b"\n")
                proc.stdin.flush()
            except OSError as exc:
                raise SupervisorError(f"fork server gone: {exc}") from exc
            if not self._changed.wait_for(
                lambda: number in self._replies or self._gone, timeout=timeout
            ):
                raise SupervisorError(f"fork server did not answer in {timeout:.0f}s")
            if number not in self._replies:
                raise SupervisorError(f"fork server exited; see {self.log_path}")
            return self._replies.pop(number)

    def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            message = json.loads(line)
            with self._lock:
                if "exit" in message:
                    self._exits[int(message["exit"])] = int(message["status"])
                else:
                    self._replies[int(message["id"])] = message
                self._changed.notify_all()
        with self._lock:  # its children died with it (PDEATHSIG)
            self._gone = True
            for pid in self._children - set(self._exits):
                self._exits[pid] = -int(signal.SIGKILL)
            self._changed.notify_all()

    def _status(self, pid: int) -> int | None:
        with self._lock:
            return self._exits.get(pid)

    def _wait(self, pid: int, timeout: float | None) -> int | None:
        with self._lock:
            self._changed.wait_for(lambda: pid in self._exits, timeout=timeout)
            return self._exits.get(pid)


# -- the fork server process ---------------------------------------------------------------
def _preload() -> None:
    """Everything a service process imports before it runs (see `run_spec`)."""
    import cfs.admin.executor
    import cfs.client.nodes
    import cfs.kernel.runtime
    import cfs.lease
    import cfs.service_main  # noqa: F401
    from cfs.kernel import registry

    for spec in registry.specs():
        spec.load()
        __import__(f"{spec.package}.service")


def _child(request: dict[str, Any], parent: int, wakeup: tuple[int, int]) -> None:
    """In the forked child: become `python -m package args...`; never returns."""
    code = 1
    try:
        os.setsid()
        from cfs.supervisor.process import _preexec_die_with_parent

        _preexec_die_with_parent(parent)()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, 1 << 16)  # the log, the pipes, the wakeup fds: dup'd or not ours
        del wakeup
        if request.get("cwd"):
            os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import random

        random.seed()  # a fork copies the generator: jitter would march in step
        import runpy

        sys.argv = [request["package"], *request["args"]]
        runpy.run_module(request["package"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            import atexit
            import logging

            atexit._run_exitfuncs()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """The fork server's main loop: requests on stdin, replies and exits on stdout."""
    out = sys.stdout.fileno()

    def say(message: dict[str, Any]) -> None:
        os.write(out, json.dumps(message).encode() + b"\n")  # no Python-level lock

    _preload()
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    signal.set_wakeup_fd(writer)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    me = os.getpid()
    pending = b""
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([stdin, reader], [], [])
        if reader in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(reader, 4096)
        while True:  # reap every child that ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            say({"exit": pid, "status": os.waitstatus_to_exitcode(status)})
        if stdin not in ready:
            continue
        data = os.read(stdin, 1 << 20)
        if not data:
            return  # the supervisor closed the pipe: its children die with us
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            if request["op"] == "ping":
                say({"id": request["id"], "pid": me})
                continue
            try:
                pid = os.fork()
            except OSError as exc:
                say({"id": request["id"], "error": str(exc)})
                continue
            if pid == 0:
                _child(request, me, (reader, writer))
            say({"id": request["id"], "pid": pid})
