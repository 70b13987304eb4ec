"""The guide's RTO/RPO tables, each row held to a target by the scenario that measures it.

Every row of the guide's "Availability Tiers", "RTO" and "RPO" tables is a `Target`:
which scenario measures it (the name it passes to `report()` in conftest.py), which
of its figures is the measurement, and the bound the scenario asserts: the guide's,
or ours where ours is stricter, or, where the guide's figure is below a floor this
system cannot go under, a looser bound with the floor named in `floor`. `report()`
asserts every target of its scenario and, when `CFS_DR_RESULTS` names a directory,
writes the figures there; `make dr-report` runs the scenarios that way and then this
module's main prints the table (guide beside measured), writes it as Markdown and
JSON, and exits non-zero when a row is not measured, misses its bound, or only
meets a bound looser than the guide's: the table shows every gap.

Figures whose name starts with `lost_` count acknowledged operations that did not
come back; an RPO measured that way is 0 s when the count is 0, and unknown (a
failure) otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS_ENV = "CFS_DR_RESULTS"

S1, S2, S3 = "scenario 1", "scenario 2", "scenario 3"
S4, S5, S6, S7 = "scenario 4", "scenario 5", "scenario 6", "scenario 7"
TOTAL_METADATA, COMPLETE = "total metadata loss", "scenario 8 complete"
CLIENT = "client disconnection"

MIN, HOUR = 60.0, 3600.0

# nats-server's Raft waits 4-9 s (server/raft.go: minElectionTimeoutDefault,
# maxElectionTimeoutDefault; not configurable) before a follower campaigns for a lost
# leader; killing the node whose server led the journal waits that out, plus the
# client's retry. The guide's 5 s is under that floor in most draws.
NATS_ELECTION_FLOOR = "JetStream Raft election after a lost leader: 4-9 s (nats-server raft.go)"


@dataclass(frozen=True)
class Target:
    table: str  # "Availability tiers" | "RTO" | "RPO"
    failure: str  # the guide's words
    objective: str  # "RTO" | "RPO"
    guide: str  # the guide's figure as it writes it
    guide_s: float | None  # None: the guide says N/A
    scenario: str  # the `report()` name whose figure measures the row
    figure: str
    bound_s: float | None = None  # what the scenario asserts; default: the guide's
    floor: str = ""  # why the bound is looser than the guide's

    @property
    def limit_s(self) -> float | None:
        return self.bound_s if self.bound_s is not None else self.guide_s

    @property
    def key(self) -> str:
        return f"{self.table}: {self.failure} ({self.objective})"


def _tier(failure: str, objective: str, guide: str, guide_s: float | None, *src: str) -> Target:
    return Target("Availability tiers", failure, objective, guide, guide_s, src[0], src[1])


# fmt: off
TARGETS: tuple[Target, ...] = (
    _tier("Single node (data)", "RTO", "2 min", 2 * MIN, S1, "rto_write_s"),
    _tier("Single node (data)", "RPO", "0", 0.0, S1, "lost_writes"),
    Target("Availability tiers", "Single node (Raft)", "RTO", "5 sec", 5.0, S2, "rto_client_s",
           bound_s=15.0, floor=NATS_ELECTION_FLOOR),
    _tier("Single node (Raft)", "RPO", "0", 0.0, S2, "lost_writes"),
    _tier("Majority quorum loss", "RTO", "30 min", 30 * MIN, S3, "option2_rto_s"),
    _tier("Majority quorum loss", "RPO", "1 min", MIN, S3, "lost_namespace_ops"),
    _tier("Full site loss", "RTO", "5 min", 5 * MIN, S4, "rto_s"),
    _tier("Full site loss", "RPO", "5 min", 5 * MIN, S4, "rpo_s"),
    _tier("Metadata corruption", "RTO", "1 hour", HOUR, S5, "restore_rto_s"),
    _tier("Metadata corruption", "RPO", "Minutes (snapshot)", 10 * MIN, S5, "lost_files"),
    _tier("S3 backend loss (cache mode)", "RTO", "N/A", None, S7, "longest_write_s"),
    _tier("S3 backend loss (cache mode)", "RPO", "0", 0.0, S7, "lost_files"),
    _tier("Complete cluster loss", "RTO", "2+ hours", 2 * HOUR, COMPLETE, "rto_s"),
    _tier("Complete cluster loss", "RPO", "1 min", MIN, COMPLETE, "rpo_s"),
    Target("RTO", "Single storage node", "RTO", "2 min", 2 * MIN, S1, "rto_write_s"),
    Target("RTO", "Raft leader loss", "RTO", "5 sec", 5.0, S2, "rto_client_s",
           bound_s=15.0, floor=NATS_ELECTION_FLOOR),
    Target("RTO", "Client disconnection", "RTO", "< 1 sec", 1.0, CLIENT, "reconnect_s"),
    Target("RTO", "Temporary network partition", "RTO", "3 min", 3 * MIN, S6, "converge_s"),
    Target("RTO", "Permanent node loss", "RTO", "10 min", 10 * MIN, S1, "rereplicated_s"),
    Target("RTO", "Full single-site loss", "RTO", "5 min", 5 * MIN, S4, "rto_s"),
    Target("RTO", "Metadata corruption", "RTO", "1 hour", HOUR, S5, "restore_rto_s"),
    Target("RTO", "Complete cluster loss", "RTO", "2+ hours", 2 * HOUR, COMPLETE, "rto_s"),
    Target("RPO", "Single node (Raft)", "RPO", "0 sec", 0.0, S2, "lost_writes"),
    Target("RPO", "Single node (data)", "RPO", "1 min", MIN, S1, "lost_writes"),
    Target("RPO", "Cross-site (async replication)", "RPO", "5 min", 5 * MIN, S4, "rpo_s"),
    Target("RPO", "S3 backend loss (cache)", "RPO", "0", 0.0, S7, "lost_files"),
    Target("RPO", "Metadata backup snapshot", "RPO", "24 hours", 24 * HOUR, TOTAL_METADATA,
           "rpo_s"),
)
# fmt: on


def is_count(figure: str) -> bool:
    return figure.startswith("lost_")


def verdict(target: Target, measured: float | None) -> tuple[str, str]:
    """(status, why): `ok`, `over guide` (within a bound the floor explains),
    `FAILED`, or `not measured`."""
    if measured is None:
        return "not measured", ""
    if is_count(target.figure):
        if measured == 0:
            return "ok", "nothing acknowledged was lost"
        return "FAILED", f"{measured:g} acknowledged operations lost"
    limit = target.limit_s
    if limit is not None and measured > limit:
        return "FAILED", f"{measured:.2f} s > {limit:g} s"
    if target.guide_s is not None and measured > target.guide_s:
        return "over guide", target.floor
    return "ok", ""


def violations(scenario: str, figures: dict[str, Any]) -> list[str]:
    """What a scenario's run misses: each target it measures, over its bound."""
    missed = []
    for target in TARGETS:
        if target.scenario != scenario:
            continue
        if target.figure not in figures:
            missed.append(f"{target.key}: figure {target.figure} not reported")
            continue
        status, why = verdict(target, float(figures[target.figure]))
        if status == "FAILED":
            missed.append(f"{target.key}: {why} (guide {target.guide})")
    return missed


