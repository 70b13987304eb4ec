"""`cfs cluster init`: fix a site's shape once and provision what it runs on.

Initialization is idempotent for the same shape (a retried init, or `cfs dev up`
on existing state, changes nothing) and refused for a different one: the shard
count decides which journal holds which inode, so it can never change after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import nats.js.errors
from nats.js.client import JetStreamContext

from cfs.bus import Bus, ensure_buckets, ensure_streams
from cfs.erasure import Scheme
from cfs_contracts.members import CLUSTER_CONFIG_KEY, ClusterConfig
from cfs_contracts.streams import NODES, SITE_BUCKETS, site_streams


class ClusterInitError(Exception):
    """The site is initialized with another shape, or the request is invalid."""


@dataclass(frozen=True)
class InitResult:
    config: ClusterConfig
    created: bool  # False: it was initialized already with this shape
    replicas: int


def check_ec(ec: str) -> str:
    """`auto` or a scheme name (ec4+2, ec2+1, copy3, ...); ClusterInitError otherwise."""
    if ec == "auto":
        return ec
    try:
        Scheme.parse(ec)
    except ValueError as exc:
        raise ClusterInitError(f"--ec {ec!r}: {exc} (auto, ec4+2, ec2+1, copy3, ...)") from None
    return ec


def new_config(
    *,
    name: str,
    site: str,
    shards: int,
    ec: str,
    bootstrap_node: str,
    created_by: str,
    site_index: int = 0,
) -> ClusterConfig:
    return ClusterConfig(
        name=name,
        site=site,
        shards=shards,
        ec=check_ec(ec),
        bootstrap_node=bootstrap_node,
        created_ms=time.time_ns() // 1_000_000,
        created_by=created_by,
        site_index=site_index,
    )


def _shape(config: ClusterConfig) -> tuple[str, str, int, str, int]:
    return (config.name, config.site, config.shards, config.ec, config.site_index)


def same_shape(a: ClusterConfig, b: ClusterConfig) -> bool:
    return _shape(a) == _shape(b)


async def read_config(bus: Bus, js: JetStreamContext | None = None) -> ClusterConfig | None:
    """None when not recorded; BucketNotFoundError when nothing was provisioned. `js`:
    another site's JetStream (its domain over the site link) instead of ours."""
    kv = await (js or bus.js).key_value(NODES.bucket)
    try:
        entry = await kv.get(CLUSTER_CONFIG_KEY)
    except nats.js.errors.KeyNotFoundError:
        return None
    return ClusterConfig.model_validate_json(entry.value) if entry.value else None


async def init_cluster(bus: Bus, wanted: ClusterConfig, *, replicas: int) -> InitResult:
    """Provision every stream and bucket, then record the config (create-only)."""
    existing = await _existing_config(bus)
    if existing is not None and not same_shape(existing, wanted):
        raise ClusterInitError(_mismatch(existing, wanted))
    await ensure_streams(bus.js, site_streams(wanted.shards), site=wanted.site, replicas=replicas)
    await ensure_buckets(bus.js, SITE_BUCKETS, replicas=replicas)
    if existing is not None:
        return InitResult(existing, created=False, replicas=replicas)
    kv = await bus.key_value(NODES.bucket)
    try:
        await kv.create(CLUSTER_CONFIG_KEY, wanted.model_dump_json().encode())
    except nats.js.errors.KeyWrongLastSequenceError:  # a concurrent init won the race
        winner = await read_config(bus)
        if winner is None or not same_shape(winner, wanted):
            raise ClusterInitError(_mismatch(winner or wanted, wanted)) from None
        return InitResult(winner, created=False, replicas=replicas)
    return InitResult(wanted, created=True, replicas=replicas)


async def _existing_config(bus: Bus) -> ClusterConfig | None:
    try:
        return await read_config(bus)
    except nats.js.errors.BucketNotFoundError:
        return None


def _mismatch(existing: ClusterConfig, wanted: ClusterConfig) -> str:
    return (
        f"site {existing.site} is already initialized as cluster {existing.name!r} with "
        f"{existing.shards} shard(s), ec {existing.ec} and site index {existing.site_index} "
        f"(asked: {wanted.name!r}, {wanted.shards} shard(s), ec {wanted.ec}, site index "
        f"{wanted.site_index}); these are fixed at init"
    )
