"""Guide scenario 3, option 2: bring a site back on its one surviving node.

JetStream has no "force new cluster", so `cfs admin raft-force-leader --shard *
--leader NODE` (for shards whose journal has no Raft leader) does it from public
APIs only:

1. export every stream of the site (metadata journals, CLUSTER, DATA, ..., the
   `leases` and `nodes` buckets) from the survivor's copy by direct get, which
   the survivor still answers without a quorum, into a recovery directory;
2. reform the survivor's NATS server as the seed of a fresh cluster: its old
   store is moved aside (never deleted), the server restarts empty on its port,
   admitting the recovery's admin user only;
3. import the export in order, so every journal keeps its sequence numbers and
   every event its id (the metadata projections on the survivor stay valid; one
   that applied more than the survivor held rebuilds itself from the journal);
   only then does the server admit the site's services again: none of them ever
   sees a half-imported stream (a lease written into an empty `KV_leases` would
   make the import refuse the bucket; a writer would lead a partial journal);
4. hand every shard's writer lease to the survivor and wait until it writes.

Operations that a quorum acknowledged but the survivor never received are lost:
that is the price the command warns about. `cfs node add` then brings new nodes
and raises the streams back to R3.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors

from cfs.bus import Bus, BusError
from cfs.fuse.config import ClientSettings
from cfs.lease import Lease, LeaseError
from cfs.recovery.streams import RecoveryError, export_streams, import_streams
from cfs.security import Role
from cfs.supervisor.devcontrol import running_dev_site
from cfs_contracts.streams import SITE_BUCKETS, site_streams

log = logging.getLogger(__name__)

LEASE_TIMEOUT_S = 60.0


class QuorumRecoveryError(RecoveryError):
    """Recovery could not go on; the message says what to do."""


def site_stream_names(shards: int) -> list[str]:
    """Every stream a site has, buckets included (`KV_<bucket>`)."""
    return [spec.name for spec in site_streams(shards)] + [
        f"KV_{bucket.bucket}" for bucket in SITE_BUCKETS
    ]


async def recover_quorum(settings: ClientSettings, *, survivor: str, shards: list[str]) -> str:
    """Re-form the site on `survivor`; returns a one-line summary for the operator."""
    control = running_dev_site()
    if control is None:
        raise QuorumRecoveryError(
            "quorum recovery restarts the survivor's NATS server, which needs the node "
            "supervisor (cfs dev); on other deployments follow README 'Quorum loss' by hand"
        )
    started = time.monotonic()
    dest = control.state_dir / "recovery" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    names = site_stream_names(settings.shards)
    credentials = settings.credentials_for(Role.ADMIN)
    exported = await export_streams(settings.nats_urls, names, dest, credentials=credentials)
    log.warning("quorum.exported", extra={"survivor": survivor, "dir": str(dest)})
    reformed = control.call("reform-nats", node=survivor, site=settings.site, timeout=120.0)
    urls = list(reformed["nats_urls"])
    try:
        await import_streams(
            urls, settings.site, settings.shards, dest, replicas=1, credentials=credentials
        )
    except RecoveryError as exc:
        raise QuorumRecoveryError(
            f"{exc}; the re-seeded server still admits the admin only (services stay "
            f"out); the export is intact in {dest}, the old store in {reformed['old_store']}"
        ) from exc
    log.warning("quorum.imported", extra={"survivor": survivor, "streams": len(names)})
    control.call("open-nats", site=settings.site, timeout=60.0)
    async with await Bus.connect(
        urls, site=settings.site, node="cfs-admin-recovery", credentials=credentials
    ) as bus:
        for shard in shards:
            await _hand_lease(bus, shard, survivor)
    journals = {name: info for name, info in exported.items() if name.startswith("META_")}
    messages = sum(info.messages for info in journals.values())
    return (
        f"{len(names)} streams re-seeded from {survivor} ({messages} journal messages) in "
        f"{time.monotonic() - started:.1f}s; old store kept at {reformed['old_store']}; "
        f"export in {dest}"
    )


async def _hand_lease(bus: Bus, shard: str, survivor: str) -> None:
    """The copied lease still names a dead holder: the survivor takes it at once."""
    lease = Lease(bus, f"meta.{shard}", node="cfs-admin")
    deadline = time.monotonic() + LEASE_TIMEOUT_S
    while True:
        status = await Lease.read_status(bus, f"meta.{shard}")
        if status is not None and status.holder == survivor:
            return
        try:
            await lease.request_handoff(survivor)
        except (BusError, LeaseError, nats.errors.Error) as exc:  # bucket still electing
            log.info("quorum.handoff_retry", extra={"shard": shard, "error": str(exc)})
        if time.monotonic() > deadline:
            raise QuorumRecoveryError(
                f"shard {shard}: {survivor} did not take the writer lease within "
                f"{LEASE_TIMEOUT_S:.0f}s after the re-seed"
            )
        await asyncio.sleep(0.5)
