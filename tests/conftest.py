"""Shared fixtures: real nats-server and S3 (moto) processes, always torn down.

The supervisor API is synchronous (start/stop take milliseconds to a second), so these
fixtures are plain sync fixtures usable from async tests.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest

from cfs.supervisor import NatsCluster, NatsServer, S3Server, kill_all, live_processes
from cfs.supervisor.process import all_processes

# Contracts parse strictly under test (unknown payload fields fail), leniently in production.
os.environ["CFS_STRICT_CONTRACTS"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    """Fail the session if any supervised child outlives its fixture (then kill it)."""
    yield
    leaked = [repr(proc) for proc in live_processes()]
    kill_all()
    assert not leaked, f"supervised processes still alive at session end: {leaked}"


class LogTails:
    """The complete lines appended to each log since the last look; a file that shrank
    is a new log and is read from its start.

    The watchers below look before and after every test at every log under the session's
    temp dir, which grows to thousands of directories and logs: a log whose size and
    modification time are those of the last look (as the caller just stat'ed them) has
    nothing new and is not opened."""

    def __init__(self) -> None:
        self._offsets: dict[str, int] = {}
        self._seen: dict[str, tuple[int, int]] = {}

    def appended(self, path: str, stat: os.stat_result | None = None) -> bytes:
        if stat is not None and self._seen.get(path) == (stat.st_size, stat.st_mtime_ns):
            return b""
        offset = self._offsets.get(path, 0)
        try:
            with open(path, "rb") as f:
                opened = os.fstat(f.fileno())
                if opened.st_size < offset:
                    offset = 0
                f.seek(offset)
                chunk = f.read()
        except OSError:
            return b""
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offsets[path] = offset + len(complete)
        if offset + len(chunk) == opened.st_size:  # else it grew meanwhile: look again
            self._seen[path] = (opened.st_size, opened.st_mtime_ns)
        else:
            self._seen.pop(path, None)
        return complete


def files_under(
    base: Path, skip: tuple[str, ...], wanted: Callable[[str], bool]
) -> dict[str, os.stat_result]:
    """Every file under `base` whose name is `wanted`, by path, with its stat; what
    `os.walk` would find not going into directories whose names start with one of `skip`
    (nor into links to directories)."""
    found: dict[str, os.stat_result] = {}
    stack = [str(base)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:  # removed meanwhile
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir():
                        if not entry.name.startswith(skip) and not entry.is_symlink():
                            stack.append(entry.path)
                    elif wanted(entry.name):
                        found[entry.path] = entry.stat()
                except OSError:  # removed meanwhile
                    continue
    return found


class NatsLogWatch:
    """New `... Violation` lines in every nats-server log under a directory.

    A service that lacks a permission it needs fails quietly (its request times out,
    nats-py reports the error asynchronously), so every test is checked for
    permission and authorization violations the servers logged while it ran."""

    _SKIP = ("store", "nodes", "s3", "logs", "credentials", "recovery")

    def __init__(self, base: Path) -> None:
        self.base = base
        self._tails = LogTails()

    def new_violations(self) -> list[str]:
        found: list[str] = []
        for path, stat in files_under(self.base, self._SKIP, "nats.log".__eq__).items():
            found += self._read(path, stat)
        return found

    def _read(self, path: str, stat: os.stat_result) -> list[str]:
        complete = self._tails.appended(path, stat)
        lines = complete.decode(errors="replace").splitlines()
        return [f"{path}: {line}" for line in lines if "Violation" in line]


@pytest.fixture(scope="session")
def _nats_logs(tmp_path_factory: pytest.TempPathFactory) -> NatsLogWatch:
    return NatsLogWatch(tmp_path_factory.getbasetemp())


def _late_reply(line: str) -> bool:
    """A reply refused because its responder answered after reconnecting to another
    server (one it lost was killed) or after a config reload: replies are allowed only
    for requests the same server delivered on that connection (`allow_responses`), so
    the requester times out and asks again. No declared grant can be missing there:
    services never publish to an inbox but as a reply."""
    return 'Publish Violation - Subject "_INBOX.' in line


@pytest.fixture(autouse=True)
def _no_permission_violations(
    request: pytest.FixtureRequest, _nats_logs: NatsLogWatch
) -> Iterator[None]:
    """Fail a test during which a NATS server refused a client a permission, unless the
    test provokes that on purpose (`@pytest.mark.permission_violations`)."""
    _nats_logs.new_violations()  # whatever earlier tests left is theirs
    yield
    found = [line for line in _nats_logs.new_violations() if not _late_reply(line)]
    if request.node.get_closest_marker("permission_violations") is None:
        assert not found, "NATS refused a permission:\n" + "\n".join(found[:20])


# Lines that are part of normal operation on a loaded 2-core machine and say nothing
# about a bug, as (event pattern, why in one line); every test accepts them. Empty for
# now: each warning the integration and scenario tests produced was either provoked by
# the test (declared there) or a bug. Keep it short: unexpected warnings fail the test.
NORMAL_LOGS: tuple[tuple[str, str], ...] = ()

_LOUD = frozenset({"warning", "error", "critical"})
_LOUD_MARK = re.compile(rb'"level": ?"(?:warning|error|critical)"', re.IGNORECASE)


@dataclass(frozen=True)
class LogLine:
    """One JSON log line of a service process at WARNING or above."""

    path: str
    entry: dict[str, Any]

    @property
    def event(self) -> str:
        return str(self.entry.get("event", ""))

    def matches(self, pattern: str) -> bool:
        """`pattern` against the event, or its first word (`event k=v` texts)."""
        return fnmatch(self.event, pattern) or fnmatch(self.event.split(" ", 1)[0], pattern)

    def describe(self, base: Path) -> str:
        path = os.path.relpath(self.path, base) if self.path.startswith(str(base)) else self.path
        skip = {"ts", "level", "event", "logger", "exc"}
        fields = [f"logger={self.entry.get('logger')}"]
        fields += [f"{k}={v}"[:120] for k, v in self.entry.items() if k not in skip][:6]
        if self.entry.get("exc"):
            fields.append(f"exc={str(self.entry['exc']).strip().splitlines()[-1][:160]}")
        return f"{path}: {self.entry.get('level')} {self.event[:160]} {' '.join(fields)}"


class ServiceLogWatch:
    """New WARNING, ERROR and CRITICAL lines in the JSON logs of service processes.

    The logs are those of every ManagedProcess this interpreter created, plus every
    `*.log` under the session's temp dir (services a `cfs dev` child started, the
    mount of `cfs mount --log`). Lines that are not JSON (nats-server, moto,
    tracebacks) are skipped; only bytes appended since the last call are read."""

    _SKIP = ("store", "nodes", "s3", "credentials", "recovery", "mnt", "jetstream")

    def __init__(self, base: Path) -> None:
        self.base = base
        self._tails = LogTails()

    def new_lines(self) -> list[LogLine]:
        found: list[LogLine] = []
        for path, stat in sorted(self._paths().items()):
            found += self._read(path, stat)
        return found

    def _paths(self) -> dict[str, os.stat_result | None]:
        """Each log by path, with its stat when it is under the temp dir."""
        paths: dict[str, os.stat_result | None] = dict.fromkeys(
            str(proc.log_path) for proc in all_processes()
        )
        paths.update(files_under(self.base, self._SKIP, lambda name: name.endswith(".log")))
        return paths

    def _read(self, path: str, stat: os.stat_result | None) -> list[LogLine]:
        complete = self._tails.appended(path, stat)
        found: list[LogLine] = []
        for line in complete.splitlines():
            # Most lines are INFO or DEBUG: look before parsing (cfs.logs writes the level
            # as `"level": "warning"`, etc.).
            if not line.startswith(b"{") or _LOUD_MARK.search(line) is None:
                continue
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short by a kill -9
                continue
            if isinstance(entry, dict) and str(entry.get("level", "")).lower() in _LOUD:
                found.append(LogLine(path, entry))
        return found


def _unexpected_logs_message(lines: list[LogLine], base: Path) -> str:
    """The first line of each unexpected event (with its count), and how to declare them."""
    first: dict[str, LogLine] = {}
    count: dict[str, int] = {}
    for line in lines:
        event = line.event.split(" ", 1)[0]
        first.setdefault(event, line)
        count[event] = count.get(event, 0) + 1
    shown = [f"  {count[e]}x {line.describe(base)}" for e, line in list(first.items())[:15]]
    return (
        f"{len(lines)} unexpected WARNING/ERROR/CRITICAL log line(s) from service processes; "
        f"the first of each event:\n" + "\n".join(shown) + "\n"
        "Provoked on purpose (a kill -9, a partition, a full disk...)? Declare it on the "
        "test, or on all tests of its module with `pytestmark = ...`:\n"
        f"  @pytest.mark.expected_logs({', '.join(json.dumps(e) for e in sorted(first))})\n"
        "Otherwise it is a bug in the service: fix the service, not the test."
    )


_SERVICE_LOGS = pytest.StashKey[ServiceLogWatch]()


@pytest.fixture(scope="session", autouse=True)
def _service_log_watch(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    request.config.stash[_SERVICE_LOGS] = ServiceLogWatch(tmp_path_factory.getbasetemp())


# Hooks rather than a fixture, so that what module-scoped fixtures log while they start
# and stop counts for the first and the last test of their module.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    watch = item.config.stash.get(_SERVICE_LOGS, None)
    if watch is not None:
        watch.new_lines()  # whatever earlier tests left is theirs
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Fail a test during which a service logged a WARNING or worse that neither the
    test (`@pytest.mark.expected_logs(...)`) nor NORMAL_LOGS declares."""
    result = yield
    watch = item.config.stash.get(_SERVICE_LOGS, None)
    if watch is None:
        return result
    expected = [pattern for mark in item.iter_markers("expected_logs") for pattern in mark.args]
    expected += [pattern for pattern, _why in NORMAL_LOGS]
    unexpected = [line for line in watch.new_lines() if not any(line.matches(p) for p in expected)]
    if unexpected:
        pytest.fail(_unexpected_logs_message(unexpected, watch.base), pytrace=False)
    return result


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A standalone JetStream nats-server with its store under tmp_path."""
    server = NatsServer.standalone(tmp_path / "nats")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_cluster3(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster (n1..n3) with a meta leader elected."""
    cluster = NatsCluster(3, tmp_path / "nats-cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[S3Server]:
    """Moto's S3 server as a separate process; see `S3Server.client_kwargs`."""
    server = S3Server(tmp_path / "s3")
    try:
        server.start()
        yield server
    finally:
        server.stop()
