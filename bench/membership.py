"""Membership benchmark on a local 6-node site: failure detection after kill -9.

    python bench/membership.py [--quick] [--json PATH]

Detection time: from SIGKILL of every process of a node (`LocalSite.kill9`) to
the first `NodeDown` event for it on the CLUSTER subjects (the same
compare-and-set write flips `member.<node>` to DOWN just before). Six kills (three
with --quick), a different node each time, at a random point of the probe cycle;
after each the node is restarted and the site waits until every member sees it
alive again. Default timing (CFS_PROBE_INTERVAL_S etc. in the environment
override it). Goals: median <= 2 s, max <= 4 s.

Repair: then about 1 GiB of fragments (64 MiB with --quick) is put on every
node through the client library, one node is killed and removed, and the repair
coordinator (unthrottled) re-creates its fragments elsewhere. Goal >= 50 MB/s.

JSON keys: detect_median_s, detect_max_s (and kills, the sample size),
repair_mb_s (and its inputs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from nats.aio.msg import Msg

from report import print_goals, write_json
from cfs.logs import setup_logging
from cfs.bus import Bus
from cfs.client import ChunkStoreClient, FileStore, MetadataClient
from cfs.lifecycle import set_lifecycle
from cfs.supervisor import LocalSite
from cfs_contracts.envelope import Envelope
from cfs_contracts.fs.records import ROOT_INO
from cfs_contracts.members import Lifecycle, Liveness
from cfs_membership.service import MembershipView, view_subject

NODES = 6
MiB = 1024 * 1024
GOAL_MEDIAN_S = 2.0
GOAL_MAX_S = 4.0


async def all_alive(bus: Bus, site: LocalSite) -> bool:
    """Every member's own view has every node ALIVE."""
    nodes = list(site.node_names)
    try:
        replies = await asyncio.gather(
            *(bus.request(view_subject(site.site, node), b"", timeout=2.0) for node in nodes)
        )
    except Exception:  # a member still starting: not yet
        return False
    for reply in replies:
        view = MembershipView.model_validate_json(reply.data)
        if any(view.state_of(node) is not Liveness.ALIVE for node in nodes):
            return False
    return True


async def settle(bus: Bus, site: LocalSite, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await all_alive(bus, site):
        if time.monotonic() > deadline:
            raise RuntimeError(f"membership did not converge within {timeout:.0f}s")
        await asyncio.sleep(0.2)


async def measure_detection(site: LocalSite, bus: Bus, kills: int) -> dict[str, float]:
    """kill -9 a node, time its NodeDown, restart it; `kills` times, round robin."""
    down_at: dict[str, float] = {}

    async def on_down(msg: Msg) -> None:
        node = msg.subject.split(".")[-2]  # cfs.<site>.cluster.node.<node>.down
        down_at.setdefault(node, time.monotonic())

    sub = await bus.nc.subscribe(f"cfs.{site.site}.cluster.node.*.down", cb=on_down)
    rng = random.Random(7)
    times: list[float] = []
    try:
        for i in range(kills):
            victim = site.node_names[(5 * i + 1) % len(site.node_names)]  # each node in turn
            await settle(bus, site)
            await asyncio.sleep(1.0 + rng.random())  # a random point of the probe cycle
            down_at.pop(victim, None)
            killed_at = time.monotonic()
            site.kill9(victim)
            while victim not in down_at:
                if time.monotonic() - killed_at > 30:
                    raise RuntimeError(f"no NodeDown for {victim} within 30 s")
                await asyncio.sleep(0.01)
            times.append(down_at[victim] - killed_at)
            print(f"kill {i + 1}/{kills}: {victim} DOWN after {times[-1]:.2f}s", flush=True)
            site.start_node(victim)
            await site.wait_ready()
    finally:
        await sub.unsubscribe()
    return {
        "detect_median_s": statistics.median(times),
        "detect_max_s": max(times),
        "kills": float(len(times)),
    }


async def run(quick: bool) -> dict[str, float]:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cfs-bench-membership-") as tmp:
        # One NATS server: SWIM does not depend on it, and two cores are shared by all.
        async with (
            LocalSite(
                Path(tmp) / "site",
                nodes=NODES,
                servers=1,
                site="bench",
                env={"CFS_REPAIR_MB_S": "0", "CFS_SCRUB_MB_S": "0"},
            ) as site,
            await site.client("bench-membership") as bus,
        ):
            results.update(await measure_detection(site, bus, kills=3 if quick else 6))
            results.update(await measure_repair(site, bus, 64 if quick else 1024))
    return results


async def measure_repair(site: LocalSite, bus: Bus, fragment_mib: int) -> dict[str, float]:
    """Remove a node holding about `fragment_mib` MiB of fragments; MB/s re-protected.

    Writes 4x that much file data (4+2 over 6 nodes puts a quarter of the data's
    size on each node), kills one node, marks it removed (`node-remove`) and
    times the repair coordinator (unthrottled) until its `RepairCompleted`.
    MB/s = fragment bytes re-created on other nodes / the job's own seconds; the
    wall time from the removal (which may include a coordinator failover, when the
    killed node held the repair lease) is reported beside it.
    """
    files = FileStore(bus, MetadataClient(bus), client_id="bench-writer")
    await files.start()
    try:
        block = os.urandom(MiB)
        total = 4 * fragment_mib * MiB
        per_file = 64 * MiB
        for n in range(max(1, total // per_file)):
            inode = await files.meta.create(ROOT_INO, f"data-{n}")
            handle = await files.open(inode.ino)
            for offset in range(0, per_file, MiB):
                # distinct chunks: content addressing would store repeats once
                await handle.write(offset, block[:-16] + offset.to_bytes(8) + n.to_bytes(8))
            await files.release(handle)
    finally:
        await files.close()
    victim = site.node_names[3]
    held = (await ChunkStoreClient(bus).stat(victim)).used_bytes
    site.kill9(victim)
    sub = await bus.js.subscribe(
        f"cfs.{site.site}.cluster.repair.{victim}.completed", ordered_consumer=True
    )
    started = time.perf_counter()
    await set_lifecycle(bus, victim, Lifecycle.REMOVED, requested_by="bench")
    msg = await sub.next_msg(timeout=3600)
    elapsed = time.perf_counter() - started
    done = Envelope.model_validate_json(msg.data).payload
    await sub.unsubscribe()
    rebuilt = int(done["bytes_rebuilt"])
    return {
        "repair_node_fragment_mib": held / MiB,
        "repair_bytes_rebuilt_mib": rebuilt / MiB,
        "repair_wall_s": elapsed,  # from node-remove, incl. a coordinator failover
        "repair_seconds": float(done["seconds"]),
        "repair_mb_s": rebuilt / MiB / float(done["seconds"]),
        "repair_chunks_lost": float(done["chunks_lost"]),
    }


def main() -> None:
    # The runs kill nodes and servers on purpose; only errors are worth a line each.
    setup_logging(os.environ.get("CFS_LOG_LEVEL", "ERROR"), service="bench")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 kills instead of 6")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    results = asyncio.run(run(args.quick))
    for key, value in results.items():
        print(f"{key:28s} {value:12.3f}")
    goals = {
        f"detect_median_s <= {GOAL_MEDIAN_S:g}": results["detect_median_s"] <= GOAL_MEDIAN_S,
        f"detect_max_s <= {GOAL_MAX_S:g}": results["detect_max_s"] <= GOAL_MAX_S,
    }
    goals["repair_mb_s >= 50"] = results["repair_mb_s"] >= 50
    print_goals(goals)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
