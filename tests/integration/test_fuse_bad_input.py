"""Odd but legal input through a real FUSE mount (issue 19, "bad input everywhere").

Names at the length limit (in bytes, multi-byte characters included), names with bytes
that are not UTF-8 or hold newlines, spaces and control characters, writes at huge
offsets, sparse files, O_DIRECT, and a truncate racing a write: POSIX errnos and no
corruption. The site and mount are `test_fuse_posix`'s (same fixture: after the module
the mount must stop cleanly and the shipped consistency checker must find nothing).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_fuse_posix import _errno, d, mounted, pytestmark, touch

__all__ = ["d", "mounted", "pytestmark"]  # the fixtures and the skip, shared

MiB = 1024 * 1024
CHUNK = 4 * MiB


def names(directory: Path) -> set[bytes]:
    return set(os.listdir(os.fsencode(directory)))


# -- names --------------------------------------------------------------------------------
def test_name_limit_is_255_bytes_not_characters(d: Path) -> None:
    longest = "é" * 127 + "x"  # 255 bytes in UTF-8
    too_long = "é" * 128  # 256 bytes, 128 characters
    assert len(longest.encode()) == 255 and len(too_long.encode()) == 256
    (d / longest).write_bytes(b"ok")
    assert (d / longest).read_bytes() == b"ok"
    assert names(d) == {longest.encode()}
    assert _errno(os.open, d / too_long, os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    assert _errno(os.mkdir, d / too_long) == errno.ENAMETOOLONG
    assert _errno(os.rename, d / longest, d / too_long) == errno.ENAMETOOLONG
    assert _errno(os.link, d / longest, d / too_long) == errno.ENAMETOOLONG
    assert _errno(os.symlink, "target", d / too_long) == errno.ENAMETOOLONG
    assert names(d) == {longest.encode()}  # nothing half-made


NOT_UTF8 = [
    b"\xff\xfe not utf-8",
    b"latin-1 caf\xe9",
    b"\xc3",  # a UTF-8 sequence cut short
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xc0\xaf",  # an overlong '/'
]
ODD_NAMES = [
    b"line\nbreak",
    b"\n",
    b" ",
    b" leading and trailing ",
    b"\x01",
    b"tab\there",
    b"\x7f\x1b[31m",
    b"-rf",
    b"back\\slash",
    b"*?[]",
    "e\u0301 vs \u00e9".encode(),  # two spellings of one glyph: two names
    "\u202eright-to-left".encode(),
    "😀".encode() * 63,  # 252 bytes
]


@pytest.mark.parametrize("name", ODD_NAMES, ids=lambda n: repr(n)[:24])
def test_odd_bytes_in_names_round_trip(d: Path, name: bytes) -> None:
    base = os.fsencode(d)
    path = os.path.join(base, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, name)
    os.close(fd)
    assert names(d) == {name}
    with open(path, "rb") as f:
        assert f.read() == name
    assert os.stat(path).st_size == len(name)
    other = os.path.join(base, name + b".2")
    os.rename(path, other)
    assert names(d) == {name + b".2"}
    os.mkdir(path)  # the same name as a directory, with a child of the same name
    touch(Path(os.fsdecode(os.path.join(path, name))))
    assert set(os.listdir(path)) == {name}
    os.unlink(os.path.join(path, name))
    os.rmdir(path)
    os.symlink(name, path)
    assert os.readlink(path) == name
    os.unlink(path)
    os.unlink(other)
    assert names(d) == set()


@pytest.mark.parametrize("name", NOT_UTF8, ids=lambda n: repr(n)[:24])
def test_names_that_are_not_utf8_are_refused_with_eilseq(d: Path, name: bytes) -> None:
    """Names are UTF-8 text in ClaudeFS (the metadata wire is JSON): other bytes are
    refused with EILSEQ, as by file systems that store UTF-8 names, and nothing is
    made. (They used to fail with EIO and log an error per lookup.)"""
    base = os.fsencode(d)
    path = os.path.join(base, name)
    (d / "file").write_bytes(b"x")
    assert _errno(os.open, path, os.O_CREAT | os.O_WRONLY) == errno.EILSEQ
    assert _errno(os.mkdir, path) == errno.EILSEQ
    assert _errno(os.stat, path) == errno.EILSEQ
    assert _errno(os.rename, os.path.join(base, b"file"), path) == errno.EILSEQ
    assert _errno(os.link, os.path.join(base, b"file"), path) == errno.EILSEQ
    assert _errno(os.symlink, b"target", path) == errno.EILSEQ
    assert _errno(os.symlink, name, os.path.join(base, b"link")) == errno.EILSEQ
    assert names(d) == {b"file"}
    assert (d / "file").read_bytes() == b"x"


def test_names_that_differ_only_in_bytes_are_different_files(d: Path) -> None:
    base = os.fsencode(d)
    family = ["café".encode(), "cafe\u0301".encode(), "CAFÉ".encode(), b"cafe"]
    for i, name in enumerate(family):
        with open(os.path.join(base, name), "xb") as f:
            f.write(bytes([i]))
    assert names(d) == set(family)
    for i, name in enumerate(family):
        with open(os.path.join(base, name), "rb") as f:
            assert f.read() == bytes([i])


# -- offsets and holes --------------------------------------------------------------------
def test_pwrite_at_one_tebibyte_makes_a_sparse_file(d: Path) -> None:
    path = d / "far"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, b"tail", 2**40) == 4
        os.fsync(fd)
        st = os.fstat(fd)
        assert st.st_size == 2**40 + 4
        assert st.st_blocks * 512 < 64 * MiB, st.st_blocks  # one chunk's worth, not 1 TiB
        assert os.pread(fd, 4096, 0) == bytes(4096)
        assert os.pread(fd, 4096, 2**39) == bytes(4096)
        assert os.pread(fd, 8, 2**40 - 4) == bytes(4) + b"tail"
        assert os.pread(fd, 100, 2**40 + 4) == b""  # at EOF
    finally:
        os.close(fd)
    assert path.stat().st_size == 2**40 + 4  # as another open sees it


def test_writes_beyond_the_largest_file_fail_with_efbig(d: Path) -> None:
    path = d / "too-far"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        limit = 2**63 - 1  # the kernel's MAX_LFS_FILESIZE for a FUSE file
        code = _errno(os.pwrite, fd, b"x" * 8, limit - 4)
        assert code in (errno.EFBIG, errno.EINVAL), errno.errorcode[code]
        assert os.fstat(fd).st_size == 0  # nothing half-written
    finally:
        os.close(fd)


def test_holes_read_as_zeros_and_take_no_room(d: Path) -> None:
    path = d / "holes"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"A" * 10, 0)
        os.pwrite(fd, b"B" * 10, 3 * CHUNK + 100)  # skips two whole chunks
        os.ftruncate(fd, 5 * CHUNK)  # and a hole at the end
        os.fsync(fd)
    finally:
        os.close(fd)
    st = path.stat()
    assert st.st_size == 5 * CHUNK
    assert 0 < st.st_blocks * 512 < 2 * CHUNK, st.st_blocks  # two chunks hold data
    with open(path, "rb") as f:
        data = f.read()
    expected = bytearray(5 * CHUNK)
    expected[0:10] = b"A" * 10
    expected[3 * CHUNK + 100 : 3 * CHUNK + 110] = b"B" * 10
    assert data == expected


def test_shrink_then_grow_reads_zeros_not_old_bytes(d: Path) -> None:
    path = d / "regrow"
    path.write_bytes(b"\xaa" * (CHUNK + 4096))
    os.truncate(path, 100)
    os.truncate(path, CHUNK + 4096)
    assert path.read_bytes() == b"\xaa" * 100 + bytes(CHUNK + 4096 - 100)


# -- O_DIRECT -----------------------------------------------------------------------------
def test_o_direct_works_or_is_refused_cleanly(d: Path) -> None:
    path = d / "direct"
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    except OSError as exc:
        assert exc.errno == errno.EINVAL, exc
        assert not path.exists() or path.stat().st_size == 0
        return
    block = mmap.mmap(-1, 2 * 4096)  # page-aligned, as O_DIRECT wants
    block.write(bytes(range(256)) * 32)
    try:
        assert os.pwrite(fd, block, 4096) == len(block)
        back = mmap.mmap(-1, 2 * 4096)
        assert os.preadv(fd, [back], 4096) == len(block)
        assert bytes(back) == bytes(block)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(4096) + bytes(block)


# -- a truncate racing a write ------------------------------------------------------------
@pytest.mark.parametrize("rounds", [14])
def test_concurrent_truncate_and_write_leave_one_of_the_serial_outcomes(
    d: Path, rounds: int
) -> None:
    """Two threads, one file: one writes 64 KiB of b'W' at 0, the other truncates to
    16 KiB. Whatever the order, the file is one of the two serial outcomes (never old
    bytes, zeros inside the written range, or an EIO)."""
    size, cut = 64 * 1024, 16 * 1024
    seen: dict[str, int] = {}
    for i in range(rounds):
        path = d / f"race-{i}"
        path.write_bytes(b"o" * size)
        errors: list[BaseException] = []
        start = threading.Barrier(2)
        # who goes first is up to the scheduler; a lag of up to 3 ms either way varies it
        lag = ((i % 7) - 3) / 1000

        def write(
            target: Path = path,
            start: threading.Barrier = start,
            errors: list[BaseException] = errors,
            lag: float = lag,
        ) -> None:
            try:
                fd = os.open(target, os.O_WRONLY)
                try:
                    start.wait()
                    time.sleep(lag if lag > 0 else 0)
                    assert os.pwrite(fd, b"W" * size, 0) == size
                finally:
                    os.close(fd)
            except BaseException as exc:
                errors.append(exc)

        def truncate(
            target: Path = path,
            start: threading.Barrier = start,
            errors: list[BaseException] = errors,
            lag: float = lag,
        ) -> None:
            try:
                start.wait()
                time.sleep(-lag if lag < 0 else 0)
                os.truncate(target, cut)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write), threading.Thread(target=truncate)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        final = path.read_bytes()
        outcomes = {
            "truncate, then write": b"W" * size,
            "write, then truncate": b"W" * cut,
        }
        found = [name for name, data in outcomes.items() if data == final]
        assert found, (
            f"round {i}: {len(final)} bytes, {final[:8]!r}...{final[-8:]!r} "
            f"(W: {final.count(b'W')}, o: {final.count(b'o')}, zeros: {final.count(0)})"
        )
        seen[found[0]] = seen.get(found[0], 0) + 1
    print(f"\nserial outcomes seen: {seen}")
