"""Whether an admin command may run, decided on one snapshot of the nodes KV (pure).

The executor (one process per service type per command) calls these on a fresh
snapshot; the CLI never decides for it, so two operators racing each other get
answers from the same rules. A refusal is one line an operator can act on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from cfs.liveness import NodeFacts as NodeFacts  # the vocabulary these rules speak
from cfs_contracts.events.admin import CommandCode
from cfs_contracts.members import Lifecycle

SHARD_RE = re.compile(r"^[0-9]{1,3}$")
ALL_SHARDS = "*"


@dataclass(frozen=True)
class Verdict:
    """`lifecycle` is what to record (None: nothing to change); `code` as in the reply."""

    code: CommandCode
    message: str
    lifecycle: Lifecycle | None = None

    @property
    def ok(self) -> bool:
        return self.code == "ok"


def _unknown(facts: NodeFacts, node: str) -> Verdict | None:
    if node in facts.known():
        return None
    known = ", ".join(facts.known()) or "none"
    return Verdict("usage", f"unknown node {node!r} (known: {known})")


def decide_drain(facts: NodeFacts, node: str) -> Verdict:
    """Draining moves fragments and leases off a node; repeating it changes nothing."""
    if (refused := _unknown(facts, node)) is not None:
        return refused
    state = facts.lifecycle(node)
    if state is Lifecycle.REMOVED:
        return Verdict("refused", f"node {node} is removed; nothing to drain")
    if state is Lifecycle.DRAINED:
        return Verdict("ok", f"node {node} is already drained")
    if state is Lifecycle.DRAINING:
        return Verdict("ok", f"node {node} is already draining")
    how = "copied" if facts.is_live(node) else "rebuilt from the other nodes (it is down)"
    return Verdict(
        "ok",
        f"node {node} is draining: its fragments are {how}, its shard leases move",
        Lifecycle.DRAINING,
    )


def decide_remove(facts: NodeFacts, node: str) -> Verdict:
    """A live node must be drained first: removing it would throw away good copies."""
    if (refused := _unknown(facts, node)) is not None:
        return refused
    state = facts.lifecycle(node)
    if state is Lifecycle.REMOVED:
        return Verdict("ok", f"node {node} is already removed")
    if facts.is_live(node) and state is Lifecycle.DRAINING:
        return Verdict(
            "refused",
            f"node {node} is still draining; wait for it (cfs admin node-drain {node} --wait)",
        )
    if facts.is_live(node) and state is not Lifecycle.DRAINED:
        return Verdict(
            "refused",
            f"node {node} is alive and not drained; drain it first (cfs admin node-drain {node})",
        )
    why = "drained" if state is Lifecycle.DRAINED else "down: its fragments are rebuilt"
    return Verdict("ok", f"node {node} is removed ({why})", Lifecycle.REMOVED)


def decide_force_election(
    facts: NodeFacts, shard: str, shards: list[str], target: str | None
) -> Verdict:
    """The target (if any) must be able to take the lease: known, alive, active."""
    if shard not in shards:
        return Verdict("usage", f"unknown shard {shard} (shards: {', '.join(shards) or 'none'})")
    if target is None:
        return Verdict("ok", f"shard {shard}: stream leader stepped down, writer lease released")
    if (refused := _unknown(facts, target)) is not None:
        return refused
    if not facts.is_live(target):
        return Verdict("refused", f"node {target} is not alive; it cannot take shard {shard}")
    if facts.lifecycle(target) is not Lifecycle.ACTIVE:
        state = facts.lifecycle(target).value
        return Verdict("refused", f"node {target} is {state}; it may not lead shard {shard}")
    return Verdict(
        "ok", f"shard {shard}: stream leader stepped down, writer lease handed to {target}"
    )


def parse_shard(text: str, shards: list[str], *, allow_all: bool = False) -> list[str]:
    """`1`, `01`, `001` -> ["001"]; `*` -> every shard when allowed. ValueError: one line."""
    if allow_all and text == ALL_SHARDS:
        return list(shards)
    if SHARD_RE.match(text) is None or int(text) == 0:
        expected = "001..999" + (" or *" if allow_all else "")
        raise ValueError(f"bad shard id {text!r} (expected {expected})")
    name = f"{int(text):03d}"
    if name not in shards:
        raise ValueError(f"unknown shard {name} (shards: {', '.join(shards) or 'none'})")
    return [name]


def merge_views(kv: NodeFacts, views: NodeFacts) -> tuple[NodeFacts, list[str]]:
    """The nodes KV, with liveness corrected by the live SWIM views where they disagree
    (a KV read from a replica without quorum can be stale); (facts, corrected nodes)."""
    members = dict(kv.members)
    corrected = []
    for node, seen in views.members.items():
        recorded = members.get(node)
        if recorded is None or recorded.state is not seen.state:
            members[node] = seen
            corrected.append(node)
    merged = replace(kv, members=members)
    return merged, sorted(corrected)
