"""The byte format of a shard image (snapshots, restores): length-prefixed pairs.

Keys and values are the projection's own, values still sealed with their
checksums, so a restored record is verified on its first read like any other.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Iterator

_LEN = struct.Struct(">I")

CHUNK_BYTES = 512 * 1024  # one journal message each (base64 keeps it under 1 MiB)


class ImageFormatError(ValueError):
    """The bytes are not a sequence of complete key/value pairs."""


def encode_pairs(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(_LEN.pack(len(k)) + k + _LEN.pack(len(v)) + v for k, v in pairs)


def iter_pairs(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    view = memoryview(data)
    at = 0
    end = len(data)
    while at < end:
        if at + 4 > end:
            raise ImageFormatError(f"truncated key length at byte {at}")
        (klen,) = _LEN.unpack_from(view, at)
        at += 4
        key = bytes(view[at : at + klen])
        at += klen
        if at + 4 > end:
            raise ImageFormatError(f"truncated value length at byte {at}")
        (vlen,) = _LEN.unpack_from(view, at)
        at += 4
        if at + vlen > end:
            raise ImageFormatError(f"truncated value at byte {at}")
        yield key, bytes(view[at : at + vlen])
        at += vlen


def decode_pairs(data_b64: str) -> Iterator[tuple[bytes, bytes]]:
    return iter_pairs(base64.b64decode(data_b64))


def split_chunks(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    """Cut an image at pair boundaries into pieces of about `chunk_bytes` each."""
    chunks: list[bytes] = []
    start = at = 0
    end = len(data)
    while at < end:
        (klen,) = _LEN.unpack_from(data, at)
        (vlen,) = _LEN.unpack_from(data, at + 4 + klen)
        at += 8 + klen + vlen
        if at - start >= chunk_bytes:
            chunks.append(data[start:at])
            start = at
    if start < end or not chunks:
        chunks.append(data[start:end])
    return chunks
