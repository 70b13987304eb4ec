"""Cross-site replication benchmark: two linked local sites, creates on site a.

    python bench/geo.py [--quick] [--json PATH]

Both sites run metadata-raft, chunk-store, membership and the geo-replicator on one
node each (one NATS server each, the second site a leaf node of the first through
the link proxy), linked both ways (`cfs admin replication-link`). This process
watches site b's journal: each file site a created shows up there in an entry the
geo-replicator applied (`...journal.remote`), and the time from site a's
acknowledgement to that moment is the file's lag (one clock: the same machine).

Figures, in the order they are taken:

- `local_creates_per_s`: the baseline. Creates on site a as fast as the client
  goes (IN_FLIGHT outstanding) for 10 s (5 s with --quick), the link up.
- `lag_p50_s`, `lag_p99_s`, `lag_max_s`: creates on site a at half that rate for
  30 s (10 s with --quick), each file's lag until site b applied it. Goal p99 <= 1 s.
- `catchup_events_per_s`: the link cut for 120 s (20 s with --quick) while site a
  creates as fast as it goes; after the heal, the files over the seconds until site
  b applied the last one. `catchup_vs_local` is that rate over `local_creates_per_s`
  (goal >= 0.5). `partition_creates` is how many were made during the cut.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from report import print_goals, write_json
from cfs.client import MetadataClient
from cfs.logs import setup_logging
from cfs.supervisor.sites import SitePair
from cfs_contracts import REGISTRY
from cfs_contracts.events.metadata import MetaCommitted, PutInode
from cfs_contracts.fs.records import ROOT_INO

CFS = str(Path(sys.executable).parent / "cfs")
SERVICES = ("membership", "metadata-raft", "chunk-store", "geo-replicator")
IN_FLIGHT = 32
GOAL_LAG_P99_S = 1.0
GOAL_CATCHUP_VS_LOCAL = 0.5


class Arrivals:
    """When each inode first appeared in site b's applied entries (monotonic time)."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}
        self.changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        now = time.monotonic()
        payload = REGISTRY.decode(msg.data).payload
        if not isinstance(payload, MetaCommitted):
            return
        for entry in payload.entries:
            for change in entry.changes:
                if isinstance(change, PutInode):
                    self.seen.setdefault(change.inode.ino, now)
        self.changed.set()


async def create_files(
    meta: MetadataClient, prefix: str, seconds: float, rate: float | None
) -> dict[int, float]:
    """Files in the root for `seconds`: as fast as IN_FLIGHT allow, or at `rate`/s.
    Returns ino -> the monotonic time site a acknowledged it."""
    acked: dict[int, float] = {}
    end = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def worker(index: int) -> None:
        while time.monotonic() < end:
            n = next(counter)
            if rate is not None:  # a steady load: file n is due at start + n / rate
                due = start + n / rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if time.monotonic() >= end:
                    return
            inode = await meta.create(ROOT_INO, f"{prefix}-{n}")
            acked[inode.ino] = time.monotonic()

    start = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(IN_FLIGHT)))
    return acked


def admin_ok(site: Any, *args: str) -> str:
    done = subprocess.run(
        [CFS, "admin", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=site.cli_env(),
        cwd=site.base_dir,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cfs admin {' '.join(args)}: exit {done.returncode}: {done.stderr}")
    return done.stdout


async def wait_for(arrivals: Arrivals, inos: set[int], timeout: float) -> float:
    """Until every ino arrived on site b; the monotonic time the last one did."""
    deadline = time.monotonic() + timeout
    while not inos <= arrivals.seen.keys():
        if time.monotonic() > deadline:
            missing = len(inos - arrivals.seen.keys())
            raise RuntimeError(f"{missing} of {len(inos)} files not on site b in {timeout}s")
        arrivals.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrivals.changed.wait(), 1.0)
    return max(arrivals.seen[ino] for ino in inos)


async def measure(pair: SitePair, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"quick": quick, "notes": []}
    arrivals = Arrivals()
    async with await pair.a.client("bench-a") as bus_a, await pair.b.client("bench-b") as bus_b:
        await bus_b.nc.subscribe(f"cfs.{pair.b.site}.meta.*.journal.remote", cb=arrivals.on_msg)
        meta = MetadataClient(bus_a, deadline_s=60)

        seconds = 5.0 if quick else 10.0
        acked = await create_files(meta, "base", seconds, None)
        local_rate = len(acked) / seconds
        results["local_creates_per_s"] = local_rate
        await wait_for(arrivals, set(acked), 120)

        seconds = 10.0 if quick else 30.0
        acked = await create_files(meta, "steady", seconds, local_rate / 2)
        await wait_for(arrivals, set(acked), 120)
        lags = sorted(arrivals.seen[ino] - at for ino, at in acked.items())
        results["lag_files"] = len(lags)
        results["lag_p50_s"] = statistics.median(lags)
        results["lag_p99_s"] = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
        results["lag_max_s"] = lags[-1]

        seconds = 20.0 if quick else 120.0
        await asyncio.to_thread(pair.partition)
        acked = await create_files(meta, "cut", seconds, None)
        results["partition_s"] = seconds
        results["partition_creates"] = len(acked)
        healed = time.monotonic()
        await asyncio.to_thread(pair.heal)
        last = await wait_for(arrivals, set(acked), 600)
        catchup_s = last - healed
        results["catchup_s"] = catchup_s
        results["catchup_events_per_s"] = len(acked) / catchup_s
        results["catchup_vs_local"] = results["catchup_events_per_s"] / local_rate
    return results


def run(quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cfs-bench-geo-") as tmp:
        pair = SitePair(Path(tmp), nodes=1, services=SERVICES)
        asyncio.run(pair.start())
        try:
            asyncio.run(pair.wait_ready())
            for here, there in ((pair.a, pair.b), (pair.b, pair.a)):
                admin_ok(here, "replication-link", "--peer", there.site)
            results = asyncio.run(measure(pair, quick))
        finally:
            pair.stop()
    results["loadavg_end"] = os.getloadavg()[0]
    return results


def main() -> None:
    setup_logging(os.environ.get("CFS_LOG_LEVEL", "ERROR"), service="bench")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter loads and partition")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    results = run(args.quick)
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:24s} {value:12.3f}")
        elif isinstance(value, int) and not isinstance(value, bool):
            print(f"{key:24s} {value:12d}")
    goals = {
        f"lag_p99_s <= {GOAL_LAG_P99_S:g}": results["lag_p99_s"] <= GOAL_LAG_P99_S,
        f"catchup_vs_local >= {GOAL_CATCHUP_VS_LOCAL:g}": (
            results["catchup_vs_local"] >= GOAL_CATCHUP_VS_LOCAL
        ),
    }
    print_goals(goals)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
