"""Single faults under load: no application-visible error, nothing acknowledged lost.

The default suite runs three seeds of the `single` schedule, one fault each, one after
another on one 3-node site (2+1 coding); `make chaos` (test_chaos.py) runs a hundred
more, on 3 and 6 nodes, with two faults a seed, and the `multi` schedules. A failing
seed prints its replay command.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.chaos.harness import CHAOS_LOGS, nats_nodes, run
from tests.chaos.schedule import draw
from tests.scenarios.conftest import DevSite

pytestmark = pytest.mark.expected_logs(*CHAOS_LOGS)

# Seeds whose faults differ in kind: SWIM cut off a node, SIGSTOP of a chunk-store,
# kill -9 of a whole node (services and NATS server).
DEFAULT_SEEDS = (2, 4, 11)
REPLAY = ".venv/bin/python -m pytest -s tests/chaos/test_single_fault.py"


def test_single_faults_cause_no_application_error(
    dev_site_factory: Callable[..., DevSite],
) -> None:
    nodes = [f"storage-{i}" for i in range(1, 4)]
    site = dev_site_factory(nodes=len(nodes))
    outcomes = []
    for seed in DEFAULT_SEEDS:
        schedule = draw(
            "single", seed, nodes, nats_nodes=nats_nodes(site), faults=1,
            hold_s=(2.0, 5.0), stop_s=None,
        )  # fmt: skip
        outcomes.append(run(site, schedule, nodes, site.mnt / f"seed-{seed}", replay=REPLAY))
    for outcome in outcomes:
        assert outcome.safe, outcome.summary()
        assert not outcome.failed_ops, outcome.summary()
