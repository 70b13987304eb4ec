"""Run a FUSE mount: bus, metadata client and data path behind pyfuse3, on asyncio.

    cfs mount /mnt/cfs --cluster nats://10.0.0.1:4222 --site dc1
    python -m cfs.fuse /mnt/cfs --cluster nats://127.0.0.1:4222 --site dc1 --shards 4

Components start in order inside one exit stack and stop in reverse: on
SIGINT/SIGTERM (or an external umount) the FUSE loop ends, the mount goes,
open files are flushed, then the bus closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pyfuse3
import pyfuse3.asyncio

from cfs.bus import Bus, BusError
from cfs.client.files import FileStore
from cfs.client.metadata import MetadataClient
from cfs.client.sites import SiteFollower
from cfs.fuse.config import FSNAME, ClientSettings, client_settings
from cfs.fuse.operations import ClaudeFsOperations
from cfs.logs import setup_logging
from cfs.security import CredentialsError, Role
from cfs.telemetry import serve_metrics, setup_tracing_from_env, shutdown_tracing
from cfs_contracts.fs.records import ROOT_INO
from cfs_contracts.fs.rpc import FsError

log = logging.getLogger("cfs.fuse")

FOLLOWER_CONNECT_S = 2.0  # a site that does not answer within this is skipped this round
OLD_STORE_CLOSE_S = 10.0
# pyfuse3 starts a worker task whenever a request arrives with none idle, and a worker
# ends once more than `min_tasks` are idle; each new one allocates a fresh libfuse
# receive buffer (about 1 MiB). At its default of one idle worker, 8 application threads
# kept workers starting and ending all the time; keeping as many as a busy application
# runs threads cut the mount's CPU per create by 4-6 % (8 threads creating files,
# alternating runs: 972-1,040 against 1,055-1,065 us).
IDLE_WORKERS = 16
MAX_WORKERS = 256


def mount_options(*, debug: bool = False) -> set[str]:
    """The kernel checks permissions against our attributes (default_permissions);
    as root, other users may use the mount as on any shared file system."""
    options = {"default_permissions", f"fsname={FSNAME}", f"subtype={FSNAME}"}
    if os.geteuid() == 0:
        options.add("allow_other")
    if debug:
        options.add("debug")
    return options


async def run_mount(
    mountpoint: Path,
    urls: Sequence[str],
    *,
    site: str,
    shard_count: int,
    client_id: str | None = None,
    credentials: Path | None = None,
    debug: bool = False,
    stop: asyncio.Event | None = None,
    peer: ClientSettings | None = None,
) -> None:
    """Mount and serve until `stop` is set (default: SIGINT/SIGTERM) or the file system
    is unmounted from outside; always leaves the mount point unmounted. `peer`: the
    other site of a replicated pair; the mount then follows the active site."""
    client_id = client_id or f"mount-{socket.gethostname()}-{os.getpid()}"
    mountpoint = _mount_dir(mountpoint)
    pyfuse3.asyncio.enable()
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        home = partial(
            Bus.connect, list(urls), site=site, node=client_id, name=client_id,
            credentials=credentials,
        )  # fmt: skip
        follower: SiteFollower | None = None
        if peer is None:
            bus = await home()
            stack.push_async_callback(bus.close)
        else:
            other = partial(
                Bus.connect, peer.nats_urls, site=peer.site, node=client_id, name=client_id,
                credentials=peer.credentials_for(Role.CLIENT),
            )  # fmt: skip
            connects = {site: home, peer.site: other}

            async def connect(name: str) -> Bus:
                return await connects[name](connect_timeout=FOLLOWER_CONNECT_S)

            async def switch(new: Bus) -> None:
                await _switch_site(operations, new, client_id)

            follower = SiteFollower(site, peer.site, connect, switch)
            stack.push_async_callback(follower.close)
            bus = await follower.start()
        meta = MetadataClient(bus)
        await meta.getattr(ROOT_INO)  # fail before mounting when metadata does not answer
        store = FileStore(bus, meta, client_id=client_id)
        await store.start()
        operations = ClaudeFsOperations(meta, store, shard_count=shard_count)
        # after the unmount: flush what is left (of the store in use then)
        stack.push_async_callback(lambda: operations.store.close())
        pyfuse3.init(operations, str(mountpoint), mount_options(debug=debug))
        stack.callback(_close_session)
        log.info(
            "fuse.mounted",
            extra={"mountpoint": str(mountpoint), "site": site, "client": client_id},
        )
        serving = asyncio.create_task(
            pyfuse3.main(min_tasks=IDLE_WORKERS, max_tasks=MAX_WORKERS), name="fuse-main"
        )
        stopping = asyncio.create_task(stop.wait(), name="fuse-stop")
        tasks = {serving, stopping}
        if follower is not None:  # its failure ends the mount, loudly, like the loop's
            tasks.add(asyncio.create_task(follower.run(), name="fuse-follow-site"))
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            log.info("fuse.stopping", extra={"mountpoint": str(mountpoint)})
            pyfuse3.terminate()
        for task in tasks - {serving}:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("fuse.follower_failed", extra={"error": repr(task.exception())})
            task.cancel()
        await serving  # re-raises a crash of the FUSE loop itself
    log.info("fuse.unmounted", extra={"mountpoint": str(mountpoint)})


async def _switch_site(operations: ClaudeFsOperations, bus: Bus, client_id: str) -> None:
    """Serve from the other site: inode numbers are the same on both, so the kernel's
    caches stay valid. Calls still waiting on the old site fail at once (EIO), and so
    do files open before the switch (their data is on the old site's chunk-stores):
    the application's next call goes to the new site."""
    meta = MetadataClient(bus)
    store = FileStore(bus, meta, client_id=client_id)
    await store.start()
    old = operations.store
    moved = f"the mount moved to site {bus.site}; try again"
    operations.meta.retire(moved)
    old.retire(moved)  # an fsync waiting out the old site's chunk-stores fails now
    operations.serve_from(meta, store)
    try:
        async with asyncio.timeout(OLD_STORE_CLOSE_S):
            await old.close()  # flushes what it can to the old site
    except (TimeoutError, BusError, FsError) as exc:
        log.warning("fuse.old_site_unflushed", extra={"error": str(exc) or repr(exc)})


def _mount_dir(path: Path) -> Path:
    """The absolute mount point; checked before anything connects (one stat, at startup)."""
    absolute = Path(os.path.abspath(path))
    if not absolute.is_dir():
        raise FileNotFoundError(f"mount point {absolute} is not a directory")
    return absolute


def _close_session() -> None:
    try:
        pyfuse3.close(unmount=True)
    except Exception as exc:  # already unmounted from outside: nothing left to do
        log.warning("fuse.close_failed", extra={"error": repr(exc)})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cfs.fuse", description="Mount ClaudeFS with FUSE (foreground)."
    )
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--cluster", help="NATS URLs, comma-separated (or CFS_NATS_URLS)")
    parser.add_argument("--site", help="site name (or CFS_SITE)")
    parser.add_argument("--shards", type=int, help="metadata shard count (or CFS_SHARDS)")
    parser.add_argument("--credentials", type=Path, help="NATS credentials file")
    parser.add_argument("--client-id", help="name of this client in logs and NATS")
    parser.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")
    parser.add_argument(
        "--no-follow",
        action="store_true",
        help="two sites: keep to this site, whichever is active",
    )
    args = parser.parse_args(argv)
    settings = client_settings(args.cluster, args.site, args.shards)
    setup_logging(settings.log_level, service="fuse-mount", mountpoint=str(args.mountpoint))
    tracing = setup_tracing_from_env("fuse-mount", args.client_id or socket.gethostname())
    try:
        metrics = serve_metrics(settings.metrics_port, settings.metrics_host)
    except OSError as exc:  # the mount matters more than its figures: said, not fatal
        log.error(
            "fuse.metrics_unavailable", extra={"port": settings.metrics_port, "error": str(exc)}
        )
        metrics = None
    try:
        asyncio.run(
            run_mount(
                args.mountpoint,
                settings.nats_urls,
                site=settings.site,
                shard_count=settings.shards,
                client_id=args.client_id,
                credentials=args.credentials or settings.credentials_for(Role.CLIENT),
                debug=args.debug_fuse,
                peer=None if args.no_follow else settings.peer_settings(),
            )
        )
    except (BusError, CredentialsError, FsError, OSError, RuntimeError) as exc:
        # Cannot mount (cluster unreachable, mount point missing or busy): one line, exit 1.
        log.error("fuse.mount_failed", extra={"error": str(exc)})
        raise SystemExit(1) from None
    finally:
        if metrics is not None:
            metrics.close()
        shutdown_tracing(tracing)
