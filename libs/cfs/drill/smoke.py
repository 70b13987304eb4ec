"""The drill's POSIX smoke test: plain system calls through a FUSE mount of the restored
site, each result and errno checked (the guide runs pjdfstest's create/open/write).

Synchronous (run it in a thread); raises `SmokeFailure` naming the first check that
failed. `on_first_op` is called once the first operation succeeded: the moment the
restored site serves (the drill's RTO).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path


class SmokeFailure(Exception):
    pass


def _expect_errno(what: str, code: int, call: Callable[[], object]) -> None:
    try:
        call()
    except OSError as exc:
        if exc.errno != code:
            raise SmokeFailure(
                f"{what}: expected {errno.errorcode[code]}, got "
                f"{errno.errorcode.get(exc.errno or 0, exc.errno)}"
            ) from None
        return
    raise SmokeFailure(f"{what}: succeeded, expected {errno.errorcode[code]}")


def _check(what: str, condition: bool) -> None:
    if not condition:
        raise SmokeFailure(what)


def posix_smoke(root: Path, on_first_op: Callable[[], None] | None = None) -> list[str]:
    """Run the checks in a fresh directory under `root` (removed at the end); the
    names of the checks that passed."""
    passed: list[str] = []
    d = root / f".cfs-dr-drill-{os.getpid()}"
    os.mkdir(d, 0o755)
    if on_first_op is not None:
        on_first_op()
    passed.append("mkdir")

    f = d / "a.txt"
    data = b"claudefs dr drill\n" * 1000
    fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        _check("write: short write", os.write(fd, data) == len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    passed.append("create+write+fsync")
    _expect_errno(
        "open(O_CREAT|O_EXCL) of an existing file",
        errno.EEXIST,
        lambda: os.close(os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)),
    )
    passed.append("O_EXCL EEXIST")
    _check("read back differs from what was written", f.read_bytes() == data)
    _check("size after write", os.stat(f).st_size == len(data))
    passed.append("read back")

    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"XYZ", 5)
        _check("pwrite then pread", os.pread(fd, 8, 3) == data[3:5] + b"XYZ" + data[8:11])
        os.ftruncate(fd, 10)
    finally:
        os.close(fd)
    _check("size after ftruncate", os.stat(f).st_size == 10)
    passed.append("open+pwrite+ftruncate")

    os.chmod(f, 0o600)
    _check("chmod", stat.S_IMODE(os.stat(f).st_mode) == 0o600)
    passed.append("chmod")

    g = d / "b.txt"
    os.rename(f, g)
    _expect_errno("stat of a renamed file's old name", errno.ENOENT, lambda: os.stat(f))
    _check("rename keeps the contents", g.read_bytes() == data[:5] + b"XYZ" + data[8:10])
    passed.append("rename")

    h = d / "hard"
    os.link(g, h)
    _check("link count after link", os.stat(g).st_nlink == 2)
    _check("hard link is the same inode", os.stat(g).st_ino == os.stat(h).st_ino)
    _expect_errno("link over an existing name", errno.EEXIST, lambda: os.link(g, h))
    passed.append("link")

    s = d / "sym"
    os.symlink("b.txt", s)
    _check("readlink", os.readlink(s) == "b.txt")
    _check("read through a symlink", s.read_bytes() == g.read_bytes())
    passed.append("symlink")

    sub = d / "sub"
    os.mkdir(sub)
    (sub / "x").write_bytes(b"x")
    _expect_errno("rmdir of a non-empty directory", errno.ENOTEMPTY, lambda: os.rmdir(sub))
    _expect_errno("mkdir of an existing name", errno.EEXIST, lambda: os.mkdir(sub))
    passed.append("rmdir ENOTEMPTY")

    os.unlink(g)
    _expect_errno("open after unlink", errno.ENOENT, lambda: os.open(g, os.O_RDONLY))
    _check("link count after unlinking one name", os.stat(h).st_nlink == 1)
    _expect_errno("unlink of a missing name", errno.ENOENT, lambda: os.unlink(g))
    passed.append("unlink ENOENT")

    for name in (h, s, sub / "x"):
        os.unlink(name)
    os.rmdir(sub)
    os.rmdir(d)
    _expect_errno("stat of the removed directory", errno.ENOENT, lambda: os.stat(d))
    passed.append("cleanup")
    return passed
