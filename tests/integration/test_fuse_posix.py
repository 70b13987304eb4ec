"""POSIX semantics through a real FUSE mount (pjdfstest style: return values and errnos).

One site for the whole module (a NATS server, a metadata-raft process over two
shards, three chunk-stores) and one mount *process* (`python -m cfs.fuse`) on a
directory under /tmp; each test works in its own fresh directory. Teardown
unmounts whatever happens, checks that no process is left, that the mount
logged no unexpected error, and that the namespace replayed from the journals
is consistent (link counts, parents, no orphans).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cfs.cli.main import app
from cfs.fuse.attrs import ENTRY_TIMEOUT_S
from cfs.fuse.config import is_fuse_mount
from cfs.supervisor.site import LocalSite, child_pythonpath
from cfs_contracts.events.metadata import MetaCommitted
from cfs_metadata.check import check_tree
from cfs_metadata.fsck import CheckReport, MetadataChecker
from cfs_metadata.journal import Journal
from cfs_metadata.state import MemoryShard, apply_entries
from tests.integration.metadata_harness import SITE, replay_journal

SHARDS = 2
STORE_NODES = ("s1", "s2", "s3")
NOBODY = 65534
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3",
)


class Mounted:
    """The module's site and mount: `path` is the mount point."""

    def __init__(self, base: Path, path: Path) -> None:
        self.base = base
        self.path = path
        self._replayed = MemoryShard(1)  # every shard's journal, applied so far
        self._positions: dict[int, int] = {}
        # One site family (LocalSite): a metadata writer on m1, a chunk-store on each s*.
        self.site = LocalSite(
            base,
            ("m1", *STORE_NODES),
            shards=SHARDS,
            site=SITE,
            servers=1,
            secure=False,
            services={"m1": ("metadata-raft",), **dict.fromkeys(STORE_NODES, ("chunk-store",))},
            env={"CFS_RESERVE_BYTES": str(16 * MiB), "CFS_HEARTBEAT_S": "0.5"},
        )
        self.mount = self.site.mount_process(path, log_path=base / "mount.log")

    def start(self) -> None:
        asyncio.run(self._start())
        self.mount.start()
        self.mount.wait_until(lambda: is_fuse_mount(self.path), 30, "the FUSE mount")

    async def _start(self) -> None:
        await self.site.start()
        await self.site.wait_ready()

    def stop(self) -> None:
        try:
            if self.mount.running:
                self.mount.stop(timeout=15)  # SIGTERM: flush, unmount, exit
        finally:
            if is_fuse_mount(self.path):
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
            if is_fuse_mount(self.path):
                subprocess.run(["umount", "-l", str(self.path)], check=False)
            self.site.stop()

    def namespace(self) -> MemoryShard:
        """Every shard's journal replayed into one view (inode numbers are unique)."""
        merged = MemoryShard(1)
        for shard in range(1, SHARDS + 1):
            for _, payload in asyncio.run(replay_journal(self.site, shard)):
                if isinstance(payload, MetaCommitted):
                    apply_entries(merged, payload.entries)
        merged.txs.clear()
        return merged

    def check(self) -> list[str]:
        """The checker after one test (STYLE.md #9): the journals' new entries replayed
        into the view kept since the module started, then the whole tree checked."""
        asyncio.run(self._catch_up())
        self._replayed.txs.clear()
        return check_tree(self._replayed, self._replayed.inodes)

    async def full_check(self) -> CheckReport:
        """`cfs admin metadata-consistency-check`, in process."""
        async with (
            await self.site.client("checker") as bus,
            MetadataChecker(bus, range(1, SHARDS + 1)) as checker,
        ):
            return await checker.run()

    async def _catch_up(self) -> None:
        async with await self.site.client("checker") as bus:
            for shard in range(1, SHARDS + 1):
                journal = Journal(bus, shard)
                last = await journal.last_seq()
                start = self._positions.get(shard, 0) + 1
                async for record in journal.read_range(start, last):
                    if isinstance(record.event.payload, MetaCommitted):
                        apply_entries(self._replayed, record.event.payload.entries)
                self._positions[shard] = last


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    base = tmp_path_factory.mktemp("fuse")
    # Under /tmp, not the (0700) pytest directory: the permission tests run as nobody.
    mountpoint = Path(tempfile.mkdtemp(prefix="cfs-mnt-", dir="/tmp"))
    mountpoint.chmod(0o755)
    fs = Mounted(base, mountpoint)
    try:
        fs.start()
        yield fs
        # The mount ends cleanly on SIGTERM and leaves a consistent namespace behind.
        assert fs.mount.stop(timeout=15) == 0, fs.mount.log_tail()
        assert not is_fuse_mount(mountpoint), "still mounted after the mount process exited"
        log = fs.mount.log_path.read_text()
        assert "fuse.unexpected_error" not in log, fs.mount.log_tail(60)
        merged = fs.namespace()
        assert check_tree(merged, merged.inodes) == []
        report = asyncio.run(fs.full_check())  # the shipped checker: replicas, fragments too
        assert report.exit_code == 0, [f.line for f in report.findings] + report.unchecked
        print(f"\nmetadata-consistency-check: {report.to_dict()['stats']}")
    finally:
        fs.stop()
        mountpoint.rmdir()


