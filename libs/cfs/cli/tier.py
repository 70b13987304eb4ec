"""The data tier's commands (guide scenario 7, DESIGN.md §7):

    cfs admin tier-config [--mode cache|tiered|off] [--url s3://bucket/prefix] ...
    cfs admin s3-health                 reachable or not, last successful write, error class
    cfs admin s3-queue-status [--watch] entries, bytes, oldest, drain rate, watermark
    cfs admin s3-failover --target s3://backup-bucket | --back
    cfs admin restore-data --from-s3 [--url s3://bucket/prefix]
    cfs admin s3-snapshot --output s3://bucket/prefix
    cfs admin s3-compact                rewrite half-empty blobs now, delete empty ones

Both reports read `tier.state`, which the active s3-tierer rewrites every second; a
state older than a few seconds is reported as such (the tierer is not running).
Exit codes: 0 healthy, 1 S3 unreachable or flash above the high watermark, 3 no tierer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Annotated

import nats.js.errors
import typer
from nats.aio.msg import Msg
from pydantic import BaseModel

from cfs.admin.client import actor, record_action
from cfs.admin.report import size
from cfs.bus import Bus, BusError, NoResponders, RequestTimeout
from cfs.cli.admin import JsonOpt, _session, _settings, app
from cfs.cli.errors import CliError, ExitCode, one_line_errors
from cfs.client.metadata import MetadataClient
from cfs.client.tier import Holder, ask_tierer, holder_of, read_blob_records
from cfs.ids import new_id
from cfs.objstore import ObjectStoreError, S3Settings, S3Url, open_store, s3_settings
from cfs.retry import RetryPolicy
from cfs_contracts.fs.records import ROOT_INO, Inode, Kind
from cfs_contracts.streams import NODES, TIER, TIER_INDEX
from cfs_contracts.tier import (
    TIER_CONFIG_KEY,
    TIER_STATE_KEY,
    BackfillReply,
    BackfillRequest,
    ChunkPlacement,
    CompactReply,
    CompactRequest,
    RecallReply,
    RecallRequest,
    ReindexReply,
    ReindexRequest,
    TierConfig,
    TierMode,
    TierSnapshot,
    TierSnapshotBlob,
    TierState,
    tier_backfill_subject,
    tier_compact_subject,
    tier_recall_subject,
    tier_reindex_subject,
)

STALE_AFTER_S = 10.0


def _age(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "never"
    seconds = max(0.0, (now_ms - ms) / 1000)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


async def _read(bus: Bus, key: str) -> bytes | None:
    kv = await bus.key_value(NODES.bucket)
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    return entry.value or None


async def read_tier(bus: Bus) -> tuple[TierConfig | None, TierState | None]:
    config, state = await _read(bus, TIER_CONFIG_KEY), await _read(bus, TIER_STATE_KEY)
    return (
        TierConfig.model_validate_json(config) if config else None,
        TierState.model_validate_json(state) if state else None,
    )


def _require(config: TierConfig | None, state: TierState | None) -> TierState:
    if config is None or not config.enabled:
        raise CliError(
            "no data tier is configured (cfs admin tier-config --mode cache --url s3://…)",
            ExitCode.FAILED,
        )
    if state is None or time.time() * 1000 - state.updated_ms > STALE_AFTER_S * 1000:
        seen = "never" if state is None else _age(state.updated_ms, int(time.time() * 1000))
        raise CliError(
            f"no active s3-tierer reports (last report: {seen}); is `s3-tierer` running?",
            ExitCode.UNREACHABLE,
        )
    return state


async def change_tier(bus: Bus, changes: Mapping[str, object]) -> TierConfig:
    """The tier config with `changes` laid over it, checked (a new bucket is created if
    missing), recorded and audited; without changes, the config as it is."""
    current, _ = await read_tier(bus)
    if not changes:
        return current or TierConfig()
    data = {**(current or TierConfig()).model_dump(), **changes}
    data.update(updated_ms=int(time.time() * 1000), updated_by=actor())
    try:
        wanted = TierConfig.model_validate(data)
    except ValueError as exc:
        raise CliError(f"refused: {exc}", ExitCode.USAGE) from None
    if wanted.mode is not TierMode.OFF and wanted.url is None:
        raise CliError(
            f"the {wanted.mode.value} mode needs a URL: s3://bucket/prefix", ExitCode.USAGE
        )
    if wanted.url is not None and wanted.url != (current.url if current else None):
        try:
            async with open_store(wanted.url, s3_settings()) as store:
                await store.ensure_bucket()
        except ObjectStoreError as exc:
            raise CliError(f"refused: {exc}", ExitCode.FAILED) from None
    kv = await bus.key_value(NODES.bucket)
    await kv.put(TIER_CONFIG_KEY, wanted.model_dump_json().encode())
    await _audit(bus, "tier-config", {k: str(v) for k, v in changes.items()})
    return wanted


def _check_url(option: str, url: str | None) -> None:
    """A bad s3:// URL is a usage error naming its option, before anything connects."""
    if url is not None:
        try:
            S3Url.parse(url)
        except ValueError as exc:
            raise CliError(f"{option}: {exc}", ExitCode.USAGE) from None


