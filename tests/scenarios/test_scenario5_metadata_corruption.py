"""Guide scenario 5: metadata corruption, both recovery paths.

Bit flips as hardware makes them: one byte of a stored inode record on one replica
(its services killed, the RocksDB files edited, the node started again) and one byte
of a fragment file on another node. `metadata-consistency-check` reports both in the
guide's words; `metadata-repair --auto-fix` rebuilds the replica from its journal and
the fragment from its chunk's survivors; the check is clean and every acknowledged
file reads back identical. Then the guide's fallback: restore the last snapshot and
replay the journal after it (`replay-journal`), so nothing acknowledged is lost
(the guide accepts losing a day). The measured RTO of each path is printed (guide: 1 h).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cfs_chunkstore.store import store_root
from cfs_contracts.fs.records import Kind
from cfs_metadata.projection import Projection
from tests.scenarios.conftest import (
    NODE_LOSS_LOGS,
    DevSite,
    report,
    sha256_of,
    wait_for,
    write_file,
)

pytestmark = [
    pytest.mark.slow,  # a site, both recovery paths, three full checks: make test-slow
    pytest.mark.expected_logs(
        *NODE_LOSS_LOGS,  # a node's services are killed -9 to edit its store
        "fragment.damaged",  # the flipped fragment, reported by its chunk-store
    ),
]

DAMAGED_REPLICA = "storage-2"
DAMAGED_FRAGMENTS = "storage-3"


def _check(site: DevSite, *args: str) -> tuple[int, str]:
    result = site.cfs("admin", "metadata-consistency-check", *args, timeout=300)
    assert result.returncode in (0, 1), (result.stdout, result.stderr)
    return result.returncode, result.stdout


def _flip_inode_record(site: DevSite, node: str) -> int:
    """One byte in the middle of a file's stored inode record; returns its number."""
    path = site.state / "nodes" / node / "metadata" / "shard-001"
    projection = Projection(path, 1)
    try:
        ino = max(i.ino for i in projection.scan_inodes() if i.kind is Kind.FILE)
        raw = bytearray(projection.raw_get(Projection.inode_key(ino)) or b"")
        assert raw, f"inode {ino} is not stored on {node}"
        raw[len(raw) // 2] ^= 0x20
        projection.raw_put(Projection.inode_key(ino), bytes(raw))
        return ino
    finally:
        projection.close()


def _flip_fragment(site: DevSite, node: str) -> Path:
    fragments = sorted((store_root(site.state / "nodes" / node) / "fragments").rglob("*"))
    path = next(p for p in fragments if p.is_file())
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    return path


def test_metadata_corruption_repair_then_snapshot_restore(
    dev_site_factory: Callable[..., DevSite],
) -> None:
    site = dev_site_factory(nodes=3)
    acked = {
        site.mnt / f"before/{i}.bin": write_file(site.mnt / f"before/{i}.bin", os.urandom(40_000))
        for i in range(10)
    }
    snapshot = site.tmp / "metadata-last.tar.gz"
    site.ok("admin", "snapshot-metadata", "--output", str(snapshot), "--json")
    for i in range(10):  # acknowledged after the last snapshot: replay-journal brings them
        path = site.mnt / f"after/{i}.bin"
        acked[path] = write_file(path, os.urandom(40_000))

    # -- the damage: a bit flip in one replica's record and one in a fragment --------------
    site.ok("dev", "kill", "--services-only", DAMAGED_REPLICA)
    ino = _flip_inode_record(site, DAMAGED_REPLICA)
    site.ok("dev", "start", DAMAGED_REPLICA)
    fragment = _flip_fragment(site, DAMAGED_FRAGMENTS)

    # -- path 1: detect, repair, verify -------------------------------------------------------
    detected_at = time.monotonic()
    code, found = _check(site, "--verbose")
    assert code == 1, found
    (site.tmp / "corruption-report.txt").write_text(found)
    assert re.search(rf"Inode {ino} checksum mismatch: expected 0x[0-9a-f]+, got 0x", found), found
    assert f"on {DAMAGED_REPLICA}" in found, found
    assert f"on {DAMAGED_FRAGMENTS} is corrupt" in found, found
    repaired = site.cfs("admin", "metadata-repair", "--auto-fix", timeout=300)
    assert repaired.returncode == 0, (repaired.stdout, repaired.stderr)
    assert f"rebuild the replica of shard 001 on {DAMAGED_REPLICA}" in repaired.stdout
    code, clean = _check(site)
    assert code == 0 and "Metadata consistent" in clean, clean
    repair_rto = time.monotonic() - detected_at
    assert all(sha256_of(p) == digest for p, digest in acked.items())
    assert fragment.read_bytes()  # rebuilt in place (its chunk-store re-verified it)

    # -- path 2: the guide's fallback, the last snapshot and the journal after it ---------
    restore_started = time.monotonic()
    restored = site.ok("admin", "restore-metadata", "--from-snapshot", str(snapshot), "--force")
    assert "read-only until" in restored, restored
    replay = json.loads(site.ok("admin", "replay-journal", "--json"))
    assert replay["open"], replay
    code, clean = _check(site)
    assert code == 0, clean

    def all_read_back() -> bool:
        try:
            return all(sha256_of(p) == digest for p, digest in acked.items())
        except OSError:
            return False

    wait_for("every acknowledged file reads back identical", all_read_back, timeout=120)
    restore_rto = time.monotonic() - restore_started
    write_file(site.mnt / "after-restore.bin", b"writable again")
    report(
        "scenario 5",
        repair_rto_s=repair_rto,
        restore_rto_s=restore_rto,
        lost_files=sum(sha256_of(p) != digest for p, digest in acked.items()),
        files_back=f"{len(acked)}/{len(acked)}",
        replayed_messages=sum(s["messages"] for s in replay["shards"]),
    )