@pytest.fixture
def d(mounted: Mounted, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the mount for one test; the namespace checker runs after it."""
    name: str = request.node.name
    path = mounted.path / name.replace("[", "-").replace("]", "")
    path.mkdir()
    yield path
    problems = mounted.check()
    assert problems == [], f"namespace inconsistent after {name}: {problems[:5]}"


def _errno(fn, *args, **kwargs) -> int:
    """The errno that `fn(*args)` fails with (fails the test if it succeeds)."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        assert exc.errno is not None
        return exc.errno
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} succeeded")


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_OMIT = (1 << 30) - 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def touch(path: Path, mode: int = 0o644) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, mode))


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- create / open ------------------------------------------------------------------------
def test_create_sets_mode_owner_and_exclusive_create_fails_with_eexist(d: Path) -> None:
    path = d / "f"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.close(fd)
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640 & ~umask()
    assert (st.st_uid, st.st_gid, st.st_nlink, st.st_size) == (os.getuid(), os.getgid(), 1, 0)
    assert _errno(os.open, path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644) == errno.EEXIST


def test_open_creat_without_excl_opens_the_existing_file(d: Path) -> None:
    touch(d / "f")
    ino = os.stat(d / "f").st_ino
    os.close(os.open(d / "f", os.O_CREAT | os.O_RDWR, 0o600))
    assert os.stat(d / "f").st_ino == ino
    assert stat.S_IMODE(os.stat(d / "f").st_mode) == 0o644 & ~umask()


