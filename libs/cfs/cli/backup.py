"""`cfs admin snapshot-metadata`, `restore-metadata`, `replay-journal` (DESIGN.md §9).

The backup service cuts and writes snapshots; this module asks it for one and
fetches the file, or takes a snapshot file apart and sends each shard's image to
its writer. Every snapshot is read and checked completely before anything in the
cluster changes, so a corrupt one is refused with its reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from cfs.backup.image import split_chunks
from cfs.backup.snapshot_file import Snapshot, SnapshotInvalid, read_snapshot
from cfs.bus import Bus, BusError, NoResponders
from cfs.cli.admin import JsonOpt, _session, _settings, app
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.client.shard_admin import ShardAdminRefused, shard_admin
from cfs.cluster import read_config
from cfs.ids import new_id
from cfs_contracts.backup import (
    FETCH_BYTES,
    FetchRequest,
    SnapshotReply,
    SnapshotRequest,
    fetch_subject,
    snapshot_subject,
)
from cfs_contracts.events.metadata import Lineage
from cfs_contracts.fs.shard_admin import OpenShard, RestoreBegin, RestoreChunk, ShardPosition

SNAPSHOT_TIMEOUT_S = 600.0

OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", help="write the snapshot here (default: metadata-<time>.tar.gz)"),
]


@app.command("snapshot-metadata")
@one_line_errors
def snapshot_metadata(
    ctx: typer.Context, output: OutputOpt = None, as_json: JsonOpt = False
) -> None:
    """A consistent snapshot of all metadata shards, written as one verified tar.gz."""
    settings = _settings(ctx, None, None, None)
    path = output or Path(time.strftime("metadata-%Y%m%dT%H%M%SZ.tar.gz", time.gmtime()))

    async def work(bus: Bus) -> SnapshotReply:
        request = SnapshotRequest(snapshot_id=new_id())
        try:
            msg = await bus.request(
                snapshot_subject(bus.site),
                request.model_dump_json().encode(),
                timeout=SNAPSHOT_TIMEOUT_S,
            )
        except NoResponders:
            raise CliError(
                "no backup service is active in this site (is `backup` running?)"
            ) from None
        reply = SnapshotReply.model_validate_json(msg.data)
        if not reply.ok or reply.manifest is None:
            raise CliError(reply.message or "the backup service reported a failure")
        tmp = path.with_name(path.name + ".partial")
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            offset = 0
            while offset < reply.bytes:
                piece = await bus.request(
                    fetch_subject(bus.site),
                    FetchRequest(snapshot_id=request.snapshot_id, offset=offset, length=FETCH_BYTES)
                    .model_dump_json()
                    .encode(),
                    timeout=30.0,
                )
                if not piece.data:
                    raise CliError(f"the backup service lost snapshot {request.snapshot_id}")
                out.write(piece.data)
                digest.update(piece.data)
                offset += len(piece.data)
        if digest.hexdigest() != reply.sha256:
            tmp.unlink(missing_ok=True)
            raise CliError("the snapshot changed in transit (checksum mismatch); run it again")
        read_snapshot(tmp)  # verified again where it landed
        tmp.replace(path)
        return reply

    try:
        reply = _session(settings, work)
    except SnapshotInvalid as exc:
        raise CliError(str(exc)) from None
    manifest = reply.manifest
    assert manifest is not None
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "path": str(path),
                    "bytes": reply.bytes,
                    "sha256": reply.sha256,
                    "seconds": round(reply.seconds, 3),
                    "manifest": manifest.model_dump(mode="json"),
                }
            )
        )
        return
    typer.echo(
        f"Snapshot {manifest.snapshot_id} written to {path}: {manifest.inodes} inodes in "
        f"{manifest.shard_count} shards, {reply.bytes} bytes, verified "
        f"({reply.seconds:.1f} s)"
    )
    for cut in manifest.shards:
        typer.echo(f"  shard {cut.shard}: seq {cut.seq}, {cut.inodes} inodes")


@app.command("restore-metadata")
@one_line_errors
def restore_metadata(
    ctx: typer.Context,
    from_snapshot: Annotated[Path, typer.Option("--from-snapshot", help="snapshot tar.gz")],
    force: Annotated[
        bool, typer.Option("--force", help="replace a cluster that holds data (after a snapshot)")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Restore every shard from a snapshot; shards stay read-only until replay-journal."""
    try:
        snapshot = read_snapshot(from_snapshot)
    except SnapshotInvalid as exc:
        raise CliError(f"refusing the snapshot: {exc}") from None
    settings = _settings(ctx, None, None, None)
    started = time.monotonic()

    async def work(bus: Bus) -> list[str]:
        return await _restore(bus, snapshot, force)

    lines = _session(settings, work)
    seconds = time.monotonic() - started
    manifest = snapshot.manifest
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "snapshot_id": manifest.snapshot_id,
                    "inodes": manifest.inodes,
                    "seconds": round(seconds, 3),
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


async def _restore(bus: Bus, snapshot: Snapshot, force: bool) -> list[str]:
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
    holds_data = any(p.lineage is not None or p.applied_seq > 3 for p in positions.values())
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
    with Progress(transient=True) as progress:
        for cut in manifest.shards:
            image = snapshot.images[cut.shard]
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
            while at < len(chunks):
                reply = await _step(
                    bus,
                    index,
                    RestoreChunk(
                        snapshot_id=manifest.snapshot_id,
                        index=at,
                        data_b64=base64.b64encode(chunks[at]).decode(),
                    ),
                )
                at = reply.next_chunk if reply.installing else len(chunks)
                progress.update(task, completed=at)
            lines.append(f"  shard {cut.shard}: {cut.inodes} inodes (source seq {cut.seq})")
    return lines


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
    none: Annotated[
        bool, typer.Option("--none", help="replay nothing: open restored shards as they are")
    ] = False,
) -> None:
    """Apply journal entries after a restored snapshot's cut, then open the shards."""
    if not none:
        raise CliError(
            "replay from the journal archive is not available yet; `--none` opens the "
            "restored shards as they are",
            ExitCode.USAGE,
        )
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> list[str]:
        config = await read_config(bus)
        if config is None:
            raise CliError("this cluster is not initialized")
        lines = []
        for index in range(1, config.shards + 1):
            reply = await _step(bus, index, OpenShard(reason="replay-journal --none"))
            state = "opened" if reply.seq else "already open"
            lines.append(f"  shard {index:03d}: {state}")
        return lines

    for line in _session(settings, work):
        typer.echo(line)
