"""FileFragmentStore on a tmp dir: durability bookkeeping, checksums, listing, reopen."""

from __future__ import annotations

import errno
import os
import zlib
from pathlib import Path

import pytest

from cfs_chunkstore.store import (
    ChecksumMismatch,
    FileFragmentStore,
    FragmentChanged,
    FragmentCorrupt,
    FragmentNotFound,
    InvalidKey,
    StoreFull,
    default_reserve,
    fragment_path,
)
from cfs_contracts.data import fragment_key

CHUNK_A = "a" * 64
CHUNK_B = "b" * 63 + "c"


def key(index: int, chunk: str = CHUNK_A, scheme: str = "ec2+1") -> str:
    return fragment_key(chunk, scheme, index)


def put(store: FileFragmentStore, k: str, data: bytes) -> None:
    store.put(k, data, zlib.crc32(data))


@pytest.fixture
def store(tmp_path: Path):
    s = FileFragmentStore(tmp_path / "chunks", node="n1", reserve_bytes=0)
    yield s
    s.close()


def flip_byte(path: Path, offset: int = 10) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_put_get_roundtrip(store: FileFragmentStore) -> None:
    data = os.urandom(100_000)
    info = store.put(key(0), data, zlib.crc32(data))
    assert info.key == key(0)
    assert info.size == len(data)
    assert info.crc32 == zlib.crc32(data)
    assert info.stored_ms > 0
    got_info, got = store.get(key(0))
    assert got == data
    assert got_info == info
    assert store.contains(key(0))
    assert not store.contains(key(1))
    assert store.verify(key(0)) == info
    assert fragment_path(store.root, key(0)).read_bytes() == data
    # empty fragments are legal (the tail of an empty chunk)
    put(store, key(1), b"")
    assert store.get(key(1))[1] == b""


def test_put_with_wrong_crc_is_refused(store: FileFragmentStore) -> None:
    data = b"hello fragment"
    with pytest.raises(ChecksumMismatch) as caught:
        store.put(key(0), data, zlib.crc32(data) ^ 1)
    assert caught.value.errno == errno.EIO
    assert "arrived damaged" in str(caught.value)
    assert not store.contains(key(0))
    assert not fragment_path(store.root, key(0)).exists()
    assert store.stat().fragments == 0


def test_invalid_keys(store: FileFragmentStore) -> None:
    for bad in ("nope", "../../etc/passwd", f"{CHUNK_A}.ec2+1.x", f"{'A' * 64}.ec2+1.0"):
        with pytest.raises(InvalidKey):
            store.put(bad, b"x", zlib.crc32(b"x"))
        with pytest.raises(InvalidKey):
            store.get(bad)


def test_flipped_byte_detected_on_get_and_verify(store: FileFragmentStore) -> None:
    data = os.urandom(4096)
    put(store, key(2), data)
    flip_byte(fragment_path(store.root, key(2)))
    with pytest.raises(FragmentCorrupt) as caught:
        store.get(key(2))
    assert caught.value.errno == errno.EIO
    assert caught.value.reason == "corrupt"
    assert "failed its checksum" in str(caught.value)
    assert f"0x{zlib.crc32(data):08x}" in str(caught.value)
    with pytest.raises(FragmentCorrupt):
        store.verify(key(2))


def test_truncated_and_missing_files_detected(store: FileFragmentStore) -> None:
    put(store, key(0), b"x" * 1000)
    put(store, key(1), b"y" * 1000)
    path = fragment_path(store.root, key(0))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(FragmentCorrupt, match="wrong size"):
        store.verify(key(0))
    fragment_path(store.root, key(1)).unlink()
    with pytest.raises(FragmentCorrupt) as caught:
        store.get(key(1))
    assert caught.value.reason == "missing"


def test_delete(store: FileFragmentStore) -> None:
    put(store, key(0), b"abc")
    put(store, key(1), b"defg")
    info = store.delete(key(0))
    assert info.size == 3
    assert not store.contains(key(0))
    assert not fragment_path(store.root, key(0)).exists()
    with pytest.raises(FragmentNotFound) as caught:
        store.get(key(0))
    assert caught.value.errno == errno.ENOENT
    with pytest.raises(FragmentNotFound) as caught:
        store.delete(key(0))
    assert caught.value.errno == errno.ENOENT
    assert "not held by node n1" in str(caught.value)
    assert store.get(key(1))[1] == b"defg"


