"""Copy a site's streams off a quorum-less survivor and into a fresh JetStream, in order.

Guide scenario 3 (2 of 3 NATS servers lost): publishes fail and stream info times
out, but every replica still answers direct gets from its own copy. So:

- `export_streams` reads each stream with batched direct gets only (no stream
  info, no consumer: both need a Raft leader) into `<dest>/<stream>.jsonl`, one
  message per line (seq, subject, original headers, base64 data), fsync'd, plus
  `manifest.json` with counts, first/last sequence and a SHA-256 per file;
- `import_streams` provisions the site's streams and buckets from the contracts on
  the fresh cluster (`NatsCluster.reform`) and publishes every message again in
  its original order, pipelined on one connection, with its subject, headers and
  `Nats-Msg-Id`. A metadata journal (`META_<shard>`) must keep its sequence numbers
  (projections record them): each of its messages carries
  `Nats-Expected-Last-Sequence: seq-1`, so the server itself refuses a copy that
  would shift, and the import fails loudly. Other streams may have gaps (limits,
  KV history, work queues) and are renumbered densely; the report says so;
- `scale_streams` raises everything back to R3 once servers were added and waits
  until every replica is current.

Not copied: consumers (services recreate their durables) and the original
timestamps (max-age and KV TTL count again from the import).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cfs.bus.connection import Client
from cfs.bus.pipeline import Ack, AckPipeline
from cfs.bus.provision import ensure_buckets, ensure_streams
from cfs.retry import RetryPolicy, retry
from cfs.security import connect_options
from cfs_contracts.streams import SITE_BUCKETS, site_streams

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST = "manifest.json"
FORMAT = "cfs-stream-export/1"
JOURNAL_PREFIX = "META_"

# Direct get batches (nats-server 2.11+): up to BATCH messages or BATCH_BYTES, then an
# EOB status. One batch in flight per stream; several streams are read at once.
BATCH = 2048
BATCH_BYTES = 8 * 1024 * 1024
PARALLEL_STREAMS = 4
REQUEST_TIMEOUT_S = 10.0
ACK_TIMEOUT_S = 30.0
IMPORT_WINDOW = 2048

# Headers the server adds to a direct get reply (not part of the stored message).
_DIRECT_GET_HEADERS = frozenset(
    {
        "Nats-Stream",
        "Nats-Subject",
        "Nats-Sequence",
        "Nats-Time-Stamp",
        "Nats-Num-Pending",
        "Nats-Last-Sequence",
        "Nats-UpTo-Sequence",
        "Status",
        "Description",
    }
)
# Stored headers that a publish would turn into instructions again (expected
# sequences, atomic batches, schedules, counters): never re-sent as they were.
_INSTRUCTION_PREFIXES = (
    "Nats-Expected-",
    "Nats-Batch-",
    "Nats-Schedule",
    "Nats-Incr",
    "Nats-Required-Api-Level",
)
_EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"


class RecoveryError(Exception):
    """An export or import that cannot be trusted; the message says which stream and why."""


class _Unanswered(Exception):
    """No replica answered a direct get (no responders, 408, or no reply): retried."""


class _StreamAbsent(Exception):
    """The stream does not exist on this cluster."""


@dataclass(frozen=True)
class ExportedStream:
    """One stream as read from a survivor; `found` False = nothing answered for it."""

    name: str
    found: bool
    messages: int = 0
    first_seq: int = 0
    last_seq: int = 0
    gaps: int = 0  # sequence numbers in [first_seq, last_seq] with no message
    bytes: int = 0
    sha256: str = ""
    file: str | None = None
    reason: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class ImportedStream:
    name: str
    messages: int
    first_seq: int
    last_seq: int
    renumbered: int  # messages stored under a different sequence than exported
    duplicates: int  # messages the server dropped as duplicates (Nats-Msg-Id)
    seconds: float


@dataclass(frozen=True)
class ImportReport:
    streams: dict[str, ImportedStream]
    skipped: dict[str, str] = field(default_factory=dict)  # stream -> why
    messages: int = 0
    seconds: float = 0.0

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


# -- export ----------------------------------------------------------------------------
async def export_streams(
    urls: Sequence[str],
    stream_names: Sequence[str],
    dest: Path,
    *,
    timeout: float = 30.0,
    credentials: Path | None = None,
) -> dict[str, ExportedStream]:
    """Read every message of each stream by direct get into `dest`; works without quorum.

    `timeout`: how long a stream may go unanswered (no responders right after a
    server loss, while interest is re-routed, lasts a second or two) before it is
    reported as not found. A stream that stops answering halfway fails the export.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    nc = await _connect(urls, credentials)
    try:
        reader = _DirectReader(nc)
        await reader.start()
        limit = asyncio.Semaphore(PARALLEL_STREAMS)

        async def one(name: str) -> ExportedStream:
            async with limit:
                return await _export_stream(reader, name, dest, timeout)

        results = await _all([one(name) for name in stream_names])
    finally:
        await _close(nc)
    exported = {result.name: result for result in results}
    _write_manifest(dest, urls, exported)
    total = sum(e.messages for e in exported.values())
    seconds = time.monotonic() - started
    log.info(
        "recovery.exported",
        extra={
            "dir": str(dest),
            "streams": len(exported),
            "missing": [n for n, e in exported.items() if not e.found],
            "messages": total,
            "seconds": round(seconds, 2),
            "msgs_per_s": round(total / seconds) if seconds > 0 else 0,
        },
    )
    return exported


