"""Single faults under load: no application-visible error, nothing acknowledged lost.

The default suite runs three seeds of the `single` schedule, one fault each, one after
another on one 3-node site (2+1 coding), under two workloads: one through the mount,
one through the client library; `make chaos` (test_chaos.py) runs a hundred
more, on 3 and 6 nodes, with two faults a seed, and the `multi` schedules. A failing
seed prints its replay command.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from tests.chaos.harness import CHAOS_LOGS, ChaosSite, nats_nodes, run
from tests.chaos.schedule import draw
from tests.chaos.test_chaos import seeds

pytestmark = pytest.mark.expected_logs(*CHAOS_LOGS)

# Seeds whose faults differ in kind: a node partitioned away from the others, the disk
# under a chunk-store full, kill -9 of a whole node (services and NATS server).
DEFAULT_SEEDS = (1, 4, 11)
REPLAY = ".venv/bin/python -m pytest -s tests/chaos/test_single_fault.py"


def test_single_faults_cause_no_application_error(
    chaos_site_factory: Callable[[int], ChaosSite],
) -> None:
    chaos = chaos_site_factory(3)
    outcomes = []
    for seed in seeds() if os.environ.get("CHAOS_SEEDS") else DEFAULT_SEEDS:
        schedule = draw(
            "single", seed, chaos.nodes, nats_nodes=nats_nodes(chaos.site), faults=1,
            hold_s=(2.0, 5.0), stop_s=None,
        )  # fmt: skip
        outcomes.append(run(chaos, schedule, chaos.site.mnt / f"seed-{seed}", replay=REPLAY))
    for outcome in outcomes:
        assert outcome.safe, outcome.summary()
        assert not outcome.failed_ops, outcome.summary()
