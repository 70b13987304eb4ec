"""The guide's annual full failover test (multi-site), its seven commands in order,
each checked, under an application writing through a mount that follows the active
site: nothing it wrote is lost and its writes land on the site that is active.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.scenarios.conftest import SITE_A, SITE_B, DevPair, report, wait_for, write_file

pytestmark = [
    pytest.mark.slow,  # two dev sites: make test-slow
    pytest.mark.expected_logs(
        "client.site_switched",  # the mount following the active site
        "fuse.io_error",  # a write refused while the primary is fenced (EROFS)
        "geo.*",
        "singleton.*",
    ),
]


def attempt(path: Path, data: bytes) -> OSError | None:
    try:
        write_file(path, data)
    except OSError as exc:
        return exc
    return None


def test_the_annual_failover_test(dev_pair_factory: Callable[..., DevPair]) -> None:
    pair = dev_pair_factory()
    wait_for("replication linked both ways", pair.caught_up, timeout=60)
    primary, secondary = SITE_A, SITE_B
    mnt = pair.mount("app", primary)
    (mnt / "before.txt").write_text("written on the primary\n")
    started = time.monotonic()

    # 2. Block all new writes to the primary site.
    prepared = pair.ok("admin", "failover-prepare", "--source", primary, "--target", secondary)
    assert f"Site {primary} fenced: new writes refused" in prepared, prepared
    assert f"applied on {secondary}: lag 0" in prepared, prepared
    refused = attempt(mnt / "during-the-fence.txt", b"no")
    assert refused is not None and refused.errno == errno.EROFS, refused

    # 3. Verify the secondary can be promoted.
    tested = json.loads(pair.ok("admin", "failover-test", "--target", secondary, "--json"))
    assert tested["ok"] and len(tested["checks"]) == 4, tested

    # 4. Fail over.
    moved = pair.ok("admin", "failover", "--from", primary, "--to", secondary)
    assert f"Active site: {secondary}" in moved, moved
    wait_for(
        "the mount on the secondary", lambda: "client.site_switched" in pair.mount_log("app"), 30
    )
    assert attempt(mnt / "on-secondary.txt", b"served by the secondary\n") is None

    # 5. The secondary serves all traffic.
    status = pair.ok("admin", "status", site=secondary)
    assert status
    assert pair.active(primary) == secondary and pair.active(secondary) == secondary

    # 6. Fail back.
    back = pair.ok("admin", "failback", "--from", secondary, "--to", primary, site=secondary)
    assert f"Active site: {primary}" in back, back
    wait_for(
        "the mount back on the primary",
        lambda: pair.mount_log("app").count("client.site_switched") >= 2,
        30,
    )
    assert attempt(mnt / "after-failback.txt", b"the primary again\n") is None

    # 7. Re-sync any divergent data.
    synced = pair.ok("admin", "replication-sync", "--source", secondary, "--target", primary)
    assert "Shard 001: equal" in synced, synced
    names = sorted(os.listdir(mnt))
    assert names == ["after-failback.txt", "before.txt", "on-secondary.txt"], names
    report("annual failover test", seconds=time.monotonic() - started)
