"""The chaos partition (`tests/chaos/netcut.py`) cuts for real, both ways, and heals.

A node is an echo server process; the test is another machine with a connection to
it made before the cut. During the cut that connection hangs (nothing comes back,
nothing is refused), a new one cannot be made, and traffic that does not involve the
node still flows; once healed the old connection delivers what waited.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from cfs.supervisor import free_port
from tests.chaos.netcut import NetCut, Ports, cgroup2_mount, local_ports

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None,
    reason="a partition needs root and nftables (make setup installs nft when root)",
)

ECHO = """
import socket, sys, threading
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
def serve(conn):
    while data := conn.recv(65536):
        conn.sendall(data)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""


@pytest.fixture
def echo_servers() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """The node's echo server, and another node's."""
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen([sys.executable, "-c", ECHO, str(p)], stdout=subprocess.PIPE, text=True)
        for p in ports
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield procs[0], ports[0], ports[1]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _echo(conn: socket.socket, data: bytes, timeout: float) -> bytes:
    conn.settimeout(timeout)
    conn.sendall(data)
    return conn.recv(65536)


def _connects(port: int, timeout: float = 1.0) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def test_a_cut_node_hangs_both_ways_and_heals(
    echo_servers: tuple[subprocess.Popen[str], int, int],
) -> None:
    node, inside, outside = echo_servers
    cgroup2_mount()  # fails clearly where there is no cgroup v2 hierarchy
    before = socket.create_connection(("127.0.0.1", inside), timeout=2.0)
    assert _echo(before, b"hello", 2.0) == b"hello"
    assert inside in local_ports([node.pid]).tcp
    cut = NetCut(f"test-{inside}")
    cut.cut([node.pid], Ports(tcp=frozenset([inside])), Ports(tcp=frozenset([outside])))
    try:
        with pytest.raises(TimeoutError):  # hangs: no reset, no answer
            _echo(before, b"during", 1.0)
        assert not _connects(inside)
        assert _connects(outside)  # the rest of the site still talks
    finally:
        cut.heal()
    started = time.monotonic()
    before.settimeout(15.0)
    got = b""
    while len(got) < len(b"during"):  # TCP retransmits what waited
        got += before.recv(65536)
    assert got == b"during", got
    print(f"\nthe old connection delivered {time.monotonic() - started:.2f}s after the heal")
    assert _connects(inside)
    before.close()
    assert not cut.cgroup.exists()
