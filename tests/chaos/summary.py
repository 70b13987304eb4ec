"""`make chaos`'s table: one row per seed run, from the `CFS_CHAOS_RESULTS` files.

Exits 1 when any run lost or corrupted something acknowledged, left the checker
unclean, the S3 tier not drained or a process stuck, or (a `single` schedule) showed
an application an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def unsafe(run: dict[str, Any]) -> bool:
    return bool(
        run["lost"]
        or run["corrupt"]
        or run["unexpected"]
        or run["stuck"]
        or not run["checker_clean"]
        or not run.get("tier_drained", True)
        or run.get("tier_backfilled", 0) < 0
        or (run["schedule"] == "single" and run["failed_ops"])
    )


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in sorted(args.results.glob("*.json"))]
    table = Table(title="chaos runs")
    for column in ("schedule", "nodes", "seed", "faults", "acked", "failed", "lost",
                   "corrupt", "longest stall", "checker", "verdict"):  # fmt: skip
        table.add_column(column)
    for run in sorted(runs, key=lambda r: (r["schedule"], r["nodes"], r["seed"])):
        bad = unsafe(run)
        table.add_row(
            run["schedule"],
            str(run["nodes"]),
            str(run["seed"]),
            "; ".join(run["faults"]),
            str(run["acknowledged"]),
            str(len(run["failed_ops"])),
            str(len(run["lost"]) + len(run["unexpected"])),
            str(len(run["corrupt"])),
            f"{run['longest_stall_s']:.2f} s",
            ("clean" if run["checker_clean"] else "NOT clean")
            + ("" if run.get("tier_drained", True) else ", S3 tier NOT drained")
            + (
                f", {run['tier_backfilled']} chunks backfilled"
                if run.get("tier_backfilled", 0) > 0
                else ", backfill FAILED"
                if run.get("tier_backfilled", 0) < 0
                else ""
            ),
            "[red]FAILED[/red]" if bad else "[green]ok[/green]",
        )
    Console(width=200).print(table)
    failed = [r for r in runs if unsafe(r)]
    stalls = [r["longest_stall_s"] for r in runs]
    print(
        f"{len(runs)} runs, {sum(r['acknowledged'] for r in runs)} operations acknowledged, "
        f"{sum(len(r['lost']) + len(r['unexpected']) for r in runs)} lost, "
        f"{sum(len(r['corrupt']) for r in runs)} corrupt, longest stall "
        f"{max(stalls, default=0.0):.2f} s, {len(failed)} failed"
    )
    for run in failed:
        print(f"replay: {run['replay']}", file=sys.stderr)
    return 1 if failed or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