@app.command("tier-config")
@one_line_errors
def tier_config(
    ctx: typer.Context,
    mode: Annotated[TierMode | None, typer.Option("--mode", help="off, cache or tiered")] = None,
    url: Annotated[str | None, typer.Option("--url", help="s3://bucket/prefix")] = None,
    flash_bytes: Annotated[
        int | None,
        typer.Option("--flash-bytes", min=0, help="per-node flash for unflushed data (0: all)"),
    ] = None,
    high: Annotated[float | None, typer.Option("--high", help="write-through from")] = None,
    critical: Annotated[float | None, typer.Option("--critical", help="alert from")] = None,
    full: Annotated[float | None, typer.Option("--full", help="ENOSPC from")] = None,
    flush_after_s: Annotated[
        float | None, typer.Option("--flush-after", help="seconds a chunk waits for its blob")
    ] = None,
    write_through_wait_s: Annotated[
        float | None, typer.Option("--write-through-wait", help="seconds, then EIO")
    ] = None,
    evict_after_s: Annotated[
        float | None,
        typer.Option(
            "--evict-after", help="tiered: seconds a file goes unread and unwritten, then off flash"
        ),
    ] = None,
    compact_below: Annotated[
        float | None,
        typer.Option("--compact-below", help="a blob whose live share is below this is rewritten"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show or change the data tier (mode, bucket, watermarks); without options, show it.

    The bucket is checked (and created when missing) before the change is recorded."""
    settings = _settings(ctx, None, None, None)
    changes = {
        name: value
        for name, value in {
            "mode": mode,
            "url": url,
            "flash_bytes": flash_bytes,
            "high": high,
            "critical": critical,
            "full": full,
            "flush_after_s": flush_after_s,
            "write_through_wait_s": write_through_wait_s,
            "evict_after_s": evict_after_s,
            "compact_below": compact_below,
        }.items()
        if value is not None
    }
    _check_url("--url", url)

    async def work(bus: Bus) -> TierConfig:
        return await change_tier(bus, changes)

    config = _session(settings, work)
    if as_json:
        typer.echo(config.model_dump_json(indent=2))
        return
    typer.echo(
        f"Data tier: {config.mode.value}"
        + (f", {config.url}" if config.url else "")
        + f"; write-through at {config.high:.0%}, critical at {config.critical:.0%}, "
        f"ENOSPC at {config.full:.0%} of "
        + (size(config.flash_bytes) if config.flash_bytes else "each store's capacity")
        + f"; blobs sealed after {config.flush_after_s:g} s"
        + (
            f"; files unread and unwritten for {config.evict_after_s:g} s leave flash"
            if config.mode is TierMode.TIERED
            else ""
        )
    )


@app.command("s3-failover")
@one_line_errors
def s3_failover(
    ctx: typer.Context,
    target: Annotated[
        str | None, typer.Option("--target", help="s3://bucket/prefix new data goes to")
    ] = None,
    back: Annotated[
        bool, typer.Option("--back", help="return to the bucket of before the last failover")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Switch the data tier to another bucket: new blobs go there at once; blobs only in
    the old one are copied over in the background (`s3-queue-status` shows progress).
    The target bucket is on the same endpoint; it is checked (created if missing)."""
    if (target is None) == (not back):
        raise CliError("give either --target s3://bucket/prefix or --back", ExitCode.USAGE)
    _check_url("--target", target)
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> TierConfig:
        current, _ = await read_tier(bus)
        if current is None or not current.enabled or current.url is None:
            raise CliError("no data tier is configured: nothing to fail over", ExitCode.FAILED)
        if back and current.previous_url is None:
            raise CliError("no failover to go back from", ExitCode.FAILED)
        new_url = current.previous_url if back else target
        assert new_url is not None
        if new_url == current.url:
            raise CliError(f"the data tier already writes to {new_url}", ExitCode.FAILED)
        try:
            async with open_store(new_url, s3_settings()) as store:
                await store.ensure_bucket()
        except ObjectStoreError as exc:
            raise CliError(f"refused: {exc}", ExitCode.FAILED) from None
        wanted = current.model_copy(
            update={
                "url": new_url,
                "previous_url": current.url,
                "updated_ms": int(time.time() * 1000),
                "updated_by": actor(),
            }
        )
        kv = await bus.key_value(NODES.bucket)
        await kv.put(TIER_CONFIG_KEY, wanted.model_dump_json().encode())
        await _audit(bus, "s3-failover", {"from": current.url, "to": new_url, "back": str(back)})
        return wanted

    config = _session(settings, work)
    if as_json:
        typer.echo(config.model_dump_json(indent=2))
        return
    typer.echo(
        f"Data tier now writes to {config.url}; blobs only in {config.previous_url} are "
        "copied over in the background (cfs admin s3-queue-status shows progress)"
    )


@app.command("s3-health")
@one_line_errors
def s3_health(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Is S3 reachable for the data tier; when did a write last succeed; what fails."""
    settings = _settings(ctx, None, None, None)
    config, state = _session(settings, read_tier)
    state = _require(config, state)
    s3 = state.s3
    if as_json:
        typer.echo(s3.model_dump_json(indent=2))
    else:
        now = int(time.time() * 1000)
        where = s3.url or "?"
        if s3.reachable:
            typer.echo(f"S3 reachable ({where}), last successful write {_age(s3.last_ok_ms, now)}")
        else:
            typer.echo(
                f"S3 unreachable ({where}), last successful write {_age(s3.last_ok_ms, now)}; "
                f"failing since {_age(s3.failing_since_ms, now)}"
            )
            typer.echo(f"  error class: {s3.error_class} ({_hint(s3.error_class)})")
            typer.echo(f"  last error: {s3.error}")
    if not s3.reachable:
        raise typer.Exit(ExitCode.FAILED)


def _hint(error_class: str | None) -> str:
    return {
        "auth": "credentials or bucket policy: check the keys the services use",
        "bucket": "the bucket does not exist at this endpoint: fix --url or create it",
        "network": "no connection or no answer: check the endpoint and the network path",
        "service": "S3 answers with errors (5xx): the service itself is failing",
    }.get(error_class or "", "unknown")


def describe_queue(state: TierState, now_ms: int) -> list[str]:
    oldest = (
        "none"
        if state.oldest_queued_ms is None
        else f"{max(0.0, (now_ms - state.oldest_queued_ms) / 1000):.1f} s old"
    )
    lines = [
        f"Queue depth: {state.queue_entries} entries ({size(state.queue_bytes)}), "
        f"oldest {oldest}; flushing at {state.drain_entries_per_s * 60:.0f}/min "
        f"({size(int(state.drain_bytes_per_s))}/s)",
        f"Watermark: {state.level} (writes {_policy_words(state)}); "
        f"S3 {'reachable' if state.s3.reachable else 'UNREACHABLE'}",
    ]
    for node in state.nodes:
        lines.append(
            f"  {node.node}: {node.level}, flash {node.fill:.1%} unflushed "
            f"({size(node.unflushed_bytes)} of {size(node.capacity_bytes)})"
        )
    if state.complete_url != state.s3.url and not (state.stray_blobs or state.copy_error):
        lines.append(f"Failover copy to {state.s3.url}: looking for blobs elsewhere")
    if state.stray_blobs or state.copy_error:
        lines.append(
            f"Failover copy to {state.s3.url}: {state.stray_blobs} blobs "
            f"({size(state.stray_bytes)}) still to copy, {state.copied_blobs} copied"
            + (f"; waiting: {state.copy_error}" if state.copy_error else "")
        )
    lines.append(
        f"Flushed by {state.holder}: {state.flushed_chunks} chunks "
        f"({size(state.flushed_bytes)}) in {state.blobs_written} blobs"
    )
    if state.forgotten_chunks or state.compacted_blobs or state.deleted_blobs or state.orphan_blobs:
        lines.append(
            f"Garbage by {state.holder}: {state.forgotten_chunks} chunks unindexed, "
            f"{state.compacted_blobs} blobs compacted, {state.deleted_blobs} deleted, "
            f"{state.orphan_blobs} orphans deleted, {size(state.reclaimed_bytes)} reclaimed"
        )
    if state.compact_note:
        lines.append(f"Compaction waiting: {state.compact_note}")
    backfill = (
        f"Backfill by {state.holder}: {state.backfilled_chunks} chunks no client had queued "
        f"({size(state.backfilled_bytes)})"
    )
    if state.backfill_pass_ms is not None:
        backfill += f"; last pass {_age(state.backfill_pass_ms, now_ms)}"
    lines.append(backfill + (f"; failing: {state.backfill_note}" if state.backfill_note else ""))
    if state.mode is TierMode.TIERED:
        lines.append(
            f"Evicted by {state.holder}: {state.evicted_chunks} chunks "
            f"({size(state.evicted_bytes)}) off flash"
            + (f"; last pass {_age(state.evict_pass_ms, now_ms)}" if state.evict_pass_ms else "")
            + (f"; {state.evict_note}" if state.evict_note else "")
        )
    return lines


def _policy_words(state: TierState) -> str:
    return {
        "ack_on_flash": "acknowledged on flash",
        "ack_after_s3": "acknowledged after their S3 PUT (write-through)",
        "refuse": "refused with ENOSPC",
    }[state.policy.value]


@app.command("s3-queue-status")
@one_line_errors
def s3_queue_status(
    ctx: typer.Context,
    watch: Annotated[bool, typer.Option("--watch", help="print again every --interval")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="seconds")] = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """The S3 flush queue: entries, bytes, oldest entry, drain rate, watermark state."""
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> TierState:
        while True:
            config, state = await read_tier(bus)
            current = _require(config, state)
            if as_json:
                typer.echo(json.dumps(current.model_dump(mode="json")))
            else:
                for line in describe_queue(current, int(time.time() * 1000)):
                    typer.echo(line)
            if not watch:
                return current
            typer.echo("")
            await asyncio.sleep(interval)

    state = _session(settings, work)
    if state.level != "NORMAL" or not state.s3.reachable:
        raise typer.Exit(ExitCode.FAILED)


RECALL_BATCH = 128  # chunks per request: the tierer reads neighbours in a blob together
RECALLS_AT_ONCE = 2  # requests out: S3 reads for one while the other's are stored
REINDEX_TIMEOUT_S = 3600.0
RECALL_TIMEOUT_S = 120.0  # one batch; sent again (it is idempotent) until RECALL_WITHIN_S
RECALL_WITHIN_S = 1800.0


async def _files(meta: MetadataClient) -> AsyncIterator[Inode]:
    """Every regular file of the tree once (hard links: once per inode)."""
    seen: set[int] = set()
    directories = [ROOT_INO]
    while directories:
        parent = directories.pop()
        async for entry in meta.readdir(parent):
            if entry.name in (".", "..") or entry.ino in seen:
                continue
            seen.add(entry.ino)
            if entry.kind is Kind.DIR:
                directories.append(entry.ino)
            elif entry.kind is Kind.FILE:
                yield await meta.getattr(entry.ino)


@app.command("restore-data")
@one_line_errors
def restore_data(
    ctx: typer.Context,
    from_s3: Annotated[
        bool, typer.Option("--from-s3", help="bring every file's data back from the S3 tier")
    ] = False,
    url: Annotated[
        str | None,
        typer.Option("--url", help="s3://bucket/prefix (default: the configured data tier)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Put every chunk the metadata tree references back onto the chunk-stores from S3.

    First the tier's index is rebuilt from the bucket (after a total loss it is all
    there is), then each file's chunks are recalled: fragments that verify on their
    node are left alone, so running it again after an interruption resumes."""
    if not from_s3:
        raise CliError("restore-data needs --from-s3 (the only source)", ExitCode.USAGE)
    _check_url("--url", url)
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> dict[str, object]:
        return await restore_data_from_s3(bus, url, progress=not as_json)

    result = _session(settings, work)
    failed = result["failed"]
    assert isinstance(failed, list)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"restore-data: {result['files']} files, {result['chunks']} chunks: "
            f"{result['restored_fragments']} fragments restored "
            f"({size(int(str(result['restored_bytes'])))} from S3), "
            f"{result['present_fragments']} already on flash, {len(failed)} failed, "
            f"in {result['seconds']} s"
        )
        for line in failed[:20]:
            typer.echo(f"  failed: {line}")
    if failed:
        raise typer.Exit(ExitCode.FAILED)


async def restore_data_from_s3(
    bus: Bus, url: str | None, *, progress: bool = True
) -> dict[str, object]:
    """`restore-data --from-s3`'s work on a connected admin bus (also the DR drill's):
    the index rebuilt from `url` (default: the configured tier), then every file's
    chunks recalled. Progress lines go to stderr when `progress`."""
    started = time.monotonic()
    config, _ = await read_tier(bus)
    source = url or (config.url if config is not None else None)
    if source is None:
        raise CliError("no data tier is configured: give --url s3://bucket/prefix")
    if config is None or not config.enabled:
        kv = await bus.key_value(NODES.bucket)
        wanted = (config or TierConfig()).model_copy(
            update={"mode": TierMode.CACHE, "url": source, "updated_by": actor(),
                    "updated_ms": int(time.time() * 1000)}
        )  # fmt: skip
        await kv.put(TIER_CONFIG_KEY, wanted.model_dump_json().encode())
        if progress:
            typer.echo(f"Data tier set to cache mode on {source}", err=True)
    reindexed = ReindexReply.model_validate_json(
        (await _ask(bus, tier_reindex_subject(bus.site), ReindexRequest(url=source),
                    REINDEX_TIMEOUT_S)).data
    )  # fmt: skip
    if progress:
        typer.echo(
            f"Index from {source}: {reindexed.blobs} blobs ({reindexed.blobs_indexed} new), "
            f"{reindexed.chunks_indexed} chunk locations added in {reindexed.seconds:.1f} s"
            + (f"; damaged: {len(reindexed.damaged)}" if reindexed.damaged else ""),
            err=True,
        )
    totals = {"files": 0, "chunks": 0, "restored_fragments": 0, "present_fragments": 0,
              "restored_bytes": 0}  # fmt: skip
    failed: list[str] = []
    batch: list[ChunkPlacement] = []
    last_print = time.monotonic()

    sent: deque[asyncio.Task[None]] = deque()  # RECALLS_AT_ONCE out, in order

    async def recall(chunks: tuple[ChunkPlacement, ...]) -> None:
        reply = RecallReply.model_validate_json(
            (await _ask(bus, tier_recall_subject(bus.site), RecallRequest(chunks=chunks),
                        RECALL_TIMEOUT_S, within_s=RECALL_WITHIN_S)).data
        )  # fmt: skip
        totals["restored_fragments"] += reply.restored_fragments
        totals["present_fragments"] += reply.present_fragments
        totals["restored_bytes"] += reply.restored_bytes
        failed.extend(reply.failed)

    async def send() -> None:
        """The batch out while the tierer still works on the one before."""
        if len(sent) >= RECALLS_AT_ONCE:
            await sent.popleft()
        sent.append(asyncio.create_task(recall(tuple(batch))))
        batch.clear()

    try:
        meta = MetadataClient(bus)
        async for inode in _files(meta):
            totals["files"] += 1
            for ref in inode.chunks:
                totals["chunks"] += 1
                batch.append(
                    ChunkPlacement(chunk_id=ref.chunk_id, length=ref.length, scheme=ref.scheme,
                                   fragments=ref.fragments)
                )  # fmt: skip
                if len(batch) >= RECALL_BATCH:
                    await send()
            if progress and time.monotonic() - last_print > 2.0:
                last_print = time.monotonic()
                typer.echo(
                    f"  {totals['files']} files, {totals['chunks']} chunks checked, "
                    f"{size(totals['restored_bytes'])} restored",
                    err=True,
                )
        if batch:
            await send()
        while sent:
            await sent.popleft()
    finally:
        for task in sent:  # a request failed: the rest are not waited for
            task.cancel()
    return {**totals, "failed": failed, "seconds": round(time.monotonic() - started, 3),
            "url": source, "reindex": reindexed.model_dump()}  # fmt: skip


async def _audit(bus: Bus, command: str, arguments: dict[str, str]) -> None:
    """The audit record of a change this command made (a warning if AUDIT is away)."""
    try:
        await record_action(bus, command, arguments, "succeeded")
    except BusError as exc:
        typer.echo(f"warning: audit record not written: {exc}", err=True)


async def _ask(
    bus: Bus, subject: str, request: BaseModel, timeout: float, *, within_s: float | None = None
) -> Msg:
    """The active tierer's answer. `within_s`: an idempotent request, sent again
    (`ask_tierer`) until that many seconds have passed."""
    payload = request.model_dump_json().encode()

    async def holder() -> Holder:  # the state alone: read every HOLDER_CHECK_S
        state = await _read(bus, TIER_STATE_KEY)
        return holder_of(TierState.model_validate_json(state) if state else None)

    try:
        if within_s is None:
            return await bus.request(subject, payload, timeout=timeout)
        policy = RetryPolicy(f"request to {subject}", deadline_s=within_s, max_delay_s=5.0)
        return await ask_tierer(bus, subject, payload, holder, attempt_s=timeout, policy=policy)
    except NoResponders:
        raise CliError(
            "no active s3-tierer answers (is `s3-tierer` running?)", ExitCode.UNREACHABLE
        ) from None
    except RequestTimeout:
        raise CliError(
            f"no answer from the s3-tierer within {within_s or timeout:g} s (a rerun resumes)",
            ExitCode.UNREACHABLE,
        ) from None


@app.command("s3-snapshot")
@one_line_errors
def s3_snapshot(
    ctx: typer.Context,
    output: Annotated[str, typer.Option("--output", help="s3://bucket/prefix for the manifest")],
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="seconds to wait for the flush")
    ] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """A consistent point of the data tier, to pair with a metadata snapshot taken just
    before: waits until every chunk queued so far is in S3, then writes the list of
    blobs that hold them (each blob's footer indexes its chunks) as a manifest."""
    _check_url("--output", output)
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> tuple[TierSnapshot, str]:
        return await take_tier_snapshot(bus, output, timeout)

    snapshot, where = _session(settings, work)
    if as_json:
        typer.echo(
            json.dumps({"path": where, **snapshot.model_dump(mode="json", exclude={"blobs"})})
        )
        return
    typer.echo(
        f"Data tier snapshot {where}: {len(snapshot.blobs)} blobs ({size(snapshot.bytes)}), "
        f"{snapshot.chunks} chunks; every chunk queued before it is included"
    )


async def take_tier_snapshot(
    bus: Bus, output: str, timeout: float, s3: S3Settings | None = None
) -> tuple[TierSnapshot, str]:
    """`s3-snapshot`'s work on a connected admin bus (also the DR drill's): the manifest
    and where it was written. `s3`: the operator's S3 settings (default: as configured)."""
    config, state = await read_tier(bus)
    _require(config, state)
    assert config is not None and config.url is not None
    point = int((await bus.js.stream_info(TIER.name)).state.last_seq)
    deadline = time.monotonic() + timeout
    while True:
        _, state = await read_tier(bus)
        current = _require(config, state)
        if current.flushed_below_seq > point:
            break
        if time.monotonic() > deadline:
            raise CliError(
                f"the flush did not reach the snapshot's point within {timeout:g} s: "
                f"{current.queue_entries} chunks still queued "
                f"(S3 {'reachable' if current.s3.reachable else 'unreachable'})",
                ExitCode.FAILED,
            )
        await asyncio.sleep(0.5)
    index = await bus.key_value(TIER_INDEX.bucket)
    records = sorted(await read_blob_records(index), key=lambda r: r.blob_id)
    now = int(time.time() * 1000)
    snapshot = TierSnapshot(
        snapshot_id=f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now / 1000))}-{new_id()}",
        created_ms=now,
        tier_url=config.url,
        queue_seq=point,
        blobs=tuple(
            TierSnapshotBlob(blob_id=r.blob_id, url=r.url, bytes=r.bytes, chunks=r.chunks)
            for r in records
        ),
        bytes=sum(r.bytes for r in records),
        chunks=sum(r.chunks for r in records),
    )
    key = f"tier-snapshot-{snapshot.snapshot_id}.json"
    try:
        async with open_store(output, s3 or s3_settings()) as store:
            await store.ensure_bucket()
            await store.put(key, snapshot.model_dump_json(indent=1).encode())
    except ObjectStoreError as exc:
        raise CliError(f"snapshot not written: {exc}", ExitCode.FAILED) from None
    where = f"{output.rstrip('/')}/{key}"
    await _audit(bus, "s3-snapshot", {"output": where})
    return snapshot, where


