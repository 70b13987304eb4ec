"""Node lifecycle changes (`cfs admin node-drain|node-remove`, DESIGN.md §6).

The operator's intent is one `admin.<node>` record in the nodes KV; the
metadata replicas and the repair coordinator act on it.
"""

from __future__ import annotations

import time

from cfs.bus import Bus
from cfs.lease import leases_held
from cfs_contracts.members import Lifecycle, NodeAdmin, admin_key
from cfs_contracts.streams import NODES


async def set_lifecycle(
    bus: Bus, node: str, lifecycle: Lifecycle, *, requested_by: str, reason: str = ""
) -> NodeAdmin:
    """Record the new state; a drain also records the leases to be moved (for NodeDrained)."""
    leases = tuple(await leases_held(bus, node)) if lifecycle is Lifecycle.DRAINING else ()
    record = NodeAdmin(
        node=node,
        lifecycle=lifecycle,
        since_ms=time.time_ns() // 1_000_000,
        requested_by=requested_by,
        reason=reason,
        leases=leases,
    )
    kv = await bus.key_value(NODES.bucket)
    await kv.put(admin_key(node), record.model_dump_json().encode())
    return record
