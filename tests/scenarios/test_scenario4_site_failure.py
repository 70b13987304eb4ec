"""Guide scenario 4, multi-site: every process of site A killed -9 under a writing
client; site B takes over (automatic failover) and the client's mount follows it;
A comes back, `replication-sync`, `failback`, and both sites' shards are equal.

RTO is the longest time the writer got no acknowledgement after the kill (guide:
5 min); RPO is how old the oldest acknowledged write missing on B at the failover
was (guide: 5 min, "the replication lag"). Those writes are in A's journal: once A
is back they cross too, and nothing acknowledged is lost in the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from tests.scenarios.conftest import (
    NODE_LOSS_LOGS,
    SITE_A,
    SITE_B,
    DevPair,
    Writer,
    report,
    sha256_of,
    wait_for,
)

FAILOVER_AFTER_S = 10  # the active site silent this long: the other takes over
GUIDE_RTO_S = GUIDE_RPO_S = 300.0

pytestmark = [
    pytest.mark.slow,  # two dev sites, a failover and a failback: make test-slow
    pytest.mark.expected_logs(
        *NODE_LOSS_LOGS,
        "geo.active_changed",  # the automatic failover
        "client.site_switched",  # the mount following it
        "fuse.old_site_unflushed",  # the killed site's store, left behind by the mount
        "fuse.release_failed",  # the file open on the killed site when it died
        "fuse.io_error",  # ... and the call that waited on it when the mount moved on
        "link.connect_failed",  # the link proxy, to the dead site's NATS
        "geo.*",  # replicators losing their peer
        "singleton.*",
    ),
]


def test_full_site_failure_with_a_second_site(dev_pair_factory: Callable[..., DevPair]) -> None:
    pair = dev_pair_factory(env={"CFS_FAILOVER_AFTER_S": str(FAILOVER_AFTER_S)})
    wait_for("replication linked both ways", pair.caught_up, timeout=60)
    assert pair.active() == SITE_A, "the first site linked is the active one"
    mnt = pair.mount("app", SITE_A)
    writer = Writer(mnt / "load")
    writer.start()
    try:
        wait_for("writes under way", lambda: len(writer.acked) >= 30, timeout=60)
        killed_at = time.monotonic()
        pair.ok("dev", "kill-site", SITE_A)
        # Site A acknowledged what the writer finished while the kill ran; from here on
        # only B can (the mount reaches B after the failover)
        dead_at = time.monotonic()

        # 1. Detect: B sees A unreachable, then takes over by itself.
        cut = pair.cfs("admin", "replication-status", site=SITE_B)
        assert cut.returncode == 3 and "unreachable (partition detected)" in cut.stdout
        failover_s = wait_for(
            "site-b active", lambda: pair.active(SITE_B) == SITE_B, timeout=90, every=0.5
        )
        # 2. The client continues on B.
        wait_for(
            "writes acknowledged on site-b",
            lambda: any(t > killed_at + failover_s for t in writer.ack_times),
            timeout=90,
        )
        time.sleep(2.0)
    finally:
        writer.stop.set()
        writer.join(timeout=90)
    rto = writer.longest_gap_after(killed_at)
    status = pair.cfs("admin", "replication-status", site=SITE_B).stdout  # exit 3: A is gone
    assert f"Active site: {SITE_B}" in status and "automatic failover" in status, status
    assert "client.site_switched" in pair.mount_log("app")

    before = {p: d for p, d in writer.acked.items() if writer.acked_at[p] < dead_at}
    missing = [p for p, d in before.items() if not p.exists() or sha256_of(p) != d]
    rpo = dead_at - min((writer.acked_at[p] for p in missing), default=dead_at)
    after = [p for p in writer.acked if writer.acked_at[p] >= dead_at]
    assert after and all(p.exists() for p in after), "writes acknowledged by B are there"

    # 4. A is back: resync from B, then switch back; the mount follows.
    pair.ok("dev", "start-site", SITE_A, timeout=240)
    wait_for(
        "site-a linked again",
        lambda: pair.cfs("admin", "replication-status").returncode == 0,
        timeout=90,
        every=1.0,
    )
    synced = pair.ok("admin", "replication-sync", "--source", SITE_B, "--target", SITE_A)
    assert "Shard 001: equal" in synced, synced
    back = pair.ok("admin", "failback", "--from", SITE_B, "--to", SITE_A, site=SITE_B)
    assert f"Active site: {SITE_A}" in back, back
    wait_for(
        "the mount back on site-a",
        lambda: pair.mount_log("app").count("client.site_switched") >= 2,
        timeout=30,
    )
    lost = [p for p, d in writer.acked.items() if not p.exists() or sha256_of(p) != d]
    assert not lost, f"{len(lost)} acknowledged files lost: {lost[:5]}"
    check = pair.cfs("admin", "metadata-consistency-check", "--cross-site", "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["differences"] == []
    report(
        "scenario 4",
        rto_s=rto,
        guide_rto_s=GUIDE_RTO_S,
        rpo_s=rpo,
        guide_rpo_s=GUIDE_RPO_S,
        failover_s=failover_s,
        missing_at_failover=str(len(missing)),
        acknowledged=str(len(writer.acked)),
        failed_writes=str(writer.failures),
    )
