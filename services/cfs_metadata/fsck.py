"""`cfs admin metadata-consistency-check`: the whole metadata, every replica, every fragment.

1. Every metadata node scans its replicas (`cfs.<site>.rpc.metacheck.<node>`): each
   stored record's checksum, and digests of the records at the replica's position.
2. Each shard is rebuilt from its journal into a scratch projection here (the same
   `apply_record` the replicas use). At every position a replica reported, the
   rebuilt state is digested and compared; differing buckets are listed by key.
   A damaged or different record on one follower is found there, by name.
3. The rebuilt shards, all together, go through `TreeCheck` (parent pointers, link
   counts, entries, orphans, sizes against chunk maps; the namespace spans shards).
4. Every fragment every chunk map names is verified by its chunk-store (present,
   CRC right).

Tree findings are confirmed: the scratch shards catch up with their journals and the
tree is checked again; only what both passes found is reported (an operation in
flight between shards is not a finding). Nothing here changes the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import nats.errors

from cfs.admin.snapshot import SnapshotUnavailable, read_node_facts
from cfs.bus import Bus, BusError, NoResponders
from cfs.client.chunks import ChunkStoreClient, FragmentError
from cfs.client.tier import TierIndex
from cfs_contracts.data import fragment_key, parse_fragment_key
from cfs_contracts.fs.check import (
    AnyCheckOp,
    CheckReply,
    CheckRequest,
    ListRecords,
    ReplicaShard,
    ScanReplicas,
    meta_check_subject,
)
from cfs_contracts.fs.records import Dentry, Inode, Kind, shard_of
from cfs_contracts.members import Lifecycle, Liveness
from cfs_metadata.check import (
    INODE_COUNT_KEY,
    Finding,
    Problem,
    TreeCheck,
    compare_buckets,
    compare_records,
    corruption_finding,
    local_of,
    replica_finding,
    shard_findings,
)
from cfs_metadata.digest import bucket_records, record_ino, record_name, scan_pairs
from cfs_metadata.journal import Journal, JournalRecord, apply_record
from cfs_metadata.projection import Projection

log = logging.getLogger(__name__)

SERVICE = "metadata-raft"
NO_RESPONDERS_TRIES = 4
SCAN_TIMEOUT_S = 120.0  # a node scans its shards one after the other
LIST_TIMEOUT_S = 60.0
TAIL_IDLE_S = 10.0  # a journal that delivers nothing this long while behind: give up
VERIFY_CONCURRENCY = 16
EXIT_CLEAN, EXIT_FINDINGS, EXIT_UNCHECKED = 0, 1, 2


class Progress(Protocol):
    """What the checker reports while it works (a rich bar on a terminal)."""

    def phase(self, description: str, total: int | None) -> None: ...

    def advance(self, amount: int = 1) -> None: ...


class NoProgress:
    def phase(self, description: str, total: int | None) -> None:
        pass

    def advance(self, amount: int = 1) -> None:
        pass


class CheckFailed(Exception):
    """The check could not run at all (nothing to compare against)."""


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # what could not be checked, and why
    notes: list[str] = field(default_factory=list)
    skipped: int = 0  # findings touching cross-shard operations still in flight
    shards: int = 0
    replicas: int = 0  # shard replicas scanned
    inodes: int = 0
    entries: int = 0
    fragments: int = 0
    positions: dict[str, int] = field(default_factory=dict)  # shard -> journal seq checked
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        if self.findings:
            return EXIT_FINDINGS
        return EXIT_UNCHECKED if self.unchecked else EXIT_CLEAN

    @property
    def status(self) -> str:
        return {EXIT_CLEAN: "clean", EXIT_FINDINGS: "findings"}.get(self.exit_code, "incomplete")

    @property
    def inodes_per_s(self) -> float:
        return self.inodes / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "findings": [f.to_dict() for f in self.findings],
            "unchecked": self.unchecked,
            "notes": self.notes,
            "skipped_in_flight": self.skipped,
            "stats": {
                "shards": self.shards,
                "replicas": self.replicas,
                "inodes": self.inodes,
                "entries": self.entries,
                "fragments": self.fragments,
                "seconds": round(self.seconds, 3),
                "inodes_per_s": round(self.inodes_per_s, 1),
                "positions": self.positions,
            },
        }


async def ask_node(
    bus: Bus, node: str, op: AnyCheckOp, timeout: float, site: str | None = None
) -> CheckReply:
    """One request to a node's replica checks (`site`: the peer's, over the link);
    BusError if it does not answer."""
    data = CheckRequest(body=op).model_dump_json().encode()
    msg = await bus.request(meta_check_subject(site or bus.site, node), data, timeout=timeout)
    if not msg.data:
        error = (msg.headers or {}).get("Cfs-Error-Message", "failed")
        return CheckReply(node=node, errno=errno.EIO, message=error)
    return CheckReply.model_validate_json(msg.data)


async def metadata_nodes(bus: Bus) -> list[str]:
    """Every node that should hold metadata replicas: each storage node runs metadata-raft
    (DESIGN.md §4), so every member not removed, and any node whose metadata-raft reports
    health (sites without membership). A node among them that does not answer is a
    replica the check could not see, never one it silently skips."""
    try:
        facts = await read_node_facts(bus, timeout=5.0)
    except SnapshotUnavailable as exc:
        raise CheckFailed(f"cannot list the metadata nodes: {exc}") from None
    nodes = {h.node for h in facts.health if h.service == SERVICE}
    nodes |= {n for n, m in facts.members.items() if m.state is not Liveness.LEFT}
    return sorted(n for n in nodes if facts.lifecycle(n) is not Lifecycle.REMOVED)


class ScratchShards:
    """The shards rebuilt from their journals, on local disk; a view over all of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shards: dict[int, Projection] = {}

    def open(self, shard: int) -> Projection:
        if shard not in self.shards:
            self.shards[shard] = Projection(self.root / f"shard-{shard:03d}", shard)
        return self.shards[shard]

    def close(self) -> None:
        for projection in self.shards.values():
            projection.close()
        self.shards.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- the merged view the repair planner reads ----------------------------------------
    def inode(self, ino: int) -> Inode | None:
        projection = self.shards.get(shard_of(ino))
        return projection.inode(ino) if projection is not None else None

    def dentry(self, parent: int, name: str) -> Dentry | None:
        projection = self.shards.get(shard_of(parent))
        return projection.dentry(parent, name) if projection is not None else None

    def in_flight(self) -> set[str]:
        """Keys locked by prepared cross-shard transactions, in any shard."""
        return {
            key
            for projection in self.shards.values()
            for tx in projection.txs()
            if tx.state == "prepared"
            for key in tx.locks
        }


