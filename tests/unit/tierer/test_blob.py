"""The tier blob format: every chunk comes back byte-identical through its index (the
footer alone, as after total loss), any flipped byte is caught, a blob whose footer
is gone is still readable record by record."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cfs_tierer.blob import (
    TAIL_BYTES,
    BlobBuilder,
    BlobError,
    chunk_bytes,
    index_range,
    parse_index,
    read_index,
    scan,
)

chunks = st.dictionaries(
    st.text("0123456789abcdef", min_size=1, max_size=64),
    st.binary(max_size=2048),
    max_size=12,
)


def _blob(contents: dict[str, bytes], blob_id: str = "b1") -> bytes:
    builder = BlobBuilder(blob_id)
    for chunk_id, data in contents.items():
        builder.add(chunk_id, data)
    blob, _ = builder.seal()
    return blob


@given(chunks)
def test_every_chunk_reads_back_through_the_footer_index(contents: dict[str, bytes]) -> None:
    blob = _blob(contents)
    # As a reader with ranged GETs does it: the tail, then the index, then each chunk.
    offset, length, digest = index_range(blob[-TAIL_BYTES:], len(blob))
    index = parse_index(blob[offset : offset + length], digest, "b1")
    assert index == read_index(blob, "b1")
    got = {e.chunk_id: chunk_bytes(blob[e.offset : e.offset + e.length], e) for e in index.entries}
    assert got == contents
    assert list(scan(blob, "b1")) == list(index.entries)  # the records say the same


@given(chunks.filter(lambda c: any(c.values())), st.data())
def test_a_flipped_byte_in_a_chunk_is_refused(
    contents: dict[str, bytes], data: st.DataObject
) -> None:
    blob = bytearray(_blob(contents))
    index = read_index(bytes(blob), "b1")
    entry = data.draw(st.sampled_from([e for e in index.entries if e.length]))
    at = entry.offset + data.draw(st.integers(0, entry.length - 1))
    blob[at] ^= 0x40
    with pytest.raises(BlobError, match=f"chunk {entry.chunk_id} checksum mismatch"):
        chunk_bytes(bytes(blob[entry.offset : entry.offset + entry.length]), entry)


def test_a_damaged_index_or_footer_is_refused_with_the_reason() -> None:
    blob = _blob({"aa": b"x" * 100, "bb": b"y" * 50})
    flipped = bytearray(blob)
    flipped[-TAIL_BYTES - 5] ^= 0x01  # inside the index JSON
    with pytest.raises(BlobError, match="index checksum mismatch"):
        read_index(bytes(flipped), "b1")
    with pytest.raises(BlobError, match="no blob footer"):
        read_index(blob[:-1], "b1")
    newer = bytearray(blob)
    newer[-1] = 9
    with pytest.raises(BlobError, match="format 9 is newer"):
        read_index(bytes(newer), "b1")
    with pytest.raises(BlobError, match="names blob b1"):
        read_index(blob, "other")


def test_without_its_footer_a_blob_is_read_record_by_record() -> None:
    contents = {"aa": b"x" * 100, "bb": b"y" * 50, "cc": b""}
    blob = _blob(contents)
    entries = read_index(blob, "b1").entries
    records = blob[: entries[-1].offset + entries[-1].length]  # the footer is lost
    assert [e.chunk_id for e in scan(records, "b1")] == ["aa", "bb", "cc"]
    second = entries[0].offset + entries[0].length  # where bb's record starts
    found = []
    with pytest.raises(BlobError, match=rf"record at byte {second} is damaged"):
        for entry in scan(blob[: entries[1].offset + 10], "b1"):  # bb cut mid-data
            found.append(entry.chunk_id)
    assert found == ["aa"]


def test_a_chunk_id_is_packed_once_and_sizes_add_up() -> None:
    builder = BlobBuilder("b2")
    entry = builder.add("aa", b"hello")
    assert entry.sha256 == hashlib.sha256(b"hello").hexdigest()
    with pytest.raises(BlobError, match="already in blob b2"):
        builder.add("aa", b"again")
    blob, index = builder.seal()
    assert len(builder) == 1 and builder.size < len(blob)
    assert index.entries == (entry,)
