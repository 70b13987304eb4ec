"""The guide's "client disconnection" RTO (< 1 s, client auto-reconnect).

A mount reaches its site's NATS server through a TCP proxy that can be cut: a cut
resets every connection through it, exactly as a dropped network link or a firewall
reset looks to the client. While a writer fsyncs files through that mount, the link
is reset a few times; the RTO of each reset is how long the application waited for
its first write acknowledged after it (the write in flight at the reset included: it must be
sent again on the new connection, not wait out a timeout), counted from the last
write acknowledged before it. RPO 0: every acknowledged
file reads back identical.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cfs.supervisor.linkproxy import LinkProxy
from tests.scenarios.conftest import DevSite, Writer, report, sha256_of, wait_for

pytestmark = pytest.mark.expected_logs("nats.disconnected", "nats.error", "retry.waiting")

RESETS = 3


def test_client_reconnects_within_a_second(
    dev_site_factory: Callable[..., DevSite], tmp_path: Path
) -> None:
    site = dev_site_factory(nodes=1)
    cluster = json.loads((site.state / "cluster.json").read_text())
    port = int(cluster["nats_urls"][0].rsplit(":", 1)[1])
    proxy = LinkProxy("client-link", tmp_path / "proxy", port, die_with_parent=True)
    proxy.start()
    try:
        mnt = site.mount(tmp_path / "proxied", "--cluster", f"nats://{proxy.url}")
        writer = Writer(mnt / "load")
        writer.start()
        gaps: list[float] = []
        try:
            wait_for("writes under way", lambda: len(writer.acked) >= 20, timeout=60)
            for _ in range(RESETS):
                proxy.cut()  # returns once every connection through it is reset
                reset_at = time.monotonic()
                proxy.heal()
                wait_for(
                    "a write acknowledged after the reset",
                    lambda at=reset_at: any(t > at for t in writer.ack_times),  # type: ignore[misc]
                    timeout=60,
                    every=0.02,
                )
                # What the application saw: from its last acknowledgement before the
                # reset to its first one after (a write's own latency included).
                before = max(t for t in writer.ack_times if t <= reset_at)
                gaps.append(min(t for t in writer.ack_times if t > reset_at) - before)
                time.sleep(1.0)
        finally:
            writer.stop.set()
            writer.join(timeout=60)
        lost = [p for p, digest in writer.acked.items() if sha256_of(p) != digest]
        assert not lost, f"{len(lost)} acknowledged files lost or changed: {lost[:5]}"
        report(
            "client disconnection",
            reconnect_s=max(gaps),
            resets=str(len(gaps)),
            each_s=",".join(f"{g:.2f}" for g in gaps),
            failed_writes=str(writer.failures),
            lost_writes=len(lost),
        )
    finally:
        proxy.stop()
