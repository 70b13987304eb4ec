"""Free TCP ports for locally supervised servers.

Servers keep their ports across restarts (a restarted NATS node must come back at the
same route address), so a port handed out here may sit unbound for a while. Two rules
keep that safe:

* never hand out the same port twice within this process, nor one another process
  of this user handed out in the last `CLAIM_S` (a claim file per port: two test
  workers starting sites at once each found port 19320 bindable, and the second
  service to bind it ran without its metrics endpoint), and
* prefer ports *below* the kernel's ephemeral range, so that an outgoing connection
  (which takes its local port from that range) cannot grab a port while its server is
  down. If that range leaves no room we fall back to binding port 0.
"""

from __future__ import annotations

import collections
import os
import random
import socket
import tempfile
import threading
import time
from pathlib import Path

_LOW_PORT = 10_000
_REMEMBER = 8192
_ATTEMPTS = 200
# How long a port handed out stays claimed against other processes: it covers the wait
# until its server binds it (and a restart's); a bound port is never bindable anyway.
CLAIM_S = 600.0

_lock = threading.Lock()
_issued: set[int] = set()
_issued_order: collections.deque[int] = collections.deque()


def _ephemeral_low() -> int:
    """First port of the kernel's ephemeral range (Linux default 32768)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _bind_zero(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _claims_dir() -> Path | None:
    """This user's claim files, or None where there can be none (no writable temporary
    directory, or one of that name someone else owns): then only this process's memory
    keeps ports apart, as before claims."""
    path = Path(tempfile.gettempdir()) / f"cfs-ports-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        owned = path.lstat().st_uid == os.getuid() and path.is_dir() and not path.is_symlink()
    except OSError:
        return None
    return path if owned else None


def _claim(port: int) -> bool:
    """Claim `port` against other processes of this user; False if one holds it."""
    claims = _claims_dir()
    if claims is None:
        return True
    path = claims / str(port)
    for _ in range(2):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return True
        except FileExistsError:
            try:
                if time.time() - path.stat().st_mtime < CLAIM_S:
                    return False
                path.unlink()  # stale: the next O_EXCL create decides who takes it
            except FileNotFoundError:
                pass
        except OSError:
            return True  # claims unusable here (a full or read-only disk): memory only
    return False


def _remember(port: int) -> None:
    _issued.add(port)
    _issued_order.append(port)
    while len(_issued_order) > _REMEMBER:
        _issued.discard(_issued_order.popleft())


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is bindable on `host` now and not yet issued by this process."""
    high = _ephemeral_low()
    with _lock:
        if high - _LOW_PORT > 1000:
            for _ in range(_ATTEMPTS):
                port = random.randrange(_LOW_PORT, high)
                if port not in _issued and _bindable(host, port) and _claim(port):
                    _remember(port)
                    return port
        for _ in range(_ATTEMPTS):
            port = _bind_zero(host)
            if port not in _issued and _claim(port):
                _remember(port)
                return port
    raise OSError(f"no free TCP port found on {host}")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return `count` distinct free ports (see `free_port`)."""
    return [free_port(host) for _ in range(count)]
