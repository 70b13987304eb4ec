"""A metadata snapshot file: one tar.gz holding a manifest, shard images and KV dumps.

    manifest.json            SnapshotManifest (format, cluster, cut, per-file SHA-256)
    shards/shard-001.img     length-prefixed key/value pairs (cfs.backup.image)
    kv/nodes.parquet         KV buckets, one row per key (guide: backup table)

`read_snapshot` checks everything before anything is changed: the archive reads to
its end, the format is one this release knows, every file matches its checksum and
every image parses to the record count the manifest names. A corrupt snapshot is
refused with the reason (the guide's "corrupt snapshot!" case).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from cfs.backup.image import ImageFormatError, iter_pairs
from cfs_contracts.backup import SNAPSHOT_FORMAT, SnapshotManifest

MANIFEST = "manifest.json"


class SnapshotInvalid(Exception):
    """The file is not a usable snapshot; the message says why."""


@dataclass(frozen=True)
class Snapshot:
    manifest: SnapshotManifest
    images: dict[str, bytes]  # shard -> image bytes


def write_snapshot(
    path: Path,
    manifest: SnapshotManifest,
    images: dict[str, bytes],
    kv_files: dict[str, bytes],
) -> SnapshotManifest:
    """Write atomically (temp file, fsync, rename); returns the manifest with checksums.

    `manifest.shards`/`kv` give everything but the file names and checksums, filled here.
    """
    shards = tuple(
        cut.model_copy(
            update={
                "file": f"shards/shard-{cut.shard}.img",
                "bytes": len(images[cut.shard]),
                "sha256": hashlib.sha256(images[cut.shard]).hexdigest(),
            }
        )
        for cut in manifest.shards
    )
    kv = tuple(
        dump.model_copy(
            update={
                "file": f"kv/{dump.bucket}.parquet",
                "sha256": hashlib.sha256(kv_files[dump.bucket]).hexdigest(),
            }
        )
        for dump in manifest.kv
    )
    final = manifest.model_copy(update={"shards": shards, "kv": kv})
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as raw:
        with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) as tar:
            _add(tar, MANIFEST, final.model_dump_json(indent=2).encode())
            for cut in shards:
                _add(tar, cut.file, images[cut.shard])
            for dump in kv:
                _add(tar, dump.file, kv_files[dump.bucket])
        raw.flush()
        os.fsync(raw.fileno())
    tmp.replace(path)
    return final


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def read_snapshot(path: Path) -> Snapshot:
    """Every check, then the contents; SnapshotInvalid with the reason otherwise."""
    files: dict[str, bytes] = {}
    try:
        with gzip.open(path) as whole:  # to the end: tar stops before the gzip trailer
            while whole.read(1 << 20):
                pass
        with tarfile.open(path, mode="r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                handle = tar.extractfile(member)
                if handle is not None:
                    files[member.name] = handle.read()
    except FileNotFoundError:
        raise SnapshotInvalid(f"{path}: no such file") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise SnapshotInvalid(
            f"{path}: not a readable tar.gz ({exc}): truncated or corrupt"
        ) from None
    if MANIFEST not in files:
        raise SnapshotInvalid(f"{path}: no {MANIFEST}: not a ClaudeFS metadata snapshot")
    try:
        raw = json.loads(files[MANIFEST])
    except ValueError as exc:
        raise SnapshotInvalid(f"{path}: {MANIFEST} is not JSON ({exc})") from None
    found = raw.get("format") if isinstance(raw, dict) else None
    if isinstance(found, int) and found > SNAPSHOT_FORMAT:
        raise SnapshotInvalid(
            f"{path}: snapshot format {found} is newer than this release reads "
            f"({SNAPSHOT_FORMAT}): restore it with a newer cfs"
        )
    try:
        manifest = SnapshotManifest.model_validate(raw)
    except ValidationError as exc:
        raise SnapshotInvalid(f"{path}: bad manifest: {exc.errors()[0]['msg']}") from None
    images: dict[str, bytes] = {}
    for cut in manifest.shards:
        data = _checked(path, files, cut.file, cut.sha256)
        try:
            count = sum(1 for _ in iter_pairs(data))
        except ImageFormatError as exc:
            raise SnapshotInvalid(f"{path}: {cut.file}: {exc}") from None
        if count != cut.records:
            raise SnapshotInvalid(
                f"{path}: {cut.file} holds {count} records, the manifest says {cut.records}"
            )
        images[cut.shard] = data
    for dump in manifest.kv:
        _checked(path, files, dump.file, dump.sha256)
    if len(manifest.shards) != manifest.shard_count:
        raise SnapshotInvalid(
            f"{path}: {len(manifest.shards)} shard images for {manifest.shard_count} shards"
        )
    return Snapshot(manifest, images)


def _checked(path: Path, files: dict[str, bytes], name: str, sha256: str) -> bytes:
    if name not in files:
        raise SnapshotInvalid(f"{path}: {name} is missing")
    actual = hashlib.sha256(files[name]).hexdigest()
    if actual != sha256:
        raise SnapshotInvalid(
            f"{path}: {name} checksum mismatch: expected {sha256[:16]}…, got {actual[:16]}…"
        )
    return files[name]


def kv_parquet(rows: list[dict[str, object]]) -> bytes:
    """KV entries as Parquet (bucket dump); pyarrow is imported only here."""
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    table = pa.table(
        {
            "key": [str(r["key"]) for r in rows],
            "revision": [int(r["revision"]) for r in rows],  # type: ignore[call-overload]
            "value": [bytes(r["value"]) for r in rows],  # type: ignore[call-overload]
        }
    )
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()
