"""The shard writer lease against a real nats-server, with real process deaths and pauses."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats.js.errors
import pytest

from cfs.bus import Bus, ensure_buckets
from cfs.lease import Lease, LeaseRecord
from cfs.supervisor import NatsServer
from cfs_contracts.streams import LEASES

ROOT = Path(__file__).resolve().parents[2]
KEY = "meta.001"
LEASE_S, RENEW_S = 1.5, 0.3


@pytest.fixture
async def buses(nats_server: NatsServer) -> AsyncIterator[tuple[Bus, Bus]]:
    a = await Bus.connect(nats_server.url, site="t", node="a")
    b = await Bus.connect(nats_server.url, site="t", node="b")
    await ensure_buckets(a.js, [LEASES], replicas=1)
    yield a, b
    await a.close()
    await b.close()


class Events:
    """Callback recorder: ('acquired', term) and ('lost', term, reason)."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, ...]] = []

    async def acquired(self, term: int) -> None:
        self.seen.append(("acquired", term))

    async def lost(self, term: int, reason: str) -> None:
        self.seen.append(("lost", term, reason))


def make(bus: Bus, node: str, events: Events | None = None) -> Lease:
    events = events or Events()
    return Lease(
        bus,
        KEY,
        node,
        lease_s=LEASE_S,
        renew_s=RENEW_S,
        on_acquired=events.acquired,
        on_lost=events.lost,
    )


async def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds it took for `pred` to hold."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def never_both(a: Lease, b: Lease, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert not (a.is_holder and b.is_holder), "two holders"
        await asyncio.sleep(0.01)


