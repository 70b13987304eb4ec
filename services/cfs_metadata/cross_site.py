"""`metadata-consistency-check --cross-site`: the two replicated sites hold the same
namespace (DESIGN.md §8).

Each site's shard is scanned by one of its metadata nodes in site-neutral form (inodes
and entries without what differs by site: chunk holders, stamps, access times; see
`digest.site_neutral`), on a checkpoint of one exact position. The bucket digests of
the two sites are compared; buckets that differ are scanned again (changes in flight
on the link settle within a few seconds), and those still different are listed record
by record, naming each record that differs or is on one site only.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import nats.errors

from cfs.bus import Bus, BusError
from cfs.bus.kv import bucket_keys
from cfs_contracts.fs.check import ListRecords, ReplicaShard, ScanReplicas
from cfs_contracts.members import health_key
from cfs_contracts.streams import HEALTH
from cfs_metadata.digest import record_name
from cfs_metadata.fsck import CheckFailed, ask_node, metadata_nodes
from cfs_metadata.projection import key_record

SCAN_TIMEOUT_S = 120.0
SETTLE_S = 2.0  # between two scans of a shard whose digests differ
ATTEMPTS = 3
SERVICE = "metadata-raft"


@dataclass(frozen=True)
class RecordDiff:
    """One record the two sites do not hold alike: `side` is where it exists (a site's
    name, or "both" when they hold different versions)."""

    shard: int
    kind: str  # inode, dentry, tx, tombstone, counter
    number: int  # the inode, or a dentry's directory
    name: str  # a dentry's name
    side: str


@dataclass
class CrossSiteReport:
    here: str
    there: str
    shards: list[dict[str, Any]] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: list[RecordDiff] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if self.unchecked else 1 if self.differences else 0

    def lines(self) -> list[str]:
        out = []
        for shard in self.shards:
            state = "equal" if shard["equal"] else "DIFFERENT"
            out.append(
                f"Shard {shard['shard']:03d}: {state} ({self.here} {shard['records_here']} "
                f"records, {self.there} {shard['records_there']})"
            )
        out += self.differences
        out += [f"Could not check: {u}" for u in self.unchecked]
        out += [f"Note: {n}" for n in self.notes]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "here": self.here,
            "there": self.there,
            "shards": self.shards,
            "differences": self.differences,
            "unchecked": self.unchecked,
            "notes": self.notes,
            "exit_code": self.exit_code,
        }


async def peer_metadata_nodes(bus: Bus, site: str) -> list[str]:
    """The nodes whose metadata-raft reports health on the peer site, from its health
    bucket over the link (this site's come from `fsck.metadata_nodes`)."""
    prefix, suffix = health_key("\0", SERVICE).split("\0")
    keys = await bucket_keys(bus, HEALTH.bucket, prefix, site=site)
    named = [k for k in keys if k.endswith(suffix)]
    return sorted(k[len(prefix) : -len(suffix)] for k in named)


async def _scan(bus: Bus, site: str, nodes: list[str], shard: int) -> tuple[str, ReplicaShard]:
    """The shard as one caught-up replica of `site` holds it (the first that answers)."""
    errors = []
    for node in nodes:
        try:
            reply = await ask_node(
                bus, node, ScanReplicas(shards=(shard,), site_neutral=True), SCAN_TIMEOUT_S, site
            )
        except (BusError, nats.errors.Error) as exc:
            errors.append(f"{node}: {exc}")
            continue
        if reply.errno:
            errors.append(f"{node}: {reply.message}")
            continue
        (scanned,) = reply.shards
        if scanned.caught_up:
            return node, scanned
        errors.append(f"{node}: replica not caught up")
    raise LookupError("; ".join(errors) or "no metadata node reports")


async def _records(
    bus: Bus, site: str, node: str, shard: int, buckets: list[int]
) -> dict[str, str]:
    op = ListRecords(shard=shard, buckets=tuple(buckets), site_neutral=True)
    reply = await ask_node(bus, node, op, SCAN_TIMEOUT_S, site)
    if reply.errno:
        raise LookupError(f"{node}: {reply.message}")
    return {r.key: r.digest for r in reply.records}


async def cross_site_check(bus: Bus, peer: str, shards: int) -> CrossSiteReport:
    report = CrossSiteReport(here=bus.site, there=peer)
    try:
        nodes = {bus.site: await metadata_nodes(bus)}
    except CheckFailed as exc:
        report.unchecked.append(str(exc))
        return report
    try:
        nodes[peer] = await peer_metadata_nodes(bus, peer)
    except (nats.errors.Error, TimeoutError) as exc:
        report.unchecked.append(f"the metadata nodes of {peer}: {exc or type(exc).__name__}")
        return report
    for shard in range(1, shards + 1):
        try:
            await _compare(bus, report, nodes, peer, shard)
        except LookupError as exc:
            report.unchecked.append(f"shard {shard:03d}: {exc}")
    return report


async def _compare(
    bus: Bus, report: CrossSiteReport, nodes: dict[str, list[str]], peer: str, shard: int
) -> None:
    for attempt in range(ATTEMPTS):
        (node_here, here), (node_there, there) = await asyncio.gather(
            _scan(bus, bus.site, nodes[bus.site], shard), _scan(bus, peer, nodes[peer], shard)
        )
        pairs = zip(here.buckets, there.buckets, strict=True)
        differ = [i for i, (a, b) in enumerate(pairs) if a != b]
        if not differ or attempt + 1 == ATTEMPTS:
            break
        await asyncio.sleep(SETTLE_S)  # a change still on its way over the link
    report.shards.append(
        {
            "shard": shard,
            "equal": not differ,
            "records_here": here.records,
            "records_there": there.records,
        }
    )
    if not differ:
        return
    ours = await _records(bus, bus.site, node_here, shard, differ)
    theirs = await _records(bus, peer, node_there, shard, differ)
    for key in sorted(ours.keys() | theirs.keys()):
        if ours.get(key) == theirs.get(key):
            continue
        what = record_name(bytes.fromhex(key))
        kind, number, name = key_record(bytes.fromhex(key))
        side = bus.site if key not in theirs else peer if key not in ours else "both"
        report.records.append(RecordDiff(shard, kind, number, name, side))
        if key not in theirs:
            report.differences.append(f"{what}: only on {bus.site}")
        elif key not in ours:
            report.differences.append(f"{what}: only on {peer}")
        else:
            report.differences.append(f"{what}: differs between {bus.site} and {peer}")