PassTimeoutOpt = Annotated[
    float, typer.Option("--timeout", min=1.0, help="seconds to wait for the pass")
]


@app.command("s3-backfill")
@one_line_errors
def s3_backfill(
    ctx: typer.Context,
    timeout: PassTimeoutOpt = 3600.0,
    as_json: JsonOpt = False,
) -> None:
    """Queue for S3 every chunk a file names that S3 lacks, now (it also runs every
    15 minutes, and a few seconds after the tier is configured or changed).

    Writes are queued by the client that makes them once it has seen the tier's
    config: files written before, or by a client that had not seen it yet, are found
    here. Once it returns, `cfs admin s3-queue-status` shows them flushing."""
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> BackfillReply:
        # idempotent: sent again to a new holder if the one asked dies mid-pass
        subject = tier_backfill_subject(bus.site)
        msg = await _ask(bus, subject, BackfillRequest(), timeout, within_s=timeout)
        return BackfillReply.model_validate_json(msg.data)

    reply = _session(settings, work)
    if as_json:
        typer.echo(reply.model_dump_json(indent=2))
    elif reply.error is None:
        typer.echo(
            f"Backfill: {reply.files} files scanned, {reply.chunks} chunks not queued "
            f"looked up, {reply.queued} not in S3 queued ({size(reply.queued_bytes)}) "
            f"in {reply.seconds:.1f} s"
        )
    if reply.error is not None:
        raise CliError(f"backfill failed: {reply.error}", ExitCode.FAILED)


