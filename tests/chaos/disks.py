"""A full disk on one node: each chunk-store's data on a file system of its own.

Before the site starts, every node's chunk-store directory gets a tmpfs of `size`
bytes (the machine's disk is far too big to fill in a test); the fault fills one of
them with a ballast file until nothing is left (`fill`), as a runaway log or another
tenant would, and removing the ballast heals it (`drain`). The chunk-store meets a
real ENOSPC from the kernel, not a figure we made up.

Needs root (mount).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

BALLAST = ".chaos-ballast"


def chunk_dir(state_dir: Path, node: str) -> Path:
    """Where a dev site keeps `node`'s chunk-store (`cfs_chunkstore.store.store_root`
    of the node's data dir)."""
    return state_dir / "nodes" / node / "chunks"


@contextlib.contextmanager
def node_disks(state_dir: Path, nodes: list[str], size: int) -> Iterator[NodeDisks]:
    """A tmpfs of `size` bytes under every node's chunk-store, unmounted on exit."""
    disks = NodeDisks(state_dir)
    try:
        for node in nodes:
            disks.mount(node, size)
        yield disks
    finally:
        disks.unmount_all()


class NodeDisks:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.mounted: list[Path] = []

    def mount(self, node: str, size: int) -> None:
        where = chunk_dir(self.state_dir, node)
        where.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "cfs-chaos", str(where))
        self.mounted.append(where)

    def fill(self, node: str) -> int:
        """Take every free byte of `node`'s disk (but a few KiB the chunk-store may
        take meanwhile); returns how many bytes that was."""
        where = chunk_dir(self.state_dir, node)
        taken = 0
        fd = os.open(where / BALLAST, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                st = os.statvfs(where)
                want = st.f_bavail * st.f_frsize
                while want >= 4096:
                    try:
                        os.posix_fallocate(fd, taken, want)
                        break
                    except OSError as exc:  # the store wrote meanwhile: ask for less
                        if exc.errno != errno.ENOSPC:
                            raise
                        want //= 2
                if want < 4096:
                    return taken
                taken += want
        finally:
            os.close(fd)

    def drain(self, node: str) -> None:
        (chunk_dir(self.state_dir, node) / BALLAST).unlink(missing_ok=True)

    def unmount_all(self) -> None:
        for where in reversed(self.mounted):
            # lazy: a process the site's teardown missed must not keep the mount alive
            _run("umount", "-l", str(where), check=False)
        self.mounted.clear()


def _run(*argv: str, check: bool = True) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
