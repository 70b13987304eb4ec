"""Data tier benchmark (issue 15): a local 3-node site with the s3-tierer, one moto S3.

    python bench/tier.py [--quick] [--json PATH] [--keep-logs]

One run, one moto S3 server (moto in server mode, a real HTTP server) for every
figure. The site: 3 nodes, metadata-raft + chunk-store + s3-tierer on each (one
tierer active), ec2+1, one NATS server, its services pointed straight at moto as
the baselines are. MB/s with 1 MB = 2**20 bytes.

Figures, in the order they are taken:

- `raw_put_mb_s`, `raw_get_mb_s`: the baseline. PUT then GET of 64 MiB objects (the
  tierer's blob size) through `cfs.objstore`, the port the tierer uses (aioboto3,
  SSE on every PUT), one at a time as the tierer uploads (8 objects; 3 with
  --quick); then every 4 MiB range of them (`raw_get_range_mb_s`, with moto's CPU
  per MiB: a ranged GET costs moto about as much as the whole object, which is
  why recall reads neighbouring chunks together). For information: the same 4 at
  a time (`raw_put_mb_s_c4`,
  `raw_get_mb_s_c4`), straight aioboto3 `put_object`/`get_object`
  (`raw_put_mb_s_boto`, `raw_get_mb_s_boto`), and `cfs.objstore` through the S3
  fault proxy in pass mode (`raw_put_mb_s_via_proxy`): the extra hop costs a fifth
  to a half of the PUT rate on a 2-core machine, which is why the site does not go
  through it (its outage is made otherwise, below). The CPU milliseconds per MiB of moto
  and of the client for the raw PUTs say what S3's side costs on this machine.
- `write_mb_s_tier_off`: client write throughput, `FileStore.write_all` of 8 MiB
  files, 4 in parallel (256 MiB a round; 96 MiB with --quick) through a
  CLIENT-role connection, as the mount has, with no data tier configured (after
  64 MiB written untimed: a fresh site's first writes pay for its warming up).
- `flush_mb_s`: the queue's drain rate. `cfs admin tier-config --mode cache --url
  s3://... --flush-after 0.5` (the command creates the bucket), once for the whole
  run: a URL changed later has the tierer copy every blob to the new bucket in the
  background, which would run during the figures. The bucket, still empty, is then
  deleted behind the tierer's back: every PUT fails (NoSuchBucket) and the tierer
  retries, as in any outage. 192 MiB (128 MiB with --quick) of new files are
  written meanwhile (acknowledged on flash: no flash quota, the default
  `flash_bytes` 0 is each store's whole capacity; their rate is
  `write_mb_s_s3_down`); once they are all queued the bucket is created again and
  the clock runs until `tier.state.queue_entries` is 0. `flush_mb_s` is the MB
  queued over the seconds from S3's return to the last blob written (the tierer's
  own log timestamps); it includes the time the tierer takes to notice S3 is back
  (its upload retry backs off up to 5 s, x1.5 jitter): `flush_resume_s`, S3's
  return to the first blob written (that blob's chunks were read before S3 came
  back). `flush_steady_mb_s` leaves that out: the blobs after the first, over the
  time from the first blob written to the last (each blob: its chunks read from
  the chunk-stores, k fragments each, decoded and SHA-256 checked, packed, PUT,
  indexed). `flush_vs_raw_put` = flush_mb_s / raw_put_mb_s and
  `flush_steady_vs_raw_put` = flush_steady_mb_s / raw_put_mb_s; goal >= 0.8.
  Where the time goes: the CPU seconds of the tierer, chunk-store, metadata, NATS
  and moto processes over the drain (`flush_cpu_s_*`, per MiB, and
  `flush_cpu_cores_busy`, all of them over the wall time); then the flush's steps
  apart, in this process, on a blob's worth of the same chunks: read back from
  flash as the tierer reads them (`flash_read_mb_s`) and packed into a blob
  (`blob_pack_mb_s`). The tierer does one blob after another, each step after the
  previous: `flush_serial_model_mb_s` is what read + pack + raw PUT add up to.
- `write_mb_s_cache`: as `write_mb_s_tier_off` with a fresh set of files in cache
  mode, while the tierer flushes behind the writes. `cache_vs_off` = the ratio;
  goal >= 0.9. The full run takes two rounds of each, in turn (tier off, [the
  flush figure], cache, `tier-config --mode off`, tier off, `--mode cache`, cache:
  the machine's load drifts), each figure the MB of its rounds over their seconds
  (`*_rounds` lists each round's); --quick one round each.
  `cache_flushed_after_write_s`: from the last acknowledged write of a round until
  the queue is empty (every chunk of its files in S3), the longest of the rounds.
  `write_cpu_ms_per_mib_tier_off` / `_cache` (and per role: client, tierer,
  chunkstore, metadata, nats, moto): the CPU milliseconds every process spent per
  MiB written, the cache rounds' until their files are in S3. `cache_vs_off_cpu`,
  off's over cache's, is what `cache_vs_off` would be if the cores were the only
  limit: on a shared 2-core machine the wall-time ratio follows the load.
- `backfill_chunks_per_s` (and `backfill_files_per_s`, `backfill_pass_s`): the
  tierer's backfill pass over the whole tree once S3 holds all of it (what it costs
  every `backfill_s`): 4,000 more one-chunk files (1,000 with --quick) written and
  flushed, then `cfs admin s3-backfill --json` (`backfill_queued` must be 0), then
  the small files unlinked again.
- `recall_mb_s`: the data back from S3 on read. The files written with the tier
  off were unlinked once measured (else the tierer's backfill pass would queue them
  when the tier comes on, into the figures after), then every chunk-store is stopped, its
  fragments deleted and started again: the rest of the data is in S3 only, as
  after tiered mode evicted it or after losing every node's flash. 128 MiB
  (64 MiB with --quick) of the flush figure's files are read whole, 1 MiB at a
  time, 4 at once, through a fresh CLIENT-role FileStore: each chunk read finds
  fewer than k fragments and has the tierer recall it (ranged GET, checked,
  fragments put back) before it is read.
- `restore_data_mb_s`: `cfs admin restore-data --from-s3 --json` on the rest
  (the tier index rebuilt from the bucket, every chunk not on flash recalled), MB
  restored over the seconds the command reports (`restore_data_command_s`: its
  wall time). Both over `raw_get_mb_s` for information (`*_vs_raw_get`), and over
  `write_mb_s_tier_off` (`*_vs_flash_write`): a recall writes the fragments back
  to flash (1.5x the data with ec2+1, each put fsync'ed), so the client's write
  rate in the same run is the nearer ceiling on a machine whose S3 is local. A
  figure that cannot be taken is null, with the reason in `notes`.

Machine facts are recorded with the figures: cores, load average at the start and
the end (other work on the machine slows everything; CPU seconds do not follow
the load as wall times do), whether the run was --quick, and its wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.js.errors

from cfs.bus import Bus
from cfs.client import FileStore, MetadataClient
from cfs.client.chunks import ChunkStoreClient
from cfs.erasure import Scheme, decode
from cfs.logs import setup_logging
from cfs.objstore import S3ObjectStore, S3Settings, S3Url
from cfs.security import Role
from cfs.supervisor import LocalSite, S3Server
from cfs.supervisor.s3proxy import S3FaultProxy
from cfs.rebuild import gather
from cfs_contracts.fs.records import ROOT_INO, ChunkRef
from cfs_contracts.streams import NODES
from cfs_contracts.tier import BLOB_TARGET_BYTES, TIER_STATE_KEY, TierState
from cfs_tierer.blob import BlobBuilder
from cfs_tierer.service import TierSettings
from cpu_accounting import cpu_seconds, own_cpu_seconds
from report import print_goals, write_json

CFS = str(Path(sys.executable).parent / "cfs")
SITE = "tier"
NODES_N = 3
SERVICES = ("metadata-raft", "chunk-store", "s3-tierer")
BUCKET = "cfs-bench-tier"
URL = f"s3://{BUCKET}/data"
RAW_BUCKET = "cfs-bench-raw"
MiB = 1024 * 1024
OBJECT = BLOB_TARGET_BYTES  # 64 MiB: the baseline's objects are the tierer's blobs
FILE = 8 * MiB
CHUNK = 4 * MiB  # a file chunk (the client's default chunk size)
WRITERS = 4  # files written at once
WARMUP_FILES = 8  # written first, untimed
FLUSH_AFTER_S = 0.5  # tier-config --flush-after: a blob is sealed this soon
STATUS_S = 0.2  # the tierer's tier.state period (CFS_STATUS_S)
PROBE_S = 0.5  # its S3 probe while idle (CFS_PROBE_S): S3 seen failing soon
POLL_S = 0.05
# chunks the tierer reads from flash at once (its default)
READ_CONCURRENCY = int(TierSettings.model_fields["read_concurrency"].default)
DRAIN_TIMEOUT_S = 600.0
GOAL_CACHE_VS_OFF = 0.9
GOAL_FLUSH_VS_RAW = 0.8
EXPECTED_ERROR = '"tier.s3_failing"'  # the flush figure blocks S3 on purpose


# -- the baseline: 64 MiB objects straight to moto ---------------------------------------
async def timed_each(
    keys: list[str], concurrency: int, call: Callable[[str], Awaitable[Any]]
) -> float:
    """Seconds to run `call` on every key, `concurrency` at a time."""
    work = iter(keys)

    async def worker() -> None:
        for key in work:
            await call(key)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


async def raw_objstore(
    settings: S3Settings, prefix: str, payload: bytes, count: int, concurrency: int, moto_pid: int
) -> dict[str, float]:
    """PUT then GET `count` objects through `cfs.objstore` (each GET checked), then
    delete them: MB/s each way and the CPU ms per MiB of moto and of this process."""
    mib = count * len(payload) / MiB
    async with S3ObjectStore(S3Url(RAW_BUCKET, prefix), settings) as store:
        await store.put("warm", b"w")  # the client is opened and connected first
        keys = [f"obj-{i}" for i in range(count)]

        async def put(key: str) -> None:
            await store.put(key, payload)

        async def get(key: str) -> None:
            if len(await store.get(key)) != len(payload):
                raise RuntimeError(f"GET {key}: short object")

        async def get_range(key_at: str) -> None:
            key, _, offset = key_at.partition("@")
            if len(await store.get_range(key, int(offset), CHUNK)) != CHUNK:
                raise RuntimeError(f"GET {key_at}: short range")

        cpu = (cpu_seconds(moto_pid), own_cpu_seconds())
        put_s = await timed_each(keys, concurrency, put)
        after = (cpu_seconds(moto_pid), own_cpu_seconds())
        get_s = await timed_each(keys, concurrency, get)
        ranges = [f"{key}@{at}" for key in keys for at in range(0, len(payload), CHUNK)]
        before_ranges = cpu_seconds(moto_pid)
        range_s = await timed_each(ranges, concurrency, get_range)
        range_cpu = cpu_seconds(moto_pid) - before_ranges
        for key in [*keys, "warm"]:
            await store.delete(key)
    return {
        "put_mb_s": mib / put_s,
        "get_mb_s": mib / get_s,
        "get_range_mb_s": mib / range_s,
        "put_cpu_ms_per_mib_moto": (after[0] - cpu[0]) * 1000 / mib,
        "put_cpu_ms_per_mib_client": (after[1] - cpu[1]) * 1000 / mib,
        "get_range_cpu_ms_per_mib_moto": range_cpu * 1000 / mib,
    }


async def raw_boto(s3: S3Server, payload: bytes, count: int) -> dict[str, float]:
    """Straight aioboto3 put_object (SSE, as the port asks) and get_object, one at a time."""
    import aioboto3

    mib = count * len(payload) / MiB
    keys = [f"boto/obj-{i}" for i in range(count)]
    async with aioboto3.Session().client("s3", **s3.client_kwargs) as client:
        await client.put_object(Bucket=RAW_BUCKET, Key="boto/warm", Body=b"w")

        async def put(key: str) -> None:
            await client.put_object(
                Bucket=RAW_BUCKET, Key=key, Body=payload, ServerSideEncryption="AES256"
            )

        async def get(key: str) -> None:
            response = await client.get_object(Bucket=RAW_BUCKET, Key=key)
            async with response["Body"] as body:
                if len(await body.read()) != len(payload):
                    raise RuntimeError(f"GET {key}: short object")

        put_s = await timed_each(keys, 1, put)
        get_s = await timed_each(keys, 1, get)
        for key in [*keys, "boto/warm"]:
            await client.delete_object(Bucket=RAW_BUCKET, Key=key)
    return {"put_mb_s": mib / put_s, "get_mb_s": mib / get_s}


async def baseline(
    s3: S3Server, direct: S3Settings, proxied: S3Settings, count: int
) -> dict[str, float]:
    assert s3.pid is not None
    payload = os.urandom(OBJECT)
    async with S3ObjectStore(S3Url(RAW_BUCKET), direct) as store:
        await store.ensure_bucket()
    one = await raw_objstore(direct, "c1", payload, count, 1, s3.pid)
    print(
        f"  raw PUT {one['put_mb_s']:.1f} MB/s, GET {one['get_mb_s']:.1f} MB/s, GET of "
        f"{CHUNK // MiB} MiB ranges {one['get_range_mb_s']:.1f} MB/s "
        f"(moto {one['get_range_cpu_ms_per_mib_moto']:.1f} CPU ms/MiB)",
        flush=True,
    )
    four = await raw_objstore(direct, "c4", payload, max(count, 4), 4, s3.pid)
    boto = await raw_boto(s3, payload, count)
    via = await raw_objstore(proxied, "proxy", payload, max(2, count // 2), 1, s3.pid)
    return {
        "raw_object_mib": OBJECT / MiB,
        "raw_objects": count,
        "raw_put_mb_s": one["put_mb_s"],
        "raw_get_mb_s": one["get_mb_s"],
        "raw_put_mb_s_c4": four["put_mb_s"],
        "raw_get_mb_s_c4": four["get_mb_s"],
        "raw_put_mb_s_boto": boto["put_mb_s"],
        "raw_get_mb_s_boto": boto["get_mb_s"],
        "raw_put_mb_s_via_proxy": via["put_mb_s"],
        "raw_get_mb_s_via_proxy": via["get_mb_s"],
        "raw_put_cpu_ms_per_mib_moto": one["put_cpu_ms_per_mib_moto"],
        "raw_put_cpu_ms_per_mib_client": one["put_cpu_ms_per_mib_client"],
        # a chunk-sized range of a blob, as a recall of one chunk reads it
        "raw_get_range_mb_s": one["get_range_mb_s"],
        "raw_get_range_cpu_ms_per_mib_moto": one["get_range_cpu_ms_per_mib_moto"],
    }


# -- the site --------------------------------------------------------------------------
def cfs_admin(
    site: LocalSite, env: dict[str, str], *args: str, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """`cfs admin ARGS` as the operator runs it, with the S3 settings in `env`."""
    return subprocess.run(
        [CFS, "admin", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=site.cli_env(**env),
        cwd=site.base_dir,
        timeout=timeout,
        check=False,
    )


def tier_config(site: LocalSite, env: dict[str, str], *args: str) -> str:
    """`cfs admin tier-config ARGS` with the S3 settings (the command creates the bucket)."""
    done = cfs_admin(site, env, "tier-config", *args)
    if done.returncode != 0:
        raise RuntimeError(f"cfs admin tier-config {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout


def queue_status(site: LocalSite) -> dict[str, Any]:
    """`cfs admin s3-queue-status --json` (what an operator sees), for the record."""
    done = cfs_admin(site, {}, "s3-queue-status", "--json")
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        report = {"exit": done.returncode, "stderr": done.stderr.strip()[-300:]}
    return report


async def state(bus: Bus) -> TierState | None:
    kv = await bus.key_value(NODES.bucket)
    try:
        entry = await kv.get(TIER_STATE_KEY)
    except nats.js.errors.KeyNotFoundError:
        return None
    return TierState.model_validate_json(entry.value or b"") if entry.value else None


async def until_state(
    bus: Bus, what: str, check: Callable[[TierState], bool], timeout: float = 120.0
) -> TierState:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = await state(bus)
        if seen is not None and check(seen):
            return seen
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}; last tier.state: {seen}")


async def write_files(
    site: LocalSite, prefix: str, total: int, tiered: bool
) -> tuple[dict[str, float], list[ChunkRef]]:
    """`total` bytes as FILE-sized files of distinct random data (chunks are content
    addressed), WRITERS at once through one CLIENT-role FileStore, each acknowledged
    (stored and committed) by `write_all`. Created before the clock starts."""
    count = total // FILE
    blobs = [os.urandom(FILE) for _ in range(count)]
    bus = await site.client(role=Role.CLIENT)
    meta = MetadataClient(bus, deadline_s=30)
    files = FileStore(bus, meta, client_id=bus.node)
    await files.start()
    try:
        deadline = time.monotonic() + 30
        while (files.nodes.tier_config is not None) != tiered:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the client never saw the tier {'on' if tiered else 'off'}")
            await asyncio.sleep(POLL_S)
        inos = [(await meta.create(ROOT_INO, f"{prefix}-{i:04d}")).ino for i in range(count)]
        work = iter(range(count))
        refs: list[ChunkRef] = []

        async def worker() -> None:
            for i in work:
                refs.extend((await files.write_all(inos[i], blobs[i])).chunks)

        start, client_cpu = time.perf_counter(), own_cpu_seconds()
        await asyncio.gather(*(worker() for _ in range(WRITERS)))
        elapsed, client_cpu = time.perf_counter() - start, own_cpu_seconds() - client_cpu
    finally:
        await files.close()
        await bus.close()
    rates = {
        "mb": count * FILE / MiB,
        "s": elapsed,
        "mb_s": count * FILE / MiB / elapsed,
        "cpu_s_client": client_cpu,
    }
    return rates, refs


async def measured_write(
    site: LocalSite, pids: dict[str, list[int]], prefix: str, total: int
) -> dict[str, float]:
    """A round of tier-off writes, with the CPU seconds each role spent on it."""
    before = cpu(pids)
    wrote, _ = await write_files(site, prefix, total, tiered=False)
    return {**wrote, **spent(before, cpu(pids))}


def roles(site: LocalSite, s3: S3Server) -> dict[str, list[int]]:
    pids: dict[str, list[int | None]] = {
        "tierer": [site.service(node, "s3-tierer").pid for node in site.node_names],
        "chunkstore": [site.chunkstore(node).pid for node in site.node_names],
        "metadata": [site.metadata(node).pid for node in site.node_names],
        "nats": [server.pid for server in site.nats_servers],
        "moto": [s3.pid],
    }
    return {role: [p for p in found if p is not None] for role, found in pids.items()}


def cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    out = {}
    for role, found in pids.items():
        total = 0.0
        for pid in found:
            with contextlib.suppress(OSError):  # gone: counted as nothing more
                total += cpu_seconds(pid)
        out[role] = total
    return out


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {f"cpu_s_{role}": after[role] - before[role] for role in before}


def cpu_per_mib(name: str, used: dict[str, float], mib: float | None) -> dict[str, float]:
    """`{name}_cpu_ms_per_mib_{role}` and their total, from `spent` CPU seconds."""
    if not mib:
        return {}
    out = {
        f"{name}_cpu_ms_per_mib_{k.removeprefix('cpu_s_')}": v * 1000 / mib for k, v in used.items()
    }
    out[f"{name}_cpu_ms_per_mib"] = sum(used.values()) * 1000 / mib
    return out


def children_cpu_seconds() -> float:
    """CPU of this process's waited-for children (the `cfs` commands it ran)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log_events(site: LocalSite, event: str, since: float) -> list[tuple[float, dict[str, Any]]]:
    """(wall time, record) of every `event` the site's tierers logged from `since` on."""
    found = []
    for path in sorted((site.base_dir / "logs").glob("*.s3-tierer.log")):
        for line in path.read_text(errors="replace").splitlines():
            if f'"{event}"' not in line:
                continue
            try:
                record = json.loads(line)
                at = datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
            except (ValueError, KeyError):
                continue
            wall = at.replace(tzinfo=UTC).timestamp()
            if record.get("event") == event and wall >= since:
                found.append((wall, record))
    return sorted(found, key=lambda item: item[0])


