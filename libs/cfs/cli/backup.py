"""`cfs admin snapshot-metadata`, `restore-metadata`, `replay-journal` (DESIGN.md §9).

The backup service cuts and writes snapshots; this module asks it for one and
fetches the file, or takes a snapshot file apart and sends each shard's image to
its writer. Every snapshot is read and checked completely before anything in the
cluster changes, so a corrupt one is refused with its reason.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from nats.aio.msg import Msg
from rich.progress import Progress

from cfs.backup.image import split_chunks
from cfs.backup.replay import (
    ReplayError,
    ShardReplay,
    archive_complete_through,
    archive_source,
    live_source,
    replay_shard,
    until_ms,
)
from cfs.backup.snapshot_file import Snapshot, SnapshotInvalid, read_snapshot
from cfs.bus import Bus, BusError, NoResponders
from cfs.cli.admin import JsonOpt, _session, _settings, app
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.client.shard_admin import ShardAdminRefused, shard_admin
from cfs.cluster import read_config
from cfs.ids import new_id
from cfs.objstore import S3Url, is_s3_url, open_store, s3_settings
from cfs_contracts.backup import (
    FETCH_BYTES,
    SCHEDULE_KEY,
    FetchRequest,
    ShardCut,
    SnapshotManifest,
    SnapshotReply,
    SnapshotRequest,
    SnapshotSchedule,
    fetch_subject,
    progress_subject,
    snapshot_subject,
)
from cfs_contracts.events.metadata import Lineage
from cfs_contracts.fs.shard_admin import (
    OpenShard,
    RestoreBegin,
    RestoreChunk,
    ShardAdminReply,
    ShardPosition,
)
from cfs_contracts.streams import NODES, meta_stream, shard_name

SNAPSHOT_TIMEOUT_S = 3600.0
PROGRESS_STALL_S = 10.0  # the service reports every second while it works

OutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        help="PATH or s3://bucket/key.tar.gz (default: ./metadata-<time>.tar.gz)",
    ),
]
DestinationOpt = Annotated[
    str | None,
    typer.Option(
        "--destination",
        help="s3://bucket/prefix: the backup service uploads metadata-<time>-<id>.tar.gz there",
    ),
]
IntervalOpt = Annotated[
    str | None,
    typer.Option("--interval", help="take one every INTERVAL (30m, 1h, 1d) to --destination"),
]
KeepOpt = Annotated[
    int | None, typer.Option("--keep", min=1, help="retention: keep the newest N at --destination")
]
MaxAgeOpt = Annotated[
    str | None, typer.Option("--max-age", help="retention: delete older than this (30d)")
]
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str, option: str) -> float:
    """`90s`, `30m`, `1h`, `30d`, `2w` (a bare number is seconds)."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:]) if value else None
    number = value[:-1] if unit else value
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        raise CliError(
            f"{option} {text!r}: expected a duration like 30m, 1h, 30d", ExitCode.USAGE
        ) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise CliError(f"{option} {text!r}: must be a finite duration, more than 0", ExitCode.USAGE)
    return seconds


def _s3_url(text: str, option: str) -> S3Url:
    try:
        return S3Url.parse(text)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}", ExitCode.USAGE) from None