class MetadataChecker:
    """One check run; keeps the scratch shards open for a repair plan until closed."""

    def __init__(
        self,
        bus: Bus,
        shards: Iterable[int],
        *,
        progress: Progress | None = None,
        fragments: bool = True,
        scratch: Path | None = None,
    ) -> None:
        self.bus = bus
        self.shard_list = sorted(shards)
        self.progress = progress or NoProgress()
        self.verify_fragments = fragments
        self.scratch = ScratchShards(scratch or Path(tempfile.mkdtemp(prefix="cfs-check-")))
        self.report = CheckReport(shards=len(self.shard_list))
        self._with_data: list[int] = []  # files with a chunk map (to verify their fragments)

    def close(self) -> None:
        self.scratch.close()

    async def __aenter__(self) -> MetadataChecker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def run(self) -> CheckReport:
        started = time.monotonic()
        scans = await self._scan_replicas()
        replayed = [await self._replay_and_compare(shard, scans) for shard in self.shard_list]
        if not all(replayed):
            self.report.unchecked.append(
                "the namespace (parent pointers, link counts, orphans, sizes, fragments): "
                "a shard's journal could not be replayed"
            )
            self.report.seconds = time.monotonic() - started
            return self.report
        first = self._check_tree()
        if first:  # confirm against the journals' newer ends (transients disappear)
            for shard in self.shard_list:
                await self._catch_up(shard)
            again = {f.identity: f for f in self._check_tree()}
            first = [again[f.identity] for f in first if f.identity in again]
        self.report.findings += first
        if self.verify_fragments:
            self.report.findings += await self._verify_fragments()
        else:
            self.report.notes.append("fragments were not verified (--no-fragments)")
        self.report.findings.sort(key=_report_order)
        self.report.seconds = time.monotonic() - started
        return self.report

    # -- 1. replicas -----------------------------------------------------------------
    async def _scan_replicas(self) -> dict[str, dict[int, ReplicaShard]]:
        nodes = await metadata_nodes(self.bus)
        if not nodes:
            raise CheckFailed("no metadata-raft process is reporting in this site")
        self.progress.phase("scanning replicas", len(nodes))
        op = ScanReplicas(shards=tuple(self.shard_list))

        async def one(node: str) -> tuple[str, CheckReply | str]:
            reply: CheckReply | str = "metadata-raft is not running there"
            for attempt in range(NO_RESPONDERS_TRIES):  # a process starting answers soon
                try:
                    reply = await ask_node(self.bus, node, op, SCAN_TIMEOUT_S)
                    break
                except NoResponders:
                    if attempt + 1 < NO_RESPONDERS_TRIES:
                        await asyncio.sleep(1.0)
                except BusError as exc:
                    reply = str(exc)
                    break
            self.progress.advance()
            return node, reply

        scans: dict[str, dict[int, ReplicaShard]] = {}
        for node, reply in await asyncio.gather(*(one(n) for n in nodes)):
            if isinstance(reply, str) or reply.errno:
                why = reply if isinstance(reply, str) else reply.message
                self.report.unchecked.append(f"replicas on {node}: {why}")
                continue
            scans[node] = {s.shard: s for s in reply.shards}
            for scanned in reply.shards:
                self.report.replicas += 1
                for bad in scanned.corrupt:
                    ino = record_ino(bytes.fromhex(bad.key))
                    self.report.findings.append(corruption_finding(scanned.shard, node, bad, ino))
        return scans

    # -- 2. journal replay against every replica ------------------------------------------
    async def _replay_and_compare(
        self, shard: int, scans: dict[str, dict[int, ReplicaShard]]
    ) -> bool:
        """Rebuild the shard from its journal, comparing each replica on the way; False
        when the journal could not be replayed to its end."""
        journal = Journal(self.bus, shard)
        try:
            first, last = await _journal_bounds(self.bus, journal)
        except BusError as exc:
            self.report.unchecked.append(f"shard {shard:03d}: journal unreadable ({exc})")
            return False
        if first > 1:
            self.report.unchecked.append(
                f"shard {shard:03d}: the journal starts at seq {first}; it cannot be replayed"
            )
            return False
        scratch = self.scratch.open(shard)
        points: dict[int, list[str]] = {}
        for node, shards in scans.items():
            scanned = shards.get(shard)
            if scanned is None:
                continue
            if scanned.applied_seq > last:
                self.report.findings.append(
                    replica_finding(
                        shard,
                        node,
                        scanned.applied_seq,
                        f"Shard {shard:03d}",
                        f"applied past the journal's end (seq {last})",
                    )
                )
                continue
            points.setdefault(scanned.applied_seq, []).append(node)
        compare = _Comparison(self, shard, scans, scratch)
        if 0 in points:
            await compare.at(0, points.pop(0))
        self.progress.phase(f"replaying shard {shard:03d}", last or None)
        target = max([last, *points])
        async for record in self._tail(journal, scratch, target, compare.deferred_end):
            apply_record(scratch, record)
            self.progress.advance()
            if record.seq in points:
                await compare.at(record.seq, points.pop(record.seq))
            await compare.deferred_at(record.seq)
        for node in compare.pending_nodes():
            self.report.unchecked.append(
                f"shard {shard:03d} on {node}: moved on before its records could be compared"
            )
        self.report.positions[f"{shard:03d}"] = scratch.applied_seq
        return scratch.applied_seq >= last

    async def _tail(
        self,
        journal: Journal,
        scratch: Projection,
        target: int,
        extra_end: Callable[[], int],
    ) -> AsyncIterator[JournalRecord]:
        """Journal records after the scratch's position through `target` (or later, while
        a comparison waits for a position past it)."""
        if scratch.applied_seq >= max(target, extra_end()):
            return
        tail = cast(AsyncGenerator[JournalRecord, None], journal.tail(scratch.applied_seq + 1))
        async with contextlib.aclosing(tail) as records:
            iterator = aiter(records)
            while scratch.applied_seq < max(target, extra_end()):
                try:
                    async with asyncio.timeout(TAIL_IDLE_S):  # (no task per message)
                        record = await anext(iterator)
                except (TimeoutError, StopAsyncIteration):
                    self.report.unchecked.append(
                        f"shard {scratch.shard:03d}: journal stopped at seq "
                        f"{scratch.applied_seq} before seq {max(target, extra_end())}"
                    )
                    return
                except BusError as exc:
                    self.report.unchecked.append(f"shard {scratch.shard:03d}: {exc}")
                    return
                if record.seq > scratch.applied_seq:
                    yield record

    async def _catch_up(self, shard: int) -> None:
        scratch = self.scratch.shards.get(shard)
        if scratch is None:
            return
        journal = Journal(self.bus, shard)
        try:
            _, last = await _journal_bounds(self.bus, journal)
        except BusError:
            return
        async for record in self._tail(journal, scratch, last, lambda: 0):
            apply_record(scratch, record)
        self.report.positions[f"{shard:03d}"] = scratch.applied_seq

    # -- 3. the namespace ------------------------------------------------------------------
    def _check_tree(self) -> list[Finding]:
        check = TreeCheck(in_flight=self.scratch.in_flight())
        total = sum(p.inode_count() for p in self.scratch.shards.values())
        self.progress.phase("checking the namespace", total or None)
        findings: list[Finding] = []
        with_data: list[int] = []
        for shard, projection in sorted(self.scratch.shards.items()):
            top = held = 0
            for inode in projection.scan_inodes():
                check.add_inode(inode)
                top = max(top, local_of(inode.ino))
                held += 1
                if inode.chunks:
                    with_data.append(inode.ino)
                self.progress.advance()
            findings += shard_findings(shard, projection.next_local(), top)
            counted = projection.inode_count()
            if counted != held:
                findings.append(
                    Finding(
                        Problem.COUNTER,
                        f"shard {shard:03d}: inode counter {counted}, the shard holds {held}",
                        shard=shard,
                        expected=held,
                        actual=counted,
                        key=INODE_COUNT_KEY,
                    )
                )
        for projection in self.scratch.shards.values():
            for entry in projection.scan_dentries():
                check.add_entry(entry)
        findings += check.finish()
        self.report.inodes, self.report.entries = check.inodes, check.entries
        self.report.skipped = check.skipped
        self._with_data = with_data
        return findings

    # -- 4. fragments ------------------------------------------------------------------------
    async def _verify_fragments(self) -> list[Finding]:
        work: asyncio.Queue[tuple[int, int, int, str, str] | None] = asyncio.Queue(maxsize=1024)
        findings: list[Finding] = []
        unreachable: dict[str, int] = {}
        chunks = ChunkStoreClient(self.bus, timeout_s=30.0)
        self.progress.phase("verifying fragments", None)
        tier = TierIndex(self.bus)
        off_flash: dict[str, bool] = {}
        in_s3 = 0

        async def evicted(key: str) -> bool:
            """Missing on purpose: the chunk was evicted to S3 (tiered mode)."""
            chunk_id = parse_fragment_key(key)[0]
            if chunk_id not in off_flash:
                off_flash[chunk_id] = await tier.off_flash(chunk_id)
            return off_flash[chunk_id]

        async def worker() -> None:
            nonlocal in_s3
            while (item := await work.get()) is not None:
                ino, index, position, node, key = item
                try:
                    await chunks.verify(node, key)
                except FragmentError as exc:
                    if exc.unreachable:
                        unreachable[node] = unreachable.get(node, 0) + 1
                    elif exc.errno == errno.ENOENT and await evicted(key):
                        in_s3 += 1
                    else:
                        state = "missing" if exc.errno == errno.ENOENT else "corrupt"
                        findings.append(
                            _fragment_finding(ino, index, position, node, key, state, exc)
                        )
                self.report.fragments += 1
                self.progress.advance()

        workers = [asyncio.create_task(worker()) for _ in range(VERIFY_CONCURRENCY)]
        try:
            for ino in self._with_data:
                inode = self.scratch.inode(ino)
                if inode is None or inode.kind is not Kind.FILE:
                    continue
                for chunk in inode.chunks:
                    for position, node in enumerate(chunk.fragments):
                        try:
                            key = fragment_key(chunk.chunk_id, chunk.scheme, position)
                        except ValueError:
                            continue  # a malformed chunk map: TreeCheck reported it
                        await work.put((inode.ino, chunk.index, position, node, key))
        finally:
            for _ in workers:
                await work.put(None)
            await asyncio.gather(*workers)
        for node, count in sorted(unreachable.items()):
            self.report.unchecked.append(f"{count} fragments on {node}: chunk-store not answering")
        if in_s3:
            self.report.notes.append(
                f"{in_s3} fragments are off flash on purpose: their chunks are evicted to S3"
            )
        return sorted(findings, key=lambda f: (f.ino, f.chunk, f.fragment))


