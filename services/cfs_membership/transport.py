"""The SWIM datagram port: real asyncio UDP, and a fault-injecting wrapper for tests.

`FaultyTransport` reads its rules from a JSON file (`CFS_NETEM_FILE`), re-read
when the file's mtime changes, so a test changes loss and delay between chosen
members of a running site by rewriting one file:

    {"rules": [
        {"src": "storage-1", "dst": "storage-2", "loss": 1.0},
        {"src": "*", "dst": "*", "loss": 0.05, "delay_ms": 20, "jitter_ms": 10}
    ]}

A rule applies to datagrams sent from `src` to `dst` (node names, `host:port`,
or `*`); the first matching rule wins. Each member applies the rules whose `src`
is itself, so a two-way fault needs two rules (or wildcards). A missing file
means no faults.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from cfs_membership.swim import Addr

log = logging.getLogger(__name__)

_RECHECK_S = 0.2  # how often the rules file's mtime is looked at


class Transport(Protocol):
    """Where encoded SWIM messages go; the receive side is a callback given at open."""

    @property
    def local_addr(self) -> Addr: ...

    def send(self, data: bytes, addr: Addr) -> None: ...

    def close(self) -> None: ...


Receiver = Callable[[bytes, Addr], None]


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._receiver(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a dead member, and the like: SWIM handles silence.
        log.debug("swim.udp_error", extra={"error": str(exc)})


class UdpTransport:
    """One bound UDP socket; sends never block (the kernel drops on overflow)."""

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self._transport = transport
        host, port = transport.get_extra_info("sockname")[:2]
        self._local = (str(host), int(port))
        self.send_errors = 0

    @classmethod
    async def open(cls, host: str, port: int, receiver: Receiver) -> UdpTransport:
        loop = asyncio.get_running_loop()
        transport, _protocol = await loop.create_datagram_endpoint(
            lambda: _Datagrams(receiver), local_addr=(host, port)
        )
        return cls(transport)

    @property
    def local_addr(self) -> Addr:
        return self._local

    def send(self, data: bytes, addr: Addr) -> None:
        if self._transport.is_closing():
            # Stopping: asyncio's sendto on a closed endpoint with datagrams still
            # buffered fails inside asyncio itself (AttributeError, Python 3.11), and a
            # datagram lost now is what SWIM expects of UDP anyway.
            self.send_errors += 1
            return
        try:
            self._transport.sendto(data, addr)
        except OSError as exc:  # e.g. no route: the same as a lost datagram to SWIM
            self.send_errors += 1
            log.debug("swim.send_failed", extra={"addr": f"{addr[0]}:{addr[1]}", "error": str(exc)})

    def close(self) -> None:
        self._transport.close()


# -- fault injection ---------------------------------------------------------------------------
@dataclass(frozen=True)
class NetemRule:
    src: str = "*"
    dst: str = "*"
    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be within 0..1, got {self.loss}")
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must not be negative")

    def matches(self, src: str, dst_names: tuple[str, ...]) -> bool:
        return self.src in ("*", src) and (self.dst == "*" or self.dst in dst_names)


def parse_rules(text: str) -> list[NetemRule]:
    """Rules from the file's JSON text (raises ValueError on anything unexpected)."""
    data = json.loads(text) if text.strip() else {"rules": []}
    if not isinstance(data, dict) or not isinstance(data.get("rules", []), list):
        raise ValueError('expected {"rules": [...]}')
    rules = []
    for raw in data.get("rules", []):
        if not isinstance(raw, dict):
            raise ValueError(f"a rule must be an object, got {raw!r}")
        unknown = set(raw) - {"src", "dst", "loss", "delay_ms", "jitter_ms"}
        if unknown:
            raise ValueError(f"unknown rule fields {sorted(unknown)}")
        rules.append(
            NetemRule(
                src=str(raw.get("src", "*")),
                dst=str(raw.get("dst", "*")),
                loss=float(raw.get("loss", 0.0)),
                delay_ms=float(raw.get("delay_ms", 0.0)),
                jitter_ms=float(raw.get("jitter_ms", 0.0)),
            )
        )
    return rules


def write_rules(path: Path, rules: list[NetemRule]) -> None:
    """Replace the rules file atomically (what tests and `cfs dev` call)."""
    body = {"rules": [asdict(rule) for rule in rules]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, path)


class FaultyTransport:
    """Drops and delays datagrams per the rules file; otherwise passes them on."""

    def __init__(
        self,
        inner: Transport,
        rules_file: Path,
        *,
        node: str,
        name_of: Callable[[Addr], str | None],
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.rules_file = rules_file
        self.node = node
        self.dropped = 0
        self.delayed = 0
        self._name_of = name_of
        self._rng = rng or random.Random()
        self._clock = clock
        self._rules: list[NetemRule] = []
        self._mtime: float | None = None
        self._checked = -math.inf

    @property
    def local_addr(self) -> Addr:
        return self.inner.local_addr

    @property
    def rules(self) -> list[NetemRule]:
        self._reload()
        return list(self._rules)

    def send(self, data: bytes, addr: Addr) -> None:
        rule = self._rule_for(addr)
        if rule is None:
            self.inner.send(data, addr)
            return
        if rule.loss and self._rng.random() < rule.loss:
            self.dropped += 1
            return
        delay = rule.delay_ms + rule.jitter_ms * self._rng.random()
        if delay <= 0:
            self.inner.send(data, addr)
            return
        self.delayed += 1
        asyncio.get_running_loop().call_later(delay / 1000, self.inner.send, data, addr)

    def close(self) -> None:
        self.inner.close()

    def _rule_for(self, addr: Addr) -> NetemRule | None:
        self._reload()
        if not self._rules:
            return None
        name = self._name_of(addr)
        names = (f"{addr[0]}:{addr[1]}",) + ((name,) if name else ())
        for rule in self._rules:
            if rule.matches(self.node, names):
                return rule
        return None

    def _reload(self) -> None:
        now = self._clock()
        if now - self._checked < _RECHECK_S:
            return
        self._checked = now
        try:
            mtime: float | None = self.rules_file.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime == self._mtime:
            return
        self._mtime = mtime
        if mtime is None:
            self._rules = []
            log.info("netem.cleared", extra={"node": self.node, "file": str(self.rules_file)})
            return
        try:
            self._rules = parse_rules(self.rules_file.read_text())
        except (OSError, ValueError) as exc:  # keep the old rules; say so loudly
            log.error(
                "netem.bad_rules",
                extra={"node": self.node, "file": str(self.rules_file), "error": str(exc)},
            )
            return
        log.info(
            "netem.rules",
            extra={
                "node": self.node,
                "file": str(self.rules_file),
                "rules": [asdict(rule) for rule in self._rules],
            },
        )
