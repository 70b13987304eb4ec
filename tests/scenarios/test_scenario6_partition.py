"""Guide scenario 6: the link between site A and site B is cut; both keep writing
through their own mounts; after the heal the sites converge, last writer wins per
field, and every conflict is shown and can be resolved by hand.

The guide's story: a file renamed on A while B changes its owner keeps both; a file
whose owner both sides change is a conflict B wins (the later change), shown by
`show-conflicts`, and `resolve-conflicts --strategy manual --winner site-a` puts A's
value back on both sites. Beyond it: one file written on both sides, one name created
on both sides, a file written on one side and deleted on the other, a directory
removed on one side while the other adds to it. No file is lost: each loser stays
under a visible name. `metadata-consistency-check --cross-site` is clean at the end.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.scenarios.conftest import SITE_A, SITE_B, DevPair, report, wait_for

pytestmark = [
    pytest.mark.slow,  # two dev sites and a partition: make test-slow
    pytest.mark.expected_logs("geo.*", "link.*", "singleton.*", "lease.*"),
]


def owner(path: Path) -> int | None:
    try:
        return os.stat(path).st_uid
    except FileNotFoundError:
        return None


def text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def test_partition_between_sites(dev_pair_factory: Callable[..., DevPair]) -> None:
    pair = dev_pair_factory()
    wait_for("replication linked both ways", pair.caught_up, timeout=60)
    a = pair.mount("mnt-a", SITE_A, follow=False)  # each site's own clients
    b = pair.mount("mnt-b", SITE_B, follow=False)
    (a / "file.txt").write_text("t1\n")
    (a / "owned.txt").write_text("o\n")
    (a / "shared.txt").write_text("v1\n")
    (a / "doomed.txt").write_text("d\n")
    (a / "dir").mkdir()
    wait_for("the files on site-b", lambda: text(b / "doomed.txt") == "d\n", timeout=60)
    wait_for("dir on site-b", lambda: (b / "dir").is_dir(), timeout=60)
    owned_ino = os.stat(a / "owned.txt").st_ino

    pair.ok("dev", "partition", "--sites", f"{SITE_A},{SITE_B}")
    cut_at = time.monotonic()
    try:
        cut = pair.cfs("admin", "replication-status")
        assert cut.returncode == 3 and "unreachable (partition detected)" in cut.stdout
        os.rename(a / "file.txt", a / "file-a.txt")  # t1 on A
        os.chown(b / "file.txt", 1002, 1002)  # t2 on B: both survive
        os.chown(a / "owned.txt", 1001, 1001)  # alice, t3
        (a / "shared.txt").write_text("from a\n")
        (a / "both.txt").write_text("made on a\n")
        (b / "both.txt").write_text("made on b\n")
        (a / "doomed.txt").write_text("written on a\n")  # written on A ...
        (b / "doomed.txt").unlink()  # ... deleted on B: the file stays
        (a / "dir").rmdir()  # removed on A ...
        (b / "dir" / "new.txt").write_text("added on b\n")  # ... added to on B: it stays
        time.sleep(0.05)
        os.chown(b / "owned.txt", 1002, 1002)  # bob, t4: the later
        (b / "shared.txt").write_text("from b\n")  # the later write
    finally:
        pair.ok("dev", "heal")
    partition_s = time.monotonic() - cut_at
    healed_at = time.monotonic()
    wait_for("replication caught up both ways", pair.caught_up, timeout=120, every=0.5)
    converge_s = time.monotonic() - healed_at

    def converged() -> bool:
        names = [sorted(os.listdir(m)) for m in (a, b)]
        return names[0] == names[1] and all(owner(m / "owned.txt") == 1002 for m in (a, b))

    wait_for("both mounts list the same names", converged, timeout=60)
    for mnt in (a, b):
        assert not (mnt / "file.txt").exists() and owner(mnt / "file-a.txt") == 1002
        assert text(mnt / "shared.txt") == "from b\n", "the later write wins"
        kept = [n for n in os.listdir(mnt) if n.startswith("both.txt.conflict-")]
        assert len(kept) == 1, os.listdir(mnt)
        assert {text(mnt / "both.txt"), text(mnt / kept[0])} == {"made on a\n", "made on b\n"}
        assert text(mnt / "doomed.txt") == "written on a\n"
        assert text(mnt / "dir" / "new.txt") == "added on b\n"

    shown = pair.ok("admin", "show-conflicts")
    assert f"Inode {owned_ino}: CONFLICT - attr.owner differs; site-b won" in shown, shown
    verbose = pair.ok("admin", "show-conflicts", "--verbose")
    assert "uid=1001" in verbose and "uid=1002" in verbose, verbose
    listed = json.loads(pair.ok("admin", "show-conflicts", "--json"))
    kinds = sorted({c["kind"] for c in listed["conflicts"]})

    pair.ok(
        "admin", "resolve-conflicts", "--strategy", "manual",
        "--inode", str(owned_ino), "--winner", SITE_A,
    )  # fmt: skip
    wait_for(
        "alice's owner on both sites",
        lambda: all(owner(m / "owned.txt") == 1001 for m in (a, b)),
        timeout=60,
    )
    pair.ok("admin", "resolve-conflicts", "--strategy", "last-write-wins")
    for site in (SITE_A, SITE_B):
        assert pair.ok("admin", "show-conflicts", site=site).strip() == "No conflicts."
    wait_for("replication caught up again", pair.caught_up, timeout=60)
    check = pair.cfs("admin", "metadata-consistency-check", "--cross-site", "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["differences"] == []
    report(
        "scenario 6",
        partition_s=partition_s,
        converge_s=converge_s,
        conflicts=str(len(listed["conflicts"])),
        kinds=",".join(kinds),
    )
