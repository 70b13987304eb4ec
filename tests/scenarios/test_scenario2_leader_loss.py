"""Guide scenario 2: the Raft leader of a shard is lost (within the site).

RTO 5 s (automatic), RPO 0: while a client keeps creating files through the
mount, the node holding shard 001's writer lease is killed with `kill -9` (its
services and its NATS server). A new leader takes over, writes resume, and every
file whose write was acknowledged is there afterwards. Then the manual path:
`raft-debug` and `raft-force-election` move the leader on request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.scenarios.conftest import (
    NODE_LOSS_LOGS,
    DevSite,
    Writer,
    report,
    sha256_of,
    wait_for,
    write_file,
)

# fuse.release_failed: a known bug, issue 19 ("errnos that tell the truth"): while the
# killed node's puts time out, a close can fail with ENOSPC ("no chunk-store node is up
# with room for data") although two stores have room. Declared here so that it stays
# visible; issue 19 removes it.
pytestmark = pytest.mark.expected_logs(*NODE_LOSS_LOGS, "fuse.release_failed")


def test_raft_leader_loss(dev_site_factory: Callable[..., DevSite]) -> None:
    site = dev_site_factory(nodes=3)
    leader = site.shard_leader()
    assert leader is not None
    writer = Writer(site.mnt / "load")
    writer.start()
    try:
        wait_for("writes under way", lambda: len(writer.acked) >= 20, timeout=60)
        killed_at = time.monotonic()
        site.ok("dev", "kill", leader)
        new_leader: str | None = None

        def elected_other() -> bool:
            nonlocal new_leader
            new_leader = site.shard_leader()
            return new_leader not in (None, leader)

        elected = wait_for("a new shard leader", elected_other, timeout=60, every=0.1)
        wait_for(
            "writes after the failover",
            lambda: any(t > killed_at + elected for t in writer.ack_times),
            timeout=60,
        )
        time.sleep(1.0)
    finally:
        writer.stop.set()
        writer.join(timeout=60)
    rto = writer.longest_gap_after(killed_at)
    status = site.ok("admin", "raft-status")
    assert f"Shard 001: Leader={new_leader}" in status, status

    # RPO 0: every acknowledged create is there with its content.
    missing = [p for p, digest in writer.acked.items() if not p.exists() or sha256_of(p) != digest]
    assert not missing, f"{len(missing)} acknowledged files lost or changed: {missing[:5]}"

    # Manual path (if an election stalls): inspect, then force a new election.
    site.ok("dev", "start", leader)
    debug = site.ok("admin", "raft-debug", "--shard", "001")
    assert "001" in debug and str(new_leader) in debug, debug
    before = site.shard_leader()
    # The node just restarted replays its journal first and may not lead until it has
    # caught up (the CLI says so), so the lease goes to the replica that stayed up.
    target = next(n for n in ("storage-1", "storage-2", "storage-3") if n not in (before, leader))
    site.ok("admin", "raft-force-election", "--shard", "001", "--to", target)
    wait_for(
        f"{target} leads after raft-force-election --to {target}",
        lambda: site.shard_leader() == target,
        timeout=60,
    )
    write_file(site.mnt / "after-election.txt", b"ok\n")
    report(
        "scenario 2",
        killed=leader,
        new_leader=str(new_leader),
        election_s=elected,
        rto_client_s=rto,
        acked=str(len(writer.acked)),
        lost_writes=len(missing),
    )