class _Comparison:
    """Replicas of one shard against the scratch, each at the position it reported."""

    def __init__(
        self,
        checker: MetadataChecker,
        shard: int,
        scans: dict[str, dict[int, ReplicaShard]],
        scratch: Projection,
    ) -> None:
        self.checker = checker
        self.shard = shard
        self.scans = scans
        self.scratch = scratch
        # node -> (position the replica listed at, its records, the buckets asked)
        self.deferred: dict[str, tuple[int, dict[str, str], tuple[int, ...]]] = {}

    def deferred_end(self) -> int:
        return max((seq for seq, _, _ in self.deferred.values()), default=0)

    def pending_nodes(self) -> list[str]:
        return sorted(self.deferred)

    async def at(self, seq: int, nodes: list[str]) -> None:
        """The scratch is at `seq`: compare every replica that reported this position."""
        replay = scan_pairs(self.scratch.image_pairs(), verify=False)
        for node in nodes:
            scanned = self.scans[node][self.shard]
            differ = compare_buckets(scanned.buckets, replay.buckets)
            if not differ:
                continue
            try:
                listed = await ask_node(
                    self.checker.bus,
                    node,
                    ListRecords(shard=self.shard, buckets=tuple(differ)),
                    LIST_TIMEOUT_S,
                )
            except BusError as exc:
                self.checker.report.unchecked.append(
                    f"shard {self.shard:03d} on {node}: records not listed ({exc})"
                )
                continue
            if listed.errno:
                self._whole(node, seq, f"differs in {len(differ)} of the record buckets")
                continue
            records = {r.key: r.digest for r in listed.records}
            if listed.applied_seq == seq:
                self._records(node, seq, records, tuple(differ))
            elif listed.applied_seq > seq:
                self.deferred[node] = (listed.applied_seq, records, tuple(differ))
            else:  # went back: being rebuilt meanwhile
                self._whole(node, seq, f"went back to seq {listed.applied_seq} during the check")

    async def deferred_at(self, seq: int) -> None:
        for node, (at, records, buckets) in list(self.deferred.items()):
            if at == seq:
                del self.deferred[node]
                self._records(node, seq, records, buckets)

    def _records(
        self, node: str, seq: int, records: dict[str, str], buckets: tuple[int, ...]
    ) -> None:
        truth = {r.key: r.digest for r in bucket_records(self.scratch.image_pairs(), buckets)}
        corrupt = {bad.key for bad in self.scans[node][self.shard].corrupt}
        differences = [(k, how) for k, how in compare_records(records, truth) if k not in corrupt]
        for key, how in differences:
            raw = bytes.fromhex(key)
            self.checker.report.findings.append(
                replica_finding(
                    self.shard, node, seq, record_name(raw), how, key=key, ino=record_ino(raw)
                )
            )
        if not differences and not corrupt:
            self._whole(node, seq, "differs from the journal (digests)")

    def _whole(self, node: str, seq: int, how: str) -> None:
        self.checker.report.findings.append(
            replica_finding(self.shard, node, seq, f"Shard {self.shard:03d}", how)
        )