async def spawn_holder(url: str, node: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    argv = ["-m", "tests.integration.procs.lease_holder", url, KEY, node, str(LEASE_S)]
    return await asyncio.create_subprocess_exec(
        sys.executable, *argv, str(RENEW_S), cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE
    )


async def next_line(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    assert line, f"lease holder exited with {await proc.wait()}"
    return line.decode().strip()


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGCONT)  # a stopped process would not die until continued
        proc.kill()
        await proc.wait()


async def test_two_contenders_exactly_one_holds_starting_at_term_1(buses: tuple[Bus, Bus]) -> None:
    a, b = make(buses[0], "a"), make(buses[1], "b")
    await asyncio.gather(a.start(), b.start())
    try:
        await wait_until(lambda: a.is_holder or b.is_holder, 5, "a holder")
        winner, loser = (a, b) if a.is_holder else (b, a)
        await wait_until(lambda: loser.holder == winner.node, 2, "the loser to see the winner")
        await never_both(a, b, 2 * LEASE_S)  # through several renewals
        assert winner.is_holder and (winner.term, loser.term) == (1, 1)
    finally:
        await a.stop()
        await b.stop()


async def test_graceful_release_hands_over_at_once_with_the_next_term(
    buses: tuple[Bus, Bus],
) -> None:
    ea = Events()
    a, b = make(buses[0], "a", ea), make(buses[1], "b")
    await a.start()
    try:
        await wait_until(lambda: a.is_holder, 5, "a to acquire")
        await b.start()
        await wait_until(lambda: b.holder == "a", 2, "b to see a")
        start = time.monotonic()
        await a.stop(release=True)
        took = await wait_until(lambda: b.is_holder, 1.0, "b to take over")
        print(f"\nrelease -> takeover: {time.monotonic() - start:.3f}s")
        assert took < 1.0 and b.term == 2
        assert ea.seen[0] == ("acquired", 1) and ea.seen[1][:2] == ("lost", 1)
    finally:
        await a.stop()
        await b.stop()


async def test_a_holder_stopped_while_nats_is_gone_gives_the_release_up_at_once(
    buses: tuple[Bus, Bus], nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """No release without NATS: the record lapses by itself; the stop says so and returns."""
    events = Events()
    a = make(buses[0], "a", events)
    await a.start()
    try:
        await wait_until(lambda: a.is_holder, 5, "a to acquire")
        nats_server.kill9()
        await wait_until(lambda: not buses[0].nc.is_connected, 5, "a to see NATS gone")
        start = time.monotonic()
        with caplog.at_level("INFO", logger="cfs.lease"):
            await a.stop(release=True)
        took = time.monotonic() - start
    finally:
        await a.stop()
    assert took < 1.0, f"stop took {took:.2f}s"
    assert events.seen[-1][:2] == ("lost", 1)
    skipped = [r for r in caplog.records if r.getMessage() == "lease.release_skipped"]
    assert len(skipped) == 1 and skipped[0].levelname == "INFO"


async def test_a_killed_holder_is_replaced_after_about_a_lease_time(
    nats_server: NatsServer, buses: tuple[Bus, Bus]
) -> None:
    proc = await spawn_holder(nats_server.url, "a")
    b = make(buses[1], "b")
    try:
        assert (await next_line(proc)).startswith("HOLDING 1 ")
        await b.start()
        await wait_until(lambda: b.holder == "a", 2, "b to see a")
        await asyncio.sleep(2.5 * RENEW_S)  # b has seen a renew; kill mid-period
        proc.kill()
        start = time.monotonic()
        took = await wait_until(lambda: b.is_holder, LEASE_S + 2, "b to take over")
        print(f"\nkill -9 -> takeover: {took:.3f}s (lease {LEASE_S}s, renew {RENEW_S}s)")
        assert LEASE_S - 2 * RENEW_S <= took <= LEASE_S + 0.5
        assert b.term == 2 and time.monotonic() - start >= took
    finally:
        await kill(proc)
        await b.stop()


async def test_a_paused_holder_steps_down_and_cannot_overwrite_the_new_holder(
    nats_server: NatsServer, buses: tuple[Bus, Bus]
) -> None:
    proc = await spawn_holder(nats_server.url, "a")
    b = make(buses[1], "b")
    try:
        line = await next_line(proc)
        assert line.startswith("HOLDING 1 ")
        stale_revision = int(line.split()[2])
        await b.start()
        await wait_until(lambda: b.holder == "a", 2, "b to see a")
        proc.send_signal(signal.SIGSTOP)
        took = await wait_until(lambda: b.is_holder, LEASE_S + 2, "b to take over")
        print(f"\nSIGSTOP -> takeover: {took:.3f}s")
        await asyncio.sleep(LEASE_S + 0.5 - took)  # paused well over a lease time
        proc.send_signal(signal.SIGCONT)
        lost = await next_line(proc, timeout=3)
        assert lost.startswith("LOST 1 ") and "last renewal" in lost, lost
        await asyncio.sleep(3 * RENEW_S)  # a resumed: does it write anything?
        assert b.is_holder and b.term == 2 and b.record is not None
        assert b.record.holder == "b"
        # What the resumed process would get, had it tried a renewal: the CAS fails.
        kv = await buses[0].key_value("leases")
        stale = LeaseRecord(holder="a", term=1, lease_s=LEASE_S, acquired_ms=0, renewed_ms=0)
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await kv.update(KEY, stale.model_dump_json().encode(), last=stale_revision)
        with pytest.raises(asyncio.TimeoutError):
            await next_line(proc, timeout=0.5)  # and it did not acquire again
    finally:
        await kill(proc)
        await b.stop()


async def test_handoff_moves_the_lease_quickly_with_the_next_term(buses: tuple[Bus, Bus]) -> None:
    ea = Events()
    a, b = make(buses[0], "a", ea), make(buses[1], "b")
    await a.start()
    try:
        await wait_until(lambda: a.is_holder, 5, "a to acquire")
        await b.start()
        await wait_until(lambda: b.holder == "a", 2, "b to see a")
        start = time.monotonic()
        await b.request_handoff("b")
        took = await wait_until(lambda: b.is_holder, LEASE_S, "b to take over")
        print(f"\nhandoff -> takeover: {time.monotonic() - start:.3f}s")
        assert took < LEASE_S / 2 and b.term == 2 and not a.is_holder
        assert ea.seen[-1] == ("lost", 1, "handoff to b requested")
        await never_both(a, b, LEASE_S)
        assert b.is_holder and b.record is not None and b.record.handoff_to is None
    finally:
        await a.stop()
        await b.stop()


async def test_force_acquire_bumps_the_term_and_deposes_the_holder(
    buses: tuple[Bus, Bus],
) -> None:
    ea = Events()
    a, b = make(buses[0], "a", ea), make(buses[1], "b")
    await a.start()
    try:
        await wait_until(lambda: a.is_holder, 5, "a to acquire")
        await b.start()
        await wait_until(lambda: b.holder == "a", 2, "b to see a")
        assert await b.force_acquire() == 2
        assert b.is_holder
        await wait_until(lambda: not a.is_holder, RENEW_S + 0.2, "a to step down")
        assert ea.seen[-1] == ("lost", 1, "record now names b term 2")
        await never_both(a, b, LEASE_S)
        assert b.is_holder and b.term == 2 and a.holder == "b"
    finally:
        await a.stop()
        await b.stop()


async def test_read_status_shows_holder_term_and_age(buses: tuple[Bus, Bus]) -> None:
    assert await Lease.read_status(buses[1], KEY) is None
    a = make(buses[0], "a")
    await a.start()
    try:
        await wait_until(lambda: a.is_holder, 5, "a to acquire")
        await asyncio.sleep(RENEW_S)
        status = await Lease.read_status(buses[1], KEY)
        assert status is not None
        assert (status.holder, status.term, status.lease_s) == ("a", 1, LEASE_S)
        assert 0 <= status.age_s < 2 * RENEW_S and status.revision >= 1
    finally:
        await a.stop()
    released = await Lease.read_status(buses[1], KEY)
    assert released is not None and (released.holder, released.term) == ("", 1)
