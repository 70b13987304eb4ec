"""Fragment store layouts: files + rocksdict index vs rocksdict with blob files.

    python bench/fragment_store.py [--quick] [--json PATH] [--dir DIR]

Both variants are durable the same way: a put returns only after the fragment
and its index entry (size, CRC-32, counters) are fsync'd. Figures for 1 MiB
fragments, MB/s (MiB/s): put from one thread and from four, get (CRC checked)
from one thread after reopening the store. The page cache is warm for gets.

(a) `files`: the real `cfs_chunkstore.store.FileFragmentStore` (write tmp + fsync
    + rename + directory fsync, then one synced rocksdict WriteBatch).
(b) `blobs`: rocksdict with `enable_blob_files` (values >= 4 KiB go to blob
    files), the value, index entry and counters in one WriteBatch with
    `WriteOptions.sync = True`; gets after a flush, so they read blob files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parents[1]
for sub in ("libs", "contracts", "services"):
    sys.path.insert(0, str(ROOT / sub))

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from report import write_json
from cfs.logs import setup_logging
from cfs_chunkstore.store import FileFragmentStore

MiB = 1024 * 1024
FRAGMENT = 1 * MiB
CHUNK = "ab" * 32
_ENTRY = struct.Struct(">QIQ")
_U64 = struct.Struct(">Q")


class BlobStore:
    """The alternative layout, with the same bookkeeping per put as FileFragmentStore."""

    def __init__(self, root: Path) -> None:
        options = Options(raw_mode=True)
        options.set_enable_blob_files(True)
        options.set_min_blob_size(4096)
        options.set_blob_file_size(256 * MiB)
        options.set_enable_blob_gc(True)
        options.set_write_buffer_size(64 * MiB)
        self._db = Rdict(str(root), options=options)
        self._sync = WriteOptions()
        self._sync.sync = True
        self._lock = threading.Lock()
        self._used = 0
        self._count = 0

    def put(self, key: str, data: bytes, crc32: int) -> None:
        if zlib.crc32(data) != crc32:
            raise ValueError("crc mismatch")
        with self._lock:
            self._used += len(data)
            self._count += 1
            batch = WriteBatch(raw_mode=True)
            batch.put(b"d" + key.encode(), data)
            batch.put(b"f" + key.encode(), _ENTRY.pack(len(data), crc32, time.time_ns()))
            batch.put(b"m:used", _U64.pack(self._used))
            batch.put(b"m:count", _U64.pack(self._count))
            self._db.write(batch, self._sync)

    def get(self, key: str) -> bytes:
        size, crc32, _ = _ENTRY.unpack(cast(bytes, self._db.get(b"f" + key.encode())))
        data = cast(bytes, self._db.get(b"d" + key.encode()))
        if len(data) != size or zlib.crc32(data) != crc32:
            raise ValueError("corrupt")
        return data

    def flush(self) -> None:
        self._db.flush()

    def close(self) -> None:
        self._db.close()


def _keys(n: int, offset: int = 0) -> list[str]:
    return [f"{CHUNK}.copy3.{(offset + i) % 1000}" for i in range(n)]


def _payloads() -> list[tuple[bytes, int]]:
    blobs = [os.urandom(FRAGMENT) for _ in range(8)]
    return [(b, zlib.crc32(b)) for b in blobs]


def _rate(n: int, seconds: float) -> float:
    return n * FRAGMENT / MiB / seconds


def _timed_puts(put: Callable[[str, bytes, int], object], keys: list[str], threads: int) -> float:
    payloads = _payloads()

    def one(i: int) -> None:
        data, crc = payloads[i % len(payloads)]
        put(keys[i], data, crc)

    start = time.perf_counter()
    if threads == 1:
        for i in range(len(keys)):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(len(keys))))
    return _rate(len(keys), time.perf_counter() - start)


def _timed_gets(get: Callable[[str], object], keys: list[str]) -> float:
    start = time.perf_counter()
    for key in keys:
        get(key)
    return _rate(len(keys), time.perf_counter() - start)


def bench_files(base: Path, n: int) -> dict[str, float]:
    root = base / "files"
    store = FileFragmentStore(root, node="bench", reserve_bytes=0)
    seq = _timed_puts(store.put, _keys(n), 1)
    par = _timed_puts(store.put, _keys(n, 500), 4)
    store.close()
    store = FileFragmentStore(root, node="bench", reserve_bytes=0)
    get = _timed_gets(store.get, _keys(n))
    store.close()
    shutil.rmtree(root)
    return {"put_mb_s": seq, "put_4threads_mb_s": par, "get_mb_s": get}


def bench_blobs(base: Path, n: int) -> dict[str, float]:
    root = base / "blobs"
    store = BlobStore(root)
    seq = _timed_puts(store.put, _keys(n), 1)
    par = _timed_puts(store.put, _keys(n, 500), 4)
    store.flush()
    store.close()
    store = BlobStore(root)
    get = _timed_gets(store.get, _keys(n))
    store.close()
    shutil.rmtree(root)
    return {"put_mb_s": seq, "put_4threads_mb_s": par, "get_mb_s": get}


def run(quick: bool, directory: Path | None) -> dict[str, object]:
    n = 48 if quick else 256
    rounds = 1 if quick else 3
    base = Path(tempfile.mkdtemp(prefix="cfs-bench-store-", dir=directory))
    samples: dict[str, list[dict[str, float]]] = {"files": [], "blobs": []}
    try:
        for _ in range(rounds):
            samples["files"].append(bench_files(base, n))
            samples["blobs"].append(bench_blobs(base, n))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results: dict[str, object] = {"fragment_bytes": FRAGMENT, "fragments": n, "rounds": rounds}
    for variant, runs in samples.items():
        results[variant] = {
            metric: round(statistics.median(r[metric] for r in runs), 1) for metric in runs[0]
        }
    files = cast(dict[str, float], results["files"])
    blobs = cast(dict[str, float], results["blobs"])
    results["choice"] = (
        "files"
        if files["put_mb_s"] + files["get_mb_s"] >= blobs["put_mb_s"] + blobs["get_mb_s"]
        else "blobs"
    )
    return results


def main() -> None:
    # The runs kill nodes and servers on purpose; only errors are worth a line each.
    setup_logging(os.environ.get("CFS_LOG_LEVEL", "ERROR"), service="bench")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer fragments, one round")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--dir", type=Path, help="directory on the disk to measure (default TMP)")
    args = parser.parse_args()
    results = run(args.quick, args.dir)
    for variant in ("files", "blobs"):
        figures = cast(dict[str, float], results[variant])
        print(
            f"{variant:6s} put {figures['put_mb_s']:8.1f} MB/s   "
            f"put x4 {figures['put_4threads_mb_s']:8.1f} MB/s   get {figures['get_mb_s']:8.1f} MB/s"
        )
    print(f"faster durable layout: {results['choice']}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
