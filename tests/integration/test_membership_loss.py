"""No false positives: ten minutes of 5% UDP loss between all members of a 6-node site
(through the netem rules file) and not one NodeDown."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from cfs.supervisor import LocalSite
from cfs_contracts.events.cluster import NodeDown
from cfs_contracts.members import Liveness
from cfs_membership.transport import NetemRule, write_rules

from .test_membership import cluster_events, views

LOSS = 0.05
DURATION_S = float(os.environ.get("CFS_LOSS_TEST_S", "600"))


@pytest.mark.slow
@pytest.mark.timeout(DURATION_S + 300)
async def test_ten_minutes_of_five_percent_udp_loss_bring_no_node_down(tmp_path: Path) -> None:
    async with LocalSite(tmp_path / "site", nodes=6, servers=1, site="loss") as site:
        nodes = list(site.node_names)
        async with await site.client() as bus:
            seen: dict[str, int] = {"suspect": 0, "down": 0, "alive": 0}

            async def count(msg: Msg) -> None:
                kind = msg.subject.rsplit(".", 1)[-1]
                if kind in seen:
                    seen[kind] += 1

            await bus.nc.subscribe(f"cfs.{site.site}.cluster.node.*.*", cb=count)
            write_rules(site.netem_file, [NetemRule(src="*", dst="*", loss=LOSS)])
            started = time.monotonic()
            while time.monotonic() - started < DURATION_S:
                await asyncio.sleep(min(30.0, DURATION_S))
                assert seen["down"] == 0, f"false positive after {time.monotonic() - started:.0f}s"
            final = await views(bus, site, nodes)
            site.netem_file.unlink()

        dropped = {node: view.stats.get("netem_dropped", 0) for node, view in final.items()}
        print(
            f"\n{DURATION_S:.0f}s at {LOSS:.0%} loss: {seen['suspect']} NodeSuspect, "
            f"{seen['alive']} NodeAlive, {seen['down']} NodeDown; datagrams dropped {dropped}"
        )
        assert all(count > 0 for count in dropped.values())  # the loss was really applied
        for view in final.values():
            assert {m.node: m.state for m in view.members} == dict.fromkeys(nodes, Liveness.ALIVE)
        async with await site.client() as bus:
            assert not [e for e in await cluster_events(bus) if isinstance(e, NodeDown)]