@app.command("s3-compact")
@one_line_errors
def s3_compact(
    ctx: typer.Context,
    timeout: PassTimeoutOpt = 3600.0,
    as_json: JsonOpt = False,
) -> None:
    """Run a compaction pass of the data tier now (it also runs every few minutes).

    Blobs whose live share fell below the threshold are rewritten with their live
    chunks, blobs with nothing live are deleted, and so are orphans (unrecorded blobs
    whose every chunk another blob serves). Chunks are unindexed first by the
    backup service's `cfs admin gc`, which keeps everything a retained snapshot or the
    archived journal can still name."""
    settings = _settings(ctx, None, None, None)

    async def work(bus: Bus) -> CompactReply:
        msg = await _ask(bus, tier_compact_subject(bus.site), CompactRequest(), timeout)
        return CompactReply.model_validate_json(msg.data)

    reply = _session(settings, work)
    if as_json:
        typer.echo(reply.model_dump_json(indent=2))
    else:
        typer.echo(
            f"Compaction: {reply.compacted} blobs rewritten, {reply.deleted} deleted, "
            f"{reply.orphans} orphans deleted, {size(reply.reclaimed_bytes)} reclaimed "
            f"in {reply.seconds:.1f} s"
        )
        for error in reply.errors:
            typer.echo(f"  waiting: {error}")
    if reply.errors:
        raise typer.Exit(ExitCode.FAILED)