async def _journal_bounds(bus: Bus, journal: Journal) -> tuple[int, int]:
    try:
        info = await bus.js.stream_info(journal.stream)
    except (nats.errors.Error, TimeoutError) as exc:
        raise BusError(f"cannot read {journal.stream}: {exc or type(exc).__name__}") from None
    last = int(info.state.last_seq)
    first = int(info.state.first_seq) if last else 1
    return first, last


def _fragment_finding(
    ino: int, index: int, position: int, node: str, key: str, state: str, exc: FragmentError
) -> Finding:
    # The store's words without the key and node the line already names.
    detail = exc.message.removeprefix(f"fragment {key} on {node}: ")
    detail = detail.replace(f"fragment {key} on node {node} ", "").replace(f"fragment {key} ", "")
    why = f" ({detail})" if state == "corrupt" else ""
    return Finding(
        Problem.FRAGMENT,
        f"Inode {ino}: chunk {index} fragment {position} on {node} is {state}{why}",
        ino=ino,
        shard=shard_of(ino),
        node=node,
        key=key,
        chunk=index,
        fragment=position,
    )


def _report_order(finding: Finding) -> tuple[int, int, str]:
    """Replicas first (they are rebuilt first), then the namespace by inode, then data."""
    replica = finding.problem in (Problem.CHECKSUM, Problem.REPLICA)
    group = 0 if replica else 2 if finding.problem is Problem.FRAGMENT else 1
    return (group, finding.ino, finding.line)