class _DirectReader:
    """Batched direct gets over one wildcard reply subscription."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._prefix = ""
        self._counter = 0
        self._batches: dict[str, tuple[list[Msg], asyncio.Future[tuple[str, str]]]] = {}

    async def start(self) -> None:
        self._prefix = f"{self.nc.new_inbox()}."
        await self.nc.subscribe(self._prefix + "*", cb=self._on_msg)

    async def batch(
        self, stream: str, seq: int, max_bytes: int | None = BATCH_BYTES
    ) -> tuple[list[Msg], str, str]:
        """Messages from `seq` on and the closing status ("204" end of batch, "404"
        nothing at or after seq, "503" no responders, "timeout")."""
        self._counter += 1
        token = str(self._counter)
        msgs: list[Msg] = []
        done: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        self._batches[token] = (msgs, done)
        request: dict[str, int] = {"seq": seq, "batch": BATCH}
        if max_bytes is not None:
            request["max_bytes"] = max_bytes
        try:
            await self.nc.publish(
                f"$JS.API.DIRECT.GET.{stream}",
                json.dumps(request).encode(),
                reply=self._prefix + token,
            )
            status, description = await asyncio.wait_for(done, REQUEST_TIMEOUT_S)
        except TimeoutError:
            status, description = "timeout", f"no reply within {REQUEST_TIMEOUT_S:g}s"
        finally:
            self._batches.pop(token, None)
        return msgs, status, description

    async def _on_msg(self, msg: Msg) -> None:
        entry = self._batches.get(msg.subject[len(self._prefix) :])
        if entry is None:
            return
        msgs, done = entry
        status = (msg.headers or {}).get("Status")
        if status is None:
            msgs.append(msg)
        elif not done.done():
            done.set_result((str(status), str(_header(msg.headers, "Description") or "")))


async def _export_stream(
    reader: _DirectReader, name: str, dest: Path, timeout: float
) -> ExportedStream:
    started = time.monotonic()
    path = dest / f"{name}.jsonl"
    part = dest / f".{name}.jsonl.part"
    digest = hashlib.sha256()
    count = first = last = gaps = size = 0
    seq = 1
    empty = 0  # end-of-batch replies in a row without a message

    async def next_batch() -> tuple[list[Msg], str, str]:
        msgs, status, description = await reader.batch(
            name, seq, BATCH_BYTES if not empty else None
        )
        if not msgs and status in ("503", "timeout", "408"):
            if count == 0 and await _stream_absent(reader.nc, name):
                raise _StreamAbsent(name)
            raise _Unanswered(description)
        return msgs, status, description

    # Each batch gets the whole `timeout` to be answered: progress restarts the clock.
    policy = RetryPolicy(
        f"export {name}",
        temporary=lambda exc: isinstance(exc, _Unanswered),
        deadline_s=timeout,
        first_delay_s=0.25,
        max_delay_s=2.0,
    )
    with part.open("wb") as out:
        while True:
            try:
                msgs, status, description = await retry(next_batch, policy, logger=log)
            except _StreamAbsent:
                return _missing(part, name, "stream does not exist")
            except _Unanswered as exc:
                if count == 0:
                    return _missing(part, name, f"no replica answered ({exc})")
                raise RecoveryError(
                    f"{name}: direct get stopped answering after seq {last}: {exc}"
                ) from None
            for msg in msgs:
                record, msg_seq = _record(msg)
                if count and msg_seq != last + 1:
                    gaps += msg_seq - last - 1
                first = first or msg_seq
                last = msg_seq
                count += 1
                line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
                digest.update(line)
                out.write(line)
                size += len(line)
            if msgs:
                seq = last + 1
                empty = 0
                if _pending(msgs[-1]) == 0:
                    break
                continue
            if status == "404":  # nothing at or after seq: the end (or an empty stream)
                break
            if status == "204" and empty < 2:  # e.g. a message over max_bytes: ask without
                empty += 1
                continue
            raise RecoveryError(
                f"{name}: direct get from seq {seq} answered {status} {description}"
            )
        out.flush()
        os.fsync(out.fileno())
    part.replace(path)
    _fsync_dir(dest)
    exported = ExportedStream(
        name=name,
        found=True,
        messages=count,
        first_seq=first,
        last_seq=last,
        gaps=gaps,
        bytes=size,
        sha256=digest.hexdigest(),
        file=path.name,
        seconds=round(time.monotonic() - started, 3),
    )
    log.info("recovery.stream_exported", extra=_fields(exported))
    return exported


def _fields(result: ExportedStream | ImportedStream) -> dict[str, Any]:
    """Log fields of a result (`name` is taken by LogRecord: it becomes `stream`)."""
    fields = asdict(result)
    fields["stream"] = fields.pop("name")
    return fields


def _record(msg: Msg) -> tuple[dict[str, Any], int]:
    headers = msg.headers or {}
    seq = int(headers["Nats-Sequence"])
    kept = {_name(k): str(v) for k, v in headers.items() if _name(k) not in _DIRECT_GET_HEADERS}
    record: dict[str, Any] = {
        "seq": seq,
        "subject": headers.get("Nats-Subject", ""),
        "time": headers.get("Nats-Time-Stamp", ""),
    }
    if kept:
        record["headers"] = kept
    record["data"] = base64.b64encode(msg.data).decode()
    return record, seq


def _pending(msg: Msg) -> int:
    try:
        return int((msg.headers or {}).get("Nats-Num-Pending", "1"))
    except ValueError:
        return 1


def _name(key: object) -> str:
    """nats-py gives some header names as enum members; the wire name is their value."""
    return str(key.value) if isinstance(key, Enum) else str(key)


def _header(headers: dict[str, str] | None, name: str) -> str | None:
    for key, value in (headers or {}).items():
        if _name(key) == name:
            return value
    return None


async def _stream_absent(nc: NATS, name: str) -> bool:
    """True only when the meta leader says the stream does not exist (error 10059).

    Without quorum the request times out: absence is then not known, only silence.
    """
    try:
        reply = await nc.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=1.0)
        error = json.loads(reply.data or b"{}").get("error") or {}
    except (nats.errors.Error, TimeoutError, ValueError):
        return False
    return bool(error.get("err_code") == 10059)


def _missing(part: Path, name: str, reason: str) -> ExportedStream:
    part.unlink(missing_ok=True)
    log.warning("recovery.stream_missing", extra={"stream": name, "reason": reason})
    return ExportedStream(name=name, found=False, reason=reason)


def _write_manifest(dest: Path, urls: Sequence[str], exported: dict[str, ExportedStream]) -> None:
    manifest = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(),
        "sources": list(urls),
        "streams": {name: asdict(e) for name, e in exported.items()},
    }
    part = dest / f".{MANIFEST}.part"
    with part.open("w") as out:
        json.dump(manifest, out, indent=2, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    part.replace(dest / MANIFEST)
    _fsync_dir(dest)


def read_manifest(src: Path) -> dict[str, ExportedStream]:
    """The streams of an export directory, as `export_streams` returned them."""
    try:
        manifest = json.loads((Path(src) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise RecoveryError(f"cannot read {Path(src) / MANIFEST}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise RecoveryError(f"{src}: unknown export format {manifest.get('format')!r}")
    return {name: ExportedStream(**entry) for name, entry in manifest["streams"].items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- import ----------------------------------------------------------------------------
async def import_streams(
    urls: Sequence[str],
    site: str,
    shards: int,
    src: Path,
    *,
    replicas: int = 1,
    credentials: Path | None = None,
) -> ImportReport:
    """Provision the site on a fresh JetStream and publish the export into it, in order.

    Refuses a target stream that already holds messages (import only into the
    cluster `reform` just made). Every file is checked against its SHA-256 first.
    """
    src = Path(src)
    exported = read_manifest(src)
    for entry in exported.values():
        if entry.found:
            _verify_file(src, entry)
    started = time.monotonic()
    nc = await _connect(urls, credentials)
    streams: dict[str, ImportedStream] = {}
    skipped: dict[str, str] = {}
    try:
        js = nc.jetstream(timeout=10.0)
        await ensure_streams(js, site_streams(shards), site=site, replicas=replicas)
        await ensure_buckets(js, SITE_BUCKETS, replicas=replicas)
        known = {s.name for s in site_streams(shards)} | {f"KV_{b.bucket}" for b in SITE_BUCKETS}
        todo: list[ExportedStream] = []
        for name, entry in exported.items():
            if not entry.found:
                skipped[name] = f"not exported: {entry.reason}"
            elif name not in known:
                skipped[name] = f"not a stream of site {site} with {shards} shards"
            else:
                info = await js.stream_info(name)
                if info.state.messages or info.state.last_seq:
                    raise RecoveryError(
                        f"{name} already holds messages (last seq {info.state.last_seq}): "
                        "import only into a fresh cluster"
                    )
                todo.append(entry)
        # Streams are independent (each its own store and fsyncs): several at once. Within
        # a stream, one connection keeps the publish order.
        limit = asyncio.Semaphore(PARALLEL_STREAMS)

        async def one(entry: ExportedStream) -> ImportedStream:
            async with limit:
                imported = await _import_stream(nc, src, entry)
                info = await js.stream_info(entry.name)
                if info.state.messages != entry.messages:
                    raise RecoveryError(
                        f"{entry.name}: {info.state.messages} messages after the import, "
                        f"exported {entry.messages}"
                    )
                return imported

        for imported in await _all([one(entry) for entry in todo]):
            streams[imported.name] = imported
    finally:
        await _close(nc)
    for name, why in skipped.items():
        log.warning("recovery.stream_skipped", extra={"stream": name, "reason": why})
    total = sum(s.messages for s in streams.values())
    report = ImportReport(
        streams=streams,
        skipped=skipped,
        messages=total,
        seconds=round(time.monotonic() - started, 3),
    )
    log.info(
        "recovery.imported",
        extra={
            "streams": len(streams),
            "messages": total,
            "seconds": report.seconds,
            "msgs_per_s": round(report.msgs_per_s),
            "renumbered": {n: s.renumbered for n, s in streams.items() if s.renumbered},
        },
    )
    return report


def _verify_file(src: Path, entry: ExportedStream) -> None:
    digest = hashlib.sha256()
    lines = 0
    with (src / str(entry.file)).open("rb") as f:
        for line in f:
            digest.update(line)
            lines += 1
    if digest.hexdigest() != entry.sha256 or lines != entry.messages:
        raise RecoveryError(
            f"{entry.file}: {lines} messages, sha256 {digest.hexdigest()}; the manifest "
            f"says {entry.messages}, {entry.sha256}: the export is damaged"
        )


async def _import_stream(nc: NATS, src: Path, entry: ExportedStream) -> ImportedStream:
    name = entry.name
    journal = name.startswith(JOURNAL_PREFIX)
    if journal and entry.messages and (entry.first_seq != 1 or entry.gaps):
        raise RecoveryError(
            f"{name}: a journal must hold every sequence from 1, the export has "
            f"{entry.first_seq}..{entry.last_seq} with {entry.gaps} missing"
        )
    started = time.monotonic()
    pipeline = AckPipeline(nc, IMPORT_WINDOW)
    in_flight: deque[tuple[int, asyncio.Future[Ack]]] = deque()
    tally = _Tally(name, journal)
    for record in _records(src / str(entry.file)):
        seq = int(record["seq"])
        headers = {k: v for k, v in (record.get("headers") or {}).items() if not _instruction(k)}
        if journal:  # the server refuses it unless it lands exactly at `seq`
            headers[_EXPECTED_LAST_SEQ] = str(seq - 1)
        data = base64.b64decode(record["data"])
        try:  # waits while the window is full of unacknowledged publishes
            sent = await asyncio.wait_for(
                pipeline.send(record["subject"], data, headers), ACK_TIMEOUT_S
            )
        except TimeoutError:
            _Tally.abandon(in_flight)
            raise RecoveryError(
                f"{name}: no acks for {ACK_TIMEOUT_S:g}s, stopped before exported seq {seq}"
            ) from None
        in_flight.append((seq, sent))
        while in_flight and in_flight[0][1].done():
            tally.check(*in_flight.popleft(), in_flight)
    while in_flight:
        seq, future = in_flight[0]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(future), ACK_TIMEOUT_S)
        tally.check(*in_flight.popleft(), in_flight)
    imported = ImportedStream(
        name=name,
        messages=tally.count,
        first_seq=tally.first,
        last_seq=tally.last,
        renumbered=tally.renumbered,
        duplicates=tally.duplicates,
        seconds=round(time.monotonic() - started, 3),
    )
    log.info("recovery.stream_imported", extra=_fields(imported))
    return imported


class _Tally:
    """Checks acks in publish order; a journal tolerates no shift and no duplicate."""

    def __init__(self, name: str, journal: bool) -> None:
        self.name = name
        self.journal = journal
        self.count = self.first = self.last = self.renumbered = self.duplicates = 0

    def check(
        self,
        seq: int,
        future: asyncio.Future[Ack],
        rest: deque[tuple[int, asyncio.Future[Ack]]],
    ) -> None:
        if not future.done():
            self.abandon(rest)
            raise RecoveryError(
                f"{self.name}: no ack for exported seq {seq} within {ACK_TIMEOUT_S:g}s"
            )
        error = future.exception()
        if error is not None:
            self.abandon(rest)
            detail = getattr(error, "description", None) or repr(error)
            raise RecoveryError(f"{self.name}: exported seq {seq} was refused: {detail}")
        ack = future.result()
        if ack.duplicate:
            self.duplicates += 1
            if self.journal:
                self.abandon(rest)
                raise RecoveryError(f"{self.name}: exported seq {seq} was dropped as a duplicate")
            return
        if ack.seq != seq:
            self.renumbered += 1
            if self.journal:
                self.abandon(rest)
                raise RecoveryError(f"{self.name}: exported seq {seq} was stored as seq {ack.seq}")
        self.count += 1
        self.first = self.first or ack.seq
        self.last = ack.seq

    @staticmethod
    def abandon(rest: deque[tuple[int, asyncio.Future[Ack]]]) -> None:
        for _, future in rest:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for line in f:
            record: dict[str, Any] = json.loads(line)
            yield record


def _instruction(header: str) -> bool:
    return header.startswith(_INSTRUCTION_PREFIXES)


# -- scale -----------------------------------------------------------------------------
async def scale_streams(
    urls: Sequence[str],
    site: str,
    shards: int,
    replicas: int,
    *,
    timeout: float = 120.0,
    credentials: Path | None = None,
) -> dict[str, list[str]]:
    """Set every site stream and bucket to `replicas`; wait until every replica is current.

    Returns stream -> its servers (leader first).
    """
    nc = await _connect(urls, credentials)
    deadline = time.monotonic() + timeout
    placed: dict[str, list[str]] = {}
    try:
        js = nc.jetstream(timeout=10.0)
        await ensure_streams(js, site_streams(shards), site=site, replicas=replicas)
        await ensure_buckets(js, SITE_BUCKETS, replicas=replicas)
        names = [s.name for s in site_streams(shards)] + [f"KV_{b.bucket}" for b in SITE_BUCKETS]
        for name in names:
            while True:
                peers, why = await _replication(js, name, replicas)
                if peers is not None:
                    placed[name] = peers
                    break
                if time.monotonic() > deadline:
                    raise RecoveryError(
                        f"{name} is not current at R{replicas} after {timeout:g}s: {why}"
                    )
                await asyncio.sleep(0.25)
    finally:
        await _close(nc)
    log.info("recovery.scaled", extra={"replicas": replicas, "streams": placed})
    return placed


async def _replication(
    js: nats.js.JetStreamContext, name: str, replicas: int
) -> tuple[list[str] | None, str]:
    """(servers, "") once `name` has `replicas` current replicas, else (None, why not)."""
    try:
        info = await js.stream_info(name)
    except (nats.errors.Error, TimeoutError) as exc:
        return None, f"stream info failed: {exc or type(exc).__name__}"
    if info.config.num_replicas != replicas:
        return None, f"configured R{info.config.num_replicas}"
    cluster = info.cluster
    if cluster is None:  # a standalone server: R1 by definition
        return ([] if replicas == 1 else None), "standalone server"
    if not cluster.leader:
        return None, "no leader"
    followers = cluster.replicas or []
    lagging = [r.name for r in followers if not r.current or r.lag or r.offline]
    if len(followers) != replicas - 1 or lagging:
        return None, f"{len(followers)} followers, not current: {lagging}"
    return [cluster.leader, *(str(r.name) for r in followers)], ""


async def _all(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; on the first failure cancel the rest (nothing left running)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# -- connection ------------------------------------------------------------------------
async def _connect(
    urls: Sequence[str], credentials: Path | None, connect_timeout: float = 3.0
) -> NATS:
    """The first of `urls` that accepts a connection (lost servers refuse at once)."""

    async def quiet(exc: Exception) -> None:
        log.debug("recovery.nats_error", extra={"error": str(exc)})

    errors: list[str] = []
    for url in urls:
        # Probe first: nats-py retries a refused server max_reconnect_attempts times.
        parsed = urlsplit(url if "://" in url else f"nats://{url}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parsed.hostname, parsed.port or 4222), connect_timeout
            )
            writer.close()
        except (OSError, TimeoutError) as exc:
            errors.append(f"{url}: {exc or type(exc).__name__}")
            continue
        try:
            nc = Client()
            await nc.connect(
                servers=[url],
                connect_timeout=max(1, int(connect_timeout)),
                max_reconnect_attempts=20,
                reconnect_time_wait=0.25,  # type: ignore[arg-type]  # float is fine
                error_cb=quiet,
                pending_size=64 * 1024 * 1024,
                **connect_options(credentials),
            )
            return nc
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            errors.append(f"{url}: {exc or type(exc).__name__}")
    raise RecoveryError(f"no NATS server answered: {'; '.join(errors) or 'no URL given'}")


async def _close(nc: NATS) -> None:
    with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
        await nc.close()
