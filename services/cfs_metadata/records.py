"""Stored form of records: `crc32 (4 bytes, big endian) || canonical JSON`.

The checksum is verified on every read: a flipped bit on disk or in RAM becomes
an EIO with `Inode <n> checksum mismatch: expected 0x…, got 0x…`, never a wrong
answer (DESIGN.md §4).
"""

from __future__ import annotations

import zlib
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from cfs_contracts.fs.records import Dentry, Inode

M = TypeVar("M", bound=BaseModel)


class CorruptRecord(Exception):
    """A stored record failed its checksum or does not parse."""

    def __init__(self, what: str, expected: int, actual: int, detail: str = "") -> None:
        super().__init__(
            f"{what} checksum mismatch: expected 0x{expected:08x}, got 0x{actual:08x}"
            + (f" ({detail})" if detail else "")
        )
        self.what = what
        self.expected = expected
        self.actual = actual


def seal(record: BaseModel) -> bytes:
    body = record.model_dump_json().encode()
    return zlib.crc32(body).to_bytes(4) + body


def unseal_inode(raw: bytes, ino: int) -> Inode:
    return _unseal(raw, Inode, f"Inode {ino}")


def unseal_dentry(raw: bytes, parent: int, name: str) -> Dentry:
    return _unseal(raw, Dentry, f"Dentry {parent}/{name}")


def seal_holds(raw: bytes) -> bool:
    return len(raw) >= 4 and zlib.crc32(raw[4:]) == int.from_bytes(raw[:4])


def check_seal(raw: bytes, what: str) -> tuple[int, bytes]:
    """The checksum and body of a stored record whose checksum holds; else CorruptRecord."""
    if len(raw) < 4:
        raise CorruptRecord(what, 0, 0, f"record truncated to {len(raw)} bytes")
    expected, body = int.from_bytes(raw[:4]), raw[4:]
    actual = zlib.crc32(body)
    if actual != expected:
        raise CorruptRecord(what, expected, actual)
    return expected, body


def _unseal(raw: bytes, model: type[M], what: str) -> M:
    checksum, body = check_seal(raw, what)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        detail = f"does not parse: {exc.errors()[0]['msg']}"
        raise CorruptRecord(what, checksum, checksum, detail) from None
