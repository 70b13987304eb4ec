"""The shard projection in rocksdict: committed state plus the applied sequence.

Every journal batch is written in one WriteBatch together with its stream
sequence, so a restart resumes exactly after the last applied batch: nothing
applied twice, nothing skipped. Records are sealed with a checksum that is
verified on every read (`records.py`). The projection can always be rebuilt
from the journal, so writes go to RocksDB's WAL without fsync.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar, cast

from pydantic import BaseModel
from rocksdict import Checkpoint, Options, Rdict, WriteBatch

from cfs.backup.image import decode_pairs, iter_pairs
from cfs.faults import crash_point
from cfs_contracts.events.metadata import (
    DelInode,
    JournalEntry,
    Lineage,
    ShardImageChunk,
    ShardRestored,
)
from cfs_contracts.fs.changes import TxRecord
from cfs_contracts.fs.records import Dentry, Inode, name_cookie
from cfs_contracts.fs.rpc import Reply
from cfs_metadata.records import (
    CorruptRecord,
    check_seal,
    seal,
    seal_holds,
    unseal_dentry,
    unseal_inode,
)
from cfs_metadata.state import MemoryShard, apply_entries

_U64 = struct.Struct(">Q")
_INODE = b"i"
_DENTRY = b"d"
_REPLY = b"o"
_REPLY_BY_SEQ = b"r"  # r || seq || op_id: lets old replies be pruned in order
_APPLIED = b"m:applied"
_APPLIED_ID = b"m:applied_id"  # Nats-Msg-Id (envelope id) of the message at m:applied
_TERM = b"m:term"
_LOCAL = b"m:local"
_INODES = b"m:inodes"
_LINEAGE = b"m:lineage"  # a restored shard: where its state came from (JSON Lineage)
_INSTALL = b"m:install"  # a restore in progress (JSON _Install)
_TX = b"t"
_TOMB = b"x"  # x || ino: how an inode was deleted (JSON DelInode), for cross-site merges
_TOMB_BY_SEQ = b"y"  # y || seq || ino: lets old tombstones be pruned in order
_REMOTE = b"m:remote:"  # || peer site: the last GEO_IN message applied (SetRemoteApplied)
# What a snapshot image holds: the records, open transactions and the counters.
# Not replies (retries are answered by the cluster that saw them), not positions.
_IMAGE_PREFIXES = (_INODE, _DENTRY, _TX, _TOMB)
_IMAGE_KEYS = (_LOCAL, _INODES)

T = TypeVar("T")
CorruptionHandler = Callable[[CorruptRecord], None]

# Replies are kept for retries by op id. A client retries for at most its deadline
# (30 s by default); 100k journal messages cover that at any realistic rate.
REPLY_RETENTION_SEQS = 100_000
# Tombstones are kept for a peer site's changes that the deletion never saw: they
# arrive after a partition, however long. Ten million journal messages is months at
# a busy shard's rate; a change older than that re-creates the inode without a name
# (metadata-check finds the orphan and adopts it).
TOMBSTONE_RETENTION_SEQS = 10_000_000


def _inode_key(ino: int) -> bytes:
    return _INODE + _U64.pack(ino)


def _dentry_prefix(parent: int) -> bytes:
    return _DENTRY + _U64.pack(parent)


def _dentry_key(parent: int, name: str) -> bytes:
    return _dentry_prefix(parent) + _U64.pack(name_cookie(name)) + _encode_name(name)


def _encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def key_record(key: bytes) -> tuple[str, int, str]:
    """What a stored key holds (the checker names records by it): `("inode", ino, "")`,
    `("dentry", parent, name)`, `("tombstone", ino, "")`, `("tx", 0, tx_id)`, else
    `("meta", 0, key)`."""
    if key.startswith(_INODE) and len(key) == 9:
        return "inode", int(_U64.unpack(key[1:9])[0]), ""
    if key.startswith(_DENTRY) and len(key) >= 17:
        name = key[17:].decode("utf-8", "surrogateescape")
        return "dentry", int(_U64.unpack(key[1:9])[0]), name
    if key.startswith(_TOMB) and len(key) == 9:
        return "tombstone", int(_U64.unpack(key[1:9])[0]), ""
    if key.startswith(_TX):
        return "tx", 0, key[1:].decode("utf-8", "replace")
    return "meta", 0, key.decode("utf-8", "replace")


class Projection:
    """rocksdict-backed `ShardView`; `apply()` is the only way state changes."""

    def __init__(self, path: Path, shard: int, on_corruption: CorruptionHandler | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.shard = shard
        self.path = path
        self._recover_swap(path)
        self._db = Rdict(str(path), options=Options(raw_mode=True))
        self._side: Rdict | None = None
        self._on_corruption = on_corruption

    def close(self) -> None:
        if self._side is not None:
            self._side.close()
            self._side = None
        self._db.close()

    # -- ShardView -------------------------------------------------------------------
    def inode(self, ino: int) -> Inode | None:
        raw = self._db.get(_inode_key(ino))
        if raw is None:
            return None
        return self._inode_at(raw, ino)

    def dentry(self, parent: int, name: str) -> Dentry | None:
        raw = self._db.get(_dentry_key(parent, name))
        if raw is None:
            return None
        return self._checked(lambda: unseal_dentry(raw, parent, name))

    def dentries(self, parent: int, after_cookie: int = 0) -> Iterator[Dentry]:
        prefix = _dentry_prefix(parent)
        start = prefix + _U64.pack(after_cookie + 1) if after_cookie else prefix
        for item_key, item_value in self._db.items(from_key=start):
            key, raw = cast(bytes, item_key), cast(bytes, item_value)
            if not key.startswith(prefix):
                return
            name = key[len(prefix) + 8 :].decode("utf-8", "surrogateescape")
            yield self._dentry_at(raw, parent, name)

    def _inode_at(self, raw: bytes, ino: int) -> Inode:
        return self._checked(lambda: unseal_inode(raw, ino))

    def _dentry_at(self, raw: bytes, parent: int, name: str) -> Dentry:
        return self._checked(lambda: unseal_dentry(raw, parent, name))

    def scan_inodes(self, after_ino: int = 0) -> Iterator[Inode]:
        for item_key, item_value in self._db.items(from_key=_inode_key(after_ino + 1)):
            key, raw = cast(bytes, item_key), cast(bytes, item_value)
            if not key.startswith(_INODE):
                return
            yield self._inode_at(raw, int(_U64.unpack(key[1:9])[0]))

    def scan_dentries(self) -> Iterator[Dentry]:
        for item_key, item_value in self._db.items(from_key=_DENTRY):
            key, raw = cast(bytes, item_key), cast(bytes, item_value)
            if not key.startswith(_DENTRY):
                return
            parent = int(_U64.unpack(key[1:9])[0])
            yield self._dentry_at(raw, parent, key[17:].decode("utf-8", "surrogateescape"))

    def has_entries(self, parent: int) -> bool:
        return next(self.dentries(parent), None) is not None

    def next_local(self) -> int:
        return self._int(_LOCAL, 1)

    def reserved_local(self, shard: int) -> int:
        raise RuntimeError(f"no inode number reserved in shard {shard} by this view")

    def tx(self, tx_id: str) -> TxRecord | None:
        raw = self._db.get(_TX + tx_id.encode())
        return TxRecord.model_validate_json(raw) if raw is not None else None

    def txs(self) -> list[TxRecord]:
        """Unresolved transactions (participant locks, coordinator outcomes to deliver)."""
        found = []
        for item_key, item_value in self._db.items(from_key=_TX):
            if not cast(bytes, item_key).startswith(_TX):
                break
            found.append(TxRecord.model_validate_json(cast(bytes, item_value)))
        return found

    def remote_applied(self, peer: str) -> int:
        return self._int(_REMOTE + peer.encode(), 0)

    def tombstone(self, ino: int) -> DelInode | None:
        raw = self._db.get(_TOMB + _U64.pack(ino))
        return None if raw is None else DelInode.model_validate_json(cast(bytes, raw))

    def op_reply(self, op_id: str) -> Reply | None:
        raw = self._db.get(_REPLY + op_id.encode())
        return Reply.model_validate_json(raw) if raw is not None else None

    # -- bookkeeping -----------------------------------------------------------------
    @property
    def applied_seq(self) -> int:
        """Stream sequence of the last journal message applied (0 = none)."""
        return self._int(_APPLIED, 0)

    @property
    def applied_id(self) -> str | None:
        """Envelope id (= Nats-Msg-Id) of the last applied message, when it was recorded."""
        raw = self._db.get(_APPLIED_ID)
        return raw.decode() if raw is not None else None

    @property
    def term(self) -> int:
        return self._int(_TERM, 0)

    def inode_count(self) -> int:
        return self._int(_INODES, 0)

    def apply(
        self,
        seq: int,
        entries: Iterable[JournalEntry] = (),
        term: int | None = None,
        msg_id: str | None = None,
        lineage: Lineage | None = None,
    ) -> None:
        """Apply one journal message (its entries, or a fence) atomically with its sequence.

        `msg_id`: the message's envelope id, kept so a journal re-seeded after quorum
        loss can be checked to still hold this very message at `seq`.
        """
        if seq <= self.applied_seq:
            raise ValueError(f"sequence {seq} already applied (at {self.applied_seq})")
        batch = _Batch(self, seq)
        apply_entries(batch, entries)
        self._prune(batch.wb, _REPLY_BY_SEQ, _REPLY, seq - REPLY_RETENTION_SEQS)
        self._prune(batch.wb, _TOMB_BY_SEQ, _TOMB, seq - TOMBSTONE_RETENTION_SEQS)
        batch.wb.put(_APPLIED, _U64.pack(seq))
        if msg_id is not None:
            batch.wb.put(_APPLIED_ID, msg_id.encode())
        else:
            batch.wb.delete(_APPLIED_ID)
        if term is not None:
            batch.wb.put(_TERM, _U64.pack(term))
        if lineage is not None:
            batch.wb.put(_LINEAGE, lineage.model_dump_json().encode())
        if batch.inode_delta:
            batch.wb.put(_INODES, _U64.pack(self.inode_count() + batch.inode_delta))
        self._db.write(batch.finish())

    def _prune(self, wb: WriteBatch, index: bytes, records: bytes, below_seq: int) -> None:
        """Drop the records (`records` || id) indexed (`index` || seq || id) below a seq."""
        if below_seq <= 0:
            return
        end = index + _U64.pack(below_seq)
        for item_key in self._db.keys(from_key=index):
            key = cast(bytes, item_key)
            if key >= end:
                break
            wb.delete(key)
            wb.delete(records + key[9:])

    @property
    def lineage(self) -> Lineage | None:
        raw = self._db.get(_LINEAGE)
        return Lineage.model_validate_json(raw) if raw is not None else None

    @property
    def held(self) -> bool:
        """Restored and waiting for replay-journal: mutations are refused."""
        lineage = self.lineage
        return lineage is not None and lineage.held

    # -- snapshot images and restore -------------------------------------------------
    def image_pairs(self) -> Iterator[tuple[bytes, bytes]]:
        """The state a snapshot keeps, as stored (sealed records, checked on every read
        after a restore)."""
        db = self._db
        for prefix in _IMAGE_PREFIXES:
            for item_key, item_value in db.items(from_key=prefix):
                key = cast(bytes, item_key)
                if not key.startswith(prefix):
                    break
                yield key, cast(bytes, item_value)
        for key in _IMAGE_KEYS:
            value = db.get(key)
            if value is not None:
                yield key, cast(bytes, value)

    def load_image(self, data: bytes, batch_pairs: int = 10_000) -> None:
        """Bulk-load an image into an empty projection (verification, tests)."""
        batch = WriteBatch(raw_mode=True)
        for count, (key, value) in enumerate(iter_pairs(data), start=1):
            batch.put(key, value)
            if count % batch_pairs == 0:
                self._db.write(batch)
                batch = WriteBatch(raw_mode=True)
        self._db.write(batch)

    def checkpoint(self, path: Path) -> None:
        """A consistent copy of this moment at `path` (hard links: instant); applies may
        continue meanwhile. Open it with `Projection(path, shard)` to read the image.
        (rocksdict's Snapshot iterators do not honour the snapshot, so a copy it is.)"""
        Checkpoint(self._db).create_checkpoint(str(path))

    @property
    def installing(self) -> _Install | None:
        raw = self._db.get(_INSTALL)
        return _Install.model_validate_json(raw) if raw is not None else None

    def begin_install(self, seq: int, restored: ShardRestored) -> None:
        """A restore starts: its image is collected beside the live state until complete."""
        self._check_next(seq)
        self._drop_side()
        self._side = Rdict(str(self._side_path), options=Options(raw_mode=True))
        install = _Install(
            snapshot_id=restored.lineage.snapshot_id,
            chunks=restored.chunks,
            records=restored.records,
            lineage=restored.lineage,
        )
        self._write_position(seq, install)

    def install_chunk(self, seq: int, chunk: ShardImageChunk) -> bool:
        """Add one chunk; True when it completed the image and the state was replaced.

        A chunk of another (abandoned) restore only advances the position.
        """
        self._check_next(seq)
        install = self.installing
        if install is None or chunk.snapshot_id != install.snapshot_id:
            self._write_position(seq, install)
            return False
        if chunk.index != install.next_chunk:
            raise ValueError(
                f"restore {install.snapshot_id}: chunk {chunk.index} at seq {seq}, "
                f"expected chunk {install.next_chunk}"
            )
        side = self._open_side()
        batch = WriteBatch(raw_mode=True)
        pairs = 0
        for key, value in decode_pairs(chunk.data_b64):
            batch.put(key, value)
            pairs += 1
        side.write(batch)
        install = install.model_copy(
            update={"next_chunk": install.next_chunk + 1, "received": install.received + pairs}
        )
        if install.next_chunk < install.chunks:
            self._write_position(seq, install)
            return False
        if install.received != install.records:
            raise ValueError(
                f"restore {install.snapshot_id}: image holds {install.received} records, "
                f"its header said {install.records}"
            )
        self._swap_in(seq, install)
        return True

    def _swap_in(self, seq: int, install: _Install) -> None:
        """Make the collected image the live state: position, term and lineage with it."""
        side = self._open_side()
        done = WriteBatch(raw_mode=True)
        done.put(_APPLIED, _U64.pack(seq))
        done.put(_TERM, _U64.pack(self.term))
        done.put(_LINEAGE, install.lineage.model_dump_json().encode())
        side.write(done)
        side.close()
        self._side = None
        self._db.close()
        old = self.path.with_name(self.path.name + ".old")
        self.path.rename(old)
        crash_point("restore.swap")  # the worst moment: neither state is at `path`
        self._side_path.rename(self.path)
        self._db = Rdict(str(self.path), options=Options(raw_mode=True))
        Rdict.destroy(str(old), Options(raw_mode=True))

    def _write_position(self, seq: int, install: _Install | None) -> None:
        batch = WriteBatch(raw_mode=True)
        batch.put(_APPLIED, _U64.pack(seq))
        batch.delete(_APPLIED_ID)
        if install is None:
            batch.delete(_INSTALL)
        else:
            batch.put(_INSTALL, install.model_dump_json().encode())
        self._db.write(batch)

    def _check_next(self, seq: int) -> None:
        if seq <= self.applied_seq:
            raise ValueError(f"sequence {seq} already applied (at {self.applied_seq})")

    @property
    def _side_path(self) -> Path:
        return self.path.with_name(self.path.name + ".restoring")

    def _open_side(self) -> Rdict:
        if self._side is None:
            self._side = Rdict(str(self._side_path), options=Options(raw_mode=True))
        return self._side

    def _drop_side(self) -> None:
        if self._side is not None:
            self._side.close()
            self._side = None
        if self._side_path.exists():
            Rdict.destroy(str(self._side_path), Options(raw_mode=True))

    @staticmethod
    def _recover_swap(path: Path) -> None:
        """Finish or undo a swap a crash interrupted (see `_swap_in`)."""
        old = path.with_name(path.name + ".old")
        if not old.exists():
            return
        if path.exists():  # the image is live: the old state is garbage
            Rdict.destroy(str(old), Options(raw_mode=True))
        else:  # crashed between the renames: the old state is still the truth
            old.rename(path)

    def reset(self) -> None:
        """Wipe everything (records, replies, position): the next apply is seq 1 again.

        For a projection that is ahead of, or differs from, its journal: the journal
        is the truth and the projection is rebuilt from it.
        """
        self._drop_side()
        self._db.close()
        Rdict.destroy(str(self.path), Options(raw_mode=True))
        self._db = Rdict(str(self.path), options=Options(raw_mode=True))

    def check_seals(self) -> int:
        """Verify every inode and dentry record's checksum without parsing it (a loaded
        snapshot image: its records were parsed when they were applied); returns the
        number of inodes. Raises CorruptRecord for the first bad one."""
        inodes = 0
        for prefix in (_INODE, _DENTRY):
            for item_key, item_value in self._db.items(from_key=prefix):
                key = cast(bytes, item_key)
                if not key.startswith(prefix):
                    break
                raw = cast(bytes, item_value)
                if not seal_holds(raw):
                    kind, number, name = key_record(key)
                    check_seal(
                        raw, f"Inode {number}" if kind == "inode" else f"Dentry {number}/{name}"
                    )
                inodes += prefix == _INODE
        return inodes

    def to_memory(self) -> MemoryShard:
        """Every record, checksums verified, as a MemoryShard (checks and comparisons)."""
        out = MemoryShard(self.shard)
        for inode in self.scan_inodes():
            out.put_inode(inode)
        for dentry in self.scan_dentries():
            out.put_dentry(dentry)
        out.set_next_local(self.next_local())
        return out

    def raw_put(self, key: bytes, value: bytes) -> None:
        """For fault-injection tests only: write bytes under a key, bypassing sealing."""
        self._db[key] = value

    def raw_get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        return value

    @staticmethod
    def inode_key(ino: int) -> bytes:
        return _inode_key(ino)

    def _int(self, key: bytes, default: int) -> int:
        raw = self._db.get(key)
        return int(_U64.unpack(raw)[0]) if raw is not None else default

    def _checked(self, read: Callable[[], T]) -> T:
        try:
            return read()
        except CorruptRecord as exc:
            if self._on_corruption is not None:
                self._on_corruption(exc)
            raise


class _Install(BaseModel):
    """Progress of a restore whose image chunks are arriving through the journal."""

    snapshot_id: str
    chunks: int
    records: int
    lineage: Lineage
    next_chunk: int = 0
    received: int = 0


class _Batch:
    """`ShardWriter` into a rocksdict WriteBatch (and an inode count delta).

    Records are sealed once per batch, in `finish`: a group commit of many creates in
    one directory rewrites that directory's inode once per create, and only the last
    version is stored.
    """

    def __init__(self, projection: Projection, seq: int) -> None:
        self._projection = projection
        self._seq = _U64.pack(seq)
        self.wb = WriteBatch(raw_mode=True)
        self.inode_delta = 0
        self._seen: dict[int, bool] = {}
        self._records: dict[bytes, Inode | Dentry | None] = {}

    def _exists(self, ino: int) -> bool:
        if ino not in self._seen:
            self._seen[ino] = self._projection.raw_get(_inode_key(ino)) is not None
        return self._seen[ino]

    def finish(self) -> WriteBatch:
        for key, record in self._records.items():
            if record is None:
                self.wb.delete(key)
            else:
                self.wb.put(key, seal(record))
        self._records.clear()
        return self.wb

    def put_inode(self, inode: Inode) -> None:
        if not self._exists(inode.ino):
            self.inode_delta += 1
            self._seen[inode.ino] = True
        self._records[_inode_key(inode.ino)] = inode

    def del_inode(self, ino: int) -> None:
        if self._exists(ino):
            self.inode_delta -= 1
            self._seen[ino] = False
        self._records[_inode_key(ino)] = None

    def put_dentry(self, dentry: Dentry) -> None:
        self._records[_dentry_key(dentry.parent, dentry.name)] = dentry

    def del_dentry(self, parent: int, name: str) -> None:
        self._records[_dentry_key(parent, name)] = None

    def set_next_local(self, value: int) -> None:
        self.wb.put(_LOCAL, _U64.pack(value))

    def record_reply(self, op_id: str, reply: Reply) -> None:
        self.wb.put(_REPLY + op_id.encode(), reply.model_dump_json().encode())
        self.wb.put(_REPLY_BY_SEQ + self._seq + op_id.encode(), b"")

    def put_tx(self, tx: TxRecord) -> None:
        self.wb.put(_TX + tx.tx_id.encode(), tx.model_dump_json().encode())

    def set_remote_applied(self, peer: str, seq: int) -> None:
        self.wb.put(_REMOTE + peer.encode(), _U64.pack(seq))

    def put_tombstone(self, deleted: DelInode) -> None:
        ino = _U64.pack(deleted.ino)
        self.wb.put(_TOMB + ino, deleted.model_dump_json().encode())
        self.wb.put(_TOMB_BY_SEQ + self._seq + ino, b"")

    def clear_tx(self, tx_id: str) -> None:
        self.wb.delete(_TX + tx_id.encode())
