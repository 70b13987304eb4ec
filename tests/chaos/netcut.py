"""A partition inside one site: a node cut off from the others by the kernel, for real.

nftables drops, both ways and silently as a dead switch port does, the traffic
between the node's processes (its NATS server and services) and other nodes' NATS
servers (client and route ports) and SWIM ports, and between the node's own NATS and
SWIM ports and any process not the node's.
The node's services still reach their own server (the same machine), which can no
longer reach its cluster. Connections are not reset: they hang, and TCP delivers
what waited once the cut is healed, as after a real partition.

A dev site runs on loopback, so ports tell the nodes apart; what tells whose socket
sent is, for the sockets the node's processes already have, their local ports (read
from /proc), and for the sockets they open during the cut, a cgroup the processes
are moved into (a socket keeps the cgroup it was created in, hence both).

Needs root, nftables (`nft`) and a cgroup v2 hierarchy (hybrid mounts included).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")  # where nft looks a cgroupv2 path up


@dataclass(frozen=True)
class Ports:
    """TCP and UDP ports: what a node listens on (NATS client and route, SWIM), or the
    local ports of its processes' sockets."""

    tcp: frozenset[int] = frozenset()
    udp: frozenset[int] = frozenset()

    def __or__(self, other: Ports) -> Ports:
        return Ports(self.tcp | other.tcp, self.udp | other.udp)


def ruleset(
    table: str, cgroup: str, level: int, *, listening: Ports, sockets: Ports, outside: Ports
) -> str:
    """The nft script that cuts a node off: its processes are those of `cgroup` (a path
    under /sys/fs/cgroup, `level` deep in the cgroup v2 hierarchy) and whoever sends
    from, or receives on, one of `sockets`; it listens on `listening`; the other nodes
    on `outside`. Both directions of every connection are cut (one cut direction only
    is another fault: a leader whose heartbeats still arrive is never replaced).
    Output sees the sending socket, input the receiving one. Pure: a test reads it."""

    def ports(values: Iterable[int]) -> str:
        return "{ " + ", ".join(str(p) for p in sorted(values)) + " }"

    member = f'socket cgroupv2 level {level} "{cgroup}"'
    lines = [f"table inet {table} {{"]
    for chain, hook, near, far in (("out", "output", "sport", "dport"),
                                   ("in", "input", "dport", "sport")):  # fmt: skip
        # out: from the node's sockets / to its ports; in: to its sockets / from its ports
        lines += [f"  chain {chain} {{",
                  f"    type filter hook {hook} priority 0; policy accept;"]  # fmt: skip
        for proto in ("tcp", "udp"):
            own, others = getattr(listening, proto), getattr(outside, proto)
            mine = ports(getattr(sockets | listening, proto))
            if others:  # between the node's processes and the other nodes' servers
                lines.append(f"    {proto} {far} {ports(others)} {proto} {near} {mine} drop")
                lines.append(f"    {proto} {far} {ports(others)} {member} drop")
            if own:  # between the node's servers and anyone but its own processes
                lines.append(f"    {proto} {far} {ports(own)} {proto} {near} {mine} accept")
                lines.append(f"    {proto} {far} {ports(own)} {member} accept")
                lines.append(f"    {proto} {far} {ports(own)} drop")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def cgroup2_mount() -> Path:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or its `unified`
    part on a hybrid system)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise RuntimeError("no cgroup v2 hierarchy is mounted: a partition needs one")


def _cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise RuntimeError(f"process {pid} has no cgroup v2 entry")


class NetCut:
    """Cuts one node off (`cut`) and heals it (`heal`); one per fault."""

    def __init__(self, name: str) -> None:
        self.table = f"cfs_chaos_{os.getpid()}_{name}".replace("-", "_")
        self.mount = cgroup2_mount()
        self.cgroup = self.mount / f"cfs-chaos-{os.getpid()}" / name
        self._moved: dict[int, str] = {}  # pid -> the cgroup it came from

    def cut(self, pids: Sequence[int], listening: Ports, outside: Ports) -> None:
        """Cut processes `pids` (listening on `listening`) off from `outside`."""
        self.cgroup.mkdir(parents=True, exist_ok=True)
        for pid in pids:  # first: a socket opened from now on is in the cgroup
            self._moved[pid] = _cgroup_of(pid)
            (self.cgroup / "cgroup.procs").write_text(str(pid))
        relative = self.cgroup.relative_to(self.mount)
        script = ruleset(
            self.table, str(self.cgroup.relative_to(CGROUP_ROOT)), len(relative.parts),
            listening=listening, sockets=local_ports(pids), outside=outside,
        )  # fmt: skip
        _nft(script)

    def heal(self) -> None:
        started = time.monotonic()
        _nft(f"delete table inet {self.table}\n", missing_ok=True)
        deleted = time.monotonic()
        for pid, origin in self._moved.items():
            # back where it was (a process that died meanwhile has nothing to move)
            with contextlib.suppress(OSError):
                (self.mount / origin.lstrip("/") / "cgroup.procs").write_text(str(pid))
        self._moved.clear()
        for group in (self.cgroup, self.cgroup.parent):
            with contextlib.suppress(OSError):  # still in use (another cut) or gone
                group.rmdir()
        # A heal that came late lengthens the partition: say where the time went. (Heals
        # of 56-91 s were the fork of `nft` waiting on a stalled mount, when the workload
        # ran in this process: see tests/chaos/workload.py.)
        if (took := time.monotonic() - started) > 1.0:
            print(f"[netcut] slow heal of {self.table}: {took:.1f}s, nft "
                  f"{deleted - started:.1f}s", flush=True)  # fmt: skip


def _nft(script: str, *, missing_ok: bool = False) -> None:
    done = subprocess.run(
        ["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False
    )
    if done.returncode != 0 and not (missing_ok and "No such file" in done.stderr):
        raise RuntimeError(f"nft refused the rules: {done.stderr.strip()}\n{script}")


_SOCKET = re.compile(r"socket:\[(\d+)\]")


def local_ports(pids: Iterable[int]) -> Ports:
    """The local ports of every TCP and UDP socket the processes `pids` have open."""
    inodes: set[str] = set()
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        try:
            links = [os.readlink(fd) for fd in fds.iterdir()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone: nothing to cut
        inodes |= {m.group(1) for link in links if (m := _SOCKET.match(link))}
    found: dict[str, set[int]] = {"tcp": set(), "udp": set()}
    for proto in found:
        for table in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
            try:
                rows = Path(table).read_text().splitlines()[1:]
            except FileNotFoundError:
                continue
            for row in rows:
                fields = row.split()
                if len(fields) > 9 and fields[9] in inodes:
                    found[proto].add(int(fields[1].rsplit(":", 1)[1], 16))
    return Ports(frozenset(found["tcp"]), frozenset(found["udp"]))