def record(scenario: str, figures: dict[str, Any]) -> Path | None:
    """Keep a scenario's figures for the report (only when `CFS_DR_RESULTS` is set)."""
    directory = os.environ.get(RESULTS_ENV)
    if not directory:
        return None
    path = Path(directory) / f"{re.sub(r'[^a-z0-9]+', '-', scenario.lower()).strip('-')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"scenario": scenario, "at": time.time(), "figures": figures}))
    return path


def load(directory: Path) -> dict[str, dict[str, Any]]:
    """Every recorded scenario's figures, by scenario name."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        entry = json.loads(path.read_text())
        found[entry["scenario"]] = entry["figures"]
    return found


def rows(measured: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for target in TARGETS:
        value = measured.get(target.scenario, {}).get(target.figure)
        number = None if value is None else float(value)
        status, why = verdict(target, number)
        table.append(
            {
                **asdict(target),
                "measured": number,
                "shown": _shown(target, number),
                "status": status,
                "why": why,
            }
        )
    return table


def _shown(target: Target, value: float | None) -> str:
    if value is None:
        return "not measured"
    if is_count(target.figure):
        return "0 s (nothing lost)" if value == 0 else f"{value:g} lost"
    return f"{value:.2f} s"


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "| Table | Failure | Objective | Guide | Measured | Bound asserted | Status | Scenario |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        bound = row["bound_s"] if row["bound_s"] is not None else row["guide_s"]
        status = row["status"] + (f" ({row['why']})" if row["why"] else "")
        lines.append(
            f"| {row['table']} | {row['failure']} | {row['objective']} | {row['guide']} "
            f"| {row['shown']} | {'N/A' if bound is None else f'{bound:g} s'} | {status} "
            f"| {row['scenario']}: `{row['figure']}` |"
        )
    return "\n".join(lines) + "\n"


def print_table(table: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = Table(title="ClaudeFS against the guide's RTO/RPO targets")
    for column in ("Table", "Failure", "Obj.", "Guide", "Measured", "Status"):
        shown.add_column(column)
    colour = {"ok": "green", "over guide": "yellow"}
    for row in table:
        style = colour.get(row["status"], "red")
        shown.add_row(
            row["table"],
            row["failure"],
            row["objective"],
            row["guide"],
            row["shown"],
            f"[{style}]{row['status']}[/{style}]" + (f" {row['why']}" if row["why"] else ""),
        )
    Console(width=160).print(shown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the CFS_DR_RESULTS directory of the run")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--pytest-rc", type=int, default=0, help="the scenario run's exit")
    args = parser.parse_args(argv)
    table = rows(load(args.results) if args.results.is_dir() else {})
    print_table(table)
    if args.markdown:
        args.markdown.write_text(markdown(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    counts: dict[str, int] = {}
    for row in table:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    if args.pytest_rc:
        print(f"the scenario run failed (pytest exit {args.pytest_rc})", file=sys.stderr)
    return 0 if counts.get("ok", 0) == len(table) and not args.pytest_rc else 1


if __name__ == "__main__":
    sys.exit(main())