def test_open_errors(d: Path) -> None:
    touch(d / "file")
    assert _errno(os.open, d / "missing", os.O_RDONLY) == errno.ENOENT
    assert _errno(os.open, d / "nodir" / "f", os.O_CREAT | os.O_WRONLY) == errno.ENOENT
    assert _errno(os.open, d / "file" / "f", os.O_CREAT | os.O_WRONLY) == errno.ENOTDIR
    assert _errno(os.open, d, os.O_WRONLY) == errno.EISDIR
    assert _errno(os.open, d / ("x" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    touch(d / ("y" * 255))  # the longest name is fine
    assert (d / ("y" * 255)).exists()


def test_create_updates_parent_times(d: Path) -> None:
    before = os.stat(d)
    time.sleep(0.01)
    touch(d / "f")
    after = os.stat(d)
    assert after.st_mtime_ns > before.st_mtime_ns
    assert after.st_ctime_ns > before.st_ctime_ns


def test_mknod_fifo_and_special_files(d: Path) -> None:
    os.mkfifo(d / "fifo", 0o600)
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    os.mknod(d / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    st = os.stat(d / "chr")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.mknod(d / "reg", stat.S_IFREG | 0o600)
    assert stat.S_ISREG(os.stat(d / "reg").st_mode)
    assert _errno(os.mkfifo, d / "fifo") == errno.EEXIST


# -- unlink -------------------------------------------------------------------------------
def test_unlink(d: Path) -> None:
    touch(d / "f")
    os.unlink(d / "f")
    assert not (d / "f").exists()
    assert _errno(os.unlink, d / "f") == errno.ENOENT
    os.mkdir(d / "sub")
    assert _errno(os.unlink, d / "sub") == errno.EISDIR
    assert sorted(os.listdir(d)) == ["sub"]


# -- mkdir / rmdir ------------------------------------------------------------------------
def test_mkdir(d: Path) -> None:
    os.mkdir(d / "a", 0o750)
    st = os.stat(d / "a")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750 & ~umask()
    assert st.st_nlink == 2
    assert os.stat(d).st_nlink == 3
    assert _errno(os.mkdir, d / "a") == errno.EEXIST
    touch(d / "f")
    assert _errno(os.mkdir, d / "f") == errno.EEXIST
    assert _errno(os.mkdir, d / "missing" / "x") == errno.ENOENT


def test_rmdir(d: Path) -> None:
    os.mkdir(d / "a")
    touch(d / "a" / "f")
    assert _errno(os.rmdir, d / "a") == errno.ENOTEMPTY
    assert _errno(os.rmdir, d / "a" / "f") == errno.ENOTDIR
    assert _errno(os.rmdir, d / "missing") == errno.ENOENT
    os.unlink(d / "a" / "f")
    os.rmdir(d / "a")
    assert os.stat(d).st_nlink == 2
    assert os.listdir(d) == []


def test_setgid_directory_passes_its_group_on(d: Path) -> None:
    os.chown(d, -1, 1234)
    os.chmod(d, 0o2775)
    touch(d / "f")
    os.mkdir(d / "sub")
    assert os.stat(d / "f").st_gid == 1234
    assert os.stat(d / "sub").st_gid == 1234
    assert os.stat(d / "sub").st_mode & stat.S_ISGID


# -- rename -------------------------------------------------------------------------------
def test_rename_file_over_file_replaces_it(d: Path) -> None:
    touch(d / "a")
    touch(d / "b")
    ino = os.stat(d / "a").st_ino
    os.rename(d / "a", d / "b")
    assert os.stat(d / "b").st_ino == ino
    assert os.listdir(d) == ["b"]
    assert _errno(os.rename, d / "a", d / "c") == errno.ENOENT


def test_rename_directory_over_empty_directory(d: Path) -> None:
    os.mkdir(d / "a")
    os.mkdir(d / "b")
    touch(d / "a" / "inside")
    os.rename(d / "a", d / "b")
    assert os.listdir(d / "b") == ["inside"]
    assert os.stat(d).st_nlink == 3


def test_rename_errors(d: Path) -> None:
    os.mkdir(d / "dir")
    os.mkdir(d / "full")
    touch(d / "full" / "x")
    touch(d / "file")
    assert _errno(os.rename, d / "dir", d / "full") == errno.ENOTEMPTY
    assert _errno(os.rename, d / "file", d / "dir") == errno.EISDIR
    assert _errno(os.rename, d / "dir", d / "file") == errno.ENOTDIR
    os.mkdir(d / "dir" / "sub")
    assert _errno(os.rename, d / "dir", d / "dir" / "sub" / "moved") == errno.EINVAL


def test_rename_between_directories_moves_the_link_count(d: Path) -> None:
    os.mkdir(d / "a")
    os.mkdir(d / "b")
    os.mkdir(d / "a" / "child")
    os.rename(d / "a" / "child", d / "b" / "child")
    assert os.stat(d / "a").st_nlink == 2
    assert os.stat(d / "b").st_nlink == 3
    assert os.stat(d / "b" / "child" / "..").st_ino == os.stat(d / "b").st_ino


def test_rename_noreplace_and_exchange(d: Path) -> None:
    touch(d / "a")
    os.mkdir(d / "b")
    a, b = os.stat(d / "a").st_ino, os.stat(d / "b").st_ino
    assert _errno(renameat2, d / "a", d / "b", RENAME_NOREPLACE) == errno.EEXIST
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    assert os.stat(d / "c").st_ino == a
    renameat2(d / "c", d / "b", RENAME_EXCHANGE)
    assert os.stat(d / "b").st_ino == a and stat.S_ISREG(os.stat(d / "b").st_mode)
    assert os.stat(d / "c").st_ino == b and stat.S_ISDIR(os.stat(d / "c").st_mode)
    assert _errno(renameat2, d / "c", d / "nothing", RENAME_EXCHANGE) == errno.ENOENT


# -- link ---------------------------------------------------------------------------------
def test_link(d: Path) -> None:
    touch(d / "a")
    os.link(d / "a", d / "b")
    assert os.stat(d / "a").st_nlink == 2
    assert os.stat(d / "a").st_ino == os.stat(d / "b").st_ino
    assert _errno(os.link, d / "a", d / "b") == errno.EEXIST
    os.mkdir(d / "dir")
    assert _errno(os.link, d / "dir", d / "dirlink") == errno.EPERM
    assert _errno(os.link, d / "missing", d / "c") == errno.ENOENT
    os.unlink(d / "a")
    assert os.stat(d / "b").st_nlink == 1


def test_link_changes_ctime(d: Path) -> None:
    touch(d / "a")
    before = os.stat(d / "a").st_ctime_ns
    time.sleep(0.01)
    os.link(d / "a", d / "b")
    assert os.stat(d / "a").st_ctime_ns > before


# -- symlink ------------------------------------------------------------------------------
def test_symlink_and_readlink(d: Path) -> None:
    os.symlink("target/of/link", d / "l")
    st = os.lstat(d / "l")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("target/of/link")
    assert os.readlink(d / "l") == "target/of/link"
    assert _errno(os.stat, d / "l") == errno.ENOENT  # dangling
    touch(d / "real")
    os.symlink("real", d / "good")
    assert os.stat(d / "good").st_ino == os.stat(d / "real").st_ino
    assert _errno(os.symlink, "x", d / "l") == errno.EEXIST
    assert _errno(os.readlink, d / "real") == errno.EINVAL


# -- attributes ---------------------------------------------------------------------------
def test_chmod_changes_mode_and_ctime(d: Path) -> None:
    touch(d / "f")
    before = os.stat(d / "f")
    time.sleep(0.01)
    os.chmod(d / "f", 0o4711)
    after = os.stat(d / "f")
    assert stat.S_IMODE(after.st_mode) == 0o4711
    assert after.st_ctime_ns > before.st_ctime_ns
    assert after.st_mtime_ns == before.st_mtime_ns


def test_chown_changes_owner_and_ctime(d: Path) -> None:
    touch(d / "f")
    before = os.stat(d / "f")
    time.sleep(0.01)
    os.chown(d / "f", 1000, 2000)
    after = os.stat(d / "f")
    assert (after.st_uid, after.st_gid) == (1000, 2000)
    assert after.st_ctime_ns > before.st_ctime_ns
    os.chown(d / "f", -1, 3000)
    assert (os.stat(d / "f").st_uid, os.stat(d / "f").st_gid) == (1000, 3000)


def test_utime_explicit_now_and_omit(d: Path) -> None:
    touch(d / "f")
    os.utime(d / "f", ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(d / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    before_ctime = st.st_ctime_ns
    os.utime(d / "f")  # UTIME_NOW for both
    st = os.stat(d / "f")
    assert abs(st.st_mtime_ns - time.time_ns()) < 10 * 10**9
    assert st.st_ctime_ns >= before_ctime
    # utimensat with UTIME_OMIT for atime: atime stays, mtime changes
    times = (ctypes.c_long * 4)(0, UTIME_OMIT, 5, 0)
    assert _libc.utimensat(AT_FDCWD, os.fsencode(d / "f"), times, 0) == 0
    after = os.stat(d / "f")
    assert after.st_atime_ns == st.st_atime_ns
    assert after.st_mtime_ns == 5 * 10**9


def test_truncate_metadata(d: Path) -> None:
    touch(d / "f")
    os.truncate(d / "f", 1000)
    assert os.stat(d / "f").st_size == 1000
    assert _errno(os.truncate, d, 0) == errno.EISDIR
    assert _errno(os.truncate, d / "missing", 0) == errno.ENOENT


# -- xattrs -------------------------------------------------------------------------------
def test_xattrs(d: Path) -> None:
    touch(d / "f")
    os.setxattr(d / "f", "user.color", b"blue")
    os.setxattr(d / "f", "user.bin", bytes(range(256)))
    assert os.getxattr(d / "f", "user.color") == b"blue"
    assert os.getxattr(d / "f", "user.bin") == bytes(range(256))
    assert sorted(os.listxattr(d / "f")) == ["user.bin", "user.color"]
    assert _errno(os.getxattr, d / "f", "user.none") == errno.ENODATA
    assert _errno(os.setxattr, d / "f", "user.color", b"x", os.XATTR_CREATE) == errno.EEXIST
    assert _errno(os.setxattr, d / "f", "user.new", b"x", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(d / "f", "user.color", b"red", os.XATTR_REPLACE)
    assert os.getxattr(d / "f", "user.color") == b"red"
    os.removexattr(d / "f", "user.color")
    assert os.listxattr(d / "f") == ["user.bin"]
    assert _errno(os.removexattr, d / "f", "user.color") == errno.ENODATA
    os.mkdir(d / "dir")
    os.setxattr(d / "dir", "user.on-a-dir", b"")
    assert os.getxattr(d / "dir", "user.on-a-dir") == b""


def test_acls_and_selinux_labels_are_unsupported_so_ls_asks_once_per_listing(d: Path) -> None:
    """EOPNOTSUPP, as a file system without them answers (an ACL stored would be
    enforced by nobody); `ls -l` remembers that of the device, so a long listing
    costs no xattr request per file."""
    touch(d / "f")
    os.mkdir(d / "sub")  # a default ACL belongs on a directory (the kernel says so of a file)
    # user::rw- group::r-- other::r-- in the kernel's xattr form
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in ((1, 6), (4, 4), (0x20, 4))
    )
    for name in ("system.posix_acl_access", "system.posix_acl_default", "security.selinux"):
        assert _errno(os.getxattr, d / "sub", name) == errno.EOPNOTSUPP, name
        assert _errno(os.setxattr, d / "sub", name, acl) == errno.EOPNOTSUPP, name
    assert os.listxattr(d / "sub") == []
    for i in range(20):
        touch(d / f"g{i}")
    traced = subprocess.run(
        ["strace", "-f", "-e", "trace=getxattr,lgetxattr", "ls", "-l", str(d)],
        capture_output=True,
        text=True,
        check=True,
    )
    asked = [line for line in traced.stderr.splitlines() if "getxattr(" in line]
    assert len(asked) <= 2, asked  # the first file's two questions, then none


# -- readdir ------------------------------------------------------------------------------
def test_readdir_lists_300_entries_exactly_once(d: Path) -> None:
    names = {f"entry-{i:03d}" for i in range(300)}
    for name in names:
        os.mknod(d / name, stat.S_IFREG | 0o644)
    listed = os.listdir(d)
    assert len(listed) == 300 and set(listed) == names
    with os.scandir(d) as it:
        kinds = {e.name: e.is_file(follow_symlinks=False) for e in it}
    assert all(kinds.values()) and len(kinds) == 300


def test_readdir_keeps_its_place_while_entries_come_and_go(d: Path) -> None:
    for i in range(100):
        os.mknod(d / f"e{i:03d}", stat.S_IFREG | 0o644)
    seen: list[str] = []
    with os.scandir(d) as it:
        for n, entry in enumerate(it):
            seen.append(entry.name)
            if n == 10:
                for i in range(100, 130):  # new entries may or may not show up
                    os.mknod(d / f"e{i:03d}", stat.S_IFREG | 0o644)
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    assert {f"e{i:03d}" for i in range(100)} <= set(seen), "an entry was skipped"


# -- permissions (as nobody; the kernel checks our attributes: default_permissions) --------
def _as_nobody(action: Callable[[], list[str]]) -> list[str]:
    """Run `action` as uid/gid 65534 in a forked child (its syscalls only); its result back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, act, report, exit without running pytest's code
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            result = " ".join(action())
        except BaseException as exc:
            result = f"crashed: {exc!r}"
        os.write(write_end, result.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read().decode()
    os.waitpid(pid, 0)
    return output.split()


def _outcome(fn: Callable[..., object], *args: object) -> str:
    try:
        fn(*args)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def test_permissions_are_enforced_for_other_users(d: Path) -> None:
    touch(d / "secret", 0o600)
    os.chmod(d / "secret", 0o600)
    touch(d / "public", 0o644)
    os.chmod(d / "public", 0o644)
    os.chmod(d, 0o755)

    def attempts() -> list[str]:
        return [
            _outcome(lambda: os.close(os.open(d / "secret", os.O_RDONLY))),
            _outcome(lambda: os.close(os.open(d / "public", os.O_RDONLY))),
            _outcome(lambda: os.close(os.open(d / "public", os.O_WRONLY))),
            _outcome(lambda: os.close(os.open(d / "new", os.O_CREAT | os.O_WRONLY))),
            _outcome(os.chmod, d / "public", 0o777),
            _outcome(os.chown, d / "public", NOBODY, NOBODY),
            _outcome(os.unlink, d / "public"),
            _outcome(os.setxattr, d / "public", "user.x", b"1"),
        ]

    assert _as_nobody(attempts) == [
        "EACCES", "ok", "EACCES", "EACCES", "EPERM", "EPERM", "EACCES", "EACCES"
    ]  # fmt: skip


def test_other_user_can_create_in_a_world_writable_directory(d: Path) -> None:
    os.chmod(d, 0o777)

    def create() -> list[str]:
        os.close(os.open(d / "mine", os.O_CREAT | os.O_WRONLY, 0o600))
        st = os.stat(d / "mine")
        return [str(st.st_uid), str(st.st_gid), _outcome(os.chmod, d / "mine", 0o640)]

    assert _as_nobody(create) == [str(NOBODY), str(NOBODY), "ok"]
    assert stat.S_IMODE(os.stat(d / "mine").st_mode) == 0o640


def test_sticky_directory_protects_other_users_files(d: Path) -> None:
    os.chmod(d, 0o1777)
    touch(d / "roots")
    assert _as_nobody(lambda: [_outcome(os.unlink, d / "roots")]) == ["EPERM"]


# -- statfs -------------------------------------------------------------------------------
def test_statfs(mounted: Mounted) -> None:
    st = os.statvfs(mounted.path)
    assert st.f_namemax == 255
    assert st.f_files > st.f_ffree > 0


# -- file contents ------------------------------------------------------------------------
def test_write_then_read_back(d: Path) -> None:
    (d / "f").write_bytes(b"hello, world\n")
    assert (d / "f").read_bytes() == b"hello, world\n"
    assert os.stat(d / "f").st_size == 13


def test_size_includes_unflushed_writes(d: Path) -> None:
    with open(d / "f", "wb", buffering=0) as f:
        f.write(b"x" * 5000)
        assert os.stat(d / "f").st_size == 5000
        assert os.fstat(f.fileno()).st_size == 5000
    assert os.stat(d / "f").st_size == 5000


def test_append(d: Path) -> None:
    (d / "f").write_bytes(b"one\n")
    with open(d / "f", "ab") as f:
        f.write(b"two\n")
    fd = os.open(d / "f", os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"three\n")  # O_APPEND wins over the file offset
    os.close(fd)
    assert (d / "f").read_bytes() == b"one\ntwo\nthree\n"


def test_overwrite_in_the_middle(d: Path) -> None:
    (d / "f").write_bytes(b"a" * 10_000)
    with open(d / "f", "r+b") as f:
        f.seek(4000)
        f.write(b"B" * 100)
    data = (d / "f").read_bytes()
    assert data == b"a" * 4000 + b"B" * 100 + b"a" * 5900


def test_sparse_file_reads_zeros_in_the_hole(d: Path) -> None:
    with open(d / "f", "wb") as f:
        f.write(b"start")
        f.seek(5 * MiB)
        f.write(b"end")
    assert os.stat(d / "f").st_size == 5 * MiB + 3
    with open(d / "f", "rb") as f:
        assert f.read(5) == b"start"
        f.seek(3 * MiB)
        assert f.read(4096) == bytes(4096)
        f.seek(5 * MiB - 2)
        assert f.read() == b"\0\0end"


def test_truncate_shrinks_and_extends_with_zeros(d: Path) -> None:
    (d / "f").write_bytes(b"0123456789" * 100)
    os.truncate(d / "f", 10)
    assert (d / "f").read_bytes() == b"0123456789"
    os.truncate(d / "f", 20)
    assert (d / "f").read_bytes() == b"0123456789" + bytes(10)
    with open(d / "f", "r+b") as f:
        f.truncate(5)
        f.write(b"!")  # at offset 0
    assert (d / "f").read_bytes() == b"!1234"


def test_open_with_o_trunc_empties_the_file(d: Path) -> None:
    (d / "f").write_bytes(b"old contents")
    with open(d / "f", "wb") as f:
        f.write(b"new")
    assert (d / "f").read_bytes() == b"new"


def test_large_file_round_trip(d: Path) -> None:
    data = os.urandom(9 * MiB + 12345)
    with open(d / "big", "wb") as f:
        for start in range(0, len(data), MiB):
            f.write(data[start : start + MiB])
        f.flush()
        os.fsync(f.fileno())
    assert os.stat(d / "big").st_size == len(data)
    got = (d / "big").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    with open(d / "big", "rb") as f:
        f.seek(4 * MiB - 10)  # across a chunk boundary
        assert f.read(20) == data[4 * MiB - 10 : 4 * MiB + 10]


def test_data_survives_rename_and_hard_link(d: Path) -> None:
    (d / "a").write_bytes(b"payload")
    os.link(d / "a", d / "b")
    os.rename(d / "a", d / "c")
    assert (d / "b").read_bytes() == b"payload"
    assert (d / "c").read_bytes() == b"payload"


def test_unlinked_file_stays_usable_while_open(d: Path) -> None:
    fd = os.open(d / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"abc" * 1000)
        os.fsync(fd)
        os.unlink(d / "f")
        assert os.pread(fd, 6, 0) == b"abcabc"
        assert os.fstat(fd).st_nlink == 0
        os.write(fd, b"more")
        os.fsync(fd)  # nothing to keep it for, and no error either
    finally:
        os.close(fd)
    assert os.listdir(d) == []


def test_two_descriptors_see_each_others_writes(d: Path) -> None:
    w = os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    r = os.open(d / "f", os.O_RDONLY)
    try:
        os.write(w, b"shared")
        assert os.pread(r, 100, 0) == b"shared"
    finally:
        os.close(w)
        os.close(r)


# -- the CLI against the same site ----------------------------------------------------------
def cfs(mounted: Mounted, *args: str) -> Result:
    runner = CliRunner()
    cluster = ["--cluster", ",".join(mounted.site.urls), "--site", SITE]
    argv = [args[0], *cluster, *args[1:]] if args[0] == "fs" else list(args)
    return runner.invoke(app, argv, catch_exceptions=False)


def test_cli_fs_sees_what_the_mount_wrote_and_the_other_way_round(
    mounted: Mounted, d: Path, tmp_path: Path
) -> None:
    (d / "sub").mkdir()
    (d / "sub" / "hello").write_bytes(b"hello from the mount\n")
    rel = f"/{d.name}/sub"
    listed = cfs(mounted, "fs", "ls", "--json", rel)
    assert listed.exit_code == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert (entry["name"], entry["kind"], entry["size"]) == ("hello", "file", 21)
    shown = cfs(mounted, "fs", "stat", "--json", f"{rel}/hello")
    assert json.loads(shown.stdout)["ino"] == os.stat(d / "sub" / "hello").st_ino
    assert cfs(mounted, "fs", "cat", f"{rel}/hello").stdout == "hello from the mount\n"

    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(300_000))
    assert cfs(mounted, "fs", "put", str(local), f"{rel}/").exit_code == 0
    assert (d / "sub" / "local.bin").read_bytes() == local.read_bytes()
    assert cfs(mounted, "fs", "get", f"{rel}/local.bin", str(tmp_path / "back")).exit_code == 0
    assert (tmp_path / "back").read_bytes() == local.read_bytes()

    assert cfs(mounted, "fs", "mkdir", "-p", f"{rel}/x/y/z").exit_code == 0
    assert (d / "sub" / "x" / "y" / "z").is_dir()
    assert cfs(mounted, "fs", "rm", "-r", f"{rel}/x").exit_code == 0
    # Another client's removal: the kernel may trust its cached entry for ENTRY_TIMEOUT_S.
    time.sleep(ENTRY_TIMEOUT_S + 0.1)
    assert not (d / "sub" / "x").exists()


def test_cli_fs_errors_are_one_line(mounted: Mounted, d: Path) -> None:
    missing = cfs(mounted, "fs", "stat", f"/{d.name}/missing")
    assert missing.exit_code == 1
    assert missing.stderr == f"cfs: /{d.name}/missing: No such file or directory\n"
    (d / "dir").mkdir()
    refused = cfs(mounted, "fs", "rm", f"/{d.name}/dir")
    assert (refused.exit_code, refused.stderr) == (1, f"cfs: /{d.name}/dir: Is a directory\n")
    assert cfs(mounted, "fs", "rm", "-f", f"/{d.name}/missing").exit_code == 0
    not_mounted = cfs(mounted, "umount", str(d))
    assert (not_mounted.exit_code, not_mounted.stderr) == (1, f"cfs: {d}: not mounted\n")


def test_cli_mount_in_the_background_then_umount(
    mounted: Mounted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", child_pythonpath())
    second = Path(tempfile.mkdtemp(prefix="cfs-mnt2-", dir="/tmp"))
    pid = None
    try:
        result = cfs(
            mounted,
            "mount",
            str(second),
            "--cluster",
            ",".join(mounted.site.urls),
            "--site",
            SITE,
            "--shards",
            str(SHARDS),
            "--log",
            str(tmp_path / "mount2.log"),
        )
        assert result.exit_code == 0, result.stderr
        pid = int(result.stdout.split("(pid ")[1].split(",")[0])
        assert is_fuse_mount(second)
        (mounted.path / "seen-by-both").write_bytes(b"close-to-open")
        assert (second / "seen-by-both").read_bytes() == b"close-to-open"
        with open(second / "seen-by-both", "ab") as f:
            f.write(b" across mounts")
        assert (mounted.path / "seen-by-both").read_bytes() == b"close-to-open across mounts"
        again = cfs(mounted, "mount", str(second), "--cluster", ",".join(mounted.site.urls))
        assert (again.exit_code, again.stderr) == (1, f"cfs: {second}: already mounted\n")
        assert cfs(mounted, "umount", str(second)).exit_code == 0
        assert not is_fuse_mount(second)
        deadline = time.monotonic() + 15
        while _alive(pid):
            assert time.monotonic() < deadline, "mount process did not exit after umount"
            time.sleep(0.05)
        pid = None
    finally:
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
        if is_fuse_mount(second):
            subprocess.run(["umount", "-l", str(second)], check=False)
        second.rmdir()


def _alive(pid: int) -> bool:
    """The background mount is not our child (it has its own session): poll /proc."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
