"""The one liveness vocabulary (pure): what the nodes KV says about a node, and the
rules every reader applies to it.

Three records per node (`cfs_contracts.members`): `member.<node>` (SWIM's verdict),
`admin.<node>` (the operator's lifecycle) and `store.<node>` (the chunk-store's
capacity, refreshed every few seconds). `NodeFacts` is one snapshot of them; the
admin commands read one with a deadline (`cfs.admin.snapshot`), long-running
services get one from their live view (`cfs.client.nodes.NodeView.facts`), so
`cfs admin status`, repair, placement and lease eligibility agree on who is up.

A node without a member record is judged by its store record (a site may run without
membership); a missing lifecycle record means active.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cfs_contracts.data import StoreRecord
from cfs_contracts.members import Lifecycle, Liveness, MemberRecord, NodeAdmin, ServiceHealth

# A chunk-store refreshes `store.<node>` every few seconds; older means not running.
STORE_FRESH_MS = 10_000


@dataclass(frozen=True)
class NodeFacts:
    """What the nodes KV says about every node, read at `now_ms`."""

    members: Mapping[str, MemberRecord] = field(default_factory=dict)
    admin: Mapping[str, NodeAdmin] = field(default_factory=dict)
    stores: Mapping[str, StoreRecord] = field(default_factory=dict)
    now_ms: int = 0
    store_fresh_ms: int = STORE_FRESH_MS
    health: tuple[ServiceHealth, ...] = ()  # each service process's own report

    def reporting(self, health: ServiceHealth) -> bool:
        """A service process writes its record every `heartbeat_s`; three missed beats
        mean it is gone (or cut off from NATS)."""
        return self.now_ms - health.updated_ms < 3 * health.heartbeat_s * 1000

    def known(self) -> list[str]:
        """Every node the site has a record of (member, lifecycle or store)."""
        return sorted(set(self.members) | set(self.admin) | set(self.stores))

    def store_fresh(self, node: str) -> bool:
        store = self.stores.get(node)
        return store is not None and self.now_ms - store.updated_ms < self.store_fresh_ms

    def liveness(self, node: str) -> Liveness | None:
        """SWIM's verdict; without membership, a fresh store record counts as alive."""
        member = self.members.get(node)
        if member is not None:
            return member.state
        return Liveness.ALIVE if self.store_fresh(node) else None

    def lifecycle(self, node: str) -> Lifecycle:
        record = self.admin.get(node)
        return record.lifecycle if record is not None else Lifecycle.ACTIVE

    def is_live(self, node: str) -> bool:
        """Alive or only suspected: still answering as far as anyone knows."""
        return self.liveness(node) in (Liveness.ALIVE, Liveness.SUSPECT)

    def live_nodes(self) -> list[str]:
        """Nodes known to be alive, sorted."""
        return [node for node in self.known() if self.liveness(node) is Liveness.ALIVE]

    def active(self, node: str) -> bool:
        """Not draining, drained or removed (liveness aside)."""
        return self.lifecycle(node) is Lifecycle.ACTIVE

    def usable(self, node: str) -> bool:
        """May take new data: alive (or not tracked by membership) and active."""
        member = self.members.get(node)
        return (member is None or member.state is Liveness.ALIVE) and self.active(node)

    def in_service(self, node: str) -> bool:
        """May run site services: not known to be down, and not drained or removed (a
        draining node keeps coordinating until its fragments are gone)."""
        member = self.members.get(node)
        return (member is None or member.state in (Liveness.ALIVE, Liveness.SUSPECT)) and (
            self.lifecycle(node) in (Lifecycle.ACTIVE, Lifecycle.DRAINING)
        )
