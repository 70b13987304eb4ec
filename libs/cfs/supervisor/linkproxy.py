"""The link between two sites, as a TCP proxy that can be cut: `cfs dev partition`.

Everything one site's NATS servers say to the other's (the leaf-node connections)
goes through one of these, so a partition is real for NATS: while the link is cut,
every connection through it is closed and new ones are accepted and closed at once,
exactly as a dead WAN link or a firewall reset looks to the leaf node. Healing the
link lets the leaf node's own reconnect loop find its way back.

The proxy runs as its own process (a partition outlives the command that made it)
and reads its state from a file, `open` or `cut`, which `LinkProxy.cut`/`heal` (and
so the CLI, from any process) rewrite:

    python -m cfs.supervisor.linkproxy --listen 127.0.0.1:7001 \\
        --target 127.0.0.1:7422 --state-file link.state
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
import time
from pathlib import Path

from cfs.logs import setup_logging
from cfs.supervisor.ports import free_port
from cfs.supervisor.process import ManagedProcess

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
POLL_S = 0.05  # how soon a cut takes effect
OPEN, CUT = "open", "cut"


class LinkProxy:
    """The proxy process, as a site's supervisor manages it."""

    def __init__(
        self,
        name: str,
        state_dir: Path,
        target_port: int,
        *,
        port: int | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.name = name
        self.state_dir = Path(state_dir)
        self.port = port if port is not None else free_port(HOST)
        self.target_port = target_port
        self.state_file = self.state_dir / "link.state"
        self.process = ManagedProcess(
            name,
            [
                sys.executable,
                "-m",
                "cfs.supervisor.linkproxy",
                "--listen",
                f"{HOST}:{self.port}",
                "--target",
                f"{HOST}:{target_port}",
                "--state-file",
                str(self.state_file),
            ],
            log_path=self.state_dir / "linkproxy.log",
            cwd=self.state_dir,
            die_with_parent=die_with_parent,
        )

    @property
    def url(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def is_cut(self) -> bool:
        return read_state(self.state_file) == CUT

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.state_file.exists():
            write_state(self.state_file, OPEN)
        self.process.start()
        self.process.wait_until(self._listening, 15.0, f"{self.name} listening on {self.url}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), 1):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> int | None:
        try:
            return self.process.stop(timeout)
        finally:
            self.applied_file.unlink(missing_ok=True)  # nobody applies states any more

    @property
    def applied_file(self) -> Path:
        """What the running proxy has put in effect (it rewrites it after each change)."""
        return applied_path(self.state_file)

    def cut(self, wait_s: float = 5.0) -> None:
        """Cut, and return once the proxy has (every connection through it reset)."""
        self._set(CUT, wait_s)

    def heal(self, wait_s: float = 5.0) -> None:
        self._set(OPEN, wait_s)

    def _set(self, state: str, wait_s: float) -> None:
        """Write the state; wait for a proxy that is running (here or started by another
        process: it keeps the applied file) to put it in effect."""
        write_state(self.state_file, state)
        if not self.applied_file.exists():
            return  # never started
        deadline = time.monotonic() + wait_s
        while read_state(self.applied_file) != state:
            if time.monotonic() > deadline:
                raise TimeoutError(f"link proxy {self.name} did not go {state} in {wait_s}s")
            time.sleep(POLL_S / 2)


def read_state(path: Path) -> str:
    try:
        return path.read_text().strip() or OPEN
    except FileNotFoundError:
        return OPEN


def applied_path(state_file: Path) -> Path:
    return state_file.with_name(state_file.stem + ".applied")


def write_state(path: Path, state: str) -> None:
    """Atomically (a reader never sees an empty file)."""
    partial = path.with_suffix(".partial")
    partial.write_text(state + "\n")
    partial.replace(path)


class _Link:
    """The running proxy: connections pumped both ways until the state says cut."""

    def __init__(self, target: tuple[str, int], state_file: Path) -> None:
        self.target = target
        self.state_file = state_file
        self.state = read_state(state_file)
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state == CUT:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            log.warning("link.connect_failed", extra={"target": self.target, "error": str(exc)})
            writer.close()
            return
        pair = (writer, up_writer)
        self.pairs.add(pair)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self.pairs.discard(pair)
            for side in pair:
                side.close()

    async def watch(self) -> None:
        write_state(applied_path(self.state_file), self.state)
        while True:
            state = read_state(self.state_file)
            if state != self.state:
                self.state = state
                log.info("link.state", extra={"state": state, "connections": len(self.pairs)})
                if state == CUT:
                    for pair in list(self.pairs):
                        for side in pair:
                            side.transport.abort()  # a reset, no goodbye
                write_state(applied_path(self.state_file), state)
            await asyncio.sleep(POLL_S)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        writer.write_eof()


async def _serve(listen: tuple[str, int], target: tuple[str, int], state_file: Path) -> None:
    link = _Link(target, state_file)
    server = await asyncio.start_server(link.accepted, *listen)
    log.info("link.listening", extra={"listen": listen, "target": target, "state": link.state})
    async with server:
        await asyncio.gather(server.serve_forever(), link.watch())


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or HOST, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, type=_address, help="host:port")
    parser.add_argument("--target", required=True, type=_address, help="host:port")
    parser.add_argument("--state-file", required=True, type=Path)
    args = parser.parse_args()
    setup_logging("INFO", service="linkproxy")
    asyncio.run(_serve(args.listen, args.target, args.state_file))


if __name__ == "__main__":
    main()
