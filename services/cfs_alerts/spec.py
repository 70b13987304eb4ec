"""alerts as the kernel runs it: a process per node, one active per site (lease)."""

from __future__ import annotations

from cfs.kernel.spec import AdminVerb, Grants, ServiceSpec, Singleton, deferred, imported
from cfs_alerts.rules import RulesError
from cfs_contracts.alerts import ALERTS_STATE_KEY
from cfs_contracts.streams import ALERTS, LEASES, NODES

SPEC = ServiceSpec(
    name="alerts",
    role="alerts",
    package="cfs_alerts",
    description="Evaluates the alert rules over the figures the services publish and the "
    "events they raise; sends each firing and resolution to the hooks (one active per site).",
    settings=imported("cfs_alerts.service:AlertSettings"),
    grants=Grants(  # AlertRaised / AlertResolved: every role may publish alerts
        read_streams=(ALERTS.name,),
        read_buckets=(NODES.bucket, LEASES.bucket),  # shard writer terms: leader changes
        write_keys={NODES.bucket: (ALERTS_STATE_KEY,)},
    ),
    admin={
        "test": AdminVerb(
            deferred("cfs_alerts.service:test_verb"),
            "send a test notification of one rule through every hook",
        )
    },
    singleton=Singleton(deferred("cfs_alerts.service:lead"), lease_s=5.0, renew_s=1.0),
    fatal=(RulesError,),  # a rules file that cannot be used: exit with its one line
)