@app.command("snapshot-metadata")
@one_line_errors
def snapshot_metadata(
    ctx: typer.Context,
    output: OutputOpt = None,
    destination: DestinationOpt = None,
    interval: IntervalOpt = None,
    keep: KeepOpt = None,
    max_age: MaxAgeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A consistent snapshot of all metadata shards as one verified tar.gz (writes go on).

    With --interval the backup service takes them on that schedule to --destination,
    enforcing --keep/--max-age; every snapshot is read back and checked after writing.
    """
    if (interval or keep or max_age) and not destination:
        raise CliError("--interval, --keep and --max-age need --destination s3://…", ExitCode.USAGE)
    if destination and output:
        raise CliError("give --output or --destination, not both", ExitCode.USAGE)
    if destination:
        _s3_url(destination, "--destination")
    max_age_s = parse_duration(max_age, "--max-age") if max_age else None
    settings = _settings(ctx, None, None, None)
    if interval:
        schedule = SnapshotSchedule(
            interval_s=parse_duration(interval, "--interval"),
            destination=destination or "",
            keep=keep,
            max_age_s=max_age_s,
        )

        async def set_schedule(bus: Bus) -> None:
            kv = await bus.key_value(NODES.bucket)
            await kv.put(SCHEDULE_KEY, schedule.model_dump_json().encode())

        _session(settings, set_schedule)
        typer.echo(
            f"Scheduled metadata snapshots {schedule.describe()} (the first one now if "
            "none is there yet); `cfs admin status` shows the backup age."
        )
        return
    to_s3 = output is not None and is_s3_url(output)
    if to_s3:
        _s3_url(output or "", "--output")
    local = Path(
        output
        if output and not to_s3
        else time.strftime("metadata-%Y%m%dT%H%M%SZ.tar.gz", time.gmtime())
    )
    if to_s3:
        local = Path(tempfile.mkdtemp(prefix="cfs-snapshot-")) / local.name
    request = SnapshotRequest(
        snapshot_id=new_id(), destination=destination, keep=keep, max_age_s=max_age_s
    )

    async def work(bus: Bus) -> SnapshotReply:
        reply = await _take(bus, request)
        if destination is None:
            await _fetch(bus, request.snapshot_id, reply, local)
            if to_s3:
                url = _s3_url(output or "", "--output")
                store = open_store(S3Url(url.bucket), s3_settings())
                async with store:
                    await store.ensure_bucket()
                    await store.put_file(url.prefix, local)
                reply = reply.model_copy(update={"url": str(url)})
        return reply

    reply = _session(settings, work)
    manifest = reply.manifest
    assert manifest is not None
    where = reply.url or str(local)
    if as_json:
        document = {
            "path": where,
            "bytes": reply.bytes,
            "sha256": reply.sha256,
            "seconds": round(reply.seconds, 3),
            "manifest": manifest.model_dump(mode="json"),
        }
        typer.echo(json.dumps(document))
        return
    typer.echo(
        f"Snapshot {manifest.snapshot_id} written to {where}: {manifest.inodes} inodes in "
        f"{manifest.shard_count} shards, {reply.bytes} bytes, verified ({reply.seconds:.1f} s)"
    )
    for cut in manifest.shards:
        typer.echo(f"  shard {cut.shard}: seq {cut.seq}, {cut.inodes} inodes")


async def _take(bus: Bus, request: SnapshotRequest) -> SnapshotReply:
    """Ask the active backup service for a snapshot, with a progress bar on a terminal.

    The service reports progress at least every second while it works; silence for
    PROGRESS_STALL_S means it is gone (killed, or its lease moved), and the command
    says so at once instead of waiting out the whole snapshot timeout.
    """
    progress = Progress(transient=True, disable=not sys.stderr.isatty())
    task = progress.add_task("snapshot", total=None)
    heard = time.monotonic()

    async def on_progress(msg: Msg) -> None:
        nonlocal heard
        heard = time.monotonic()
        update = json.loads(msg.data)
        progress.update(
            task,
            description=f"snapshot: {update['phase']}",
            completed=update["done"],
            total=update["total"],
        )

    sub = await bus.nc.subscribe(progress_subject(bus.site, request.snapshot_id), cb=on_progress)
    asked = asyncio.ensure_future(
        bus.request(
            snapshot_subject(bus.site),
            request.model_dump_json().encode(),
            timeout=SNAPSHOT_TIMEOUT_S,
        )
    )
    try:
        with progress:
            while not asked.done():
                await asyncio.wait({asked}, timeout=1.0)
                if not asked.done() and time.monotonic() - heard > PROGRESS_STALL_S:
                    asked.cancel()
                    raise CliError(
                        f"the backup service stopped reporting during snapshot "
                        f"{request.snapshot_id} (killed, or its lease moved): nothing was "
                        "written here; run the command again"
                    )
            msg = asked.result()
    except NoResponders:
        raise CliError("no backup service is active in this site (is `backup` running?)") from None
    finally:
        await sub.unsubscribe()
    reply = SnapshotReply.model_validate_json(msg.data)
    if not reply.ok or reply.manifest is None:
        raise CliError(reply.message or "the backup service reported a failure")
    return reply


async def _fetch(bus: Bus, snapshot_id: str, reply: SnapshotReply, path: Path) -> None:
    """Copy the service's file here in pieces; checked end to end, then renamed."""
    tmp = path.with_name(path.name + ".partial")
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        offset = 0
        while offset < reply.bytes:
            request = FetchRequest(snapshot_id=snapshot_id, offset=offset, length=FETCH_BYTES)
            piece = await bus.request(
                fetch_subject(bus.site, reply.node),
                request.model_dump_json().encode(),
                timeout=30.0,
            )
            if not piece.data:
                raise CliError(f"the backup service lost snapshot {snapshot_id}; run it again")
            out.write(piece.data)
            digest.update(piece.data)
            offset += len(piece.data)
    if digest.hexdigest() != reply.sha256:
        tmp.unlink(missing_ok=True)
        raise CliError("the snapshot changed in transit (checksum mismatch); run it again")
    try:
        read_snapshot(tmp)  # verified again where it landed
    except SnapshotInvalid as exc:
        tmp.unlink(missing_ok=True)
        raise CliError(str(exc)) from None
    tmp.replace(path)


def _load(source: str) -> Snapshot:
    """A snapshot from a path or s3://bucket/key, checked completely (or refused); one
    from S3 is downloaded to a temporary directory, removed once read (into memory)."""
    if not is_s3_url(source):
        return _read(Path(source))
    url = _s3_url(source, "--from-snapshot")
    with tempfile.TemporaryDirectory(prefix="cfs-restore-") as tmp:
        local = Path(tmp) / "snapshot.tar.gz"

        async def download() -> None:
            async with open_store(S3Url(url.bucket), s3_settings()) as store:
                await store.get_file(url.prefix, local)

        asyncio.run(download())
        return _read(local)


def _read(path: Path) -> Snapshot:
    try:
        return read_snapshot(path)
    except SnapshotInvalid as exc:
        raise CliError(f"refusing the snapshot: {exc}") from None


@app.command("restore-metadata")
@one_line_errors
def restore_metadata(
    ctx: typer.Context,
    from_snapshot: Annotated[
        str, typer.Option("--from-snapshot", help="snapshot tar.gz: PATH or s3://bucket/key")
    ],
    force: Annotated[
        bool,
        typer.Option("--force", help="replace a cluster that holds data (a snapshot of it first)"),
    ] = False,
    pre_restore_output: Annotated[
        Path | None,
        typer.Option(
            "--pre-restore-output",
            help="with --force: where the snapshot of the replaced state goes "
            "(default ./metadata-pre-restore-<time>.tar.gz)",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore every shard from a snapshot; shards stay read-only until replay-journal.

    A cluster that holds metadata is replaced only with --force, and only after a
    snapshot of what it holds has been written and verified (guide: restore procedure).
    """
    snapshot = _load(from_snapshot)
    settings = _settings(ctx, None, None, None)
    before = pre_restore_output or Path(
        time.strftime("metadata-pre-restore-%Y%m%dT%H%M%SZ.tar.gz", time.gmtime())
    )
    started = time.monotonic()

    async def work(bus: Bus) -> tuple[list[str], float]:
        return await _restore(bus, snapshot, force, before)

    lines, pre_restore_s = _session(settings, work)
    seconds = time.monotonic() - started
    manifest = snapshot.manifest
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "snapshot_id": manifest.snapshot_id,
                    "inodes": manifest.inodes,
                    "seconds": round(seconds, 3),
                    "pre_restore_snapshot_s": round(pre_restore_s, 3),
                    "shards": lines,
                }
            )
        )
        return
    for line in lines:
        typer.echo(line)
    typer.echo(
        f"Restored snapshot {manifest.snapshot_id} ({manifest.inodes} inodes) in "
        f"{seconds:.1f} s. Shards are read-only until `cfs admin replay-journal` "
        "(or `cfs admin replay-journal --none` to open them as they are)."
    )


async def _restore(
    bus: Bus, snapshot: Snapshot, force: bool, before: Path
) -> tuple[list[str], float]:
    """The report's lines, and the seconds the snapshot of the replaced state took."""
    manifest = snapshot.manifest
    config = await read_config(bus)
    if config is None:
        raise CliError("this cluster is not initialized: run `cfs cluster init` first")
    if config.shards != manifest.shard_count:
        raise CliError(
            f"the snapshot has {manifest.shard_count} shards, this cluster {config.shards}: "
            "make the cluster with `cfs cluster init --shards "
            f"{manifest.shard_count}`"
        )
    positions = {i: await _position(bus, i) for i in range(1, config.shards + 1)}
    # A fresh cluster holds the root directory (shard 001) and nothing else.
    holds_data = any(p.lineage is not None or p.inodes > 1 for p in positions.values())
    if holds_data and not force:
        raise CliError(
            "this cluster holds metadata; restoring would replace it. Take a snapshot "
            "first (`cfs admin snapshot-metadata`) and pass --force"
        )
    if holds_data and manifest.cluster_id != config.cluster_id:
        raise CliError(
            f"the snapshot is of cluster {manifest.cluster_id}, this cluster is "
            f"{config.cluster_id}: restore it into a fresh cluster (`cfs cluster init`)"
        )
    lines = []
    started = time.monotonic()
    if holds_data:
        request = SnapshotRequest(snapshot_id=new_id())
        reply = await _take(bus, request)
        await _fetch(bus, request.snapshot_id, reply, before)
        lines.append(f"  the replaced state was saved first: {before} (verified)")
    pre_restore_s = time.monotonic() - started
    with Progress(transient=True) as progress:
        # Shards install side by side: each is its own writer's journal and replicas.
        async with asyncio.TaskGroup() as shards:
            for cut in manifest.shards:
                shards.create_task(
                    _install(bus, manifest, cut, snapshot.images[cut.shard], progress)
                )
    lines += [
        f"  shard {cut.shard}: {cut.inodes} inodes (source seq {cut.seq})"
        for cut in manifest.shards
    ]
    return lines, pre_restore_s


CHUNKS_IN_FLIGHT = 3


async def _install(
    bus: Bus, manifest: SnapshotManifest, cut: ShardCut, image: bytes, progress: Progress
) -> None:
    """One shard's image through its writer, chunk by chunk (each one journaled)."""
    chunks = split_chunks(image)
    task = progress.add_task(f"shard {cut.shard}", total=len(chunks))
    lineage = Lineage(
        cluster_id=manifest.cluster_id,
        shard=cut.shard,
        seq=cut.seq,
        hlc=cut.hlc,
        snapshot_id=manifest.snapshot_id,
        archive_url=manifest.archive_url,
    )
    index = int(cut.shard)
    reply = await _step(
        bus,
        index,
        RestoreBegin(
            lineage=lineage,
            chunks=len(chunks),
            records=cut.records,
            sha256=hashlib.sha256(image).hexdigest(),
        ),
    )
    at = reply.next_chunk

    async def send(chunk: int) -> ShardAdminReply:
        data = base64.b64encode(chunks[chunk]).decode()
        op = RestoreChunk(snapshot_id=manifest.snapshot_id, index=chunk, data_b64=data)
        return await shard_admin(bus, index, op)

    # A few chunks in flight: the writer takes them in order, and while it journals
    # one the next is already on its way. One that overtook another (a retry) is
    # refused with the position the writer expects; the next round starts there.
    while at < len(chunks):
        window = range(at, min(at + CHUNKS_IN_FLIGHT, len(chunks)))
        answers = await asyncio.gather(*(send(i) for i in window), return_exceptions=True)
        positions = []
        for answer in answers:
            if (
                isinstance(answer, ShardAdminRefused)
                and answer.reply.installing == manifest.snapshot_id
            ):
                positions.append(answer.reply.next_chunk)  # out of order: resume there
            elif isinstance(answer, BaseException):
                raise CliError(f"shard {index:03d}: {answer}") from None
            else:
                positions.append(answer.next_chunk if answer.installing else len(chunks))
        if max(positions) <= at:
            raise CliError(f"shard {index:03d}: the writer takes no chunk after {at}")
        at = max(positions)
        progress.update(task, completed=at)


async def _position(bus: Bus, shard: int):  # type: ignore[no-untyped-def]
    return await _step(bus, shard, ShardPosition())


async def _step(bus: Bus, shard: int, op):  # type: ignore[no-untyped-def]
    try:
        return await shard_admin(bus, shard, op)
    except ShardAdminRefused as exc:
        raise CliError(str(exc)) from None
    except BusError as exc:
        raise CliError(f"shard {shard:03d}: {exc}") from None


@app.command("replay-journal")
@one_line_errors
def replay_journal(
    ctx: typer.Context,
    from_: Annotated[
        str | None,
        typer.Option("--from", help="TIMESTAMP (ISO 8601 or epoch s): must not be after the cut"),
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="TIMESTAMP: point-in-time restore (inclusive)")
    ] = None,
    archive: Annotated[
        str | None,
        typer.Option("--archive", help="s3://… archive root, if not the one the snapshot names"),
    ] = None,
    none: Annotated[
        bool, typer.Option("--none", help="replay nothing: open the restored shards as they are")
    ] = False,
    keep_read_only: Annotated[
        bool, typer.Option("--keep-read-only", help="do not open the shards afterwards")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Apply the journal after a restored snapshot's cut (live journal or S3 archive),
    the same point in time on every shard, then open the shards for writes."""
    from_ms = parse_timestamp(from_, "--from") if from_ else None
    to_ms = parse_timestamp(to, "--to") if to else None
    if none and (from_ or to or archive):
        raise CliError("--none replays nothing: it takes no --from/--to/--archive", ExitCode.USAGE)
    settings = _settings(ctx, None, None, None)
    started = time.monotonic()

    async def work(bus: Bus) -> dict[str, Any]:
        config = await read_config(bus)
        if config is None:
            raise CliError("this cluster is not initialized")
        shards = range(1, config.shards + 1)
        positions = {i: await _step(bus, i, ShardPosition()) for i in shards}
        results: list[ShardReplay] = []
        through: int | None = None
        if not none:
            lineages = {i: p.lineage for i, p in positions.items()}
            missing = [shard_name(i) for i, lin in lineages.items() if lin is None]
            if missing:
                raise CliError(
                    f"shards {', '.join(missing)} were not restored from a snapshot: "
                    "run `cfs admin restore-metadata` first"
                )
            restored = {i: lin for i, lin in lineages.items() if lin is not None}
            cut_ms = min((lin.hlc.wall_ms for lin in restored.values() if lin.hlc), default=0)
            if from_ms is not None and cut_ms and from_ms > cut_ms:
                raise CliError(
                    f"--from {_iso(from_ms)} is after the restored cut ({_iso(cut_ms)}): "
                    "the journal between them would be skipped"
                )
            results, through = await _replay_all(bus, config.cluster_id, restored, to_ms, archive)
        if not keep_read_only:
            for i in shards:
                await _step(bus, i, OpenShard(reason="replay-journal finished"))
        return {"shards": results, "through_ms": through}

    done = _session(settings, work)
    seconds = time.monotonic() - started
    results: list[ShardReplay] = done["shards"]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "seconds": round(seconds, 3),
                    "through_ms": done["through_ms"],
                    "open": not keep_read_only,
                    "shards": [
                        {
                            "shard": r.shard,
                            "messages": r.messages,
                            "first": r.first,
                            "last": r.last,
                            "last_ms": r.last_hlc.wall_ms if r.last_hlc else None,
                            "stopped": r.stopped,
                        }
                        for r in results
                    ],
                }
            )
        )
        return
    for r in results:
        upto = f", last change {_iso(r.last_hlc.wall_ms)}" if r.last_hlc else ""
        typer.echo(f"  shard {r.shard}: replayed {r.messages} messages{upto}")
        if r.stopped:
            typer.echo(f"    stopped: {r.stopped}")
    state = "read-only (--keep-read-only)" if keep_read_only else "open for writes"
    typer.echo(f"Journal replay finished in {seconds:.1f} s; shards are {state}.")


async def _replay_all(
    bus: Bus,
    cluster_id: str,
    restored: dict[int, Lineage],
    to_ms: int | None,
    archive: str | None,
) -> tuple[list[ShardReplay], int | None]:
    """One point in time for every shard: --to, and (from an archive) the moment up to
    which every shard's archive is complete, whichever is earlier."""
    sources = {lin.cluster_id for lin in restored.values()}
    if len(sources) != 1:
        raise CliError(f"shards were restored from different clusters: {sorted(sources)}")
    source_cluster = sources.pop()
    lineage = next(iter(restored.values()))
    root = archive.rstrip("/") + f"/{source_cluster}" if archive else lineage.archive_url
    use_live = archive is None and source_cluster == cluster_id
    if not use_live and not root:
        raise CliError(
            f"the snapshot's cluster {source_cluster} had no journal archive: give "
            "--archive s3://… or use --none"
        )
    store = None if use_live else open_store(root or "", s3_settings())
    try:
        until_stamp = until_ms(to_ms) if to_ms is not None else None
        through = None
        if store is not None:
            streams = [meta_stream(lin.shard).name for lin in restored.values()]
            through = await archive_complete_through(store, streams)
            if not through:
                raise CliError(f"{root}: no archive progress record: nothing can be replayed")
            if to_ms is None or through < to_ms:
                until_stamp = until_ms(through)
        results = []
        for index, lin in sorted(restored.items()):
            if store is None:
                source = live_source(bus, index, lin.seq + 1)
            else:
                source = archive_source(store, meta_stream(lin.shard).name, lin.seq + 1)
            try:
                results.append(await replay_shard(bus, index, lin, source, until_stamp))
            except (ReplayError, ShardAdminRefused) as exc:
                raise CliError(str(exc)) from None
        return results, through
    finally:
        if store is not None:
            await store.close()


def parse_timestamp(text: str, option: str) -> int:
    """ISO 8601 (`2026-12-03T01:20:00Z`, naive = UTC) or epoch seconds, as wall ms."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        try:  # a moment a date can name: not inf, nan, or past the year 9999
            return int(datetime.fromtimestamp(seconds, UTC).timestamp() * 1000)
        except (OverflowError, ValueError, OSError):
            raise CliError(
                f"{option} {text!r}: epoch seconds out of range", ExitCode.USAGE
            ) from None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            f"{option} {text!r}: expected ISO 8601 (2026-12-03T01:20:00Z) or epoch seconds",
            ExitCode.USAGE,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _iso(wall_ms: int) -> str:
    return datetime.fromtimestamp(wall_ms / 1000, UTC).isoformat(timespec="milliseconds")


# -- the same steps for other commands (`cfs admin dr-drill`) ----------------------------
async def take_snapshot(bus: Bus, path: Path) -> SnapshotReply:
    """`snapshot-metadata --output PATH` on a connected admin bus: taken by the backup
    service, fetched here and verified where it landed."""
    request = SnapshotRequest(snapshot_id=new_id())
    reply = await _take(bus, request)
    await _fetch(bus, request.snapshot_id, reply, path)
    return reply


async def restore_snapshot(bus: Bus, snapshot: Snapshot, pre_restore: Path) -> list[str]:
    """`restore-metadata` (without --force) then `replay-journal --none`: every shard
    installed from `snapshot` and opened as it is. The report's lines."""
    lines, _ = await _restore(bus, snapshot, False, pre_restore)
    for cut in snapshot.manifest.shards:
        await _step(bus, int(cut.shard), OpenShard(reason="restored by the DR drill"))
    return lines
