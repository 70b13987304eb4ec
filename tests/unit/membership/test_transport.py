"""The fault-injecting transport: rules file, matching, reload on change, loss and delay."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from cfs_membership.swim import Addr
from cfs_membership.transport import (
    FaultyTransport,
    NetemRule,
    UdpTransport,
    parse_rules,
    write_rules,
)

A: Addr = ("127.0.0.1", 7001)
B: Addr = ("127.0.0.1", 7002)
NAMES = {A: "a", B: "b"}


class Recorder:
    local_addr: Addr = ("127.0.0.1", 7000)

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Addr]] = []

    def send(self, data: bytes, addr: Addr) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _faulty(path: Path, clock: Clock) -> tuple[FaultyTransport, Recorder]:
    inner = Recorder()
    faulty = FaultyTransport(
        inner, path, node="me", name_of=NAMES.get, rng=random.Random(1), clock=clock
    )
    return faulty, inner


def test_parse_rules_is_strict() -> None:
    assert parse_rules("") == []
    rules = parse_rules('{"rules": [{"src": "a", "dst": "*", "loss": 0.5, "delay_ms": 3}]}')
    assert rules == [NetemRule("a", "*", 0.5, 3.0, 0.0)]
    for bad in ('{"rules": [{"loss": 2}]}', '{"rules": [{"drop": 1}]}', "[1]", "{"):
        with pytest.raises(ValueError):
            parse_rules(bad)


def test_rules_by_name_and_address_first_match_wins(tmp_path: Path) -> None:
    path = tmp_path / "netem.json"
    clock = Clock()
    faulty, inner = _faulty(path, clock)
    faulty.send(b"x", A)  # no file: no faults
    write_rules(
        path,
        [
            NetemRule(src="me", dst="a", loss=1.0),
            NetemRule(src="other", dst="*", loss=1.0),
            NetemRule(src="*", dst="127.0.0.1:7002", loss=0.0),
        ],
    )
    clock.t += 1
    for _ in range(10):
        faulty.send(b"y", A)
        faulty.send(b"z", B)
    assert [d for d, _ in inner.sent] == [b"x"] + [b"z"] * 10
    assert faulty.dropped == 10


def test_rules_reload_when_the_file_changes_and_clear_when_removed(tmp_path: Path) -> None:
    path = tmp_path / "netem.json"
    clock = Clock()
    faulty, inner = _faulty(path, clock)
    write_rules(path, [NetemRule(loss=1.0)])
    clock.t += 1
    faulty.send(b"1", A)
    write_rules(path, [NetemRule(loss=0.0)])
    os.utime(path, (1e9, 1e9))  # a different mtime even within the same clock tick
    faulty.send(b"2", A)  # not re-read yet: rules are looked at every 0.2 s
    clock.t += 1
    faulty.send(b"3", A)
    write_rules(path, [NetemRule(loss=1.0)])
    clock.t += 1
    path.unlink()
    clock.t += 1
    faulty.send(b"4", A)
    assert [d for d, _ in inner.sent] == [b"3", b"4"]


def test_loss_is_about_the_configured_fraction(tmp_path: Path) -> None:
    path = tmp_path / "netem.json"
    write_rules(path, [NetemRule(loss=0.05)])
    faulty, inner = _faulty(path, Clock())
    for _ in range(4000):
        faulty.send(b".", B)
    assert 140 <= faulty.dropped <= 260
    assert len(inner.sent) + faulty.dropped == 4000


async def test_delay_holds_datagrams_back(tmp_path: Path) -> None:
    path = tmp_path / "netem.json"
    write_rules(path, [NetemRule(dst="b", delay_ms=50)])
    faulty, inner = _faulty(path, Clock())
    faulty.send(b"late", B)
    faulty.send(b"now", A)
    assert [d for d, _ in inner.sent] == [b"now"]
    await asyncio.sleep(0.1)
    assert [d for d, _ in inner.sent] == [b"now", b"late"]
    assert faulty.delayed == 1


async def test_a_datagram_sent_while_stopping_is_lost_not_a_crash() -> None:
    """The SWIM loop may send once more after the endpoint began closing; that is a lost
    datagram (counted), never an exception that takes the service down."""
    transport = await UdpTransport.open("127.0.0.1", 0, lambda data, addr: None)
    transport.close()
    for _ in range(3):
        transport.send(b"ping", ("127.0.0.1", 9))
    await asyncio.sleep(0)
    transport.send(b"ping", ("127.0.0.1", 9))
    assert transport.send_errors == 4
