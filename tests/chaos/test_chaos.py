"""`make chaos`: many seeds of each schedule on 3-node (2+1) and 6-node (4+2) sites.

Every seed: nothing acknowledged lost or corrupt, the checker clean, no process
stuck; `single` seeds (one fault at a time) also without one application error.
`CHAOS_SEEDS` (e.g. "7" or "1-25"), `CHAOS_SCHEDULES` ("single,multi") and
`CHAOS_NODES` ("3,6") choose; a failing seed prints the command that replays it.
The seeds of one (schedule, nodes) pair run one after another on one site.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from tests.chaos.harness import CHAOS_LOGS, ChaosSite, nats_nodes, run
from tests.chaos.schedule import draw

# Two faults at once may leave too few nodes for a write: an application may see EIO.
pytestmark = [pytest.mark.slow, pytest.mark.expected_logs(*CHAOS_LOGS, "fuse.io_error")]

SEEDS_PER_SITE = 25  # x (single, multi) x (3, 6 nodes) = 100 seeds
# A seed: two faults (a SIGSTOP holds 30 s, an S3 outage up to 30 s), the heal, the
# checks; about a minute, far more when something is stuck, which then shows.
SEED_BUDGET_S = 300


def seeds() -> list[int]:
    chosen = os.environ.get("CHAOS_SEEDS") or f"1-{SEEDS_PER_SITE}"
    out: list[int] = []
    for part in chosen.replace(",", " ").split():
        low, _, high = part.partition("-")
        out += list(range(int(low), int(high or low) + 1))
    return out


def _choices(variable: str, default: str) -> list[str]:
    return (os.environ.get(variable) or default).replace(",", " ").split()


@pytest.mark.timeout(120 + SEED_BUDGET_S * len(seeds()))
@pytest.mark.parametrize("nodes", [int(n) for n in _choices("CHAOS_NODES", "3,6")])
@pytest.mark.parametrize("schedule", _choices("CHAOS_SCHEDULES", "single,multi"))
def test_chaos(chaos_site_factory: Callable[[int], ChaosSite], schedule: str, nodes: int) -> None:
    chaos = chaos_site_factory(nodes)
    unsafe = []
    for seed in seeds():
        drawn = draw(schedule, seed, chaos.nodes, nats_nodes=nats_nodes(chaos.site))
        outcome = run(chaos, drawn, chaos.site.mnt / f"seed-{seed}")
        if not outcome.safe or (schedule == "single" and outcome.failed_ops):
            unsafe.append(outcome.summary())
    assert not unsafe, "\n".join(unsafe)