def log_lines(site: LocalSite) -> list[str]:
    """The site's error lines (at most 20) but the ones the blocked S3 causes on purpose."""
    lines = []
    for path in sorted((site.base_dir / "logs").glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            error = any(f'"level": "{level}"' in line for level in ("error", "critical"))
            if error and EXPECTED_ERROR not in line:
                lines.append(f"{path.name}: {line[:400]}")
    return lines[:20]


async def configure_cache(site: LocalSite, env: dict[str, str]) -> None:
    """tier-config --mode cache (the command creates the bucket), once for the run: a
    URL changed later would have the tierer copy every blob to the new one."""
    out = await asyncio.to_thread(
        tier_config, site, env, "--mode", "cache", "--url", URL, "--flush-after", str(FLUSH_AFTER_S)
    )
    print(f"  {out.strip().splitlines()[0] if out.strip() else 'tier configured'}", flush=True)
    async with await site.client("bench-tier") as bus:
        await until_state(
            bus, "the tierer in cache mode", lambda s: s.mode == "cache" and s.s3.reachable
        )


async def cache_phase(
    site: LocalSite, pids: dict[str, list[int]], prefix: str, total: int
) -> dict[str, float]:
    """A fresh set of files in cache mode, then the queue emptied; the CPU seconds each
    role spent on it, flush included."""
    async with await site.client("bench-tier") as bus:
        before = await until_state(
            bus, "S3 reachable, an empty queue", lambda s: s.s3.reachable and s.queue_entries == 0
        )
        cpu_before = cpu(pids)
        wrote, _ = await write_files(site, prefix, total, tiered=True)
        done = time.perf_counter()
        after = await until_state(
            bus,
            "the cache writes flushed",
            lambda s: s.queue_entries == 0 and s.flushed_bytes - before.flushed_bytes >= total,
            timeout=DRAIN_TIMEOUT_S,
        )
        flushed_s = time.perf_counter() - done
        used = spent(cpu_before, cpu(pids))
    blobs = after.blobs_written - before.blobs_written
    return {**wrote, **used, "flushed_s": flushed_s, "blobs": blobs}


async def bucket(s3: S3Server, name: str, create: bool) -> None:
    """Create or delete a bucket straight on moto (the S3 port has no delete_bucket)."""
    import aioboto3

    async with aioboto3.Session().client("s3", **s3.client_kwargs) as client:
        if create:
            await client.create_bucket(Bucket=name)
        else:
            await client.delete_bucket(Bucket=name)


async def flash_read(site: LocalSite, refs: list[ChunkRef]) -> dict[str, float]:
    """A blob's worth of chunks read back from flash as the tierer reads them (k
    fragments each from the chunk-stores, decoded, SHA-256 checked, `read_concurrency`
    at once), then packed into a blob as it packs them: the flush's work but the PUT."""
    limit = asyncio.Semaphore(READ_CONCURRENCY)
    found: dict[str, bytes] = {}
    async with await site.client("bench-read") as bus:
        chunks = ChunkStoreClient(bus)

        async def one(ref: ChunkRef) -> None:
            scheme = Scheme.parse(ref.scheme)
            async with limit:
                got = await gather(chunks, ref.chunk_id, scheme, dict(enumerate(ref.fragments)))
            data = await asyncio.to_thread(decode, scheme, got, ref.length)
            if hashlib.sha256(data).hexdigest() != ref.chunk_id:
                raise RuntimeError(f"chunk {ref.chunk_id} read back wrong")
            found[ref.chunk_id] = data

        start = time.perf_counter()
        await asyncio.gather(*(one(ref) for ref in refs))
        read_s = time.perf_counter() - start
    start = time.perf_counter()
    builder = BlobBuilder("bench")
    for ref in refs:
        builder.add(ref.chunk_id, found[ref.chunk_id])
    blob, _ = builder.seal()
    pack_s = time.perf_counter() - start
    mib = sum(ref.length for ref in refs) / MiB
    return {
        "flash_read_mib": mib,
        "flash_read_mb_s": mib / read_s,
        "blob_pack_mb_s": len(blob) / MiB / pack_s,
    }


async def flush_phase(
    site: LocalSite, s3: S3Server, total: int, notes: list[str]
) -> dict[str, Any]:
    """S3 taken away (the tier's bucket, still empty, deleted), files written (queued,
    acknowledged on flash), the bucket back: the drain."""
    results: dict[str, Any] = {}
    async with await site.client("bench-flush") as bus:
        empty = await until_state(
            bus, "an empty queue", lambda s: s.queue_entries == 0 and s.s3.reachable
        )
        if empty.blobs_written:
            raise RuntimeError("the tier's bucket must be empty before the flush figure")
        await bucket(s3, BUCKET, create=False)
        await until_state(bus, "S3 seen failing", lambda s: not s.s3.reachable, timeout=60)
        wrote, refs = await write_files(site, "flush", total, tiered=True)
        results["write_mb_s_s3_down"] = wrote["mb_s"]
        print(f"  wrote {wrote['mb']:.0f} MiB with S3 down: {wrote['mb_s']:.1f} MB/s", flush=True)
        queued = await until_state(
            bus,
            "every chunk queued, S3 seen failing",
            lambda s: s.queue_bytes >= total and not s.s3.reachable,
            timeout=120,
        )
        results["flush_queued_mb"] = queued.queue_bytes / MiB
        results["flush_queued_entries"] = queued.queue_entries
        results["flush_level_while_down"] = queued.level
        results["flush_s3_error_while_down"] = queued.s3.error_class
        if queued.level != "NORMAL":
            notes.append(f"flush: the watermark was {queued.level} with S3 down (expected NORMAL)")
        await asyncio.sleep(1.0)  # the tierer retrying its first blob, as in an outage
        pids = roles(site, s3)
        cpu_before = cpu(pids)
        back = time.time()
        start = time.perf_counter()
        await bucket(s3, BUCKET, create=True)
        emptied = await until_state(
            bus, "the queue drained", lambda s: s.queue_entries == 0, timeout=DRAIN_TIMEOUT_S
        )
        seen_s = time.perf_counter() - start
        cpu_after = cpu(pids)
    results["flush_seen_empty_s"] = seen_s  # S3 back -> a tier.state with an empty queue
    results["flush_blobs"] = emptied.blobs_written
    blobs = log_events(site, "tier.blob_written", back)
    mb = queued.queue_bytes / MiB
    if blobs:
        last = blobs[-1][0]
        drain_s = last - back
        results["flush_s"] = drain_s
        results["flush_resume_s"] = blobs[0][0] - back
        results["flush_mb_s"] = mb / drain_s
        results["flush_blobs_after_s3_back"] = len(blobs)
        results["flush_first_blob_mb"] = int(blobs[0][1].get("bytes", 0)) / MiB
        later = blobs[1:]
        if later and last > blobs[0][0]:
            later_mb = sum(int(record.get("bytes", 0)) for _, record in later) / MiB
            results["flush_steady_mb"] = later_mb
            results["flush_steady_mb_s"] = later_mb / (last - blobs[0][0])
        else:
            results["flush_steady_mb_s"] = None
            notes.append("flush: one blob only after S3 came back; no steady drain rate")
    else:  # no log lines: the tier.state's view, to a status period
        notes.append("flush: no tier.blob_written log lines; figures from tier.state polling")
        results["flush_s"] = seen_s
        results["flush_resume_s"] = None
        results["flush_mb_s"] = mb / seen_s
        results["flush_steady_mb_s"] = None
    for role in cpu_before:
        used = cpu_after[role] - cpu_before[role]
        results[f"flush_cpu_s_{role}"] = used
        results[f"flush_cpu_ms_per_mib_{role}"] = used * 1000 / mb
    results["flush_cpu_s"] = sum(cpu_after[r] - cpu_before[r] for r in cpu_before)
    results["flush_cpu_cores_busy"] = results["flush_cpu_s"] / seen_s
    # The flush's steps apart, on the same chunks now in S3: read back + pack, here.
    blob_refs: list[ChunkRef] = []
    for ref in refs:
        if sum(r.length for r in blob_refs) + ref.length > OBJECT:
            break
        blob_refs.append(ref)
    results.update(await flash_read(site, blob_refs))
    return results


# -- data back from S3 -----------------------------------------------------------------
def names(prefix: str, total: int) -> list[str]:
    """The files `write_files(site, prefix, total, ...)` created."""
    return [f"{prefix}-{i:04d}" for i in range(total // FILE)]


async def forget(site: LocalSite, unlinked: list[str]) -> None:
    """Unlink a phase's files once they are measured, so the figures after it are not
    of them: the tier-off files before the tier is on again (else the backfill pass
    queues them into the next figures, and restore-data, which brings back every
    file of the tree, needs them in the bucket), and the backfill phase's small ones."""
    async with await site.client("bench-unlink") as bus:
        meta = MetadataClient(bus, deadline_s=30)
        for name in unlinked:
            await meta.unlink(ROOT_INO, name)


def wipe_flash(site: LocalSite) -> None:
    """Every chunk-store stopped, its fragments and index deleted, started again: the
    data is in S3 only (as after evicting it all, or losing every node's flash)."""
    for node in site.node_names:
        store = site.chunkstore(node)
        store.stop(15.0)
        shutil.rmtree(site.data_dir(node) / "chunks")
        store.start()
    asyncio.run(site.wait_ready())


async def read_files(site: LocalSite, read: list[str]) -> dict[str, float]:
    """Files read whole, 1 MiB at a time, WRITERS at once, through a fresh CLIENT-role
    FileStore: with no fragment on flash, every chunk is recalled from S3 first."""
    bus = await site.client(role=Role.CLIENT)
    meta = MetadataClient(bus, deadline_s=30)
    files = FileStore(bus, meta, client_id=bus.node)
    await files.start()
    try:
        inos = [(await meta.lookup(ROOT_INO, name)).ino for name in read]
        work = iter(inos)

        async def worker() -> None:
            for ino in work:
                handle = await files.open(ino)
                try:
                    for offset in range(0, FILE, MiB):
                        if len(await handle.read(offset, MiB)) != MiB:
                            raise RuntimeError(f"inode {ino}: short read at {offset}")
                finally:
                    await files.release(handle)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(WRITERS)))
        elapsed = time.perf_counter() - start
    finally:
        await files.close()
        await bus.close()
    mib = len(read) * FILE / MiB
    return {"recall_mib": mib, "recall_s": elapsed, "recall_mb_s": mib / elapsed}


async def small_files(site: LocalSite, prefix: str, count: int) -> None:
    """`count` files of 1 KiB each (one chunk apiece; `<prefix>-<5 digits>`), 32 at
    once, in cache mode."""
    bus = await site.client(role=Role.CLIENT)
    meta = MetadataClient(bus, deadline_s=30)
    files = FileStore(bus, meta, client_id=bus.node)
    await files.start()
    try:
        work = iter(range(count))

        async def worker() -> None:
            for i in work:
                ino = (await meta.create(ROOT_INO, f"{prefix}-{i:05d}")).ino
                await files.write_all(ino, os.urandom(1024))

        await asyncio.gather(*(worker() for _ in range(32)))
    finally:
        await files.close()
        await bus.close()


def backfill_pass(site: LocalSite, env: dict[str, str], small: int) -> dict[str, Any]:
    """What the periodic backfill pass costs when S3 has everything: `small` more
    one-chunk files written and flushed, then `cfs admin s3-backfill --json` over the
    whole tree (every file's chunk map read, every chunk looked up in the index)."""
    asyncio.run(small_files(site, "small", small))

    async def flushed() -> None:
        async with await site.client("bench-backfill") as bus:
            await until_state(bus, "the small files flushed", lambda s: s.queue_entries == 0)

    asyncio.run(flushed())
    done = cfs_admin(site, env, "s3-backfill", "--json", timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"cfs admin s3-backfill: {done.stderr or done.stdout}")
    reply = json.loads(done.stdout)
    seconds = max(float(reply["seconds"]), 1e-6)
    # gone again: restore-data's figures are of the same files as before this phase
    asyncio.run(forget(site, [f"small-{i:05d}" for i in range(small)]))
    return {
        "backfill_files": reply["files"],
        "backfill_chunks": reply["chunks"],
        "backfill_queued": reply["queued"],
        "backfill_pass_s": seconds,
        "backfill_files_per_s": reply["files"] / seconds,
        "backfill_chunks_per_s": reply["chunks"] / seconds,
    }


def restore_data(site: LocalSite, env: dict[str, str], notes: list[str]) -> dict[str, Any]:
    """`cfs admin restore-data --from-s3 --json` end to end: the tier index rebuilt from
    the bucket, then every chunk not on flash recalled."""
    start = time.perf_counter()
    done = cfs_admin(site, env, "restore-data", "--from-s3", "--json", timeout=1800)
    wall = time.perf_counter() - start
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        report = {}
    if done.returncode != 0 or not report:
        notes.append(
            f"restore-data --from-s3 exited {done.returncode}: "
            f"{(done.stderr.strip() or done.stdout.strip())[-300:]}"
        )
    if not report:
        return {"restore_data_mb_s": None}
    mib = int(report.get("restored_bytes", 0)) / MiB
    seconds = float(report.get("seconds", wall))
    return {
        "restore_data_files": report.get("files"),
        "restore_data_chunks": report.get("chunks"),
        "restore_data_mib": mib,
        "restore_data_failed": len(report.get("failed", [])),
        "restore_data_reindex_s": report.get("reindex", {}).get("seconds"),
        "restore_data_s": seconds,
        "restore_data_command_s": wall,
        "restore_data_mb_s": mib / seconds if done.returncode == 0 else None,
    }


# -- the run ---------------------------------------------------------------------------
def keep_logs(base: Path) -> None:
    """A copy of the run's logs outside its temporary directory, to read later."""
    kept = Path(tempfile.mkdtemp(prefix="cfs-bench-tier-logs-"))
    for logs in (base / "site" / "logs", base / "s3", base / "proxy"):
        if logs.exists():
            shutil.copytree(logs, kept / logs.name, dirs_exist_ok=True)
    print(f"logs kept in {kept}", file=sys.stderr, flush=True)


def run(quick: bool, keep: bool = False) -> dict[str, Any]:
    objects = 3 if quick else 8
    write_total = (96 if quick else 256) * MiB
    flush_total = (128 if quick else 192) * MiB
    rounds = 1 if quick else 2  # of tier-off and cache-mode writes, in turn
    recall_total = (64 if quick else 128) * MiB  # of the flush figure's files
    notes: list[str] = []
    results: dict[str, Any] = {
        "quick": quick,
        "cores": len(os.sched_getaffinity(0)),
        "nodes": NODES_N,
        "file_mib": FILE / MiB,
        "writers": WRITERS,
        "flush_after_s": FLUSH_AFTER_S,
        "loadavg_start": os.getloadavg()[0],
    }
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cfs-bench-tier-") as tmp:
        base = Path(tmp)
        s3 = S3Server(base / "s3")
        proxy = S3FaultProxy(base / "proxy", s3.endpoint_url)
        site: LocalSite | None = None
        try:
            s3.start()
            proxy.start()
            credentials = s3.write_credentials(base / "s3.ini")
            env = s3.settings_env(credentials)
            direct = S3Settings(
                endpoint_url=s3.endpoint_url, region=s3.REGION, credentials_file=credentials
            )
            proxied = direct.model_copy(update={"endpoint_url": proxy.endpoint_url})
            print(f"raw S3 ({objects} x {OBJECT // MiB} MiB objects)", flush=True)
            results.update(asyncio.run(baseline(s3, direct, proxied, objects)))
            proxy.stop()  # only the baseline's information figure goes through it
            print(
                f"  raw c4 PUT {results['raw_put_mb_s_c4']:.1f} MB/s, "
                f"GET {results['raw_get_mb_s_c4']:.1f}; aioboto3 PUT "
                f"{results['raw_put_mb_s_boto']:.1f}, GET {results['raw_get_mb_s_boto']:.1f}; "
                f"via proxy PUT {results['raw_put_mb_s_via_proxy']:.1f}",
                flush=True,
            )
            site = LocalSite(
                base / "site",
                nodes=NODES_N,
                servers=1,
                site=SITE,
                services=SERVICES,
                env={
                    **env,
                    "CFS_STATUS_S": str(STATUS_S),
                    "CFS_PROBE_S": str(PROBE_S),
                    "CFS_LOG_LEVEL": "INFO",
                },
            )
            asyncio.run(start_site(site))
            pids = roles(site, s3)
            # untimed: the first writes on a fresh site pay for its warming up
            asyncio.run(write_files(site, "warmup", WARMUP_FILES * FILE, tiered=False))
            off = asyncio.run(measured_write(site, pids, "off0", write_total))
            print(f"write, tier off: {off['mb_s']:.1f} MB/s ({off['mb']:.0f} MiB)", flush=True)
            untiered = names("warmup", WARMUP_FILES * FILE) + names("off0", write_total)
            asyncio.run(forget(site, untiered))
            asyncio.run(configure_cache(site, env))
            results.update(asyncio.run(flush_phase(site, s3, flush_total, notes)))
            results["flush_vs_raw_put"] = results["flush_mb_s"] / results["raw_put_mb_s"]
            steady = results.get("flush_steady_mb_s")
            results["flush_steady_vs_raw_put"] = (
                steady / results["raw_put_mb_s"] if steady is not None else None
            )
            # one blob after another: read from flash, pack, PUT, nothing overlapped
            results["flush_serial_model_mb_s"] = 1 / (
                1 / results["flash_read_mb_s"]
                + 1 / results["blob_pack_mb_s"]
                + 1 / results["raw_put_mb_s"]
            )
            print(
                f"flush: {results['flush_mb_s']:.1f} MB/s "
                f"({results['flush_vs_raw_put']:.2f} x raw PUT; goal >= {GOAL_FLUSH_VS_RAW})"
                f", first blob {fmt(results['flush_resume_s'], 's')} after S3's return"
                f", then {fmt(steady, 'MB/s')}",
                flush=True,
            )
            offs, caches = [off], []
            for round_ in range(rounds):
                if round_:  # off and cache again, in turn: the machine's load drifts
                    tier_config(site, env, "--mode", "off")
                    again = asyncio.run(measured_write(site, pids, f"off{round_}", write_total))
                    offs.append(again)
                    print(f"write, tier off again: {again['mb_s']:.1f} MB/s", flush=True)
                    asyncio.run(forget(site, names(f"off{round_}", write_total)))
                    tier_config(site, env, "--mode", "cache")
                cache = asyncio.run(cache_phase(site, pids, f"cache{round_}", write_total))
                caches.append(cache)
                print(
                    f"write, cache mode: {cache['mb_s']:.1f} MB/s; in S3 "
                    f"{cache['flushed_s']:.1f} s after the last write",
                    flush=True,
                )
            results["write_rounds"] = rounds
            results["write_mb_tier_off"] = sum(r["mb"] for r in offs)
            results["write_mb_s_tier_off"] = sum(r["mb"] for r in offs) / sum(r["s"] for r in offs)
            results["write_mb_cache"] = sum(r["mb"] for r in caches)
            results["write_mb_s_cache"] = sum(r["mb"] for r in caches) / sum(r["s"] for r in caches)
            results["write_mb_s_tier_off_rounds"] = [r["mb_s"] for r in offs]
            results["write_mb_s_cache_rounds"] = [r["mb_s"] for r in caches]
            results["cache_flushed_after_write_s"] = max(r["flushed_s"] for r in caches)
            results["cache_blobs_written"] = int(sum(r["blobs"] for r in caches))
            results["cache_vs_off"] = results["write_mb_s_cache"] / results["write_mb_s_tier_off"]
            for name, done in (("tier_off", offs), ("cache", caches)):
                mib = sum(r["mb"] for r in done)
                for key in done[0]:
                    if key.startswith("cpu_s_"):
                        role = key.removeprefix("cpu_s_")
                        per_mib = sum(r[key] for r in done) * 1000 / mib
                        results[f"write_cpu_ms_per_mib_{name}_{role}"] = per_mib
                results[f"write_cpu_ms_per_mib_{name}"] = (
                    sum(v for r in done for k, v in r.items() if k.startswith("cpu_s_"))
                    * 1000
                    / mib
                )
            # what the ratio would be if the machine's cores were the only limit
            results["cache_vs_off_cpu"] = (
                results["write_cpu_ms_per_mib_tier_off"] / results["write_cpu_ms_per_mib_cache"]
            )
            print(
                f"write: tier off {results['write_mb_s_tier_off']:.1f} MB/s, cache mode "
                f"{results['write_mb_s_cache']:.1f} MB/s ({results['cache_vs_off']:.2f} x off; "
                f"goal >= {GOAL_CACHE_VS_OFF})",
                flush=True,
            )
            results.update(backfill_pass(site, env, small=1000 if quick else 4000))
            print(
                f"backfill pass, S3 holding everything: {results['backfill_files']} files, "
                f"{results['backfill_chunks']} chunks in {results['backfill_pass_s']:.2f} s "
                f"({results['backfill_chunks_per_s']:.0f} chunks/s), "
                f"{results['backfill_queued']} queued",
                flush=True,
            )
            results["queue_status"] = queue_status(site)
            wipe_flash(site)
            recalled = names("flush", flush_total)[: recall_total // FILE]
            pids = roles(site, s3)  # the chunk-stores were restarted
            before, client = cpu(pids), own_cpu_seconds()
            try:
                results.update(asyncio.run(read_files(site, recalled)))
            except Exception as exc:  # the figure is missing; the run goes on
                notes.append(f"recall_mb_s: reading files with no fragment on flash failed: {exc}")
                results["recall_mb_s"] = None
            used = {**spent(before, cpu(pids)), "cpu_s_client": own_cpu_seconds() - client}
            results.update(cpu_per_mib("recall", used, results.get("recall_mib")))
            print(f"recall on read: {fmt(results['recall_mb_s'], 'MB/s')}", flush=True)
            before, cli = cpu(pids), children_cpu_seconds()
            results.update(restore_data(site, env, notes))
            used = {**spent(before, cpu(pids)), "cpu_s_client": children_cpu_seconds() - cli}
            results.update(cpu_per_mib("restore_data", used, results.get("restore_data_mib")))
            for name in ("recall", "restore_data"):  # for information: no goal yet
                rate = results[f"{name}_mb_s"]
                for ceiling, key in (("raw_get", "raw_get_mb_s"),
                                     ("raw_get_range", "raw_get_range_mb_s"),
                                     ("flash_write", "write_mb_s_tier_off")):  # fmt: skip
                    top = results.get(key)
                    results[f"{name}_vs_{ceiling}"] = rate / top if rate and top else None
            print(
                f"restore-data --from-s3: {fmt(results['restore_data_mb_s'], 'MB/s')}",
                flush=True,
            )
            if errors := log_lines(site):
                results["service_errors"] = errors
            if errors or keep:
                keep_logs(base)
        except BaseException:
            keep_logs(base)
            raise
        finally:
            try:
                if site is not None:
                    site.stop()
            finally:
                proxy.stop()
                s3.stop()
    results["wall_s"] = time.perf_counter() - began
    results["loadavg_end"] = os.getloadavg()[0]
    results["notes"] = notes
    return results


async def start_site(site: LocalSite) -> None:
    await site.start()
    await site.wait_ready()


def fmt(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.1f} {unit}"


def main() -> None:
    # Only errors are worth a line each; the figures are printed below.
    setup_logging(os.environ.get("CFS_LOG_LEVEL", "ERROR"), service="bench")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 objects, 96 MiB of writes, 128 MiB flushed"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--keep-logs", action="store_true", help="copy the site's logs aside (else on errors)"
    )
    args = parser.parse_args()
    results = run(args.quick, args.keep_logs)
    for key, value in results.items():
        if isinstance(value, bool) or key == "notes":
            continue
        if isinstance(value, float):
            print(f"{key:36s} {value:12.3f}")
        elif isinstance(value, int):
            print(f"{key:36s} {value:12d}")
        elif value is None:
            print(f"{key:36s} {'-':>12s}")
    goals = {
        f"cache_vs_off >= {GOAL_CACHE_VS_OFF}": results["cache_vs_off"] >= GOAL_CACHE_VS_OFF,
        f"flush_vs_raw_put >= {GOAL_FLUSH_VS_RAW}": results["flush_vs_raw_put"]
        >= GOAL_FLUSH_VS_RAW,
    }
    if results["flush_steady_vs_raw_put"] is not None:
        goals[f"flush_steady_vs_raw_put >= {GOAL_FLUSH_VS_RAW}"] = (
            results["flush_steady_vs_raw_put"] >= GOAL_FLUSH_VS_RAW
        )
    print_goals(goals)
    mib = results["flush_queued_mb"]
    print(
        f"raw PUT {results['raw_put_mb_s']:.1f} MB/s (moto "
        f"{results['raw_put_cpu_ms_per_mib_moto']:.1f} CPU ms/MiB, client "
        f"{results['raw_put_cpu_ms_per_mib_client']:.1f}); flush of {mib:.0f} MiB in "
        f"{results['flush_s']:.1f} s, CPU ms/MiB: "
        + ", ".join(
            f"{role} {results[f'flush_cpu_ms_per_mib_{role}']:.1f}"
            for role in ("tierer", "chunkstore", "moto", "nats", "metadata")
        )
    )
    print(
        f"write CPU ms per MiB (every process): tier off "
        f"{results['write_cpu_ms_per_mib_tier_off']:.1f}, cache "
        f"{results['write_cpu_ms_per_mib_cache']:.1f} ("
        + ", ".join(
            f"{role} {results[f'write_cpu_ms_per_mib_cache_{role}']:.1f}"
            for role in ("client", "tierer", "chunkstore", "moto", "nats", "metadata")
        )
        + f"): {results['cache_vs_off_cpu']:.2f} x off if the cores were the only limit"
    )
    print(
        f"a blob's steps apart: read from flash {results['flash_read_mb_s']:.1f} MB/s, pack "
        f"{results['blob_pack_mb_s']:.1f} MB/s, PUT {results['raw_put_mb_s']:.1f} MB/s: "
        f"{results['flush_serial_model_mb_s']:.1f} MB/s one after the other; the tierer "
        f"drained {fmt(results['flush_steady_mb_s'], 'MB/s')} once going, with "
        f"{results['flush_cpu_cores_busy']:.2f} of {results['cores']} cores busy"
    )
    print(
        f"data back from S3: recall on read {fmt(results['recall_mb_s'], 'MB/s')}, "
        f"restore-data --from-s3 {fmt(results['restore_data_mb_s'], 'MB/s')}; raw GET "
        f"{results['raw_get_mb_s']:.1f} MB/s"
    )
    for name in ("recall", "restore_data"):
        if f"{name}_cpu_ms_per_mib" in results:
            print(
                f"{name} CPU ms per MiB {results[f'{name}_cpu_ms_per_mib']:.1f} ("
                + ", ".join(
                    f"{role} {results[f'{name}_cpu_ms_per_mib_{role}']:.1f}"
                    for role in ("client", "tierer", "chunkstore", "moto", "nats", "metadata")
                )
                + ")"
            )
    print(
        f"load average {results['loadavg_start']:.1f} at the start, "
        f"{results['loadavg_end']:.1f} at the end, on {results['cores']} CPUs"
        f"{' (--quick)' if results['quick'] else ''}"
    )
    for line in results.get("service_errors", []):
        print(f"service error: {line}")
    for note in results["notes"]:
        print(f"note: {note}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