def test_list_paging_and_chunk_filter(store: FileFragmentStore) -> None:
    keys = sorted([key(i) for i in range(5)] + [key(i, CHUNK_B, "copy2") for i in range(2)])
    for k in keys:
        put(store, k, k.encode())
    everything, more = store.list()
    assert [f.key for f in everything] == keys
    assert not more

    pages: list[str] = []
    after = ""
    while True:
        page, more = store.list(after=after, limit=3)
        pages += [f.key for f in page]
        if not more:
            break
        assert len(page) == 3
        after = page[-1].key
    assert pages == keys

    only_a, more = store.list(chunk_id=CHUNK_A)
    assert [f.key for f in only_a] == [key(i) for i in range(5)]
    assert not more
    page, more = store.list(chunk_id=CHUNK_A, after=key(1), limit=2)
    assert [f.key for f in page] == [key(2), key(3)]
    assert more
    only_b, _ = store.list(chunk_id=CHUNK_B)
    assert [f.key for f in only_b] == [key(0, CHUNK_B, "copy2"), key(1, CHUNK_B, "copy2")]
    assert store.list(chunk_id="c" * 64) == ([], False)
    with pytest.raises(InvalidKey):
        store.list(chunk_id="xyz")


def test_stat_accounting(store: FileFragmentStore) -> None:
    status = store.stat()
    assert (status.node, status.used_bytes, status.fragments) == ("n1", 0, 0)
    assert status.capacity_bytes > 0
    assert 0 < status.free_bytes <= status.capacity_bytes
    put(store, key(0), b"a" * 100)
    put(store, key(1), b"b" * 50)
    assert (store.stat().used_bytes, store.stat().fragments) == (150, 2)
    put(store, key(0), b"a" * 70)  # rewrite: size changes, count does not
    assert (store.stat().used_bytes, store.stat().fragments) == (120, 2)
    store.delete(key(1))
    assert (store.stat().used_bytes, store.stat().fragments) == (70, 1)


def test_reserve_refuses_puts(tmp_path: Path) -> None:
    probe = FileFragmentStore(tmp_path / "probe", node="n9")
    capacity = probe.stat().capacity_bytes
    assert probe.reserve_bytes == default_reserve(capacity)
    assert probe.reserve_bytes >= 64 * 1024 * 1024
    probe.close()
    with FileFragmentStore(tmp_path / "full", node="n9", reserve_bytes=2 * capacity) as full:
        assert full.stat().free_bytes == 0
        with pytest.raises(StoreFull) as caught:
            put(full, key(0), b"x" * 10)
        assert caught.value.errno == errno.ENOSPC
        assert str(caught.value).startswith("node n9 is full: ")
        assert " bytes free" in str(caught.value)
        assert not full.contains(key(0))


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    root = tmp_path / "chunks"
    data = {key(i): os.urandom(1000 + i) for i in range(10)}
    with FileFragmentStore(root, node="n1", reserve_bytes=0) as store:
        for k, v in data.items():
            put(store, k, v)
        store.delete(key(3))
        before = store.stat()
    del data[key(3)]
    with FileFragmentStore(root, node="n1", reserve_bytes=0) as store:
        assert store.removed_at_open == 0
        after = store.stat()
        assert (after.used_bytes, after.fragments) == (before.used_bytes, before.fragments)
        assert after.fragments == 9
        for k, v in data.items():
            assert store.get(k)[1] == v
        assert [f.key for f in store.list()[0]] == sorted(data)


def test_open_removes_orphans_and_temporaries(tmp_path: Path) -> None:
    """A crash between the rename and the index write leaves a file nobody acknowledged."""
    root = tmp_path / "chunks"
    with FileFragmentStore(root, node="n1", reserve_bytes=0) as store:
        put(store, key(0), b"kept")
    directory = fragment_path(root, key(0)).parent
    (directory / key(1)).write_bytes(b"orphan")
    (directory / f".{key(2)}.1234abcd.tmp").write_bytes(b"half")
    with FileFragmentStore(root, node="n1", reserve_bytes=0) as store:
        assert store.removed_at_open == 2
        assert sorted(p.name for p in directory.iterdir()) == [key(0)]
        assert store.get(key(0))[1] == b"kept"
        assert store.stat().fragments == 1


def test_second_open_of_same_root_fails(store: FileFragmentStore) -> None:
    with pytest.raises(Exception, match=r"(?i)lock"):
        FileFragmentStore(store.root, node="n1")


def test_conditional_delete_spares_a_fragment_stored_again(store: FileFragmentStore) -> None:
    """GC deletes on the stored time it listed: a client's put of the same chunk since
    then (a new file with the same content) wins, and nothing changes."""
    put(store, key(0), b"abc")
    held = store.info(key(0))
    assert held is not None
    with pytest.raises(FragmentChanged) as refused:
        store.delete(key(0), stored_ms=held.stored_ms - 1)  # listed before the last put
    assert refused.value.errno == errno.ESTALE
    assert store.contains(key(0)) and store.stat().fragments == 1
    assert store.delete(key(0), stored_ms=held.stored_ms).size == 3
    assert not store.contains(key(0))
